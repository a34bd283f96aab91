"""Inference memory (weights + KV cache + Mamba state) of hard and soft sub-networks:
closed form (`nemo_elastic.cost_model`), expected / differentiable (`nemo_elastic.elastic.expected_cost`)."""

import contextlib
import dataclasses
import math
import random

import pytest
import torch

from nemo_elastic.cost_model import (GB, MemorySpec, count_memory, count_parameters, memory_breakdown,
                                 memory_gb, subnetwork_memory)
from nemo_elastic.config import ConfigError, load_config
from nemo_elastic.elastic.expected_cost import expected_memory, expected_parameters
from nemo_elastic.elastic.masks import SoftAxis, SoftLayer, SoftSubNetwork
from nemo_elastic.elastic.subnet import SubNetwork, sample_subnetwork
from tests.conftest import soft_one_hot, tiny_config

# The first uses the Flextron defaults (batch 1, 131072 tokens, bf16).
SPECS = [MemorySpec(), MemorySpec(batch_size=3, seq_length=1000, bytes_per_param=4.0,
                                  bytes_per_cache=1.0)]


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _soft_full(m, hidden=None, **soft_layers) -> SoftSubNetwork:
    """The full model as a SoftSubNetwork; `soft_layers` = {"L<i>": SoftLayer} overrides."""
    layers = [SoftLayer(**layer.sizes()) for layer in SubNetwork.full(m).layers]
    for name, layer in soft_layers.items():
        layers[int(name[1:])] = layer
    return SoftSubNetwork(hidden_size=m.hidden_size if hidden is None else hidden, layers=layers)


# ------------------------------------------------------------------ (a) one-hot soft == hard

@pytest.mark.parametrize("mode", ["mixture", "scaled"])
@pytest.mark.parametrize("spec", SPECS)
def test_one_hot_memory_equals_hard_memory(mode, spec):
    # One attention layer keeps every byte count below 2**24: exact in the float32 probs' dtype.
    cfg = tiny_config({"hybrid_layer_pattern": "M-*M-", "mamba_num_heads": 8})
    rng = random.Random(0)
    for _ in range(20):
        subnet = sample_subnetwork(cfg.model, rng)  # every axis, depth included
        soft = soft_one_hot(cfg, subnet, mode)
        hard = subnetwork_memory(cfg.model, subnet, spec)
        assert expected_memory(cfg.model, soft, spec).item() == hard


@pytest.mark.parametrize("spec", SPECS)
def test_one_hot_memory_equals_hard_memory_12b(spec):
    cfg = load_config("conf/nemotron_nano_12b.yaml")
    rng = random.Random(1)
    with default_dtype(torch.float64):  # ~3e10 bytes: exact in float64
        for _ in range(5):
            subnet = sample_subnetwork(cfg.model, rng)
            soft = soft_one_hot(cfg, subnet, "mixture")
            hard = subnetwork_memory(cfg.model, subnet, spec)
            assert expected_memory(cfg.model, soft, spec).item() == hard


# ------------------------------------------------------------------ (b) the paper's 12B parent

