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

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from nemo_elastic import cost_model
from nemo_elastic.config import ConfigError, ModelConfig
from nemo_elastic.config_elastic import ROUTER_MODES, ElasticConfig
from nemo_elastic.elastic.expected_cost import expected_parameters
from nemo_elastic.elastic.masks import SoftAxis, SoftLayer, SoftSubNetwork, hard_scale
from nemo_elastic.elastic.subnet import SubNetwork
from nemo_elastic.sizes import ELASTIC_AXES, GROUPED


def axis_choices(model: ModelConfig, axis: str, fractions: Sequence[float],
                 layer: Optional[int] = None) -> list[int]:
    """Distinct sizes, largest first, at `fractions` of the parent's size, rounded to a multiple
    of the axis's group count (heads per group stay equal)."""
    _, field_name = ELASTIC_AXES[axis]
    divisor_name = GROUPED.get(field_name)
    full = model.layer_size(field_name, layer) if layer is not None else getattr(model, field_name)
    step = getattr(model, divisor_name) if divisor_name else 1
    sizes = {max(step, int(round(full * f / step)) * step) for f in fractions}
    if field_name == "num_moe_experts":  # every token is routed to top-k experts
        sizes = {max(model.moe.moe_router_topk, s) for s in sizes}
    return sorted(sizes, reverse=True)


# state-dict key prefix of the router.init=zero_shot logit offsets (one buffer per axis)
PRIOR_PREFIX = "prior_"
# router.family_choice=in_band searches with these axes at the argmax first
AXES_KEPT_FIRST = ("hidden", "depth")


class _AxisRouter(nn.Module):
    """one-hot(budget) [n_budgets] -> logits [n_outputs, n_choices] (LeakyReLU MLP, no bias)."""

    def __init__(self, n_budgets: int, hidden: int, n_outputs: int, n_choices: int, std: float,
                 generator: torch.Generator):
        super().__init__()
        self.n_outputs, self.n_choices = n_outputs, n_choices
        self.net = nn.Sequential(nn.Linear(n_budgets, hidden, bias=False), nn.LeakyReLU(0.1),
                                 nn.Linear(hidden, n_outputs * n_choices, bias=False))
        with torch.no_grad():
            for layer in (self.net[0], self.net[2]):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * std)

    def forward(self, one_hot: torch.Tensor) -> torch.Tensor:
        return self.net(one_hot).view(self.n_outputs, self.n_choices)


@dataclass
class RouterOutput:
    subnetwork: SoftSubNetwork
    probs: dict[str, torch.Tensor] = field(default_factory=dict)  # axis -> [n_outputs, n_choices]
    # axis -> the MLP's logits [n_outputs, n_choices] before scale, noise and temperature
    raw_logits: dict[str, torch.Tensor] = field(default_factory=dict)


