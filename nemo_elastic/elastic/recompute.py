"""Activation recompute that sees the masks of its own forward call.

Megatron re-runs parts of the forward in the backward pass: whole layers (full recompute) or
sub-modules (selective).  That happens after `ElasticHybridModel.forward` unbound its masks and,
with pipeline parallelism (1F1B), after the forward of the next micro-batch, which may run another
sub-network.  So every recompute unit carries the masks of the forward that created it:

* reentrant checkpoints (`tensor_parallel.checkpoint`: the chunks of full recompute, built by
  `ElasticHybridStack`; the "mlp" module, which `ElasticMLP` checkpoints itself) take the mask
  tensors as extra checkpoint *inputs* and re-bind masks rebuilt from them inside the
  checkpointed function.  Inputs, not a closure: in the recompute they arrive detached with
  requires_grad, the checkpoint returns their gradients, and those flow on through the outer
  graph - soft (router-driven) masks stay autograd-connected to the router.  A closure would make
  the recompute's inner backward run through the router's graph, once per checkpoint.
* "layernorm" (`CheckpointWithoutOutput` around a pre-norm): the norm's only mask is a python
  float (the active hidden fraction), so its run function is wrapped to pin that fraction.
* "core_attn" re-runs DotProductAttention, which no mask reaches (the head mask scales the
  `linear_proj` input, outside the checkpoint): nothing to do.

Mamba layers have no selective recompute in Megatron-Core 0.19.  Every other recompute module
("moe", "moe_act", "shared_experts", "mla_up_proj", "gdn_norm_out": layers this model does not
have) and full recompute under fp8/fp4 are refused at model build (`check_config`); a layer whose
recompute was not adopted here is refused at its first masked forward
(`state.check_recompute_adopted`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import random as mrandom

from nemo_elastic.elastic.norm import ElasticRMSNorm
from nemo_elastic.elastic.sliced import pinned
from nemo_elastic.elastic.state import ADOPTED, ElasticMixin

SELECTIVE = ("core_attn", "layernorm", "mlp")

# (flag, CheckpointWithoutOutput attribute, norm attribute) of Megatron's TransformerLayer.
_NORM_CHECKPOINTS = (
    ("recompute_input_layernorm", "input_layernorm_checkpoint", "input_layernorm"),
    ("recompute_pre_mlp_layernorm", "pre_mlp_norm_checkpoint", "pre_mlp_layernorm"),
)


# ------------------------------------------------------------------------------- config

def check_config(config) -> None:
    """Raise (at model build) for a recompute setting whose recompute could not see its masks."""
    granularity = config.recompute_granularity
    if granularity == "full" and (config.fp8 or config.fp4):
        raise ValueError(
            "recompute_granularity='full' with fp8/fp4: the elastic stack recomputes through "
            "megatron tensor_parallel.checkpoint (masks as inputs), not Transformer-Engine's "
            "te_checkpoint; disable fp8/fp4 or use recompute_granularity='selective'")
    if granularity == "selective":
        modules = list(config.recompute_modules)
        bad = sorted(set(modules) - set(SELECTIVE))
        if bad:
            raise ValueError(
                f"recompute_modules={modules}: {bad} not supported by the elastic hybrid model "
                f"(supported: {list(SELECTIVE)}); remove {bad}")
        if "layernorm" in modules and not hasattr(mrandom, "FP8GlobalStateManager"):
            # CheckpointWithoutOutput(fp8=False) sets self.fp8 = (fp8 is not None) = True and
            # then calls Transformer-Engine's FP8GlobalStateManager, which is absent without TE.
            raise ValueError(
                f"recompute_modules={modules}: 'layernorm' needs Transformer-Engine (megatron-core "
                "0.19's CheckpointWithoutOutput uses TE's FP8GlobalStateManager even without fp8); "
                "install transformer-engine or remove 'layernorm'")


# ------------------------------------------------------------------------------- masks as inputs

class _Slot(int):
    """Placeholder for the i-th tensor of a mask structure."""


def split(masks: Any) -> tuple[list[torch.Tensor], Callable[[Sequence[torch.Tensor]], Any]]:
    """(tensors, fill): the tensors inside a mask structure (dataclasses, dicts, lists, tuples;
    e.g. `ElasticMasks`, `ModuleMasks`, None) in a fixed order, and a function that rebuilds the
    same structure - floats (fractions, dropped gates) kept - around replacement tensors."""
    tensors: list[torch.Tensor] = []

    def walk(x, leaf):
        if isinstance(x, (torch.Tensor, _Slot)):
            return leaf(x)
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return dataclasses.replace(x, **{f.name: walk(getattr(x, f.name), leaf)
                                             for f in dataclasses.fields(x) if f.init})
        if isinstance(x, dict):
            return {k: walk(v, leaf) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v, leaf) for v in x)
        return x

    def take(t):
        tensors.append(t)
        return _Slot(len(tensors) - 1)

    template = walk(masks, take)

    def fill(values: Sequence[torch.Tensor]) -> Any:
        if len(values) != len(tensors):
            raise ValueError(f"expected {len(tensors)} mask tensors, got {len(values)}")
        return walk(template, lambda slot: values[slot])

    return tensors, fill


def checkpoint_with_masks(function: Callable, masks: Any, bind: Callable[[Any], Any], *args,
                          distribute_saved_activations: bool = False):
    """`tensor_parallel.checkpoint` of `function(*args, masks)`, run under `bind(masks)` both in
    the forward and in the recompute; the mask tensors are extra checkpoint inputs (after `args`,
    whose first entry is the one `distribute_saved_activations` splits)."""
    tensors, fill = split(masks)
    n = len(args)

    def run(*inputs):
        rebuilt = fill(inputs[n:])
        with bind(rebuilt):
            return function(*inputs[:n], rebuilt)

    return tensor_parallel.checkpoint(run, distribute_saved_activations, *args, *tensors)


def checkpoint_module(module: ElasticMixin, function: Callable, *args, **kwargs):
    """Reentrant checkpoint of `function(*args, **kwargs)` (a method of `module`) that re-binds
    `module.elastic` - the masks bound now, None included - in forward and recompute."""
    def run(*inputs):  # (*args, masks); the masks are already bound to module.elastic
        return function(*inputs[:-1], **kwargs)

    return checkpoint_with_masks(run, module.elastic, lambda masks: pinned(module, elastic=masks),
                                 *args)


# ------------------------------------------------------------------------------- full recompute

def full_recompute_plan(config, num_layers: int) -> list[tuple[int, int, bool]]:
    """(start, end, checkpointed) layer ranges of this stage, as Megatron's `checkpointed_forward`
    splits them: 'uniform' = chunks of recompute_num_layers layers, all checkpointed; 'block' =
    single layers, the first recompute_num_layers checkpointed."""
    k = config.recompute_num_layers
    if config.recompute_method == "uniform":
        return [(s, min(s + k, num_layers), True) for s in range(0, num_layers, k)]
    if config.recompute_method == "block":
        return [(i, i + 1, i < k) for i in range(num_layers)]
    raise ValueError(f"recompute_method={config.recompute_method!r}: must be 'uniform' or 'block'")


# ------------------------------------------------------------------------ selective recompute

def adopt(layer: torch.nn.Module) -> None:
    """Make every Megatron selective recompute of `layer` re-bind the masks of its forward:
    the "mlp" checkpoint moves into `ElasticMLP` (masks as inputs); each pre-norm
    `CheckpointWithoutOutput` gets its run function wrapped after the layer's forward."""
    if getattr(layer, "recompute_mlp", False) and isinstance(layer.mlp, ElasticMixin):
        # (A non-elastic mlp - the IdentityOp of attention layers - has no masks to lose.)
        if not getattr(layer.mlp, "supports_masked_recompute", False):
            raise ValueError(f"layer {layer.layer_number}: recompute_modules has 'mlp' but "
                             f"{type(layer.mlp).__name__} cannot checkpoint itself with its masks")
        layer.recompute_mlp = False
        layer.mlp.checkpointed = True
    if any(getattr(layer, flag, False) for flag, _, _ in _NORM_CHECKPOINTS):
        layer.register_forward_hook(_pin_norm_recompute)
    setattr(layer, ADOPTED, True)