def test_12b_recipe_matches_hand_calculation():
    m = load_config("conf/nemotron_nano_12b.yaml").model
    assert (m.num_layers, m.layer_symbols.count("M"), m.layer_symbols.count("*"),
            m.layer_symbols.count("-")) == (62, 28, 6, 28)
    # Literal architecture: hidden 5120, vocab 131072, FFN 20480; attention 40 query heads,
    # 8 KV groups x 128; Mamba 128 heads x 80 (d = 10240), 8 groups, state 128, conv 4.
    mamba = (5120 + (2 * 10240 + 2 * 8 * 128 + 128) * 5120 + (10240 + 2 * 8 * 128) * (4 + 1)
             + 3 * 128 + 10240 + 5120 * 10240)
    attention = 5120 + (40 + 2 * 8) * 128 * 5120 + 5120 * 40 * 128
    mlp = 5120 + 2 * 20480 * 5120
    params = 2 * 131072 * 5120 + 5120 + 28 * mamba + 6 * attention + 28 * mlp
    assert params == count_parameters(m) == 12_310_001_152
    # bf16, batch 1, 131072 tokens.
    weights = params * 2
    kv_cache = 6 * (2 * 1 * 131072 * 8 * 128 * 2)  # K and V of the 8 KV groups, per attention layer
    ssm = 1 * 128 * 80 * 128 * 2  # [B, H, P, N]
    conv = 1 * (10240 + 2 * 8 * 128) * (4 - 1) * 2  # [B, d + 2GN, k - 1]
    mamba_state = 28 * (ssm + conv)
    total = weights + kv_cache + mamba_state
    assert (weights, kv_cache, mamba_state, total) == (
        24_620_002_304, 3_221_225_472, 75_464_704, 27_916_692_480)
    assert memory_breakdown(m) == {"weights": weights, "kv_cache": kv_cache,
                                   "mamba_state": mamba_state, "total": total}
    assert count_memory(m, MemorySpec()) == total
    assert memory_gb(m) == pytest.approx(27.91669248, abs=1e-9)
    # Twice the batch (or the context) doubles the caches only.
    double = memory_breakdown(m, MemorySpec(batch_size=2))
    assert (double["weights"], double["kv_cache"], double["mamba_state"]) == (
        weights, 2 * kv_cache, 2 * mamba_state)
    # Dropping an attention layer removes its weights and its KV cache.
    dropped = SubNetwork.full(m).replace_layer(7, keep=False)
    assert memory_gb(m, subnet=dropped) * GB == pytest.approx(
        total - 2 * attention - 2 * 131072 * 8 * 128 * 2)


# ------------------------------------------------------------------ (c) vs a sliced model

def _module_memory(model, spec: MemorySpec) -> int:
    """Bytes of a built model read off its modules: parameters, plus the caches Megatron
    allocates for inference (shapes as in `Attention._allocate_memory` and
    `MambaMixer.mamba_state_shapes_per_request`)."""
    from megatron.core.ssm.mamba_mixer import MambaMixer
    from megatron.core.transformer.attention import Attention

    total = sum(p.numel() * p.element_size() for p in model.parameters())
    cache_bytes = next(model.parameters()).element_size()  # caches take the parameters' dtype
    for module in model.modules():
        if isinstance(module, Attention):  # K [S, B, g, c] and V [S, B, g, c]
            g = module.num_query_groups_per_partition
            values = spec.seq_length * spec.batch_size * g * (module.key_hidden_size
                                                              + module.val_hidden_size)
            total += values * cache_bytes
        elif isinstance(module, MambaMixer):
            (channels, width), ssm_shape = module.mamba_state_shapes_per_request()
            assert width == module.d_conv
            # Megatron keeps k conv columns; only the last k - 1 inputs are state (the convention
            # of nemo_elastic.cost_model, as in vLLM), so one column is not counted.
            total += spec.batch_size * (math.prod(ssm_shape) + channels * (width - 1)) * cache_bytes
    return total


def test_sliced_model_memory_equals_subnetwork_memory(megatron_env):
    from nemo_elastic.export.slicing import slice_model
    from nemo_elastic.model import build_hybrid_model
    from nemo_elastic.runtime import set_seed

    cfg = tiny_config({"hybrid_layer_pattern": "M-*M-*", "mamba_num_heads": 8})
    set_seed(0)
    parent = build_hybrid_model(cfg)
    spec = MemorySpec(batch_size=2, seq_length=48, bytes_per_param=4, bytes_per_cache=4)  # fp32
    assert _module_memory(parent, spec) == count_memory(cfg.model, spec)
    rng = random.Random(3)
    for _ in range(3):
        subnet = sample_subnetwork(cfg.model, rng)
        _, child = slice_model(parent, cfg, subnet)
        assert _module_memory(child, spec) == subnetwork_memory(cfg.model, subnet, spec)


