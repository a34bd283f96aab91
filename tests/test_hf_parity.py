"""Hugging Face NemotronH -> nemo_elastic: logits parity, config checks, parameter counts.

A random tiny `NemotronHForCausalLM` (every parameter perturbed) is saved with transformers,
imported with `import_hf`, and our Megatron model's fp32 logits must match transformers' (its
torch path on CPU, no mamba-ssm) over a sequence longer than the Mamba chunk size.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

pytest.importorskip("transformers")

from tests.hf_util import hf_config, hf_logits, our_logits, random_hf_model, rel_err, save_hf, tokens

from nemo_elastic.cost_model import count_parameters
from nemo_elastic.config import ModelConfig
from nemo_elastic.export import HFConfigError, import_hf

logger = logging.getLogger(__name__)

TOLERANCE = 1e-4

PARITY_CASES = {
    "M-M*-": dict(pattern="M-M*-"),
    "MM*-M-/1group": dict(pattern="MM*-M-", n_groups=1),
    "*-M-M/4groups": dict(pattern="*-M-M", n_groups=4, num_key_value_heads=1),
    "M*M*-/mha/no-conv-bias": dict(pattern="M*M*-", num_key_value_heads=4, use_conv_bias=False),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_logits_match_transformers(case, tmp_path):
    overrides = dict(PARITY_CASES[case])
    cfg = hf_config(overrides.pop("pattern"), **overrides)
    hf_model = random_hf_model(cfg, seed=len(case))
    hf_dir = save_hf(hf_model, tmp_path / "hf")
    ids = tokens()
    ref = hf_logits(hf_model, ids)

    ckpt = import_hf(hf_dir, tmp_path / "ckpt")
    ours = our_logits(ckpt, ids)

    err = rel_err(ours, ref)
    logger.info("parity %s: max relative logit error %.3e", case, err)
    assert ours.shape == ref.shape
    assert err <= TOLERANCE, f"{case}: max relative logit error {err:.3e} > {TOLERANCE}"


# ---------------------------------------------------------------------------------------------
# unsupported Hugging Face configs stop with an error naming the field
# ---------------------------------------------------------------------------------------------

UNSUPPORTED = [
    (dict(pattern="M-E*", moe_latent_size=16), "moe_latent_size"),
    (dict(mlp_hidden_act="silu"), "mlp_hidden_act"),
    (dict(mamba_hidden_act="gelu"), "mamba_hidden_act"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(use_bias=True), "use_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mamba_proj_bias=True), "mamba_proj_bias"),
    (dict(num_nextn_predict_layers=1), "num_nextn_predict_layers"),
    (dict(sliding_window=8), "sliding_window"),
    (dict(time_step_limit=(0.0, 1.0)), "time_step_limit"),
    (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon"),
]


def _write_config(directory, cfg=None, raw_updates=None):
    directory.mkdir(parents=True, exist_ok=True)
    (cfg or hf_config()).save_pretrained(str(directory))
    if raw_updates:
        path = directory / "config.json"
        raw = json.loads(path.read_text())
        raw.update(raw_updates)
        path.write_text(json.dumps(raw))
    return directory


@pytest.mark.parametrize("overrides,field", UNSUPPORTED, ids=[f for _, f in UNSUPPORTED])
def test_unsupported_config_field_is_named(overrides, field, tmp_path):
    overrides = dict(overrides)
    cfg = hf_config(overrides.pop("pattern", "M-M*-"), **overrides)
    hf_dir = _write_config(tmp_path / "hf", cfg)
    with pytest.raises(HFConfigError, match=repr(field)):
        import_hf(hf_dir, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("raw,field", [
    ({"model_type": "mamba2"}, "model_type"),
    ({"norm_before_gate": True}, "norm_before_gate"),
    ({"hybrid_override_pattern": "ME-", "layers_block_type": None, "n_shared_experts": 2},
     "n_shared_experts"),
], ids=["model_type", "norm_before_gate", "legacy-moe-pattern"])
def test_unsupported_raw_field_is_named(raw, field, tmp_path):
    hf_dir = _write_config(tmp_path / "hf", raw_updates=raw)
    with pytest.raises(HFConfigError, match=repr(field)):
        import_hf(hf_dir, tmp_path / "ckpt")


def test_legacy_field_names_are_read(tmp_path):
    """NVIDIA's original config.json names (hybrid_override_pattern, mamba_n_groups, ...)."""
    from nemo_elastic.export import load_hf_config, model_config_from_hf

    hf_dir = _write_config(tmp_path / "hf", raw_updates={
        "hybrid_override_pattern": "M-*", "layers_block_type": None, "mamba_n_groups": 4,
        "mamba_d_conv": 3, "mamba_chunk_size": 8})
    raw = json.loads((hf_dir / "config.json").read_text())
    for key in ("layers_block_type", "n_groups", "conv_kernel", "chunk_size"):
        raw.pop(key, None)
    (hf_dir / "config.json").write_text(json.dumps(raw))
    m = model_config_from_hf(load_hf_config(hf_dir))
    assert (m.hybrid_layer_pattern, m.mamba_num_groups, m.mamba_conv_kernel,
            m.mamba_chunk_size) == ("M-*", 4, 3, 8)


# ---------------------------------------------------------------------------------------------
# parameter counts
# ---------------------------------------------------------------------------------------------

NANO_V2_12B = dict(
    hybrid_layer_pattern="M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-",
    hidden_size=5120, ffn_hidden_size=20480, num_attention_heads=40, num_query_groups=8,
    kv_channels=128, mamba_num_heads=128, mamba_head_dim=80, mamba_num_groups=8,
    mamba_state_dim=128, mamba_conv_kernel=4, vocab_size=131072)


def test_nano_v2_12b_parameter_count_matches_transformers():
    from nemo_elastic.export import hf_config_from_model
    from transformers import NemotronHForCausalLM

    m = ModelConfig(**NANO_V2_12B)
    assert count_parameters(m) == 12_310_001_152
    with torch.device("meta"):  # shapes only, no allocation
        hf_model = NemotronHForCausalLM(hf_config_from_model(m))
    assert sum(p.numel() for p in hf_model.parameters()) == 12_310_001_152


@pytest.mark.parametrize("pattern", ["M-M*-", "*-M-M", "MM-"])
def test_closed_form_count_matches_built_model(pattern, megatron_env):
    from tests.conftest import tiny_config

    from nemo_elastic.model import build_hybrid_model
    from nemo_elastic.model import module_parameters as count_built

    cfg = tiny_config({"hybrid_layer_pattern": pattern})
    model = build_hybrid_model(cfg, spec_backend="local")
    assert count_parameters(cfg.model) == count_built(model)
