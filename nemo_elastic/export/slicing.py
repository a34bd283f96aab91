"""(parent weights, hard `SubNetwork`) -> the weights of the physically smaller plain model.

This is THE slicing path: the oracle that masked sub-networks are tested against and the engine
of checkpoint extraction.  Its index rules are written here from the `SubNetwork` definition
alone (nothing is shared with the masking code, so the two can check each other):

* hidden: the first `hidden_size` channels of every tensor that reads or writes the residual
  stream (embedding / output-layer columns, every pre-norm, the final norm, the input columns of
  in_proj / linear_qkv / linear_fc1, the output rows of out_proj / linear_proj / linear_fc2);
* Mamba (TP=1 layout, H heads of P channels in G groups, state N):
    in_proj rows      [z (H*P) | x (H*P) | B (G*N) | C (G*N) | dt (H)]
    conv1d weight/bias over [x (H*P) | B (G*N) | C (G*N)]
  kept heads = the first H_k/G heads of each group (group g owns heads g*H/G .. (g+1)*H/G - 1),
  of each kept head the first P_k channels (head i owns channels i*P .. i*P + P - 1 of z, x, the
  gated norm and the out_proj columns); B, C, and the state are never pruned;
  dt_bias / A_log / D are indexed by kept heads;
* attention (Q query groups, a heads, head dim c): linear_qkv rows per group q are
  [its a/Q query heads (c rows each) | k (c) | v (c)]; the first a_k/Q query heads of every
  group are kept, k and v always; linear_proj columns are the kept heads (global head j belongs
  to group j // (a/Q));
* MLP: the first `ffn_hidden_size` rows of linear_fc1 and columns of linear_fc2;
* dropped layers are removed and the kept layers renumbered 0..n-1.

Tensors are full TP=1 tensors with upstream Megatron-Core names (local spec; the fused-norm
Transformer-Engine aliases `*.layer_norm_weight` are sliced like the pre-norms they replace).
`_extra_state` entries are not weights and are dropped.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Mapping

import torch

from nemo_elastic.config import ATTENTION, MAMBA, MLP, Config, ModelConfig, ParallelConfig
from nemo_elastic.elastic.subnet import LayerChoice, SubNetwork
from nemo_elastic.model.names import LAYER_KEY, PRE_NORM_KEYS

logger = logging.getLogger(__name__)

Tensor = torch.Tensor


class SlicingError(ValueError):
    """The parent weights do not match the parent config, or the runtime cannot slice."""


# ---------------------------------------------------------------------------------------------
# index helpers
# ---------------------------------------------------------------------------------------------

def _rows(t: Tensor, index: Tensor) -> Tensor:
    return t.index_select(0, index.to(t.device))


def _prefix(t: Tensor, dim: int, n: int) -> Tensor:
    return t.narrow(dim, 0, n).clone(memory_format=torch.contiguous_format)


def _expect(name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise SlicingError(f"parent tensor {name!r} has shape {tuple(t.shape)}, expected {shape} "
                           "from the parent config; pass the config the weights were built with")


def first_of_each_group(total: int, groups: int, kept: int) -> Tensor:
    """Indices kept on an axis of `total` items in `groups` contiguous equal groups: the first
    kept/groups items of every group, in group order (Mamba heads, attention query heads)."""
    per, keep = total // groups, kept // groups
    return (torch.arange(groups)[:, None] * per + torch.arange(keep)[None, :]).reshape(-1)


def head_channels(heads: Tensor, head_dim: int, kept_dim: int) -> Tensor:
    """Indices into a [num_heads * head_dim] axis (head i owns i*head_dim .. +head_dim-1) of the
    first `kept_dim` channels of every head in `heads`, in that order."""
    return (heads[:, None] * head_dim + torch.arange(kept_dim)[None, :]).reshape(-1)


# ---------------------------------------------------------------------------------------------
# per layer type: {suffix: tensor} of one parent layer -> {suffix: tensor} of the child layer
# ---------------------------------------------------------------------------------------------

def _slice_mamba(sd: dict[str, Tensor], m: ModelConfig, layer: int, choice: LayerChoice,
                 h: int, where: str) -> dict[str, Tensor]:
    H, P = m.layer_size("mamba_num_heads", layer), m.layer_size("mamba_head_dim", layer)
    G, N = m.mamba_num_groups, m.mamba_state_dim
    heads = first_of_each_group(H, G, choice.mamba_num_heads)
    inner = head_channels(heads, P, choice.mamba_head_dim)  # into [H*P]
    d, bc = H * P, torch.arange(2 * G * N)
    # in_proj rows [z | x | B | C | dt]; conv channels [x | B | C]
    in_rows = torch.cat([inner, d + inner, 2 * d + bc, 2 * d + 2 * G * N + heads])
    conv_rows = torch.cat([inner, d + bc])
    out: dict[str, Tensor] = {}
    for key, t in sd.items():
        name = where + key
        if key in PRE_NORM_KEYS:
            _expect(name, t, (m.hidden_size,))
            out[key] = _prefix(t, 0, h)
        elif key == "mixer.in_proj.weight":
            _expect(name, t, (2 * d + 2 * G * N + H, m.hidden_size))
            out[key] = _prefix(_rows(t, in_rows), 1, h)
        elif key == "mixer.conv1d_weight":
            _expect(name, t, (d + 2 * G * N, 1, m.mamba_conv_kernel))
            out[key] = _rows(t, conv_rows)
        elif key == "mixer.conv1d_bias":
            _expect(name, t, (d + 2 * G * N,))
            out[key] = _rows(t, conv_rows)
        elif key in ("mixer.dt_bias", "mixer.A_log"):
            _expect(name, t, (H,))
            out[key] = _rows(t, heads)
        elif key == "mixer.D":  # [H], or [H*P] when Megatron's D_has_hdim is set
            if tuple(t.shape) != (H,):
                _expect(name, t, (d,))
            out[key] = _rows(t, heads if t.shape[0] == H else inner)
        elif key == "mixer.norm.weight":  # gated RMSNorm over [H*P], groups of H*P/G
            _expect(name, t, (d,))
            out[key] = _rows(t, inner)
        elif key == "mixer.out_proj.weight":
            _expect(name, t, (m.hidden_size, d))
            out[key] = _prefix(t, 0, h).index_select(1, inner)
        else:
            raise SlicingError(f"unexpected Mamba tensor {name!r}: slicing knows the upstream "
                               "TP=1 Megatron-Core names only")
    return out


def _slice_attention(sd: dict[str, Tensor], m: ModelConfig, layer: int, choice: LayerChoice,
                     h: int, where: str) -> dict[str, Tensor]:
    a, Q, c = m.layer_size("num_attention_heads", layer), m.num_query_groups, m.head_dim
    per, keep = a // Q, choice.num_attention_heads // Q
    qkv_rows = []  # per group q: [kept q heads | k | v] of its block [(per + 2) * c rows]
    for q in range(Q):
        start = q * (per + 2) * c
        qkv_rows += [start + j * c + torch.arange(c) for j in range(keep)]
        qkv_rows += [start + per * c + torch.arange(c), start + (per + 1) * c + torch.arange(c)]
    qkv_rows = torch.cat(qkv_rows)
    proj_cols = head_channels(first_of_each_group(a, Q, choice.num_attention_heads), c, c)
    out: dict[str, Tensor] = {}
    for key, t in sd.items():
        name = where + key
        if key in PRE_NORM_KEYS:
            _expect(name, t, (m.hidden_size,))
            out[key] = _prefix(t, 0, h)
        elif key == "self_attention.linear_qkv.weight":
            _expect(name, t, ((a + 2 * Q) * c, m.hidden_size))
            out[key] = _prefix(_rows(t, qkv_rows), 1, h)
        elif key == "self_attention.linear_proj.weight":
            _expect(name, t, (m.hidden_size, a * c))
            out[key] = _prefix(t, 0, h).index_select(1, proj_cols)
        else:
            raise SlicingError(f"unexpected attention tensor {name!r} (biases, q/k layernorms "
                               "and gated attention are not part of this model)")
    return out


def _slice_mlp(sd: dict[str, Tensor], m: ModelConfig, layer: int, choice: LayerChoice,
               h: int, where: str) -> dict[str, Tensor]:
    F, f = m.layer_size("ffn_hidden_size", layer), choice.ffn_hidden_size
    out: dict[str, Tensor] = {}
    for key, t in sd.items():
        name = where + key
        if key in PRE_NORM_KEYS:
            _expect(name, t, (m.hidden_size,))
            out[key] = _prefix(t, 0, h)
        elif key == "mlp.linear_fc1.weight":  # [F, h]
            _expect(name, t, (F, m.hidden_size))
            out[key] = _prefix(_prefix(t, 0, f), 1, h)
        elif key == "mlp.linear_fc2.weight":  # [h, F]
            _expect(name, t, (m.hidden_size, F))
            out[key] = _prefix(_prefix(t, 0, h), 1, f)
        else:
            raise SlicingError(f"unexpected MLP tensor {name!r} (biases and gated MLPs are not "
                               "part of this model)")
    return out


_SLICERS: dict[str, Callable[..., dict[str, Tensor]]] = {
    MAMBA: _slice_mamba, ATTENTION: _slice_attention, MLP: _slice_mlp}

# Model-level tensors: hidden is the only pruned axis.
_GLOBAL = {"embedding.word_embeddings.weight": 1,  # [V, h]: columns
           "output_layer.weight": 1,  # [V, h]
           "decoder.final_norm.weight": 0}  # [h]


def slice_state_dict(parent_sd: Mapping[str, Tensor], parent: ModelConfig,
                     subnet: SubNetwork) -> dict[str, Tensor]:
    """Weights of `subnet.model_config(parent)` cut out of the full TP=1 `parent_sd`.

    Kept layers are renumbered 0..n-1.  Raises SlicingError on a tensor that is not part of the
    model or whose shape disagrees with `parent`; ConfigError if `subnet` does not fit `parent`.
    Returns new tensors (no views of `parent_sd`).
    """
    subnet.validate(parent)
    h, symbols = subnet.hidden_size, parent.layer_symbols
    new_index = {old: new for new, old in enumerate(subnet.kept_layers)}
    per_layer: dict[int, dict[str, Tensor]] = {i: {} for i in range(len(symbols))}
    out: dict[str, Tensor] = {}
    for key, t in parent_sd.items():
        if key.endswith("_extra_state"):
            continue  # TE/fp8 metadata, not a weight (None for the local spec)
        match = LAYER_KEY.match(key)
        if match:
            layer = int(match.group(1))
            if layer >= len(symbols):
                raise SlicingError(f"parent tensor {key!r}: the parent config has only "
                                   f"{len(symbols)} layers ({parent.hybrid_layer_pattern!r})")
            per_layer[layer][match.group(2)] = t
        elif key in _GLOBAL:
            dim = _GLOBAL[key]
            _expect(key, t, (parent.hidden_size,) if dim == 0
                    else (parent.vocab_size, parent.hidden_size))
            out[key] = _prefix(t, dim, h)
        else:
            raise SlicingError(f"unexpected parent tensor {key!r}: slicing knows the upstream "
                               "TP=1 Megatron-Core names only (unwrap DDP/Float16Module first)")
    for layer, tensors in per_layer.items():
        if layer not in new_index:
            continue  # dropped: the residual stream passes through
        where = f"decoder.layers.{layer}."
        sliced = _SLICERS[symbols[layer]](tensors, parent, layer, subnet.layers[layer], h, where)
        out.update({f"decoder.layers.{new_index[layer]}.{k}": v for k, v in sliced.items()})
    return out


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------

def child_config(parent_cfg: Config, subnet: SubNetwork) -> Config:
    """`parent_cfg` with the sub-network's model section and TP = PP = 1."""
    parallel = ParallelConfig(backend=parent_cfg.parallel.backend)
    return dataclasses.replace(parent_cfg, model=subnet.model_config(parent_cfg.model),
                               parallel=parallel)


