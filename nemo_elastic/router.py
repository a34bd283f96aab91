"""Budget router (paper-digest §5): a target budget -> a differentiable sub-network choice.

One small MLP per axis (hidden, Mamba heads, Mamba head channels, attention heads, FFN, depth)
maps the one-hot of the target budget to logits over that axis's choice list; Gumbel-Softmax
with an annealed temperature and a growing logit scale turns them into probabilities, and the
probabilities become a `SoftSubNetwork` (masks = sum_i p_i * prefix(c_i), or the chosen prefix
scaled by its probability).  Heterogeneous axes emit one choice per layer of their type.

Depth: the choice is the number of layers kept; with the layer ranking from `prepare` (least
important first) layer j's keep weight is sum over choices L of p_L * [rank(j) >= N - L].

Every tensor- and pipeline-parallel rank of a replica must draw the same sub-network: the Gumbel
noise comes from a generator seeded with (seed, iteration, micro-batch), never from the global
RNG.  The budget loss (Flextron/Megatron-LM form) is |E[params] / (budget * params_full) - 1|,
zero inside a tolerance band, plus 10 x MSE(probs, one-hot(full)) for the full budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from nemo_elastic.budget import count_parameters
from nemo_elastic.config import (ATTENTION, MAMBA, MLP, ConfigError, ModelConfig,
                                 require_positive)
from nemo_elastic.elastic.cost import expected_parameters
from nemo_elastic.elastic.masks import MODES, SoftAxis, SoftLayer, SoftSubNetwork

# axis name -> (layer symbol it lives on or None for global, SubNetwork field, group divisor)
AXES = {
    "hidden": (None, "hidden_size", None),
    "mamba_heads": (MAMBA, "mamba_num_heads", "mamba_num_groups"),
    "mamba_head_dim": (MAMBA, "mamba_head_dim", None),
    "attention_heads": (ATTENTION, "num_attention_heads", "num_query_groups"),
    "ffn": (MLP, "ffn_hidden_size", None),
}


@dataclass(kw_only=True)
class RouterConfig:
    budgets: Sequence[float] = (1.0, 0.75, 0.5)  # fractions of the parent's parameters
    width_fractions: Sequence[float] = (1.0, 0.875, 0.75, 0.625, 0.5)  # choices per width axis
    axes: Sequence[str] = ("hidden", "mamba_heads", "attention_heads", "ffn")
    heterogeneous: Sequence[str] = ()  # axes with one choice per layer
    depth_choices: Sequence[int] = ()  # numbers of kept layers; () = depth not elastic
    hidden_dim: int = 256
    init_std: float = 0.1
    tau_start: float = 1.0
    tau_end: float = 0.05
    scale_start: float = 1.0
    scale_end: float = 10.0
    anneal_iters: int = 1000
    mode: str = "mixture"  # mixture | scaled
    tolerance: float = 0.05  # relative budget dead band
    full_budget_weight: float = 10.0
    seed: int = 1234

    def __post_init__(self) -> None:
        p = "router."
        if not self.budgets or any(not 0 < b <= 1 for b in self.budgets):
            raise ConfigError(f"{p}budgets={list(self.budgets)}: need fractions in (0, 1]")
        bad = sorted(set(self.axes) - set(AXES))
        if bad:
            raise ConfigError(f"{p}axes={list(self.axes)}: unknown {bad}; valid: {list(AXES)}")
        if not set(self.heterogeneous) <= set(self.axes) - {"hidden"}:
            raise ConfigError(f"{p}heterogeneous={list(self.heterogeneous)}: must be a subset "
                              "of the elastic axes, without 'hidden' (the hidden size is global)")
        if not self.width_fractions or any(not 0 < f <= 1 for f in self.width_fractions):
            raise ConfigError(f"{p}width_fractions={list(self.width_fractions)}: need (0, 1]")
        if self.mode not in MODES:
            raise ConfigError(f"{p}mode={self.mode!r}: must be one of {MODES}")
        require_positive(self, "hidden_dim", "anneal_iters", prefix=p)
        if not (0 < self.tau_end <= self.tau_start):
            raise ConfigError(f"{p}tau_end={self.tau_end}: must be in (0, tau_start]")


def axis_choices(model: ModelConfig, axis: str, fractions: Sequence[float],
                 layer: Optional[int] = None) -> list[int]:
    """Distinct sizes, largest first, at `fractions` of the parent's size, rounded to a multiple
    of the axis's group count (heads per group stay equal)."""
    _, field_name, divisor_name = AXES[axis]
    full = model.layer_size(field_name, layer) if layer is not None else getattr(model, field_name)
    step = getattr(model, divisor_name) if divisor_name else 1
    sizes = {max(step, int(round(full * f / step)) * step) for f in fractions}
    return sorted(sizes, reverse=True)


