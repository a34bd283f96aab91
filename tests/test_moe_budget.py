"""Budgets of MoE parents in *active* parameters (what one token touches), and per-layer
(heterogeneous) router choices for the MoE axes.

Oracles: a hand count written out below, and the parameters of the physically sliced
Megatron-Core model minus the routed experts a token does not use."""

from __future__ import annotations

import pytest
import torch

from nemo_elastic.cost_model import (count_active_parameters, count_parameters,
                                 subnetwork_active_parameters, subnetwork_parameters)
from nemo_elastic.config import ConfigError
from nemo_elastic.config_elastic import ElasticConfig
from nemo_elastic.elastic.expected_cost import expected_active_parameters, expected_parameters
from nemo_elastic.elastic.subnet import SubNetwork
from nemo_elastic.router import ElasticRouter
from tests.conftest import perturb, soft_one_hot, tiny_config

MOE = dict(num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=24,
           moe_shared_expert_intermediate_size=16, moe_router_topk_scaling_factor=2.5)
PATTERN = "ME*E"
TOPK = 2


def _cfg(**elastic):
    sections = {"elastic": {"iters": 1000, "warmup_iters": 0, **elastic}} if elastic else {}
    return tiny_config({"hybrid_layer_pattern": PATTERN, "moe": MOE}, **sections)


def _subnet(m) -> SubNetwork:
    """A heterogeneous MoE sub-network: hidden 24 of 32, Mamba 2 heads x 6 of 4 x 8,
    attention 2 of 4 heads, layer 1: 5 experts of width 16, shared 8; layer 3: 3 experts of
    width 24, shared 16 (full)."""
    s = SubNetwork.uniform(m, hidden_size=24, mamba_num_heads=2, mamba_head_dim=6,
                           num_attention_heads=2)
    s = s.replace_layer(1, num_moe_experts=5, moe_ffn_hidden_size=16,
                        moe_shared_expert_intermediate_size=8)
    return s.replace_layer(3, num_moe_experts=3)


def _hand_active(total: bool = False) -> int:
    """`_subnet` counted by hand (V = 64, Mamba groups 2, state 8, conv 4, head dim 8 for
    attention with 2 query groups)."""
    h, V = 24, 64
    d, G, N, H, K = 2 * 6, 2, 8, 2, 4
    mamba = h + (2 * d + 2 * G * N + H) * h + (d + 2 * G * N) * (K + 1) + 3 * H + d + h * d
    attention = h + (2 + 2 * 2) * 8 * h + h * 2 * 8
    moe = 0
    for experts, f, fs in ((5, 16, 8), (3, 24, 16)):
        used = experts if total else TOPK  # a token touches top-k routed experts
        moe += h + experts * h + used * 2 * f * h + 2 * fs * h
    return 2 * V * h + h + mamba + attention + moe


@pytest.mark.parametrize("mode", ["mixture", "scaled"])
def test_active_cost_one_hot_equals_closed_form_and_hand_count(mode):
    m = _cfg().model
    subnet = _subnet(m)
    soft = soft_one_hot(_cfg(), subnet, mode)
    assert expected_active_parameters(m, soft).item() == \
        subnetwork_active_parameters(m, subnet) == _hand_active()
    assert expected_parameters(m, soft).item() == subnetwork_parameters(m, subnet) == \
        _hand_active(total=True)
    # the router's cost for an active budget is the same function
    cfg = _cfg(budget_type="active", budgets={"full": 1.0, "half": 0.5},
               axes=["hidden", "mamba_heads", "moe_experts"])
    router = ElasticRouter(m, cfg.elastic, total_iters=10)
    assert router.cost_of(subnet) == _hand_active()
    assert router.expected_cost(soft).item() == _hand_active()
    assert router.full_cost == count_active_parameters(m) < count_parameters(m)
    assert router.targets[1] == 0.5 * count_active_parameters(m)


def test_active_count_equals_the_sliced_model(megatron_env):
    """Independent of the closed form: the physically sliced Megatron-Core model's parameters,
    less the (experts - top-k) routed experts [f, h] + [h, f] each MoE layer does not use."""
    from nemo_elastic.elastic.specs import build_elastic_model
    from nemo_elastic.export.slicing import slice_model
    from nemo_elastic.model import module_parameters as count_built

    cfg = _cfg()
    subnet = _subnet(cfg.model)
    _, child = slice_model(build_elastic_model(cfg), cfg, subnet)
    unused = 0
    for layer in child.decoder.layers:
        experts = getattr(getattr(layer, "mlp", None), "experts", None)
        if experts is not None:
            local = list(experts.local_experts)
            per_expert = sum(p.numel() for p in local[0].parameters())
            unused += (len(local) - TOPK) * per_expert
    assert count_built(child) == _hand_active(total=True)
    assert count_built(child) - unused == _hand_active()


def test_active_budget_validation():
    # (the expert count alone cannot reach 60 %: every token still touches top-k experts)
    cfg = _cfg(budget_type="active", budgets={"full": "100%", "b60": "60%"},
               axes=["hidden", "moe_expert_ffn"])
    assert cfg.elastic.budgets == {"full": 1.0, "b60": 0.6}
    with pytest.raises(ConfigError, match=r"elastic.budgets.b60=0.6: is below the smallest "
                       r"fraction of the parent's active parameters .* 0.98"):
        _cfg(budget_type="active", budgets={"full": 1.0, "b60": 0.6}, axes=["moe_experts"])
    with pytest.raises(ConfigError, match=r"elastic.budgets.big.*fraction"):
        _cfg(budget_type="active", budgets={"big": 1.5}, axes=["moe_experts"])
    with pytest.raises(ConfigError, match=r"elastic.budget_type.*MoE.*use params"):
        tiny_config(elastic={"iters": 100, "warmup_iters": 0, "budget_type": "active"})


