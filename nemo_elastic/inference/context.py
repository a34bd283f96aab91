"""Megatron-Core's `StaticInferenceContext` with every layer's state allocated up front.

Megatron allocates a layer's cache on its first inference forward, but its attention allocates
on `torch.cuda.current_device()` (no CPU path) and its Mamba mixer keeps the SSM state in the
parameter dtype.  Here every state is put into `context.key_value_memory_dict` (under the layer
number Megatron looks up) before the first forward, on the layer's own device and with the
layer's OWN sizes, so heterogeneous budgets (per-layer heads / head dims / groups) and budgets
with dropped layers (fewer layers, renumbered) need nothing special:

* attention: key / value `[max_len, batch, num_query_groups_local, head_dim]` in the QKV
  weight's dtype (Megatron's layout: sequence-major);
* Mamba: conv state `[batch, conv_dim_local, d_conv]` (the last d_conv pre-conv inputs of
  [x | B | C], oldest first) in the conv weight's dtype, SSM state `[batch, h_local, p, n]` in
  float32 (as the torch scan accumulates it; float64 for a float64 model).
"""

from __future__ import annotations

import torch
from megatron.core.inference.contexts.static_context import StaticInferenceContext
from megatron.core.ssm.mamba_mixer import MambaMixer
from megatron.core.transformer.attention import Attention


def static_context(model: torch.nn.Module, batch_size: int,
                   max_sequence_length: int) -> StaticInferenceContext:
    """A fresh context for `batch_size` sequences of up to `max_sequence_length` tokens."""
    if batch_size < 1 or max_sequence_length < 1:
        raise ValueError(f"static_context: batch_size={batch_size}, max_sequence_length="
                         f"{max_sequence_length}: both must be >= 1")
    ctx = StaticInferenceContext(batch_size, max_sequence_length)
    for module in model.modules():
        if isinstance(module, Attention):
            weight = module.linear_qkv.weight
            shape = (max_sequence_length, batch_size, module.num_query_groups_per_partition)
            ctx.key_value_memory_dict[module.layer_number] = (
                torch.zeros(*shape, module.key_hidden_size, dtype=weight.dtype,
                            device=weight.device),
                torch.zeros(*shape, module.val_hidden_size, dtype=weight.dtype,
                            device=weight.device))
        elif isinstance(module, MambaMixer):
            conv_shape, ssm_shape = module.mamba_state_shapes_per_request()
            weight = module.conv1d_weight
            state_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
            ctx.key_value_memory_dict[module.layer_number] = (
                torch.zeros(batch_size, *conv_shape, dtype=weight.dtype, device=weight.device),
                torch.zeros(batch_size, *ssm_shape, dtype=state_dtype, device=weight.device))
            # Megatron reallocates (in the parameter dtype) when the batch size differs from
            # the one it last saw; these buffers are the ones to use.
            module.cached_batch_size = batch_size
    return ctx
