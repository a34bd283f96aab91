"""Differentiable parameter cost of a soft sub-network (the router's budget term).

Each axis's size is replaced by its expectation under the router's probabilities,
E[size] = sum_i p_i * c_i, and pushed through the same closed-form per-layer formulas as
`nemo_elastic.budget` (paper-digest §5.4; Megatron-LM's Flextron computes the cost the same way).
A soft depth gate multiplies its layer's count.  With one-hot probabilities the result equals
`budget.subnetwork_parameters` of the argmax sub-network exactly.
"""

from __future__ import annotations

from typing import Union

import torch

from nemo_elastic import budget
from nemo_elastic.config import ATTENTION, MAMBA, ModelConfig
from nemo_elastic.elastic.masks import SoftAxis, SoftSubNetwork

Number = Union[int, float, torch.Tensor]


def expected_size(value) -> Number:
    """An int size, or a SoftAxis's probability-weighted expected size (a 0-dim tensor)."""
    if isinstance(value, SoftAxis):
        choices = torch.as_tensor(value.choices, dtype=value.probs.dtype, device=value.probs.device)
        return (value.probs * choices).sum()
    return value


def expected_parameters(model: ModelConfig, soft: SoftSubNetwork) -> torch.Tensor:
    """E[parameter count] of `soft` as a differentiable scalar tensor."""
    h = expected_size(soft.hidden_size)
    total = budget.embedding_parameters(model, h)
    for sym, layer in zip(model.layer_symbols, soft.layers):
        if isinstance(layer.keep, bool) and not layer.keep:
            continue
        if sym == MAMBA:
            count = budget.mamba_parameters(
                h, expected_size(layer.mamba_num_heads), expected_size(layer.mamba_head_dim),
                model.mamba_num_groups, model.mamba_state_dim, model.mamba_conv_kernel)
        elif sym == ATTENTION:
            count = budget.attention_parameters(h, expected_size(layer.num_attention_heads),
                                                model.num_query_groups, model.head_dim)
        else:
            count = budget.mlp_parameters(h, expected_size(layer.ffn_hidden_size))
        total = total + (count * layer.keep if isinstance(layer.keep, torch.Tensor) else count)
    return torch.as_tensor(total, dtype=torch.float64) if not isinstance(total, torch.Tensor) \
        else total