def test_budget_loss_alone_steers_the_router_to_active_budgets():
    """budget_type=active: the budget loss moves the argmax sub-network's *active* parameters
    into the band; the family table reports total and active, the band is judged on active."""
    from nemo_elastic.family_check import check_family
    from nemo_elastic.units import parameters_text, target_text

    m = tiny_config({"hybrid_layer_pattern": "ME*EME", "hidden_size": 64, "kv_channels": 16,
                     "mamba_num_heads": 8, "moe": {**MOE, "moe_ffn_hidden_size": 64,
                                                   "moe_shared_expert_intermediate_size": 64}}
                    ).model
    e = ElasticConfig(iters=1000, warmup_iters=0, budget_type="active",
                      budgets={"full": 1.0, "a60": 0.6},
                      axes=["hidden", "mamba_heads", "moe_experts", "moe_expert_ffn",
                            "moe_shared_ffn"],
                      width_fractions=[1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25])
    router = ElasticRouter(m, e, total_iters=150)
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    for it in range(200):
        for b in (0, 1):
            loss = router.budget_loss(router(b, iteration=it), b)
            opt.zero_grad()
            loss.backward()
            opt.step()
    rows = {r["name"]: r for r in router.family_table()}
    final = router(1, iteration=200, noise=False).subnetwork.hard()
    active = subnetwork_active_parameters(m, final)
    assert abs(active / (0.6 * count_active_parameters(m)) - 1) <= 0.12, active
    row = rows["a60"]
    assert row["active_parameters"] == active and row["parameters"] == \
        subnetwork_parameters(m, final)
    assert row["active_fraction"] == active / count_active_parameters(m)
    assert rows["full"]["active_fraction"] == 1.0 and rows["full"]["parameter_fraction"] == 1.0
    check = check_family(list(rows.values())).by_name()
    assert check["a60"].achieved == row["active_fraction"]
    assert target_text(row) == "0.6 of the active parameters"
    assert f"active {active:,} ({row['active_fraction']:.1%})" in parameters_text(row)


def test_heterogeneous_moe_router_choices_masked_equal_sliced(megatron_env):
    """elastic.heterogeneous on the MoE axes: one expert-count / expert-width / shared-width
    choice per MoE layer; the router's (one-hot) soft sub-network computes the same logits as
    the physically sliced heterogeneous model, and its cost is that model's count."""
    from nemo_elastic.elastic.specs import build_elastic_model
    from nemo_elastic.export.slicing import slice_model

    axes = ["moe_experts", "moe_expert_ffn", "moe_shared_ffn"]
    cfg = tiny_config({"hybrid_layer_pattern": "ME*EE", "moe": MOE},
                      elastic={"iters": 1000, "warmup_iters": 0, "axes": ["hidden", *axes],
                               "heterogeneous": axes, "budget_type": "active",
                               "budgets": {"full": 1.0, "b50": 0.5}})
    m = cfg.model
    router = ElasticRouter(m, cfg.elastic, total_iters=10)
    moe_layers = [i for i, s in enumerate(m.layer_symbols) if s == "E"]
    for axis in axes:
        assert router.layers_of[axis] == moe_layers
        assert router.routers[axis].n_outputs == len(moe_layers)
    # distinct per-layer choices: set the last-layer logits so each MoE layer picks another size
    with torch.no_grad():
        for axis in axes:
            net = router.routers[axis].net
            net[0].weight.fill_(1.0)
            n_choices = router.routers[axis].n_choices
            w = torch.zeros(len(moe_layers), n_choices, net[2].weight.shape[1])
            for row in range(len(moe_layers)):
                w[row, (row + 1) % n_choices] = 1.0
            net[2].weight.copy_(w.view(-1, net[2].weight.shape[1]))
    out = router(1, noise=False, iteration=10 ** 6)  # tau -> tau_end: near one-hot
    hard = out.subnetwork.hard()
    experts = [hard.layers[i].num_moe_experts for i in moe_layers]
    assert len(set(experts)) > 1, experts  # heterogeneous
    for i, layer in zip(moe_layers, range(len(moe_layers))):
        assert experts[layer] == router.choices["moe_experts"][(layer + 1)
                                                              % len(router.choices["moe_experts"])]
    assert router.cost_of(hard) == subnetwork_active_parameters(m, hard)

    elastic = perturb(build_elastic_model(cfg), 5)
    tokens = torch.randint(0, m.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(24).expand(2, 24)
    _, child = slice_model(elastic, cfg, hard)
    with torch.no_grad():
        sliced = child(tokens, pos, None)
        masked = elastic(tokens, pos, None, subnetwork=hard)
        exact = soft_one_hot(cfg, hard, "scaled")  # the router's hard mode at probability 1
        soft_out = elastic(tokens, pos, None, subnetwork=exact)
    for out_ in (masked, soft_out):
        assert ((out_ - sliced).norm() / sliced.norm()).item() <= 1e-5
