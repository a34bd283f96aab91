"""ModelOpt's `mcore_minitron` on this project's HybridModel (CPU adapter; `peers` extra).

Oracle: the project's own model built from the pruned config (`build_hybrid_model`) with the
pruned weights loaded strictly must give the pruned model's logits, and those must differ from
the parent's; pruning to the full sizes (every axis re-sorted, nothing dropped) must keep the
parent's logits.  Skips without nvidia-modelopt.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("modelopt")

from tests.conftest import perturb, tiny_config  # noqa: E402


def _build(cfg, seed=0):
    from nemo_elastic.model.build import build_hybrid_model

    torch.manual_seed(seed)
    return build_hybrid_model(cfg, spec_backend="local").eval()


def _logits(model, tokens):
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, pos, None)


def _setup(megatron_env):
    from nemo_elastic.peers import modelopt_minitron as mm

    try:
        mm.require_modelopt()
    except ImportError as e:
        pytest.skip(str(e))
    cfg = tiny_config()
    model = perturb(_build(cfg), seed=1, scale=0.05)
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, cfg.model.vocab_size, (2, 24), generator=gen) for _ in range(3)]
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 20), generator=gen)

    def forward_loop(m):
        for t in calib:
            _logits(m, t)

    return mm, cfg, model, forward_loop, tokens


def _rebuilt_logits(cfg, result, tokens):
    rebuilt = _build(dataclasses.replace(cfg, model=result.model_config), seed=5)
    rebuilt.load_state_dict(result.state_dict, strict=True)
    return rebuilt, _logits(rebuilt, tokens)


def test_width_prune_matches_project_model_of_pruned_config(megatron_env):
    mm, cfg, model, forward_loop, tokens = _setup(megatron_env)
    parent_logits = _logits(model, tokens)
    n_parent = sum(p.numel() for p in model.parameters())
    target = {"hidden_size": 24, "ffn_hidden_size": 48, "num_attention_heads": 2,
              "mamba_num_heads": 2, "mamba_head_dim": 6}
    result = mm.prune(model, cfg.model, forward_loop, export_config=target)
    assert result.export_config == target
    m = result.model_config
    assert (m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.mamba_num_heads,
            m.mamba_head_dim) == (24, 48, 2, 2, 6)
    rebuilt, rebuilt_logits = _rebuilt_logits(cfg, result, tokens)
    assert result.parameters == sum(p.numel() for p in rebuilt.parameters()) < n_parent
    pruned_logits = _logits(model, tokens)
    torch.testing.assert_close(rebuilt_logits, pruned_logits, rtol=0, atol=1e-6)
    assert (pruned_logits - parent_logits).abs().max() > 1e-3  # something was really cut


def test_identity_prune_preserves_logits(megatron_env):
    mm, cfg, model, forward_loop, tokens = _setup(megatron_env)
    parent_logits = _logits(model, tokens)
    m = cfg.model
    full = {"hidden_size": m.hidden_size, "ffn_hidden_size": m.ffn_hidden_size,
            "num_attention_heads": m.num_attention_heads, "mamba_num_heads": m.mamba_num_heads,
            "mamba_head_dim": m.mamba_head_dim}
    result = mm.prune(model, cfg.model, forward_loop, export_config=full)
    assert result.model_config == m
    _, rebuilt_logits = _rebuilt_logits(cfg, result, tokens)
    # every axis re-sorted by ModelOpt's importance, nothing dropped: the same function
    torch.testing.assert_close(rebuilt_logits, parent_logits, rtol=0, atol=1e-5)
    # the import stand-ins are gone: the project still sees no TE and no mamba-ssm kernels
    from nemo_elastic.model.specs import have_transformer_engine
    from nemo_elastic.ops import have_mamba_kernels

    assert not have_transformer_engine() and not have_mamba_kernels()


def test_depth_and_unknown_axes_refused(megatron_env):
    mm, cfg, model, forward_loop, _ = _setup(megatron_env)
    with pytest.raises(ValueError, match="num_layers"):
        mm.prune(model, cfg.model, forward_loop, export_config={"num_layers": 3})
