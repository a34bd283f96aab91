"""Masks of a sub-network, in the parent's *global* index space, and their TP-local shards.

Every axis is a (grouped) prefix after importance reordering:

* hidden                 ``[h]``        first ``hidden_size`` channels;
* Mamba inner channels   ``[H * P]``    head-major (`head * P + channel`): in each of the G groups
                                        the first ``heads/G`` heads, and of each kept head the
                                        first ``head_dim`` channels (group-aware, B/C untouched);
* attention heads        ``[Hq]``       in each of the Q query groups the first ``heads/Q``;
* FFN neurons            ``[F]``        first ``ffn_hidden_size``;
* MoE (`MoEMasks`)       ``[E]``        first ``num_moe_experts`` routed experts (a dropped
                                        expert is never routed to), ``[F_e]`` the first
                                        ``moe_ffn_hidden_size`` neurons of every expert, ``[F_s]``
                                        the first ``moe_shared_expert_intermediate_size`` shared
                                        neurons (hard masks only so far);
* depth                  per layer      a gate: absent (kept), 0.0 (dropped) or a soft weight.

Two forms produce the same `ElasticMasks`:

* hard: `hard_masks(SubNetwork)` - 0/1 values, used for evaluation and matching extraction;
* soft: `soft_masks(SoftSubNetwork)` - each axis is a probability vector over a choice list;
  ``mode="mixture"``: mask = sum_i p_i * prefix(c_i); ``mode="scaled"``: prefix(c_argmax) *
  p_argmax.  Either way the router receives gradients; one-hot probabilities reproduce the hard
  masks exactly.

An axis at its full size has ``values=None``: modules then run the unmodified upstream code,
which keeps the full-budget model bit-identical to the plain Megatron-Core model.

Tensor parallelism splits the Mamba inner channels, attention heads and FFN neurons into
contiguous equal blocks per rank (Megatron's column-parallel layout), so a rank's mask is the
matching block of the global mask (`shard`).  The hidden axis is not split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from nemo_elastic.config import ATTENTION, MAMBA, MOE, ModelConfig
from nemo_elastic.elastic.subnet import SubNetwork


@dataclass
class AxisMask:
    """values: [n] multiplier over the parent's channels (None = all kept, unmasked);
    fraction: active share of the channels (RMSNorm correction, paper-digest §3.4)."""

    values: Optional[torch.Tensor] = None
    fraction: float = 1.0

    @property
    def is_full(self) -> bool:
        return self.values is None


@dataclass
class MoEMasks:
    """A MoE layer's axes: routed experts [E], expert neurons [F_e] (the same in every expert),
    shared-expert neurons [F_s]."""

    experts: AxisMask = field(default_factory=AxisMask)
    expert_ffn: AxisMask = field(default_factory=AxisMask)
    shared_ffn: AxisMask = field(default_factory=AxisMask)

    @property
    def is_full(self) -> bool:
        return self.experts.is_full and self.expert_ffn.is_full and self.shared_ffn.is_full


@dataclass
class LayerMasks:
    gate: Optional[Union[float, torch.Tensor]] = None  # None: kept; 0.0: dropped; tensor: soft
    inner: AxisMask = field(default_factory=AxisMask)  # Mamba [H*P] / attention [Hq] / FFN [F]
    moe: MoEMasks = field(default_factory=MoEMasks)  # MoE layers

    @property
    def dropped(self) -> bool:
        return isinstance(self.gate, float) and self.gate == 0.0


@dataclass
class ElasticMasks:
    hidden: AxisMask
    layers: dict[int, LayerMasks]  # global 0-based layer index -> masks

    def layer(self, index: int) -> LayerMasks:
        return self.layers.get(index) or LayerMasks()


# ------------------------------------------------------------------------------- prefixes

def grouped_prefix(groups: int, per_group: int, keep_per_group: int, *,
                   dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """[groups * per_group]: within each contiguous group, the first `keep_per_group` are 1."""
    mask = torch.zeros(groups, per_group, dtype=dtype, device=device)
    mask[:, :keep_per_group] = 1
    return mask.reshape(-1)


def mamba_inner_prefix(model: ModelConfig, layer: int, heads: int, head_dim: int, *,
                       dtype=torch.float32, device=None) -> torch.Tensor:
    """[H * P] head-major mask: `heads / G` heads in every group x first `head_dim` channels."""
    H, P, G = model.layer_size("mamba_num_heads", layer), model.layer_size("mamba_head_dim", layer), \
        model.mamba_num_groups
    head_mask = grouped_prefix(G, H // G, heads // G, dtype=dtype, device=device)  # [H]
    chan_mask = grouped_prefix(1, P, head_dim, dtype=dtype, device=device)  # [P]
    return (head_mask[:, None] * chan_mask[None, :]).reshape(-1)


def attention_prefix(model: ModelConfig, layer: int, heads: int, *, dtype=torch.float32,
                     device=None) -> torch.Tensor:
    Hq, Q = model.layer_size("num_attention_heads", layer), model.num_query_groups
    return grouped_prefix(Q, Hq // Q, heads // Q, dtype=dtype, device=device)


def ffn_prefix(model: ModelConfig, layer: int, neurons: int, *, dtype=torch.float32,
               device=None) -> torch.Tensor:
    return grouped_prefix(1, model.layer_size("ffn_hidden_size", layer), neurons, dtype=dtype,
                          device=device)


def shard(values: Optional[torch.Tensor], tp_rank: int, tp_size: int) -> Optional[torch.Tensor]:
    """The contiguous block of a global mask held by tensor-parallel rank `tp_rank`.

    A soft (router-driven) mask needs care: rank r's block only influences rank r's channels, so
    rank r's backward yields d loss / d block_r alone.  Routing the global mask through Megatron's
    copy-to-TP-region (forward identity, backward all-reduce over the TP group) sums those
    pieces, so every TP rank's router receives the full gradient - the same as one process.
    """
    if values is None or tp_size == 1:
        return values
    if values.requires_grad:
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

        values = copy_to_tensor_model_parallel_region(values)
    return values.view(tp_size, -1)[tp_rank]


# ------------------------------------------------------------------------------- hard masks

def _axis(full: int, kept: int, make: Callable[[], torch.Tensor]) -> AxisMask:
    return AxisMask() if kept == full else AxisMask(values=make(), fraction=kept / full)


def hard_masks(subnet: SubNetwork, model: ModelConfig, *, dtype=torch.float32,
               device=None, tp_size: int = 1) -> ElasticMasks:
    """0/1 masks of a validated hard sub-network (global index space)."""
    subnet.validate(model, tp_size)
    kw = {"dtype": dtype, "device": device}
    h = model.hidden_size
    hidden = _axis(h, subnet.hidden_size, lambda: grouped_prefix(1, h, subnet.hidden_size, **kw))
    layers: dict[int, LayerMasks] = {}
    for i, (sym, choice) in enumerate(zip(model.layer_symbols, subnet.layers)):
        if not choice.keep:
            layers[i] = LayerMasks(gate=0.0)
            continue
        if sym == MAMBA:
            H, P = model.layer_size("mamba_num_heads", i), model.layer_size("mamba_head_dim", i)
            k, p = choice.mamba_num_heads, choice.mamba_head_dim
            inner = _axis(H * P, k * p, lambda: mamba_inner_prefix(model, i, k, p, **kw))
        elif sym == ATTENTION:
            Hq, k = model.layer_size("num_attention_heads", i), choice.num_attention_heads
            inner = _axis(Hq, k, lambda: attention_prefix(model, i, k, **kw))
        elif sym == MOE:
            moe = moe_masks(model, i, choice, **kw)
            if not moe.is_full:
                layers[i] = LayerMasks(moe=moe)
            continue
        else:
            F, k = model.layer_size("ffn_hidden_size", i), choice.ffn_hidden_size
            inner = _axis(F, k, lambda: ffn_prefix(model, i, k, **kw))
        if not inner.is_full:
            layers[i] = LayerMasks(inner=inner)
    return ElasticMasks(hidden=hidden, layers=layers)


def moe_masks(model: ModelConfig, i: int, choice, **kw) -> MoEMasks:
    """0/1 prefix masks of MoE layer `i` keeping `choice`'s experts and neurons."""
    def prefix(field_name: str) -> AxisMask:
        full, kept = model.layer_size(field_name, i), getattr(choice, field_name)
        if full is None:  # no shared expert
            return AxisMask()
        return _axis(full, kept, lambda: grouped_prefix(1, full, kept, **kw))

    return MoEMasks(experts=prefix("num_moe_experts"), expert_ffn=prefix("moe_ffn_hidden_size"),
                    shared_ffn=prefix("moe_shared_expert_intermediate_size"))


