"""Apply `Permutations` to a TP=1 state dict: the same function, every budget a prefix.

Works on full (TP=1) tensors with upstream Megatron-Core names - simplest and exact; `prepare`
therefore loads the parent at TP=1 (any checkpoint reshards on load) and the permuted
checkpoint loads at any TP / PP again.  Every tensor that touches an axis is reindexed with the
same permutation (``perm[new] = old``): which rows and columns those are is
`nemo_elastic.layout` (the same table slicing reads), given

hidden ``p_h [h]``, per Mamba layer ``mamba_heads [H]`` (group-preserving) and
``mamba_channels`` ([H, P]: each parent head's own channel order, or [P] the same for every
head), per attention layer ``attention_heads [a]``
(query-group-preserving; K/V untouched), per MLP layer ``ffn [F]``, per MoE layer ``experts
[E]`` (the router's gate rows and score-correction bias entries move with their experts, whose
tensors are renamed), ``expert_ffn [F_e]`` (the same for every expert) and ``shared_ffn [F_s]``.
A MoE layer computes the same function after any expert permutation: the router scores every
expert, and top-k and the weight normalisation do not depend on the experts' order (up to ties).  B, C and the Mamba state
are never reordered.

Why the function is preserved: RMSNorm statistics are sums over the whole hidden axis (and over
each Mamba group's channels for the gated norm) - invariant to a permutation inside the set;
heads never leave their group, so every head keeps reading its group's B / C and K / V; a
head's channels (per-head orders included) move together through in_proj's z and x rows, the
conv's x channels, D, the gated norm's weight and out_proj's columns, and meet only in the
group's norm sum.

Unknown keys raise: a parameter this module does not know about would otherwise stay unpermuted
and silently break the function.
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch

from nemo_elastic.config import ATTENTION, MAMBA, MOE, ModelConfig
from nemo_elastic.importance.order import Permutations, validate_permutations
from nemo_elastic.layout import LayerIndex, LayoutError, expert_key, reindex, tensor_axes

logger = logging.getLogger(__name__)

Tensor = torch.Tensor


def permutation_index(m: ModelConfig, perms: Permutations, layer) -> LayerIndex:
    """`perms` of global layer `layer` (None: the model-level tensors) as a layout index."""
    if layer is None:
        return LayerIndex(m=m, layer=None, hidden=perms.hidden)
    if layer not in perms.layers:
        raise LayoutError(f"no permutation for layer {layer}")
    p, sym = perms.layers[layer], m.layer_symbols[layer]
    if sym == MAMBA:
        return LayerIndex(m=m, layer=layer, hidden=perms.hidden, heads=p.mamba_heads,
                          channels=p.mamba_channels)
    if sym == ATTENTION:
        return LayerIndex(m=m, layer=layer, hidden=perms.hidden, heads=p.attention_heads)
    if sym == MOE:
        return LayerIndex(m=m, layer=layer, hidden=perms.hidden, experts=p.experts,
                          expert_ffn=p.expert_ffn, shared_ffn=p.shared_ffn)
    return LayerIndex(m=m, layer=layer, hidden=perms.hidden, ffn=p.ffn)


def permute_state_dict(state: Mapping[str, object], model_cfg: ModelConfig,
                       perms: Permutations) -> dict[str, object]:
    """A new state dict (TP=1, upstream names) with every axis reordered by `perms`.

    `_extra_state` entries pass through.  Raises ValueError for a key it does not know, or for
    a tensor whose shape does not match `model_cfg`.
    """
    validate_permutations(perms, model_cfg)
    out: dict[str, object] = {}
    index: dict = {}
    for key, value in state.items():
        if key.endswith("_extra_state"):
            out[key] = value
            continue
        try:
            layer, _, axes = tensor_axes(model_cfg, key, value.shape)
            if layer not in index:
                index[layer] = permutation_index(model_cfg, perms, layer)
            out[expert_key(key, index[layer])] = reindex(value, axes, index[layer])
        except LayoutError as err:
            raise ValueError(f"state dict tensor {key!r} cannot be reordered ({err}); a tensor "
                             "left unpermuted would break the model's function") from None
    logger.debug("permuted %d tensors", len(out))
    return out


def permute_model_(model: torch.nn.Module, model_cfg: ModelConfig, perms: Permutations) -> None:
    """Reorder a one-process (TP=1, PP=1) model's weights in place."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        tp = ps.get_tensor_model_parallel_world_size()
        pp = ps.get_pipeline_model_parallel_world_size()
        if tp > 1 or pp > 1:
            # TP shards hold partial tensors; PP stages number their layers locally.
            raise ValueError(f"permute_model_ needs the whole model in one process, got TP={tp}, "
                             f"PP={pp}; load the checkpoint at TP=1, PP=1 to reorder it")
    state = model.state_dict()
    model.load_state_dict(permute_state_dict(state, model_cfg, perms))
