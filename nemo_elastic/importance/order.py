"""Permutations of every width axis: from scores (descending importance), random, or identity.

Convention: ``perm[new] = old`` - position ``new`` of the reordered axis holds the parent's
item ``perm[new]`` (so ``weight.index_select(dim, perm)`` reorders a tensor).  The structure is
exactly what a `SubNetwork` prefix keeps (`elastic/subnet.py`):

* ``hidden [h]``: any permutation;
* ``mamba_heads [H]``: heads stay in their group - group g owns heads ``g*H/G .. (g+1)*H/G-1``
  before and after (B/C are per group, so a head moved across groups would read another group's
  B/C); each group is sorted on its own, so "the first k/G heads of every group" are its best;
* ``mamba_channels``: ``[H, P]`` per head (row h: old head h's own channel order, the default
  from scores: each head's prefix of ``p`` channels is its own best ``p``) or ``[P]`` shared by
  every head of the layer (`MAMBA_CHANNEL_ORDERS`).  Either preserves the function: a head's
  channels only meet in the gated RMSNorm's sum over its group and in out_proj's columns, both
  permuted with them; B / C / dt / A stay per group / head;
* ``attention_heads [Hq]``: query heads stay in their query group (KV is per group);
* ``ffn [F]``: any permutation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from nemo_elastic.config import ATTENTION, MAMBA, MLP, MOE, ModelConfig
from nemo_elastic.importance.scores import ImportanceScores


@dataclass
class LayerPermutation:
    kind: str  # 'M' | '*' | '-'
    ffn: Optional[torch.Tensor] = None  # [F]
    mamba_heads: Optional[torch.Tensor] = None  # [H], group-preserving
    mamba_channels: Optional[torch.Tensor] = None  # [H, P] per head, or [P] shared
    attention_heads: Optional[torch.Tensor] = None  # [Hq], query-group-preserving
    experts: Optional[torch.Tensor] = None  # [E] routed experts (MoE)
    expert_ffn: Optional[torch.Tensor] = None  # [F_e], the same for every expert
    shared_ffn: Optional[torch.Tensor] = None  # [F_s] (empty without a shared expert)

    def axes(self) -> dict[str, torch.Tensor]:
        names = {MAMBA: ("mamba_heads", "mamba_channels"), ATTENTION: ("attention_heads",),
                 MLP: ("ffn",), MOE: ("experts", "expert_ffn", "shared_ffn")}[self.kind]
        return {n: getattr(self, n) for n in names}


@dataclass
class Permutations:
    hidden: torch.Tensor  # [h]
    layers: dict[int, LayerPermutation] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"hidden": self.hidden.tolist(),
                "layers": {str(i): {"type": p.kind, **{k: v.tolist() for k, v in p.axes().items()}}
                           for i, p in self.layers.items()}}


# ------------------------------------------------------------------------------ helpers

def descending(scores: torch.Tensor) -> torch.Tensor:
    """Indices sorting `scores` most-important first; ties keep the original order."""
    return torch.sort(scores, descending=True, stable=True).indices


def grouped_descending(scores: torch.Tensor, groups: int) -> torch.Tensor:
    """[n] scores in `groups` contiguous equal groups -> global indices, each group sorted on
    its own and kept in place."""
    per = scores.numel() // groups
    local = torch.sort(scores.view(groups, per), dim=1, descending=True, stable=True).indices
    return (local + torch.arange(groups)[:, None] * per).reshape(-1)


def grouped_random(n: int, groups: int, gen: torch.Generator) -> torch.Tensor:
    per = n // groups
    return torch.cat([torch.randperm(per, generator=gen) + g * per for g in range(groups)])


def _layer_sizes(m: ModelConfig, i: int, kind: str) -> dict[str, tuple[int, int]]:
    """axis -> (size, groups) of global layer i."""
    if kind == MAMBA:
        return {"mamba_heads": (m.layer_size("mamba_num_heads", i), m.mamba_num_groups),
                "mamba_channels": (m.layer_size("mamba_head_dim", i), 1)}
    if kind == ATTENTION:
        return {"attention_heads": (m.layer_size("num_attention_heads", i), m.num_query_groups)}
    if kind == MOE:
        return {"experts": (m.layer_size("num_moe_experts", i), 1),
                "expert_ffn": (m.layer_size("moe_ffn_hidden_size", i), 1),
                "shared_ffn": (m.layer_size("moe_shared_expert_intermediate_size", i) or 0, 1)}
    return {"ffn": (m.layer_size("ffn_hidden_size", i), 1)}


# ------------------------------------------------------------------------------ constructors

MAMBA_CHANNEL_ORDERS = ("per_head", "shared")
DEFAULT_MAMBA_CHANNEL_ORDER = "per_head"


def permutations_from_scores(scores: ImportanceScores, model_cfg: ModelConfig, *,
                             mamba_channel_order: str = DEFAULT_MAMBA_CHANNEL_ORDER
                             ) -> Permutations:
    """Every axis sorted by descending score (Mamba / attention heads within their groups).

    `mamba_channel_order`: 'per_head' sorts each Mamba head's channels by that head's own
    scores (``mamba_head_channel [H, P]``); 'shared' sorts them once for all heads by the
    channel score ``||A[:, d]||`` (paper Eq. 3)."""
    if mamba_channel_order not in MAMBA_CHANNEL_ORDERS:
        raise ValueError(f"mamba_channel_order={mamba_channel_order!r}: must be one of "
                         f"{MAMBA_CHANNEL_ORDERS}")
    layers = {}
    for i, s in scores.layers.items():
        sizes = _layer_sizes(model_cfg, i, s.kind)
        layers[i] = LayerPermutation(kind=s.kind, **{
            axis: grouped_descending(values.cpu(), sizes[axis][1])
            for axis, values in s.axes().items()})
        if s.kind == MAMBA and mamba_channel_order == "per_head":
            layers[i].mamba_channels = torch.sort(s.mamba_head_channel.cpu(), dim=1,
                                                  descending=True, stable=True).indices
    perms = Permutations(hidden=descending(scores.hidden.cpu()), layers=layers)
    return validate_permutations(perms, model_cfg)


def random_permutations(model_cfg: ModelConfig, generator: torch.Generator) -> Permutations:
    """Random structure-respecting permutations of every axis (a baseline, and a test input)."""
    layers = {}
    for i, kind in enumerate(model_cfg.layer_symbols):
        layers[i] = LayerPermutation(kind=kind, **{
            axis: grouped_random(n, groups, generator)
            for axis, (n, groups) in _layer_sizes(model_cfg, i, kind).items()})
    perms = Permutations(hidden=torch.randperm(model_cfg.hidden_size, generator=generator),
                         layers=layers)
    return validate_permutations(perms, model_cfg)


def identity_permutations(model_cfg: ModelConfig) -> Permutations:
    layers = {}
    for i, kind in enumerate(model_cfg.layer_symbols):
        layers[i] = LayerPermutation(kind=kind, **{
            axis: torch.arange(n) for axis, (n, _) in _layer_sizes(model_cfg, i, kind).items()})
    return Permutations(hidden=torch.arange(model_cfg.hidden_size), layers=layers)


# ------------------------------------------------------------------------------ validation

def validate_permutations(perms: Permutations, model_cfg: ModelConfig) -> Permutations:
    """Raise ValueError naming the axis if any permutation is malformed or crosses a group
    (a Mamba head or attention query head moved to another group). Returns `perms`."""
    _check_axis("hidden", perms.hidden, model_cfg.hidden_size, 1)
    symbols = model_cfg.layer_symbols
    for i, p in perms.layers.items():
        if not 0 <= i < len(symbols) or symbols[i] != p.kind:
            raise ValueError(f"permutations.layers[{i}] has type {p.kind!r}, but the model's "
                             f"layer {i} is {symbols[i] if 0 <= i < len(symbols) else 'absent'!r}")
        sizes = _layer_sizes(model_cfg, i, p.kind)
        for axis, values in p.axes().items():
            if values is None:
                raise ValueError(f"permutations.layers[{i}].{axis} is missing")
            if axis == "mamba_channels" and values.dim() == 2:  # per head [H, P]
                H = sizes["mamba_heads"][0]
                if values.shape[0] != H:
                    raise ValueError(f"permutations.layers[{i}].mamba_channels has shape "
                                     f"{tuple(values.shape)}; expected [{H}, P] or [P]")
                for h in range(H):
                    _check_axis(f"layers[{i}].mamba_channels[{h}]", values[h], *sizes[axis])
                continue
            _check_axis(f"layers[{i}].{axis}", values, *sizes[axis])
    return perms


def _check_axis(name: str, perm: torch.Tensor, n: int, groups: int) -> None:
    if perm.dim() != 1 or perm.numel() != n:
        raise ValueError(f"permutations.{name} has shape {tuple(perm.shape)}; expected [{n}]")
    if not torch.equal(torch.sort(perm.cpu()).values, torch.arange(n)):
        raise ValueError(f"permutations.{name} is not a permutation of 0..{n - 1}")
    if groups > 1:
        per = n // groups
        own = torch.arange(n) // per
        moved = (perm.cpu() // per != own).nonzero().flatten()
        if moved.numel():
            j = int(moved[0])
            raise ValueError(
                f"permutations.{name} moves item {int(perm[j])} (group {int(perm[j]) // per}) to "
                f"position {j} (group {j // per}); heads must stay within their group of {per}")