# ------------------------------------------------------------------ (d) gradients

def test_memory_gradients_are_analytic():
    cfg = tiny_config({"hybrid_layer_pattern": "M-*", "mamba_num_heads": 8})
    m, spec = cfg.model, SPECS[0]
    probs = torch.tensor([0.25, 0.75], dtype=torch.float64, requires_grad=True)
    gate = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    soft = _soft_full(m, L0=SoftLayer(mamba_num_heads=SoftAxis([8, 4], probs),
                                      mamba_head_dim=m.mamba_head_dim),
                      L2=SoftLayer(keep=gate, num_attention_heads=m.num_attention_heads))
    cost = expected_memory(m, soft, spec)
    full = SubNetwork.full(m)
    mem = lambda s: subnetwork_memory(m, s, spec)  # noqa: E731
    big, small = mem(full), mem(full.replace_layer(0, mamba_num_heads=4))
    no_attention = mem(full.replace_layer(2, keep=False))
    attention = big - no_attention  # its weights and KV cache
    # Linear in E[heads]: E[cost] = p0 cost(8) + p1 cost(4) - (1 - gate) attention
    assert cost.item() == pytest.approx(0.25 * big + 0.75 * small - 0.6 * attention, rel=1e-12)
    cost.backward()
    per_head = (big - small) / 4
    assert probs.grad.tolist() == pytest.approx([8 * per_head, 4 * per_head], rel=1e-12)
    assert gate.grad.item() == pytest.approx(attention, rel=1e-12)
    assert attention > 2 * 1 * 131072 * m.num_query_groups * m.head_dim * 2  # KV cache included


def test_memory_gradients_match_finite_differences():
    cfg = tiny_config({"hybrid_layer_pattern": "M-*M-", "mamba_num_heads": 8})
    m = cfg.model
    spec = MemorySpec(batch_size=2, seq_length=256)

    def cost(hidden_p, heads_p, dim_p, ffn_p, gate):
        axis = lambda choices, p: SoftAxis(choices, p)  # noqa: E731
        soft = _soft_full(
            m, hidden=axis([32, 16, 8], hidden_p),
            L0=SoftLayer(keep=gate, mamba_num_heads=axis([8, 4, 2], heads_p),
                         mamba_head_dim=axis([8, 3], dim_p)),
            L1=SoftLayer(ffn_hidden_size=axis([64, 20], ffn_p)))
        return expected_memory(m, soft, spec)  # a polynomial in the probabilities and the gate

    args = [torch.tensor(v, dtype=torch.float64, requires_grad=True)
            for v in ([0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.4], [0.1, 0.9], 0.7)]
    assert torch.autograd.gradcheck(cost, args)


def test_expected_memory_checks_layer_count():
    m = tiny_config().model
    soft = _soft_full(m)
    soft.layers = soft.layers[:-1]
    with pytest.raises(ValueError, match="layers"):
        expected_memory(m, soft)
    with pytest.raises(ValueError, match="layers"):
        expected_parameters(m, soft)


# ------------------------------------------------------------------ (e) validation

@pytest.mark.parametrize("name,value", [
    ("batch_size", 0), ("batch_size", -1), ("batch_size", 1.5), ("batch_size", True),
    ("seq_length", 0), ("bytes_per_param", 0), ("bytes_per_param", -2.0),
    ("bytes_per_param", float("nan")), ("bytes_per_param", "2"), ("bytes_per_cache", 0.0),
    ("bytes_per_cache", float("inf"))])
def test_memory_spec_errors_name_the_field(name, value):
    with pytest.raises(ConfigError) as err:
        MemorySpec(**{name: value})
    assert str(err.value).startswith(f"memory.{name}={value!r}: must be a positive")


def test_memory_spec_is_frozen_keyword_only():
    spec = MemorySpec(seq_length=8192)
    assert spec.batch_size == 1 and spec.bytes_per_param == spec.bytes_per_cache == 2.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seq_length = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        MemorySpec(1, 2)  # type: ignore[misc]
