"""(parent weights, hard `SubNetwork`) -> the weights of the physically smaller plain model.

This is THE slicing path: the oracle that masked sub-networks are tested against and the engine
of checkpoint extraction and export.  Which rows and columns of which tensor belong to which
unit is `nemo_elastic.layout` (shared with the importance reordering and the HF mapping, NOT
with the masks, so that masked and sliced models check each other).  What slicing keeps:

* hidden: the first `hidden_size` channels (every tensor on the `hidden` axis);
* Mamba: the first mamba_num_heads/G heads of every group and, of each kept head, the first
  `mamba_head_dim` channels; B, C and the state are never pruned;
* attention: the first num_attention_heads/Q query heads of every query group, K/V kept;
* MLP: the first `ffn_hidden_size` neurons;
* dropped layers are removed and the kept layers renumbered 0..n-1.

Tensors are full TP=1 tensors with upstream Megatron-Core names (local spec; the fused-norm
Transformer-Engine aliases `*.layer_norm_weight` are sliced like the pre-norms they replace).
`_extra_state` entries are not weights and are dropped.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Mapping

import torch

from nemo_elastic.config import ATTENTION, MAMBA, MOE, Config, ModelConfig, ParallelConfig
from nemo_elastic.elastic.subnet import SubNetwork
# first_of_each_group / head_channels: re-exported, callers import them from here
from nemo_elastic.layout import (  # noqa: F401
    LAYER_KEY, LayerIndex, LayoutError, first_of_each_group, head_channels, kept_heads,
    reindex_state_dict)

logger = logging.getLogger(__name__)

Tensor = torch.Tensor


class SlicingError(ValueError):
    """The parent weights do not match the parent config, or the runtime cannot slice."""


def subnetwork_index(parent: ModelConfig, subnet: SubNetwork, layer) -> LayerIndex | None:
    """What `subnet` keeps of global layer `layer` (None: the model-level tensors), as prefix
    indices; None for a dropped layer."""
    hidden = torch.arange(subnet.hidden_size)
    if layer is None:
        return LayerIndex(m=parent, layer=None, hidden=hidden)
    choice = subnet.layers[layer]
    if not choice.keep:
        return None
    sym = parent.layer_symbols[layer]
    if sym == MAMBA:
        return LayerIndex(m=parent, layer=layer, hidden=hidden,
                          heads=kept_heads(parent, layer, choice.mamba_num_heads),
                          channels=torch.arange(choice.mamba_head_dim))
    if sym == ATTENTION:
        return LayerIndex(m=parent, layer=layer, hidden=hidden,
                          heads=kept_heads(parent, layer, choice.num_attention_heads))
    if sym == MOE:
        shared = choice.moe_shared_expert_intermediate_size
        return LayerIndex(m=parent, layer=layer, hidden=hidden,
                          experts=torch.arange(choice.num_moe_experts),
                          expert_ffn=torch.arange(choice.moe_ffn_hidden_size),
                          shared_ffn=None if shared is None else torch.arange(shared))
    return LayerIndex(m=parent, layer=layer, hidden=hidden,
                      ffn=torch.arange(choice.ffn_hidden_size))


def slice_state_dict(parent_sd: Mapping[str, Tensor], parent: ModelConfig,
                     subnet: SubNetwork) -> dict[str, Tensor]:
    """Weights of `subnet.model_config(parent)` cut out of the full TP=1 `parent_sd`.

    Kept layers are renumbered 0..n-1.  Raises SlicingError on a tensor that is not part of the
    model or whose shape disagrees with `parent`; ConfigError if `subnet` does not fit `parent`.
    Returns new tensors (no views of `parent_sd`).
    """
    subnet.validate(parent)
    new_index = {old: new for new, old in enumerate(subnet.kept_layers)}
    try:
        sliced = reindex_state_dict(parent_sd, parent,
                                    lambda layer: subnetwork_index(parent, subnet, layer))
    except LayoutError as err:
        raise SlicingError(f"cannot slice the parent weights: {err}") from None
    out: dict[str, Tensor] = {}
    for key, t in sliced.items():
        match = LAYER_KEY.match(key)
        if match:
            key = f"decoder.layers.{new_index[int(match.group(1))]}.{match.group(2)}"
        out[key] = t
    return out


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------

def child_config(parent_cfg: Config, subnet: SubNetwork) -> Config:
    """`parent_cfg` with the sub-network's model section, TP = PP = 1 and no elastic section
    (a child is a plain model; the parent's elastic rules do not apply to it)."""
    parallel = ParallelConfig(backend=parent_cfg.parallel.backend)
    return dataclasses.replace(parent_cfg.with_model(subnet.model_config(parent_cfg.model)),
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