# ------------------------------------------------------------------------------- soft masks

MODES = ("mixture", "scaled")


@dataclass
class SoftAxis:
    """A differentiable choice among sizes: `probs [n]` over `choices` (descending or not)."""

    choices: Sequence[int]
    probs: torch.Tensor
    mode: str = "mixture"
    # mode "scaled" only: the chosen prefix x 1 in value, x its probability in gradient
    straight_through: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"SoftAxis.mode={self.mode!r}: must be one of {MODES}")
        if self.probs.dim() != 1 or self.probs.numel() != len(self.choices):
            raise ValueError(f"SoftAxis.probs has shape {tuple(self.probs.shape)}; expected "
                             f"[{len(self.choices)}] (one probability per choice {list(self.choices)})")
        bad = [c for c in self.choices if c < 1]
        if bad:
            raise ValueError(f"SoftAxis.choices={list(self.choices)}: sizes {bad} must be >= 1")

    def mask(self, full: int, prefix: Callable[[int], torch.Tensor]) -> AxisMask:
        probs = self.probs
        if self.mode == "mixture":
            values = sum(p * prefix(c) for p, c in zip(probs, self.choices))
            fraction = float(sum(float(p) * c for p, c in zip(probs.detach(), self.choices))) / full
        else:
            best = int(torch.argmax(probs.detach()))
            values = prefix(self.choices[best]) * hard_scale(probs[best], self.straight_through)
            fraction = self.choices[best] / full
        return AxisMask(values=values, fraction=fraction)

    def hard_choice(self) -> int:
        return self.choices[int(torch.argmax(self.probs.detach()))]


