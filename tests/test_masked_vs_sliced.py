"""The contract: masked elastic logits == the physically sliced model's logits.

For many random hard sub-networks of a small parent (every axis, heterogeneous per-layer sizes,
dropped layers, several Mamba groups and query groups, a sequence longer than the Mamba chunk),
the elastic parent run with the sub-network's masks must compute what `export.slicing` builds:
a plain Megatron-Core HybridModel of the smaller configuration (fp32 relative error <= 1e-5).
"""

import random

import pytest
import torch

from nemo_elastic.elastic.subnet import sample_subnetwork
from nemo_elastic.elastic.specs import build_elastic_model
from nemo_elastic.export.slicing import slice_model
from tests.conftest import perturb, tiny_config

TOL = 1e-5


def _parent(pattern, seed=0, **model):
    cfg = tiny_config({"hybrid_layer_pattern": pattern, "mamba_num_heads": 8, "mamba_num_groups": 2,
                       "num_attention_heads": 4, "num_query_groups": 2, **model})
    elastic = perturb(build_elastic_model(cfg), seed)
    return cfg, elastic


def _max_rel_error(cfg, elastic, subnet, tokens):
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    _, child = slice_model(elastic, cfg, subnet)
    with torch.no_grad():
        masked = elastic(tokens, pos, None, subnetwork=subnet)
        sliced = child(tokens, pos, None)
    return ((masked - sliced).norm() / sliced.norm()).item()


@pytest.mark.parametrize("pattern", ["M-*M-", "*M-M-*", "MM--*"])
def test_random_subnetworks_masked_equal_sliced(megatron_env, pattern):
    cfg, elastic = _parent(pattern)
    rng = random.Random(pattern)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 37))  # 37 > Mamba chunk 16
    errors = [_max_rel_error(cfg, elastic, sample_subnetwork(cfg.model, rng), tokens)
              for _ in range(8)]
    assert max(errors) <= TOL, errors


@pytest.mark.parametrize("axis", ["hidden", "mamba", "head_dim", "attention", "ffn", "depth"])
def test_each_axis_alone_masked_equals_sliced(megatron_env, axis):
    cfg, elastic = _parent("M-*M-*-", seed=1)
    rng = random.Random(7)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 40))
    for _ in range(4):
        subnet = sample_subnetwork(cfg.model, rng, axes=(axis,))
        err = _max_rel_error(cfg, elastic, subnet, tokens)
        assert err <= TOL, (axis, subnet.describe(cfg.model), err)


def test_heterogeneous_parent_slices_again(megatron_env):
    """A sliced heterogeneous child is itself a valid elastic parent (per_layer sizes)."""
    cfg, elastic = _parent("M-*M-")
    rng = random.Random(11)
    first = sample_subnetwork(cfg.model, rng, axes=("mamba", "attention", "ffn"))
    child_cfg, child = slice_model(elastic, cfg, first)
    child_elastic = build_elastic_model(child_cfg)
    child_elastic.load_state_dict(child.state_dict())
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 37))
    second = sample_subnetwork(child_cfg.model, rng, axes=("hidden", "mamba", "ffn"))
    assert _max_rel_error(child_cfg, child_elastic, second, tokens) <= TOL


def test_bf16_parent_masked_close_to_sliced(megatron_env):
    """bf16 params (A_log, D and norms stay fp32): masks follow the parameter dtype; the masked
    and sliced models agree to bf16 precision and the masked backward runs."""
    cfg, elastic = _parent("M-*M-", params_dtype="bfloat16")
    rng = random.Random(5)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 37))
    pos = torch.arange(37).expand_as(tokens)
    for _ in range(3):
        subnet = sample_subnetwork(cfg.model, rng)
        _, child = slice_model(elastic, cfg, subnet)
        with torch.no_grad():
            masked = elastic(tokens, pos, None, subnetwork=subnet).float()
            sliced = child(tokens, pos, None).float()
        assert ((masked - sliced).norm() / sliced.norm()).item() <= 3e-2
    elastic(tokens, pos, None, labels=tokens, subnetwork=subnet).float().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in elastic.parameters() if p.grad is not None)