def _require_single_stage_runtime() -> None:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise SlicingError("slice_model needs the Megatron runtime initialized at TP=1, PP=1 "
                           "(nemo_elastic.runtime.distributed(ParallelConfig()) or "
                           "nemo_elastic.export.common.tp1_runtime())")
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    if (tp, pp) != (1, 1):
        raise SlicingError(f"slice_model works on whole (unsharded) models, but Megatron runs with "
                           f"tensor_model_parallel_size={tp}, pipeline_model_parallel_size={pp}; "
                           "slice in a TP=1/PP=1 process (e.g. extract_checkpoint)")


def slice_model(parent_model: torch.nn.Module, parent_cfg: Config, subnet: SubNetwork, *,
                spec_backend: str = "auto") -> tuple[Config, torch.nn.Module]:
    """Build the plain smaller `HybridModel` of `subnet` and load the sliced parent weights.

    `parent_model` is the whole TP=1 model (wrappers such as DDP are unwrapped).  The child
    is built with `build_hybrid_model(child_cfg, spec_backend=spec_backend)` (use the parent's
    backend so parameter names agree) and loaded strictly; it is left in the parent's
    train/eval mode.
    """
    from megatron.core.utils import unwrap_model

    from nemo_elastic.model import build_hybrid_model

    _require_single_stage_runtime()
    parent_model = unwrap_model(parent_model)
    child_cfg = child_config(parent_cfg, subnet)
    with torch.no_grad():
        sliced = slice_state_dict(parent_model.state_dict(), parent_cfg.model, subnet)
    child = build_hybrid_model(child_cfg, spec_backend=spec_backend, perform_initialization=False)
    result = child.load_state_dict(sliced, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise SlicingError(f"sliced weights do not match the child model built from "
                           f"{subnet.describe(parent_cfg.model)}: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    child.train(parent_model.training)
    logger.info("sliced %s", subnet.describe(parent_cfg.model))
    return child_cfg, child