def hard_scale(p: torch.Tensor, straight_through: bool) -> torch.Tensor:
    """The chosen mask's scale: `p`, or 1 in value with p's gradient (straight-through)."""
    return p - p.detach() + 1.0 if straight_through else p


SizeOrSoft = Union[int, SoftAxis]


@dataclass
class SoftLayer:
    """Per-layer soft choices; ints are fixed sizes; `keep` may be a soft weight tensor.

    `keep` is what the forward runs: True (kept), False (dropped, not run) or a gate tensor g
    (the layer's residual update scaled by g).  The router's depth axis also records
    `expected_keep` (the probability that the layer survives, sum_i p_i [layer kept by choice i]:
    what the differentiable cost counts) and `hard_keep` (the argmax choice keeps it: what
    `hard()` and the family use).  In the router's mixture mode keep == expected_keep; in its
    hard mode keep is p_best for the argmax choice's layers and False for the others (paper
    mode 1: the selected mask scaled by its probability), so dropped layers are not run."""

    keep: Union[bool, torch.Tensor] = True
    mamba_num_heads: Optional[SizeOrSoft] = None
    mamba_head_dim: Optional[SizeOrSoft] = None
    num_attention_heads: Optional[SizeOrSoft] = None
    ffn_hidden_size: Optional[SizeOrSoft] = None
    num_moe_experts: Optional[SizeOrSoft] = None
    moe_ffn_hidden_size: Optional[SizeOrSoft] = None
    moe_shared_expert_intermediate_size: Optional[SizeOrSoft] = None
    expected_keep: Optional[torch.Tensor] = None
    hard_keep: Optional[bool] = None

    def kept_in_hard(self) -> bool:
        """Kept by the argmax sub-network: `hard_keep` when the router set it, else a fixed keep
        or a gate tensor of at least 0.5."""
        if self.hard_keep is not None:
            return self.hard_keep
        return bool(self.keep >= 0.5) if isinstance(self.keep, torch.Tensor) else bool(self.keep)

    def cost_keep(self) -> Union[bool, torch.Tensor]:
        """The keep weight the differentiable cost counts (the expectation when known)."""
        return self.keep if self.expected_keep is None else self.expected_keep


