"""Elastic MoE axes: routed experts (a prefix: the router's gate rows and bias entries follow),
expert FFN width and shared-expert width.  Masked elastic logits == the physically sliced plain
Megatron-Core model (`export.slicing`), per axis and all together with the dense axes."""

from __future__ import annotations

import random

import pytest
import torch

from nemo_elastic.elastic.specs import build_elastic_model
from nemo_elastic.elastic.subnet import SubNetwork, sample_subnetwork
from nemo_elastic.export.slicing import slice_model
from tests.conftest import perturb, tiny_config

TOL = 1e-5
MOE = dict(num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=24,
           moe_shared_expert_intermediate_size=16, moe_router_topk_scaling_factor=2.5)


def _parent(pattern="ME*E-", seed=0):
    cfg = tiny_config({"hybrid_layer_pattern": pattern, "moe": MOE})
    elastic = perturb(build_elastic_model(cfg), seed)
    gen = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():  # a score-correction bias that changes the routing
        for name, buf in elastic.named_buffers():
            if name.endswith("router.expert_bias"):
                buf.copy_(0.3 * torch.randn(buf.shape, generator=gen))
    return cfg, elastic


def _rel_error(cfg, elastic, subnet, tokens) -> float:
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    _, child = slice_model(elastic, cfg, subnet)
    with torch.no_grad():
        masked = elastic(tokens, pos, None, subnetwork=subnet)
        sliced = child(tokens, pos, None)
    return ((masked - sliced).norm() / sliced.norm()).item()


@pytest.mark.parametrize("axes", [("experts",), ("expert_ffn",), ("shared_ffn",),
                                  ("experts", "expert_ffn", "shared_ffn", "hidden", "mamba",
                                   "attention", "ffn", "depth")],
                         ids=["experts", "expert_ffn", "shared_ffn", "all"])
def test_moe_axes_masked_equal_sliced(megatron_env, axes):
    cfg, elastic = _parent()
    rng = random.Random(str(axes))
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator()
                           .manual_seed(0))
    for _ in range(3):
        subnet = sample_subnetwork(cfg.model, rng, axes=axes)
        err = _rel_error(cfg, elastic, subnet, tokens)
        assert err <= TOL, (subnet.describe(cfg.model), err)


def test_dropped_experts_are_never_routed_to(megatron_env):
    """Keeping 3 of 8 experts: the kept experts receive every token's top-2; the others none."""
    cfg, elastic = _parent("ME")
    subnet = SubNetwork.uniform(cfg.model, num_moe_experts=3)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24))
    router = elastic.decoder.layers[1].mlp.router
    router.local_tokens_per_expert.zero_()
    elastic(tokens, torch.arange(24).expand(2, 24), None, subnetwork=subnet)
    load = router.local_tokens_per_expert
    assert load[3:].sum() == 0 and load[:3].sum() == 2 * 24 * 2
    # the bias itself is untouched by the masking
    assert torch.isfinite(router.expert_bias).all()
