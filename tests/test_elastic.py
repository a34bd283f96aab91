"""Elastic parent: full budget == upstream bit for bit, soft == hard, router gradients, errors."""

import math
import random

import pytest
import torch

from nemo_elastic.config import ConfigError
from nemo_elastic.elastic import SubNetwork
from nemo_elastic.elastic.masks import SoftAxis, SoftLayer, SoftSubNetwork, hard_masks
from nemo_elastic.elastic.norm import ElasticRMSNorm
from nemo_elastic.elastic.subnet import sample_subnetwork
from nemo_elastic.elastic.specs import build_elastic_model
from nemo_elastic.model import build_hybrid_model
from tests.conftest import perturb, soft_one_hot, tiny_config

PATTERN = "M-*M-"  # Mamba, MLP, attention: every axis


def _cfg(**model):
    return tiny_config({"hybrid_layer_pattern": PATTERN, **model})


def _pair(cfg, seed=0):
    """(plain upstream-spec HybridModel, elastic model) sharing perturbed weights."""
    plain = build_hybrid_model(cfg)
    perturb(plain, seed)
    elastic = build_elastic_model(cfg)
    elastic.load_state_dict(plain.state_dict())
    return plain, elastic


def _tokens(cfg, b=2, s=37):
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, cfg.model.vocab_size, (b, s), generator=gen), torch.arange(s).expand(b, s)


def test_full_budget_bit_identical_to_upstream(megatron_env):
    cfg = _cfg()
    plain, elastic = _pair(cfg)
    tokens, pos = _tokens(cfg)
    reference = plain(tokens, pos, None)
    for subnet in (None, SubNetwork.full(cfg.model)):
        out = elastic(tokens, pos, None, subnetwork=subnet)
        assert torch.equal(out, reference)
    # gradients too
    plain(tokens, pos, None, labels=tokens).sum().backward()
    elastic(tokens, pos, None, labels=tokens, subnetwork=SubNetwork.full(cfg.model)).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), elastic.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_same_parameter_names_and_checkpoint_keys_as_parent(megatron_env):
    cfg = _cfg()
    plain, elastic = _pair(cfg)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in elastic.named_parameters()]
    keys = lambda m: sorted((k, v.key) for k, v in m.sharded_state_dict().items()  # noqa: E731
                            if hasattr(v, "key"))
    assert keys(plain) == keys(elastic)


def test_masks_are_unbound_after_forward_even_on_error(megatron_env):
    cfg = _cfg()
    _, elastic = _pair(cfg)
    tokens, pos = _tokens(cfg)
    subnet = SubNetwork.uniform(cfg.model, hidden_size=16)
    elastic(tokens, pos, None, subnetwork=subnet)
    with pytest.raises(Exception):
        elastic(tokens[:, :0], pos[:, :0], None, subnetwork=subnet)  # empty sequence fails inside
    assert all(getattr(m, "elastic", None) is None for m in elastic.modules())
    assert all(m.elastic_fraction is None for m in elastic.modules() if isinstance(m, ElasticRMSNorm))
    torch.testing.assert_close(elastic(tokens, pos, None), elastic(tokens, pos, None,
                                                                    subnetwork=SubNetwork.full(cfg.model)))


@pytest.mark.parametrize("mode", ["mixture", "scaled"])
def test_one_hot_soft_equals_hard_and_router_gets_gradients(megatron_env, mode):
    cfg = _cfg()
    _, elastic = _pair(cfg)
    tokens, pos = _tokens(cfg)
    rng = random.Random(3)
    for _ in range(3):
        subnet = sample_subnetwork(cfg.model, rng, axes=("hidden", "mamba", "head_dim",
                                                         "attention", "ffn"))
        soft = soft_one_hot(cfg, subnet, mode)
        assert soft.hard() == subnet
        hard_out = elastic(tokens, pos, None, subnetwork=subnet)
        soft_out = elastic(tokens, pos, None, subnetwork=soft)
        assert torch.equal(hard_out, soft_out)
        soft_out.square().mean().backward()
        axes = [soft.hidden_size] + [getattr(layer, f) for layer in soft.layers
                                     for f in ("mamba_num_heads", "mamba_head_dim",
                                               "num_attention_heads", "ffn_hidden_size")]
        for axis in axes:
            if isinstance(axis, SoftAxis):
                assert axis.probs.grad is not None and torch.isfinite(axis.probs.grad).all()
        assert soft.hidden_size.probs.grad.abs().sum() > 0