@dataclass
class SoftSubNetwork:
    hidden_size: SizeOrSoft
    layers: Sequence[SoftLayer]

    def hard(self) -> SubNetwork:
        """The argmax sub-network (what inference / extraction uses)."""
        from nemo_elastic.elastic.subnet import LayerChoice

        pick = lambda v: v.hard_choice() if isinstance(v, SoftAxis) else v  # noqa: E731
        layers = []
        for layer in self.layers:
            layers.append(LayerChoice(
                keep=layer.kept_in_hard(), mamba_num_heads=pick(layer.mamba_num_heads),
                mamba_head_dim=pick(layer.mamba_head_dim),
                num_attention_heads=pick(layer.num_attention_heads),
                ffn_hidden_size=pick(layer.ffn_hidden_size),
                num_moe_experts=pick(layer.num_moe_experts),
                moe_ffn_hidden_size=pick(layer.moe_ffn_hidden_size),
                moe_shared_expert_intermediate_size=pick(
                    layer.moe_shared_expert_intermediate_size)))
        return SubNetwork(hidden_size=pick(self.hidden_size), layers=tuple(layers))


def _soft_moe_axis(model: ModelConfig, i: int, field_name: str, value, kw) -> AxisMask:
    """One MoE axis of layer i, soft or fixed (a prefix over the experts / neurons); a MoE
    without shared expert has no shared mask."""
    full = model.layer_size(field_name, i)
    if full is None or value is None:
        return AxisMask()
    return _soft_or_hard(value, full, lambda c: grouped_prefix(1, full, c, **kw))


def _soft_or_hard(value: SizeOrSoft, full: int, prefix: Callable[[int], torch.Tensor]) -> AxisMask:
    if isinstance(value, SoftAxis):
        return value.mask(full, prefix)
    return _axis(full, value, lambda: prefix(value))


def soft_masks(soft: SoftSubNetwork, model: ModelConfig, *, dtype=torch.float32,
               device=None) -> ElasticMasks:
    """Differentiable masks; sizes are validated through the argmax sub-network."""
    soft.hard().validate(model)
    kw = {"dtype": dtype, "device": device}
    h = model.hidden_size
    hidden = _soft_or_hard(soft.hidden_size, h, lambda c: grouped_prefix(1, h, c, **kw))
    layers: dict[int, LayerMasks] = {}
    for i, (sym, layer) in enumerate(zip(model.layer_symbols, soft.layers)):
        gate = None
        if isinstance(layer.keep, torch.Tensor):
            gate = layer.keep
        elif not layer.keep:
            layers[i] = LayerMasks(gate=0.0)
            continue
        if sym == MAMBA:
            H, P = model.layer_size("mamba_num_heads", i), model.layer_size("mamba_head_dim", i)
            heads = _soft_or_hard(layer.mamba_num_heads, H,
                                  lambda c: grouped_prefix(model.mamba_num_groups, H // model.mamba_num_groups,
                                                           c // model.mamba_num_groups, **kw))
            chans = _soft_or_hard(layer.mamba_head_dim, P, lambda c: grouped_prefix(1, P, c, **kw))
            if heads.is_full and chans.is_full:
                inner = AxisMask()
            else:
                hv = heads.values if heads.values is not None else torch.ones(H, **kw)
                cv = chans.values if chans.values is not None else torch.ones(P, **kw)
                inner = AxisMask(values=(hv[:, None] * cv[None, :]).reshape(-1),
                                 fraction=heads.fraction * chans.fraction)
        elif sym == ATTENTION:
            inner = _soft_or_hard(layer.num_attention_heads, model.layer_size("num_attention_heads", i),
                                  lambda c: attention_prefix(model, i, c, **kw))
        elif sym == MOE:
            moe = MoEMasks(**{axis: _soft_moe_axis(model, i, field, getattr(layer, field), kw)
                              for axis, field in (("experts", "num_moe_experts"),
                                                  ("expert_ffn", "moe_ffn_hidden_size"),
                                                  ("shared_ffn",
                                                   "moe_shared_expert_intermediate_size"))})
            if gate is not None or not moe.is_full:
                layers[i] = LayerMasks(gate=gate, moe=moe)
            continue
        else:
            inner = _soft_or_hard(layer.ffn_hidden_size, model.layer_size("ffn_hidden_size", i),
                                  lambda c: ffn_prefix(model, i, c, **kw))
        if gate is not None or not inner.is_full:
            layers[i] = LayerMasks(gate=gate, inner=inner)
    return ElasticMasks(hidden=hidden, layers=layers)
