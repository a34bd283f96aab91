"""Differentiable expected parameter cost of soft sub-networks vs the closed-form count."""

import random

import pytest
import torch

from nemo_elastic.cost_model import count_parameters, subnetwork_parameters
from nemo_elastic.elastic import SubNetwork
from nemo_elastic.elastic.expected_cost import expected_parameters
from nemo_elastic.elastic.masks import SoftAxis, SoftLayer, SoftSubNetwork
from nemo_elastic.elastic.subnet import sample_subnetwork
from tests.conftest import soft_one_hot, tiny_config


@pytest.mark.parametrize("mode", ["mixture", "scaled"])
def test_one_hot_cost_equals_sliced_count(mode):
    cfg = tiny_config({"hybrid_layer_pattern": "M-*M-", "mamba_num_heads": 8})
    rng = random.Random(0)
    for _ in range(10):
        subnet = sample_subnetwork(cfg.model, rng, axes=("hidden", "mamba", "head_dim",
                                                         "attention", "ffn"))
        cost = expected_parameters(cfg.model, soft_one_hot(cfg, subnet, mode))
        assert cost.item() == subnetwork_parameters(cfg.model, subnet)
    full = SubNetwork.full(cfg.model)
    hard_as_soft = SoftSubNetwork(hidden_size=full.hidden_size,
                                  layers=[SoftLayer(**layer.sizes()) for layer in full.layers])
    assert expected_parameters(cfg.model, hard_as_soft).item() == count_parameters(cfg.model)


def test_cost_is_linear_in_probabilities_and_differentiable():
    cfg = tiny_config({"hybrid_layer_pattern": "M-*"})
    m = cfg.model
    probs = torch.tensor([0.3, 0.7], requires_grad=True)
    ffn = SoftAxis(choices=[m.ffn_hidden_size, m.ffn_hidden_size // 2], probs=probs)
    full = SubNetwork.full(m)
    layers = [SoftLayer(**layer.sizes()) for layer in full.layers]
    layers[1] = SoftLayer(ffn_hidden_size=ffn)
    soft = SoftSubNetwork(hidden_size=m.hidden_size, layers=layers)
    cost = expected_parameters(m, soft)
    big = count_parameters(m)
    small = subnetwork_parameters(m, full.replace_layer(1, ffn_hidden_size=m.ffn_hidden_size // 2))
    assert cost.item() == pytest.approx(0.3 * big + 0.7 * small)
    cost.backward()
    assert probs.grad[0] - probs.grad[1] == pytest.approx(big - small)


def test_soft_depth_gate_scales_its_layer():
    cfg = tiny_config({"hybrid_layer_pattern": "M-*"})
    m = cfg.model
    full = SubNetwork.full(m)
    gate = torch.tensor(0.25, requires_grad=True)
    layers = [SoftLayer(keep=gate if i == 0 else True, **layer.sizes())
              for i, layer in enumerate(full.layers)]
    cost = expected_parameters(m, SoftSubNetwork(hidden_size=m.hidden_size, layers=layers))
    dropped = subnetwork_parameters(m, full.replace_layer(0, keep=False))
    assert cost.item() == pytest.approx(dropped + 0.25 * (count_parameters(m) - dropped))
    cost.backward()
    assert gate.grad.item() == pytest.approx(count_parameters(m) - dropped)
