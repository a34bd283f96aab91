"""GPU tier: the masked forward behind mamba-ssm's fused kernels (skipped without CUDA).

The elastic Mamba mixer masks the kernel's gated output before the grouped norm, so the fused
`mamba_split_conv1d_scan_combined` path stays in use; these tests check that it matches the
physically sliced model and the torch reference path.
"""

import random

import pytest
import torch

from nemo_elastic.ops import have_mamba_kernels

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
needs_kernels = pytest.mark.skipif(not have_mamba_kernels(),
                                   reason="needs the mamba-ssm and causal-conv1d CUDA kernels")


def _parent():
    from nemo_elastic.elastic.specs import build_elastic_model
    from tests.conftest import perturb, tiny_config

    cfg = tiny_config({"hybrid_layer_pattern": "M-*M-", "mamba_num_heads": 8,
                       "mamba_num_groups": 2, "mamba_chunk_size": 16})
    model = perturb(build_elastic_model(cfg).cuda())
    return cfg, model


@needs_kernels
def test_masked_equals_sliced_with_fused_kernels(megatron_env):
    from nemo_elastic.elastic.subnet import sample_subnetwork
    from nemo_elastic.export.slicing import slice_model

    cfg, elastic = _parent()
    assert not elastic.decoder.layers[0].mixer.use_torch_path
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 64), device="cuda")
    pos = torch.arange(64, device="cuda").expand_as(tokens)
    rng = random.Random(0)
    for _ in range(5):
        subnet = sample_subnetwork(cfg.model, rng)
        _, child = slice_model(elastic, cfg, subnet)
        with torch.no_grad():
            masked = elastic(tokens, pos, None, subnetwork=subnet)
            sliced = child.cuda()(tokens, pos, None)
        assert ((masked - sliced).norm() / sliced.norm()).item() <= 1e-4


@needs_kernels
def test_torch_path_matches_fused_kernels(megatron_env):
    cfg, elastic = _parent()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 64), device="cuda")
    pos = torch.arange(64, device="cuda").expand_as(tokens)
    with torch.no_grad():
        fused = elastic(tokens, pos, None)
        for layer in elastic.decoder.layers:
            if hasattr(getattr(layer, "mixer", None), "use_torch_path"):
                layer.mixer.use_torch_path = True
        reference = elastic(tokens, pos, None)
    assert ((fused - reference).norm() / reference.norm()).item() <= 1e-4
