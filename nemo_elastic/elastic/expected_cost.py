"""Differentiable parameter, active-parameter and memory cost of a soft sub-network (the
router's budget term).

Each axis's size is replaced by its expectation under the router's probabilities,
E[size] = sum_i p_i * c_i, and pushed through the same closed-form per-layer walk as
`nemo_elastic.cost_model` (`cost_model.cost_terms`; paper-digest §5.4; Megatron-LM's Flextron computes
the cost the same way).  A soft depth gate multiplies its layer's parameters and its cache (KV
cache / Mamba state); for the router's depth axis that is the layer's survival probability
(`SoftLayer.expected_keep`) in both router modes, as the widths count their expectation in
both.  With one-hot probabilities the result equals `cost_model.subnetwork_parameters` /
`cost_model.subnetwork_memory` of the argmax sub-network exactly.

The cost is computed in the probabilities' dtype; in float32 a 12B model's bytes (~3e10) carry
a relative rounding error of ~1e-7, harmless for a loss.
"""

from __future__ import annotations

from typing import Union

import torch

from nemo_elastic import cost_model
from nemo_elastic.cost_model import MemorySpec
from nemo_elastic.config import ModelConfig
from nemo_elastic.elastic.masks import SoftAxis, SoftSubNetwork

Number = Union[int, float, torch.Tensor]


def expected_size(value) -> Number:
    """An int size, or a SoftAxis's probability-weighted expected size (a 0-dim tensor)."""
    if isinstance(value, SoftAxis):
        choices = torch.as_tensor(value.choices, dtype=value.probs.dtype, device=value.probs.device)
        return (value.probs * choices).sum()
    return value


def _expected_terms(model: ModelConfig, soft: SoftSubNetwork, spec=None) -> dict:
    """`cost_model.cost_terms` at the expected sizes of `soft` (soft gates scale their layer)."""
    if len(soft.layers) != model.num_layers:
        raise ValueError(f"soft sub-network has {len(soft.layers)} layers; the model has "
                         f"{model.num_layers} (pattern {model.hybrid_layer_pattern!r})")
    return cost_model.cost_terms(
        model, spec, hidden=expected_size(soft.hidden_size),
        size=lambda field, i: expected_size(getattr(soft.layers[i], field)),
        keep=lambda i: soft.layers[i].cost_keep())


def _as_tensor(total: Number) -> torch.Tensor:
    # Nothing soft (all sizes fixed, no soft gate): a constant cost.
    return total if isinstance(total, torch.Tensor) else torch.as_tensor(total, dtype=torch.float64)


def expected_parameters(model: ModelConfig, soft: SoftSubNetwork) -> torch.Tensor:
    """E[parameter count] of `soft` as a differentiable scalar tensor."""
    return _as_tensor(cost_model.parameters_from_terms(_expected_terms(model, soft)))


def expected_active_parameters(model: ModelConfig, soft: SoftSubNetwork) -> torch.Tensor:
    """E[active parameters] of `soft` (what one token touches: each MoE layer's router, top-k
    of its routed experts at the expected expert width, and its shared expert) as a
    differentiable scalar tensor; = `expected_parameters` for a model without MoE layers.
    The expert-count axis still enters through the router's gate rows [E, h]."""
    return _as_tensor(cost_model.active_from_terms(_expected_terms(model, soft)))


def expected_memory(model: ModelConfig, soft: SoftSubNetwork,
                    spec: MemorySpec = MemorySpec()) -> torch.Tensor:
    """E[inference memory] of `soft` in bytes (weights + KV cache + Mamba state, see
    `nemo_elastic.cost_model`) as a differentiable scalar tensor; divide by `cost_model.GB` for GB."""
    return _as_tensor(cost_model.memory_from_terms(_expected_terms(model, soft, spec), spec)["total"])