def _pin_norm_recompute(layer, args, output) -> None:
    """Forward hook: this call's norm checkpoints recompute with this call's hidden fraction."""
    for flag, checkpoint_name, norm_name in _NORM_CHECKPOINTS:
        if not getattr(layer, flag, False):
            continue
        checkpoint = getattr(layer, checkpoint_name, None)
        if not hasattr(checkpoint, "run_function"):
            raise RuntimeError(
                f"layer {layer.layer_number}: {flag} is set but the layer has no "
                f"CheckpointWithoutOutput `{checkpoint_name}` (Megatron-Core changed); the norm "
                "recompute cannot be given its masks - remove 'layernorm' from recompute_modules")
        norm = getattr(layer, norm_name)
        if checkpoint.run_function is not None and isinstance(norm, ElasticRMSNorm):
            checkpoint.run_function = _with_fraction(checkpoint.run_function, norm,
                                                     norm.elastic_fraction, norm.elastic_width)


def _with_fraction(run_function: Callable, norm: ElasticRMSNorm, fraction, width=None) -> Callable:
    """The norm's masked hidden fraction (or sliced width) of this call, pinned in its recompute."""
    def run(*inputs):
        with pinned(norm, elastic_fraction=fraction), pinned(norm, elastic_width=width):
            return run_function(*inputs)
    return run