class ElasticRouter(nn.Module):
    """Budget -> soft sub-network.  `total_iters`: the whole run (all curriculum stages), over
    which tau and the logit scale anneal; `layer_ranking` (from `prepare`, least important
    first) is needed when depth is elastic."""

    def __init__(self, model: ModelConfig, config: ElasticConfig, *, total_iters: int,
                 layer_ranking: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        self.model, self.config, self.total_iters = model, config, max(1, int(total_iters))
        self.names = config.budget_names
        self.mode = ROUTER_MODES[config.router.mode]
        symbols = model.layer_symbols
        self.choices: dict[str, list] = {}
        self.layers_of: dict[str, list[int]] = {}
        # Identical initial weights on every rank without touching the global RNG (ranks of a
        # pipeline each build a copy; they must agree).
        gen = torch.Generator().manual_seed(config.seed)
        routers = {}
        n_budgets, r = len(self.names), config.router
        for axis in config.axes:
            symbol = ELASTIC_AXES[axis][0]
            layers = [i for i, s in enumerate(symbols) if s == symbol] if symbol else []
            if symbol and not layers:
                continue  # e.g. no attention layer in the pattern
            if layers and model.layer_size(ELASTIC_AXES[axis][1], layers[0]) is None:
                continue  # e.g. moe_shared_ffn of a MoE without shared expert
            self.layers_of[axis] = layers
            ref = layers[0] if layers else None
            explicit = config.choices.get(axis)
            self.choices[axis] = sorted(set(explicit), reverse=True) if explicit else \
                axis_choices(model, axis, config.width_fractions, ref)
            n_out = len(layers) if axis in config.heterogeneous else 1
            routers[axis] = _AxisRouter(n_budgets, r.hidden_dim, n_out, len(self.choices[axis]),
                                        r.init_std, gen)
        if config.depth_choices:
            if layer_ranking is None or sorted(layer_ranking) != list(range(len(symbols))):
                raise ConfigError(
                    f"elastic.depth_choices={list(config.depth_choices)} needs the layer ranking "
                    "from `prepare` (ranking.json next to the prepared checkpoint: a permutation "
                    "of all layer indices, least important first); run `nemo-elastic prepare`")
            self.choices["depth"] = sorted(set(config.depth_choices), reverse=True)
            # rank[j]: position of layer j in the removal order (0 = dropped first)
            self.register_buffer("rank", torch.tensor(
                [list(layer_ranking).index(j) for j in range(len(symbols))]), persistent=False)
            routers["depth"] = _AxisRouter(n_budgets, r.hidden_dim, 1,
                                           len(self.choices["depth"]), r.init_std, gen)
        if not routers:
            raise ConfigError(f"elastic.axes={list(config.axes)}: none of these axes exists in "
                              f"model.hybrid_layer_pattern={model.hybrid_layer_pattern!r}")
        self.routers = nn.ModuleDict(routers)
        # router.init=zero_shot: a fixed logit offset per (budget, axis) [n_budgets, n_outputs,
        # n_choices], added to the MLP's logits; zero until `set_prior` (before the first
        # iteration), then restored with the router's state on resume.
        self.has_prior = r.init == "zero_shot"
        if self.has_prior:
            for axis, router in routers.items():
                self.register_buffer(PRIOR_PREFIX + axis,
                                     torch.zeros(n_budgets, router.n_outputs, router.n_choices))
        self.full_parameters = cost_model.count_parameters(model)
        self.full_active = cost_model.count_active_parameters(model)
        self.memory_spec = cost_model.MemorySpec(**config.memory) \
            if config.budget_type == "memory" else None
        self.active = config.budget_type == "active"  # fractions of the active parameters
        self.full_cost = float(self.cost_of(SubNetwork.full(model)))
        # Target cost of each budget, in the cost's unit (parameters, active parameters, bytes).
        unit = cost_model.GB if self.memory_spec is not None else self.full_cost
        self.targets = [float(config.budgets[n]) * unit for n in self.names]

    # ------------------------------------------------------------------ costs
    def cost_of(self, subnetwork) -> float:
        """Parameters (active parameters, or memory in bytes) of a hard SubNetwork."""
        if self.memory_spec is not None:
            return cost_model.subnetwork_memory(self.model, subnetwork, self.memory_spec)
        if self.active:
            return cost_model.subnetwork_active_parameters(self.model, subnetwork)
        return cost_model.subnetwork_parameters(self.model, subnetwork)

    def expected_cost(self, soft: SoftSubNetwork) -> torch.Tensor:
        if self.memory_spec is not None:
            from nemo_elastic.elastic.expected_cost import expected_memory

            return expected_memory(self.model, soft, self.memory_spec)
        if self.active:
            from nemo_elastic.elastic.expected_cost import expected_active_parameters

            return expected_active_parameters(self.model, soft)
        return expected_parameters(self.model, soft)

    def is_full(self, budget_index: int) -> bool:
        """The budget asks for the whole parent (the identity term applies)."""
        return self.targets[budget_index] >= self.full_cost * (1 - 1e-9)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ConfigError(f"budget {name!r} is not trained; budgets: {self.names}") from None

    # ------------------------------------------------------------------ schedules
    def temperature(self, iteration: int) -> float:
        c = self.config.router
        t = min(iteration, self.total_iters) / self.total_iters
        return c.tau_start * (c.tau_end / c.tau_start) ** t  # exponential: tau_start -> tau_end

    def logit_scale(self, iteration: int) -> float:
        c = self.config.router
        t = min(iteration, self.total_iters) / self.total_iters
        return c.scale_start + (c.scale_end - c.scale_start) * t

    # ------------------------------------------------------------------ forward
    def forward(self, budget_index: int, *, iteration: int = 0, micro_batch: int = 0,
                noise: bool = True) -> RouterOutput:
        """Soft sub-network for budget `budget_index` (index into config.budgets).

        Noise depends only on (seed, iteration, micro_batch, axis): identical on every
        tensor/pipeline-parallel rank.  noise=False: plain softmax at the current temperature.
        """
        n = len(self.names)
        if not 0 <= budget_index < n:
            raise ValueError(f"budget_index={budget_index}: must be in [0, {n})")
        param = next(self.parameters())
        one_hot = torch.zeros(n, dtype=param.dtype, device=param.device)
        one_hot[budget_index] = 1.0
        tau, scale = self.temperature(iteration), self.logit_scale(iteration)
        probs, raw = {}, {}
        for k, (axis, router) in enumerate(self.routers.items()):
            raw[axis] = router(one_hot)
            if self.has_prior:
                raw[axis] = raw[axis] + getattr(self, PRIOR_PREFIX + axis)[budget_index]
            logits = raw[axis] * scale
            if noise:
                gen = torch.Generator().manual_seed(
                    hash((self.config.seed, iteration, micro_batch, k)) % (2**63))
                u = torch.rand(logits.shape, generator=gen, dtype=torch.float64)
                gumbel = -torch.log(-torch.log(u.clamp(1e-12, 1 - 1e-12)))
                logits = logits + gumbel.to(logits)
            probs[axis] = torch.softmax(logits / tau, dim=-1)
        return RouterOutput(subnetwork=self._soft_subnetwork(probs), probs=probs, raw_logits=raw)

    def _soft_subnetwork(self, probs: dict[str, torch.Tensor]) -> SoftSubNetwork:
        m, mode = self.model, self.mode
        straight = self.config.router.hard_scale == "straight_through"
        axis_of = lambda axis, row: SoftAxis(self.choices[axis], probs[axis][row], mode,  # noqa: E731
                                             straight_through=straight)
        hidden = axis_of("hidden", 0) if "hidden" in probs else m.hidden_size
        keep, expected, hard_keep = [True] * m.num_layers, [None] * m.num_layers, \
            [None] * m.num_layers
        if "depth" in probs:
            p = probs["depth"][0]
            kept_counts = torch.tensor(self.choices["depth"], device=self.rank.device)
            # kept[j, i] = layer j survives when choice i keeps kept_counts[i] layers
            kept = (self.rank[:, None] >= m.num_layers - kept_counts[None, :]).to(p)
            expected = list(kept @ p)  # survival probability of each layer (the cost's)
            best = int(torch.argmax(p.detach()))
            hard_keep = [bool(k) for k in kept[:, best]]
            if mode == "mixture":
                keep = expected
            else:  # hard: the argmax choice's layers, scaled by its probability; others not run
                keep = [hard_scale(p[best], straight) if k else False for k in hard_keep]
        layers = []
        for i, sym in enumerate(m.layer_symbols):
            sizes = {}
            for axis, (symbol, field_name) in ELASTIC_AXES.items():
                if symbol != sym:
                    continue
                if axis in probs:
                    row = self.layers_of[axis].index(i) if axis in self.config.heterogeneous else 0
                    sizes[field_name] = axis_of(axis, row)
                else:
                    sizes[field_name] = m.layer_size(field_name, i)
            layers.append(SoftLayer(keep=keep[i], expected_keep=expected[i],
                                    hard_keep=hard_keep[i], **sizes))
        return SoftSubNetwork(hidden_size=hidden, layers=layers)

    def hard_subnetwork(self, indices: dict[str, Sequence[int]]) -> SubNetwork:
        """The SubNetwork of choice indices: {axis: one index per output row} (axes left out
        keep their largest choice, index 0)."""
        probs, device = {}, next(self.parameters()).device
        for axis, router in self.routers.items():
            p = torch.zeros(router.n_outputs, router.n_choices, device=device)
            rows = indices.get(axis, [0] * router.n_outputs)
            p[torch.arange(router.n_outputs), torch.as_tensor(list(rows))] = 1.0
            probs[axis] = p
        return self._soft_subnetwork(probs).hard()

    @torch.no_grad()
    def set_prior(self, choices: dict[str, dict[str, Sequence[int]]], margin: float) -> None:
        """router.init=zero_shot: budget name -> {axis: index per row} gets `margin` on those
        logits (budgets left out: no offset).  Only before training: the offset is fixed."""
        if not self.has_prior:
            raise ValueError("set_prior needs elastic.router.init=zero_shot (no prior buffers)")
        for axis in self.routers:
            buf = getattr(self, PRIOR_PREFIX + axis)
            buf.zero_()
            for name, idx in choices.items():
                rows = idx.get(axis, [0] * buf.shape[1])
                buf[self.index(name), torch.arange(buf.shape[1]), torch.as_tensor(list(rows))] = \
                    float(margin)

    # ------------------------------------------------------------------ loss
    def budget_loss(self, output: RouterOutput, budget_index: int) -> torch.Tensor:
        """|E[cost] / target - 1| outside the band (0 inside: +-tolerance, or [-tolerance, 0]
        with band=ceiling); a full budget adds full_budget_weight x MSE(probs, one-hot of the
        largest choice)."""
        loss_cfg = self.config.loss
        cost = self.expected_cost(output.subnetwork)
        if loss_cfg.cost == "hard":
            # value: the cost of the argmax sub-network (the one the student runs in mode hard,
            # the one the family deploys in either mode); gradient: the expectation's.  In mode
            # soft E[cost] can sit inside the band while the argmax does not (issue 22 item 5).
            hard = self.cost_of(output.subnetwork.hard())
            cost = cost + (hard - cost.detach())
        if loss_cfg.grad_temperature is not None and output.raw_logits:
            # gradient of E[cost] under an unsaturated softmax of the raw logits; same value
            t = loss_cfg.grad_temperature
            smooth = self.expected_cost(self._soft_subnetwork(
                {axis: torch.softmax(z / t, dim=-1) for axis, z in output.raw_logits.items()}))
            cost = smooth + (cost.detach() - smooth.detach())
        signed = cost / self.targets[budget_index] - 1.0
        upper = 0.0 if loss_cfg.band == "ceiling" else loss_cfg.tolerance
        inside = (signed > -loss_cfg.tolerance) & (signed <= upper)
        loss = torch.where(inside, torch.zeros_like(signed), signed.abs())
        if self.is_full(budget_index):
            for probs in output.probs.values():
                target = torch.zeros_like(probs)
                target[:, 0] = 1.0  # choices are sorted largest first
                loss = loss + loss_cfg.full_budget_weight * ((probs - target) ** 2).mean()
        return loss

    # ------------------------------------------------------------------ the family
    def inside_band(self, cost: float, budget_index: int) -> bool:
        """The budget loss's free band (`family_check`'s verdict, same rounding allowance)."""
        loss_cfg = self.config.loss
        dev = cost / self.targets[budget_index] - 1.0
        upper = 0.0 if loss_cfg.band == "ceiling" else loss_cfg.tolerance
        return -loss_cfg.tolerance - 1e-9 < dev <= upper + 1e-9

    @torch.no_grad()
    def family(self) -> dict[str, SubNetwork]:
        """Each budget's deployable sub-network: the argmax of the router's logits, no noise
        (argmax does not depend on tau or the positive logit scale); with
        `router.family_choice: in_band` the most likely combination inside the band."""
        if self.config.router.family_choice == "in_band":
            return {name: self.in_band(i) for i, name in enumerate(self.names)}
        return {name: self(i, noise=False).subnetwork.hard() for i, name in enumerate(self.names)}

    MAX_VISITS = 20000  # combinations tried before in_band gives up and keeps the argmax

    @torch.no_grad()
    def in_band(self, budget_index: int) -> SubNetwork:
        """The combination of choices with the largest sum of raw logit margins
        (z_choice - z_max, summed over every axis and every per-layer row) whose cost is inside
        the band, keeping the argmax's hidden size and depth when some combination allows it: combinations are visited best-first (a heap over per-row rank positions, each
        row's choices sorted by logit), so the argmax comes first and is kept when inside.  The
        sum of margins orders combinations the same at every temperature and logit scale."""
        import heapq

        routed = self(budget_index, noise=False)
        raw = routed.raw_logits
        if not raw:  # a router that reports no logits (e.g. a fixed family): its own choice
            return routed.subnetwork.hard()
        rows = [(axis, r) for axis, z in raw.items() for r in range(z.shape[0])]
        order = [torch.argsort(raw[a][r], descending=True, stable=True).tolist() for a, r in rows]
        margin = [(raw[a][r][o] - raw[a][r].max()).tolist() for (a, r), o in zip(rows, order)]

        def subnet(state):
            indices = {a: [0] * z.shape[0] for a, z in raw.items()}
            for (a, r), o, k in zip(rows, order, state):
                indices[a][r] = o[k]
            return self.hard_subnetwork(indices)

        start = (0,) * len(rows)
        # First with the hidden size and depth the router trained (a changed hidden size or a
        # dropped layer touches every layer: an untrained 40-wide model of a router that
        # trained 44 lost 0.23 nats in the main job's elastic stage, seed 1), then any axis.
        for frozen in (AXES_KEPT_FIRST, ()):
            movable = [j for j, (a, _) in enumerate(rows) if a not in frozen]
            heap, seen = [(0.0, start)], {start}
            for _ in range(self.MAX_VISITS):
                if not heap:
                    break
                _, state = heapq.heappop(heap)
                candidate = subnet(state)
                if self.inside_band(self.cost_of(candidate), budget_index):
                    return candidate
                for j in movable:
                    if state[j] + 1 < len(order[j]):
                        nxt = state[:j] + (state[j] + 1,) + state[j + 1:]
                        if nxt not in seen:
                            seen.add(nxt)
                            heapq.heappush(heap, (-sum(m[k] for m, k in zip(margin, nxt)), nxt))
        return subnet(start)  # nothing inside: the argmax, reported outside by family_check

    def family_table(self) -> list[dict]:
        """One entry per budget: name, target, sizes, parameters and memory (bytes)."""
        spec = self.memory_spec or cost_model.MemorySpec()
        rows = []
        for name, subnet in self.family().items():
            params = cost_model.subnetwork_parameters(self.model, subnet)
            rows.append({
                "name": name, "target": float(self.config.budgets[name]),
                "budget_type": self.config.budget_type, "parameters": params,
                "parameter_fraction": params / self.full_parameters,
                "memory_bytes": cost_model.subnetwork_memory(self.model, subnet, spec),
                "memory_spec": dataclasses.asdict(spec), "summary": subnet.describe(self.model),
                "subnetwork": subnet.to_dict(),
                # the band the budget loss treats as free (nemo_elastic.family_check)
                "tolerance": float(self.config.loss.tolerance), "band": self.config.loss.band})
            if self.model.has_moe:  # what one token touches (top-k experts of each MoE layer)
                active = cost_model.subnetwork_active_parameters(self.model, subnet)
                rows[-1].update(active_parameters=active, active_fraction=active / self.full_active)
        return rows