def test_soft_depth_gate_interpolates(megatron_env):
    cfg = _cfg()
    _, elastic = _pair(cfg)
    tokens, pos = _tokens(cfg)
    full = SubNetwork.full(cfg.model)
    dropped = full.replace_layer(1, keep=False)

    def soft(gate):
        layers = [SoftLayer(keep=gate if i == 1 else True, **layer.sizes())
                  for i, layer in enumerate(full.layers)]
        return SoftSubNetwork(hidden_size=cfg.model.hidden_size, layers=layers)

    torch.testing.assert_close(elastic(tokens, pos, None, subnetwork=soft(torch.tensor(1.0))),
                               elastic(tokens, pos, None, subnetwork=full), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(elastic(tokens, pos, None, subnetwork=soft(torch.tensor(0.0))),
                               elastic(tokens, pos, None, subnetwork=dropped), rtol=1e-6, atol=1e-6)
    gate = torch.tensor(0.5, requires_grad=True)
    elastic(tokens, pos, None, subnetwork=soft(gate)).square().mean().backward()
    assert gate.grad is not None and gate.grad != 0


def test_rms_norm_correction_equals_norm_of_kept_channels():
    torch.manual_seed(0)
    h, kept = 32, 12
    norm = ElasticRMSNorm(h, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(5, h)
    x[:, kept:] = 0
    small = torch.nn.RMSNorm(kept, eps=1e-5)
    with torch.no_grad():
        small.weight.copy_(norm.weight[:kept])
    norm.elastic_fraction = kept / h
    out = norm(x)
    torch.testing.assert_close(out[:, :kept], small(x[:, :kept]), rtol=1e-6, atol=1e-6)
    assert torch.equal(out[:, kept:], torch.zeros(5, h - kept))
    norm.elastic_fraction = None
    assert not torch.allclose(norm(x)[:, :kept], small(x[:, :kept]))


@pytest.mark.parametrize("change,field", [
    ({"hidden_size": 33}, "subnetwork.hidden_size=33"),
    ({"mamba_num_heads": 3}, "subnetwork.layers[0].mamba_num_heads=3"),
    ({"mamba_num_heads": 8}, "subnetwork.layers[0].mamba_num_heads=8"),
    ({"num_attention_heads": 3}, "subnetwork.layers[2].num_attention_heads=3"),
    ({"ffn_hidden_size": 0}, "subnetwork.layers[1].ffn_hidden_size=0"),
    ({"mamba_head_dim": 9}, "subnetwork.layers[0].mamba_head_dim=9"),
])
def test_invalid_subnetworks_name_the_field(change, field):
    cfg = _cfg()
    with pytest.raises(ConfigError) as err:
        SubNetwork.uniform(cfg.model, **change).validate(cfg.model)
    assert field in str(err.value)


def test_tp_cannot_split_and_structural_errors():
    cfg = _cfg()
    with pytest.raises(ConfigError, match=r"layers\[1\].ffn_hidden_size=33.*tensor_model_parallel_size=2"):
        SubNetwork.uniform(cfg.model, ffn_hidden_size=33).validate(cfg.model, tp_size=2)
    with pytest.raises(ConfigError, match="every layer is dropped"):
        SubNetwork.uniform(cfg.model, drop_layers=range(5)).validate(cfg.model)
    with pytest.raises(ConfigError, match=r"layers\[1\].mamba_num_heads=2: layer 1 is an MLP layer"):
        SubNetwork.full(cfg.model).replace_layer(1, mamba_num_heads=2).validate(cfg.model)
    with pytest.raises(ConfigError, match="has 2 entries"):
        SubNetwork(hidden_size=8, layers=SubNetwork.full(cfg.model).layers[:2]).validate(cfg.model)


def test_hard_mask_layout_is_group_aware():
    cfg = _cfg(mamba_num_heads=4, mamba_num_groups=2, mamba_head_dim=8)
    subnet = SubNetwork.uniform(cfg.model, mamba_num_heads=2, mamba_head_dim=3, num_attention_heads=2)
    masks = hard_masks(subnet, cfg.model)
    mamba = masks.layer(0).inner.values.view(4, 8)  # [heads, head_dim], heads of group g: 2g, 2g+1
    expected_heads = torch.tensor([1.0, 0.0, 1.0, 0.0])  # first head of each group
    assert torch.equal(mamba, expected_heads[:, None] * (torch.arange(8) < 3).float()[None, :])
    assert math.isclose(masks.layer(0).inner.fraction, (2 * 3) / (4 * 8))
    attn = masks.layer(2).inner.values  # 4 heads in 2 query groups -> keep head 0 and head 2
    assert torch.equal(attn, torch.tensor([1.0, 0.0, 1.0, 0.0]))
