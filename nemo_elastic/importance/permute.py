"""Apply `Permutations` to a TP=1 state dict: the same function, every budget a prefix.

Works on full (TP=1) tensors with upstream Megatron-Core names - simplest and exact; `prepare`
therefore loads the parent at TP=1 (any checkpoint reshards on load) and the permuted
checkpoint loads at any TP / PP again.  Every tensor that touches an axis is reindexed with the
same permutation (``perm[new] = old``):

hidden ``p_h [h]``   embedding / output-layer columns, every pre-norm and the final norm, the
                     input columns of in_proj / linear_qkv / linear_fc1 and the output rows of
                     out_proj / linear_proj / linear_fc2;
Mamba (H heads x P channels, G groups, state N; inner index ``head * P + channel``):
                     inner ``q = p_heads[:, None] * P + p_channels[None, :]`` (flattened)
                     in_proj rows ``[z (H*P): q | x (H*P): q | B, C (2*G*N): kept | dt (H): p_heads]``
                     conv1d_weight/bias over ``[x: q | B, C: kept]``; dt_bias, A_log, D: p_heads
                     (D: q when it has the head dim); gated-norm weight: q; out_proj columns: q;
attention (Q groups of a/Q query heads, head dim c):
                     linear_qkv rows per group ``[query heads (a/Q * c) | k (c) | v (c)]``: query
                     blocks reordered within the group, k and v untouched; linear_proj columns
                     ``p_heads[:, None] * c + arange(c)``;
MLP ``p_f [F]``      linear_fc1 rows, linear_fc2 columns.

Why the function is preserved: RMSNorm statistics are sums over the whole hidden axis (and over
each Mamba group's channels for the gated norm) - invariant to a permutation inside the set;
heads never leave their group, so every head keeps reading its group's B / C and K / V.

Unknown keys raise: a parameter this module does not know about would otherwise stay unpermuted
and silently break the function.
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch

from nemo_elastic.config import ATTENTION, MAMBA, MLP, ModelConfig
from nemo_elastic.importance.order import LayerPermutation, Permutations, validate_permutations
from nemo_elastic.model.names import LAYER_KEY, PRE_NORM_KEYS

logger = logging.getLogger(__name__)

Tensor = torch.Tensor


def _take(t: Tensor, dim: int, index: Tensor) -> Tensor:
    return t.index_select(dim, index.to(t.device)).contiguous()


def mamba_inner_index(heads: Tensor, channels: Tensor) -> Tensor:
    """[H*P] inner-channel gather index for a head permutation [H] and a channel one [P]."""
    P = channels.numel()
    return (heads[:, None] * P + channels[None, :]).reshape(-1)


def _mamba(name: str, t: Tensor, p: LayerPermutation, m: ModelConfig, i: int, ph: Tensor) -> Tensor:
    H, P = m.layer_size("mamba_num_heads", i), m.layer_size("mamba_head_dim", i)
    GN = m.mamba_num_groups * m.mamba_state_dim
    q = mamba_inner_index(p.mamba_heads, p.mamba_channels)  # [H*P]
    d = H * P
    bc = torch.arange(2 * GN)
    if name == "mixer.in_proj.weight":  # [2d + 2GN + H, h]
        rows = torch.cat([q, d + q, 2 * d + bc, 2 * d + 2 * GN + p.mamba_heads])
        return _take(_take(t, 0, rows), 1, ph)
    if name in ("mixer.conv1d_weight", "mixer.conv1d_bias"):  # [d + 2GN, 1, k] / [d + 2GN]
        return _take(t, 0, torch.cat([q, d + bc]))
    if name in ("mixer.dt_bias", "mixer.A_log"):  # [H]
        return _take(t, 0, p.mamba_heads)
    if name == "mixer.D":  # [H], or [H*P] with D_has_hdim
        return _take(t, 0, q if t.numel() == d else p.mamba_heads)
    if name == "mixer.norm.weight":  # [d] gated grouped RMSNorm
        return _take(t, 0, q)
    if name == "mixer.out_proj.weight":  # [h, d]
        return _take(_take(t, 1, q), 0, ph)
    raise KeyError(name)


def _attention(name: str, t: Tensor, p: LayerPermutation, m: ModelConfig, i: int,
               ph: Tensor) -> Tensor:
    Hq, Q, c = m.layer_size("num_attention_heads", i), m.num_query_groups, m.head_dim
    per = Hq // Q
    heads = p.attention_heads
    if name == "self_attention.linear_qkv.weight":  # [Q * (per + 2) * c, h]
        block = (per + 2) * c
        rows = []
        for g in range(Q):
            local = heads[g * per:(g + 1) * per] - g * per  # old in-group slots, new order
            q_rows = (local[:, None] * c + torch.arange(c)[None, :]).reshape(-1)
            kv_rows = per * c + torch.arange(2 * c)
            rows.append(g * block + torch.cat([q_rows, kv_rows]))
        return _take(_take(t, 0, torch.cat(rows)), 1, ph)
    if name == "self_attention.linear_proj.weight":  # [h, Hq * c]
        cols = (heads[:, None] * c + torch.arange(c)[None, :]).reshape(-1)
        return _take(_take(t, 1, cols), 0, ph)
    raise KeyError(name)


def _mlp(name: str, t: Tensor, p: LayerPermutation, ph: Tensor) -> Tensor:
    if name == "mlp.linear_fc1.weight":  # [F, h]
        return _take(_take(t, 0, p.ffn), 1, ph)
    if name == "mlp.linear_fc2.weight":  # [h, F]
        return _take(_take(t, 1, p.ffn), 0, ph)
    raise KeyError(name)


def permute_state_dict(state: Mapping[str, object], model_cfg: ModelConfig,
                       perms: Permutations) -> dict[str, object]:
    """A new state dict (TP=1, upstream names) with every axis reordered by `perms`.

    `_extra_state` entries pass through.  Raises ValueError for a key it does not know, or for
    a tensor whose shape does not match `model_cfg`.
    """
    validate_permutations(perms, model_cfg)
    ph = perms.hidden
    symbols = model_cfg.layer_symbols
    out: dict[str, object] = {}
    for key, value in state.items():
        if key.endswith("_extra_state"):
            out[key] = value
            continue
        try:
            out[key] = _permute_one(key, value, model_cfg, perms, symbols, ph)
        except KeyError:
            raise ValueError(f"state dict key {key!r} is not a parameter this reordering knows "
                             "(Nemotron-H hybrid, local or TE spec, no biases); it would stay "
                             "unpermuted and break the model's function") from None
        except IndexError as err:
            raise ValueError(f"state dict tensor {key!r} of shape {tuple(value.shape)} does not "
                             f"match the config ({err}); pass the ModelConfig of these "
                             "weights") from err
        if tuple(out[key].shape) != tuple(value.shape):
            raise ValueError(f"state dict tensor {key!r} has shape {tuple(value.shape)}, which "
                             "does not match the config; pass the ModelConfig of these weights")
    logger.debug("permuted %d tensors", len(out))
    return out


def _permute_one(key: str, t: Tensor, m: ModelConfig, perms: Permutations, symbols: str,
                 ph: Tensor) -> Tensor:
    if key in ("embedding.word_embeddings.weight", "output_layer.weight"):  # [V, h]
        return _take(t, 1, ph)
    if key == "decoder.final_norm.weight":
        return _take(t, 0, ph)
    match = LAYER_KEY.match(key)
    if match is None:
        raise KeyError(key)
    i, name = int(match.group(1)), match.group(2)
    if name in PRE_NORM_KEYS:
        return _take(t, 0, ph)
    if i >= len(symbols) or i not in perms.layers:
        raise KeyError(key)
    p = perms.layers[i]
    if symbols[i] == MAMBA:
        return _mamba(name, t, p, m, i, ph)
    if symbols[i] == ATTENTION:
        return _attention(name, t, p, m, i, ph)
    if symbols[i] == MLP:
        return _mlp(name, t, p, ph)
    raise KeyError(key)


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