class _AxisRouter(nn.Module):
    """one-hot(budget) [n_budgets] -> logits [n_outputs, n_choices] (LeakyReLU MLP, no bias)."""

    def __init__(self, n_budgets: int, hidden: int, n_outputs: int, n_choices: int, std: float):
        super().__init__()
        self.n_outputs, self.n_choices = n_outputs, n_choices
        self.net = nn.Sequential(nn.Linear(n_budgets, hidden, bias=False), nn.LeakyReLU(0.1),
                                 nn.Linear(hidden, n_outputs * n_choices, bias=False))
        for layer in (self.net[0], self.net[2]):
            nn.init.normal_(layer.weight, std=std)

    def forward(self, one_hot: torch.Tensor) -> torch.Tensor:
        return self.net(one_hot).view(self.n_outputs, self.n_choices)


@dataclass
class RouterOutput:
    subnetwork: SoftSubNetwork
    probs: dict[str, torch.Tensor] = field(default_factory=dict)  # axis -> [n_outputs, n_choices]


class ElasticRouter(nn.Module):
    def __init__(self, model: ModelConfig, config: RouterConfig,
                 layer_ranking: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        self.model, self.config = model, config
        symbols = model.layer_symbols
        self.choices: dict[str, list] = {}
        self.layers_of: dict[str, list[int]] = {}
        routers = {}
        for axis in config.axes:
            symbol = AXES[axis][0]
            layers = [i for i, s in enumerate(symbols) if s == symbol] if symbol else []
            if symbol and not layers:
                continue  # e.g. no attention layer in the pattern
            self.layers_of[axis] = layers
            per_layer = axis in config.heterogeneous
            ref = layers[0] if layers else None
            self.choices[axis] = axis_choices(model, axis, config.width_fractions, ref)
            n_out = len(layers) if per_layer else 1
            routers[axis] = _AxisRouter(len(config.budgets), config.hidden_dim, n_out,
                                        len(self.choices[axis]), config.init_std)
        if config.depth_choices:
            if layer_ranking is None or sorted(layer_ranking) != list(range(len(symbols))):
                raise ConfigError("router.depth_choices needs the layer ranking from `prepare` "
                                  "(a permutation of all layer indices, least important first)")
            bad = [c for c in config.depth_choices if not 1 <= c <= len(symbols)]
            if bad:
                raise ConfigError(f"router.depth_choices={list(config.depth_choices)}: {bad} "
                                  f"outside [1, {len(symbols)}]")
            self.choices["depth"] = sorted(set(config.depth_choices), reverse=True)
            # rank[j]: position of layer j in the removal order (0 = dropped first)
            self.register_buffer("rank", torch.tensor(
                [list(layer_ranking).index(j) for j in range(len(symbols))]), persistent=False)
            routers["depth"] = _AxisRouter(len(config.budgets), config.hidden_dim, 1,
                                           len(self.choices["depth"]), config.init_std)
        self.routers = nn.ModuleDict(routers)
        self.full_parameters = count_parameters(model)

    # ------------------------------------------------------------------ schedules
    def temperature(self, iteration: int) -> float:
        c = self.config
        t = min(iteration, c.anneal_iters) / c.anneal_iters
        return c.tau_start * (c.tau_end / c.tau_start) ** t  # exponential: tau_start -> tau_end

    def logit_scale(self, iteration: int) -> float:
        c = self.config
        t = min(iteration, c.anneal_iters) / c.anneal_iters
        return c.scale_start + (c.scale_end - c.scale_start) * t

    # ------------------------------------------------------------------ forward
    def forward(self, budget_index: int, *, iteration: int = 0, micro_batch: int = 0,
                noise: bool = True) -> RouterOutput:
        """Soft sub-network for budget `budget_index` (index into config.budgets).

        Noise depends only on (seed, iteration, micro_batch, axis): identical on every
        tensor/pipeline-parallel rank.  noise=False: plain softmax at the current temperature.
        """
        n = len(self.config.budgets)
        if not 0 <= budget_index < n:
            raise ValueError(f"budget_index={budget_index}: must be in [0, {n})")
        param = next(self.parameters())
        one_hot = torch.zeros(n, dtype=param.dtype, device=param.device)
        one_hot[budget_index] = 1.0
        tau, scale = self.temperature(iteration), self.logit_scale(iteration)
        probs = {}
        for k, (axis, router) in enumerate(self.routers.items()):
            logits = router(one_hot) * scale
            if noise:
                gen = torch.Generator().manual_seed(
                    hash((self.config.seed, iteration, micro_batch, k)) % (2**63))
                u = torch.rand(logits.shape, generator=gen, dtype=torch.float64)
                gumbel = -torch.log(-torch.log(u.clamp(1e-12, 1 - 1e-12)))
                logits = logits + gumbel.to(logits)
            probs[axis] = torch.softmax(logits / tau, dim=-1)
        return RouterOutput(subnetwork=self._soft_subnetwork(probs), probs=probs)

    def _soft_subnetwork(self, probs: dict[str, torch.Tensor]) -> SoftSubNetwork:
        m, mode = self.model, self.config.mode
        axis_of = lambda axis, row: SoftAxis(self.choices[axis], probs[axis][row], mode)  # noqa: E731
        hidden = axis_of("hidden", 0) if "hidden" in probs else m.hidden_size
        keep = [True] * m.num_layers
        if "depth" in probs:
            kept_counts = torch.tensor(self.choices["depth"], device=self.rank.device)
            # kept[j, i] = layer j survives when choice i keeps kept_counts[i] layers
            kept = (self.rank[:, None] >= m.num_layers - kept_counts[None, :]).to(probs["depth"])
            keep = list(kept @ probs["depth"][0])
        layers = []
        for i, sym in enumerate(m.layer_symbols):
            sizes = {}
            for axis, (symbol, field_name, _) in AXES.items():
                if symbol != sym:
                    continue
                if axis in probs:
                    row = self.layers_of[axis].index(i) if axis in self.config.heterogeneous else 0
                    sizes[field_name] = axis_of(axis, row)
                else:
                    sizes[field_name] = m.layer_size(field_name, i)
            layers.append(SoftLayer(keep=keep[i], **sizes))
        return SoftSubNetwork(hidden_size=hidden, layers=layers)

    # ------------------------------------------------------------------ loss
    def budget_loss(self, output: RouterOutput, budget_index: int) -> torch.Tensor:
        """|E[params] / (budget * params_full) - 1| outside the tolerance band (0 inside);
        the full budget adds weight x MSE(probs, one-hot of the largest choice)."""
        budget = self.config.budgets[budget_index]
        params = expected_parameters(self.model, output.subnetwork)
        deviation = (params / (budget * self.full_parameters) - 1.0).abs()
        loss = torch.where(deviation < self.config.tolerance, torch.zeros_like(deviation),
                           deviation)
        if math.isclose(budget, 1.0):
            for probs in output.probs.values():
                target = torch.zeros_like(probs)
                target[:, 0] = 1.0  # choices are sorted largest first
                loss = loss + self.config.full_budget_weight * ((probs - target) ** 2).mean()
        return loss
