"""The parameter layout of the hybrid model, written down once.

Read by every transformation of whole (TP=1) state dicts: slicing a sub-network
(`export.slicing`), the importance reordering (`importance.permute`) and the Hugging Face
mapping (`export.hf_adapter`).  The elastic masks (`elastic/`) stay a separate implementation on
purpose: masked == sliced is the contract the tests check, so the two must not share code.

Three things live here:

1. The grouped-axis rule: which heads a prefix keeps (`first_of_each_group`, `kept_heads`: the
   first k/groups of every group).  The tables it reads, `LAYER_FIELDS` (per-layer size fields
   by layer symbol) and `GROUPED` (sizes that must be a multiple of a group count), live in
   `nemo_elastic.sizes` with the rest of the size tables.
2. `TENSOR_AXES`: the named axis of every dimension of every parameter (Megatron-Core names):

       embedding / output layer [vocab, hidden]; final norm and every pre-norm [hidden]
       Mamba (H heads x P channels in G groups, state N, d = H*P; inner index = head*P + channel)
         in_proj  [in_proj, hidden]   rows [z (d) | x (d) | B (G*N) | C (G*N) | dt (H)]
         conv1d   [conv, 1, kernel]   channels [x (d) | B (G*N) | C (G*N)]; conv1d_bias [conv]
         dt_bias, A_log, D [heads] (D [inner] with Megatron's D_has_hdim); norm.weight [inner]
         (gated RMSNorm in G groups of d/G channels); out_proj [hidden, inner]
       attention (a query heads in Q query groups, head dim c)
         linear_qkv [qkv, hidden]     rows per query group q: [its a/Q query heads (c rows each)
                                      | k (c) | v (c)]; linear_proj [hidden, proj] (head j: j*c..)
       MLP (F neurons): linear_fc1 [ffn, hidden], linear_fc2 [hidden, ffn]
       MoE (E routed experts of F_e neurons, a shared expert of F_s neurons)
         router.weight [experts, hidden]; router.expert_bias [experts] (a buffer)
         experts.local_experts.<j>.linear_fc1 [expert_ffn, hidden] / linear_fc2 [hidden,
         expert_ffn]: the expert axis is the <j> in the NAME (one tensor per expert), so keeping
         or reordering experts renames tensors (`reindex_state_dict`)
         shared_experts.linear_fc1 [shared_ffn, hidden] / linear_fc2 [hidden, shared_ffn]
3. The fused axes as functions of the basic ones (`LayerIndex`): a transformation says which
   hidden channels, heads (global index, each staying in its group), head channels and neurons
   it keeps, in which order; `LayerIndex.axis(name)` expands that into the rows of in_proj, conv,
   qkv, proj, ...  Slicing passes prefixes (the first k of each group), the reordering passes
   permutations; `reindex` applies them to a tensor after checking its shape.

Pure Python at import (torch is imported inside the functions), like `config` and `cost_model`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional

from nemo_elastic.config import ATTENTION, GROUPED, LAYER_FIELDS, MAMBA, MLP, MOE, ModelConfig

if TYPE_CHECKING:
    import torch

# 1. --------------------------------------------------------------------------------- sizes

# LAYER_FIELDS (per-layer size fields by layer symbol) and GROUPED (grouped size field -> the
# ModelConfig field holding its group count) live in `nemo_elastic.sizes`, a leaf of the import
# graph, so that the config validation, SubNetwork, the Megatron stack and the router read them too.


def first_of_each_group(total: int, groups: int, kept: int) -> "torch.Tensor":
    """Indices kept on an axis of `total` items in `groups` contiguous equal groups: the first
    kept/groups items of every group, in group order (Mamba heads, attention query heads)."""
    import torch

    per, keep = total // groups, kept // groups
    return (torch.arange(groups)[:, None] * per + torch.arange(keep)[None, :]).reshape(-1)


def grouped_field(symbol: str) -> Optional[str]:
    """The grouped size field of a layer symbol (its heads), None for MLP layers."""
    return next((f for f in LAYER_FIELDS[symbol] if f in GROUPED), None)


def kept_heads(m: ModelConfig, layer: int, kept: int) -> "torch.Tensor":
    """The heads a prefix sub-network keeps in global layer `layer`: the first kept/groups of
    every group (the one grouped-axis rule, for Mamba and attention layers alike)."""
    field = grouped_field(m.layer_symbols[layer])
    return first_of_each_group(m.layer_size(field, layer), getattr(m, GROUPED[field]), kept)


def head_channels(heads: "torch.Tensor", head_dim: int, kept_dim) -> "torch.Tensor":
    """Indices into a [num_heads * head_dim] axis (head i owns i*head_dim .. +head_dim-1): for
    every head in `heads`, in that order, its channels `kept_dim`: an index tensor [p'] into
    [head_dim] (the same for every head), a per-head one [num_heads, p'] (row i: head i's own
    channels, indexed by the head's number in `heads`, e.g. Mamba's per-head channel orders), or,
    given an int, its first `kept_dim` channels."""
    import torch

    channels = torch.arange(kept_dim) if isinstance(kept_dim, int) else kept_dim
    if channels.dim() == 2:  # per head: head heads[j] keeps channels[heads[j]]
        return (heads[:, None] * head_dim + channels[heads]).reshape(-1)
    return (heads[:, None] * head_dim + channels[None, :]).reshape(-1)


# 2. --------------------------------------------------------------------------------- axes

HIDDEN = "hidden"
# dims that no transformation reindexes
VOCAB, ONE, KERNEL = "vocab", "one", "kernel"

# "decoder.layers.<global index>.<name inside the layer>"
LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# Pre-norm weights [h]: local spec names and their Transformer-Engine fused-norm aliases.
PRE_NORM_KEYS = ("norm.weight", "mixer.in_proj.layer_norm_weight", "input_layernorm.weight",
                 "self_attention.linear_qkv.layer_norm_weight", "pre_mlp_layernorm.weight",
                 "mlp.linear_fc1.layer_norm_weight")

GLOBAL_AXES: dict[str, tuple[str, ...]] = {
    "embedding.word_embeddings.weight": (VOCAB, HIDDEN),
    "output_layer.weight": (VOCAB, HIDDEN),
    "decoder.final_norm.weight": (HIDDEN,),
}
TENSOR_AXES: dict[str, dict[str, tuple[str, ...]]] = {
    MAMBA: {"mixer.in_proj.weight": ("in_proj", HIDDEN),
            "mixer.conv1d_weight": ("conv", ONE, KERNEL),
            "mixer.conv1d_bias": ("conv",),
            "mixer.dt_bias": ("heads",), "mixer.A_log": ("heads",),
            "mixer.D": ("heads",),  # ("inner",) when it has the head dim, see `tensor_axes`
            "mixer.norm.weight": ("inner",),
            "mixer.out_proj.weight": (HIDDEN, "inner")},
    ATTENTION: {"self_attention.linear_qkv.weight": ("qkv", HIDDEN),
                "self_attention.linear_proj.weight": (HIDDEN, "proj")},
    MLP: {"mlp.linear_fc1.weight": ("ffn", HIDDEN),
          "mlp.linear_fc2.weight": (HIDDEN, "ffn")},
    MOE: {"mlp.router.weight": ("experts", HIDDEN),
          "mlp.router.expert_bias": ("experts",),
          "mlp.experts.local_experts.#.linear_fc1.weight": ("expert_ffn", HIDDEN),
          "mlp.experts.local_experts.#.linear_fc2.weight": (HIDDEN, "expert_ffn"),
          "mlp.shared_experts.linear_fc1.weight": ("shared_ffn", HIDDEN),
          "mlp.shared_experts.linear_fc2.weight": (HIDDEN, "shared_ffn")},
}
# "...local_experts.<j>.rest" -> (j, "...local_experts.#.rest")
EXPERT_KEY = re.compile(r"^(.*\.local_experts\.)(\d+)(\..+)$")


def expert_of(name: str) -> tuple[Optional[int], str]:
    """(expert number or None, the name with the number replaced by '#')."""
    match = EXPERT_KEY.match(name)
    if match is None:
        return None, name
    return int(match.group(2)), f"{match.group(1)}#{match.group(3)}"
for _table in TENSOR_AXES.values():
    _table.update({key: (HIDDEN,) for key in PRE_NORM_KEYS})


class LayoutError(ValueError):
    """A tensor name the layout does not know, or a shape that disagrees with the config."""


def axis_sizes(m: ModelConfig, layer: Optional[int] = None) -> dict[str, int]:
    """Full size of every axis of global layer `layer` (None: the model-level axes)."""
    sizes = {HIDDEN: m.hidden_size, VOCAB: m.vocab_size, ONE: 1, KERNEL: m.mamba_conv_kernel}
    if layer is None:
        return sizes
    sym = m.layer_symbols[layer]
    if sym == MAMBA:
        H, P = m.layer_size("mamba_num_heads", layer), m.layer_size("mamba_head_dim", layer)
        GN = m.mamba_num_groups * m.mamba_state_dim
        sizes.update(heads=H, inner=H * P, in_proj=2 * H * P + 2 * GN + H, conv=H * P + 2 * GN)
    elif sym == ATTENTION:
        a, Q, c = m.layer_size("num_attention_heads", layer), m.num_query_groups, m.head_dim
        sizes.update(heads=a, qkv=(a + 2 * Q) * c, proj=a * c)
    elif sym == MOE:
        sizes.update(experts=m.layer_size("num_moe_experts", layer),
                     expert_ffn=m.layer_size("moe_ffn_hidden_size", layer),
                     shared_ffn=m.layer_size("moe_shared_expert_intermediate_size", layer) or 0)
    else:
        sizes.update(ffn=m.layer_size("ffn_hidden_size", layer))
    return sizes


def tensor_axes(m: ModelConfig, key: str, shape) -> tuple[Optional[int], str, tuple[str, ...]]:
    """(global layer or None, name inside the layer, axis names) of parameter `key`; checks the
    shape against `m`.  Raises LayoutError naming the tensor."""
    layer, name = None, key
    match = LAYER_KEY.match(key)
    if match:
        layer, name = int(match.group(1)), match.group(2)
        if layer >= m.num_layers:
            raise LayoutError(f"tensor {key!r}: the config has only {m.num_layers} layers "
                              f"({m.hybrid_layer_pattern!r})")
        sym = m.layer_symbols[layer]
        expert, generic = expert_of(name)
        axes = TENSOR_AXES[sym].get(generic)
        if expert is not None and axes is not None and \
                expert >= m.layer_size("num_moe_experts", layer):
            raise LayoutError(f"tensor {key!r}: layer {layer} has only "
                              f"{m.layer_size('num_moe_experts', layer)} experts")
        if axes is None:
            raise LayoutError(f"unexpected {_KIND[sym]} tensor {key!r}: the layout knows the "
                              "upstream TP=1 Megatron-Core names of this model only (no biases, "
                              "q/k layernorms, gated MLPs or MoE)")
    else:
        axes = GLOBAL_AXES.get(key)
        if axes is None:
            raise LayoutError(f"unexpected tensor {key!r}: the layout knows the upstream TP=1 "
                              "Megatron-Core names only (unwrap DDP/Float16Module first)")
    sizes = axis_sizes(m, layer)
    if name == "mixer.D" and tuple(shape) == (sizes["inner"],):
        axes = ("inner",)  # Megatron's D_has_hdim
    expected = tuple(sizes[a] for a in axes)
    if tuple(shape) != expected:
        raise LayoutError(f"tensor {key!r} has shape {tuple(shape)}, expected {expected} from "
                          "the config; pass the config the weights were built with")
    return layer, name, axes


_KIND = {MAMBA: "Mamba", ATTENTION: "attention", MLP: "MLP", MOE: "MoE"}


# 3. ------------------------------------------------------------------------ fused axes

@dataclass(frozen=True)
class LayerIndex:
    """What one transformation keeps of a layer, in which order (index tensors, int64):

    hidden [h'] into the hidden channels; heads [k] global head indices (Mamba or query heads;
    each group contributes the same number and heads never leave their group); channels [p']
    into one Mamba head's P channels (the same for every head), or [H, p'] per head (row h: head
    h's own channels; the reordering's per-head orders); ffn [f'] into the neurons.
    `axis(name)` expands them into the index of any axis in `TENSOR_AXES`.
    """

    m: ModelConfig
    layer: Optional[int]
    hidden: "torch.Tensor"
    heads: Optional["torch.Tensor"] = None
    channels: Optional["torch.Tensor"] = None
    ffn: Optional["torch.Tensor"] = None
    # MoE: kept routed experts (global expert numbers, in order), their neurons, shared neurons
    experts: Optional["torch.Tensor"] = None
    expert_ffn: Optional["torch.Tensor"] = None
    shared_ffn: Optional["torch.Tensor"] = None

    def axis(self, name: str) -> Optional["torch.Tensor"]:
        """Index into axis `name`; None for axes left as they are (vocab, conv kernel)."""
        if name == HIDDEN:
            return self.hidden
        if name in (VOCAB, ONE, KERNEL):
            return None
        m, i = self.m, self.layer
        sym = m.layer_symbols[i]
        if name == "ffn":
            return self.ffn
        if name in ("experts", "expert_ffn", "shared_ffn"):
            return getattr(self, name)
        if name == "heads":
            return self.heads
        if sym == MAMBA:
            H, P = m.layer_size("mamba_num_heads", i), m.layer_size("mamba_head_dim", i)
            d, bc = H * P, 2 * m.mamba_num_groups * m.mamba_state_dim
            inner = head_channels(self.heads, P, self.channels)
            if name == "inner":
                return inner
            if name == "in_proj":
                return in_proj_rows(inner, self.heads, d, bc)
            if name == "conv":
                return conv_channels(inner, d, bc)
        elif sym == ATTENTION:
            c = m.head_dim
            if name == "proj":
                return head_channels(self.heads, c, c)
            if name == "qkv":
                return self._qkv_rows()
        raise LayoutError(f"layer {i} ({sym!r}) has no axis {name!r}")

    def _qkv_rows(self) -> "torch.Tensor":
        m, i = self.m, self.layer
        a, Q = m.layer_size("num_attention_heads", i), m.num_query_groups
        try:
            return qkv_rows(self.heads, Q, a // Q, m.head_dim)
        except ValueError as e:
            raise LayoutError(f"layer {i}: {e}") from None


# The fused row layouts as functions of kept heads / channels.  `LayerIndex` (whole TP=1
# tensors) and sliced execution (one tensor-parallel rank's shard, local sizes: Megatron shards
# in_proj, conv1d and linear_qkv so that every rank holds the same layout at its local sizes)
# both call these.

def in_proj_rows(inner: "torch.Tensor", heads: "torch.Tensor", d: int, bc: int) -> "torch.Tensor":
    """Rows of Mamba's in_proj [z (d) | x (d) | B, C (bc = 2*G*N) | dt (H)] that keep the inner
    channels `inner` (into d = H*P), the heads `heads` and every B/C row (never pruned)."""
    import torch

    return torch.cat([inner, d + inner, 2 * d + torch.arange(bc), 2 * d + bc + heads])


def conv_channels(inner: "torch.Tensor", d: int, bc: int) -> "torch.Tensor":
    """Channels of Mamba's conv1d [x (d) | B, C (bc)] that keep `inner` and every B/C channel."""
    import torch

    return torch.cat([inner, d + torch.arange(bc)])


def qkv_rows(heads: "torch.Tensor", groups: int, per: int, c: int) -> "torch.Tensor":
    """Rows of the fused linear_qkv [groups x (per query heads | k | v) x c] that keep the query
    heads `heads` (indices into groups*per, listed group by group, each group's in the given
    order) and every group's k and v."""
    import torch

    heads = torch.as_tensor(heads, dtype=torch.long)
    group = heads // per
    if not torch.equal(group, torch.sort(group).values):
        raise ValueError(f"query heads {heads.tolist()} must be listed group by group "
                         f"({per} per query group)")
    rows = []
    for q in range(groups):  # per group: [its kept query heads, in the given order | k | v]
        slots = heads[group == q] - q * per
        start = q * (per + 2) * c
        rows += [start + head_channels(slots, c, c), start + per * c + torch.arange(2 * c)]
    return torch.cat(rows)


def reindex(t: "torch.Tensor", axes: tuple[str, ...], index: LayerIndex) -> "torch.Tensor":
    """`t` with every dim whose axis `index` selects gathered by that index (a new tensor)."""
    out = t
    for dim, name in enumerate(axes):
        idx = index.axis(name)
        if idx is not None:
            out = out.index_select(dim, idx.to(out.device))
    return out.contiguous() if out is not t else out.clone()


# HF's separate q/k/v projections <-> Megatron's fused linear_qkv (per group: q heads | k | v).

def fuse_qkv(q, k, v, m: ModelConfig, layer: Optional[int] = None):
    """HF q [a*c, h], k/v [Q*c, h] -> Megatron linear_qkv [Q*(a/Q + 2)*c, h] (query heads of
    group j are heads j*a/Q .. (j+1)*a/Q - 1 on both sides, as HF's repeat_kv)."""
    import torch

    a = m.num_attention_heads if layer is None else m.layer_size("num_attention_heads", layer)
    Q, c = m.num_query_groups, m.head_dim
    per, h = a // Q, q.shape[-1]
    for name, t, rows in (("q_proj", q, a * c), ("k_proj", k, Q * c), ("v_proj", v, Q * c)):
        if tuple(t.shape) != (rows, h):
            raise ValueError(f"attention {name}.weight has shape {tuple(t.shape)}, expected "
                             f"{(rows, h)} for {a} heads / {Q} groups / head dim {c}")
    fused = [q.reshape(Q, per * c, h), k.reshape(Q, c, h), v.reshape(Q, c, h)]
    return torch.cat(fused, dim=1).reshape(Q * (per + 2) * c, h)


def split_qkv(qkv, m: ModelConfig, layer: Optional[int] = None):
    """Megatron linear_qkv [Q*(a/Q + 2)*c, h] -> contiguous HF (q, k, v)."""
    a = m.num_attention_heads if layer is None else m.layer_size("num_attention_heads", layer)
    Q, c = m.num_query_groups, m.head_dim
    per, h = a // Q, qkv.shape[-1]
    q, k, v = qkv.reshape(Q, (per + 2) * c, h).split([per * c, c, c], dim=1)
    return (q.reshape(Q * per * c, h).contiguous(), k.reshape(Q * c, h).contiguous(),
            v.reshape(Q * c, h).contiguous())


def reindex_state_dict(state: Mapping[str, object], m: ModelConfig, index_of) -> dict[str, object]:
    """Every tensor of a TP=1 state dict reindexed: `index_of(layer)` returns the LayerIndex of
    global layer `layer` (None: model-level tensors), or None to leave the layer out.
    `_extra_state` entries are dropped.  Keys keep their names (callers renumber layers)."""
    out: dict[str, object] = {}
    cache: dict[Optional[int], Optional[LayerIndex]] = {}
    for key, t in state.items():
        if key.endswith("_extra_state"):
            continue
        layer, _, axes = tensor_axes(m, key, t.shape)
        if layer not in cache:
            cache[layer] = index_of(layer)
        index = cache[layer]
        if index is None:
            continue
        new_key = expert_key(key, index)
        if new_key is not None:
            out[new_key] = reindex(t, axes, index)
    return out


def expert_key(key: str, index: LayerIndex) -> Optional[str]:
    """The name tensor `key` gets under `index`: a routed expert's tensors (one per expert, the
    expert number in the name) move to the expert's position in `index.experts` (None: that
    expert is not kept); every other name stays."""
    expert, _ = expert_of(key)
    if expert is None or index.experts is None:
        return key
    kept = index.experts.tolist()
    if expert not in kept:
        return None
    match = EXPERT_KEY.match(key)
    return f"{match.group(1)}{kept.index(expert)}{match.group(3)}"
