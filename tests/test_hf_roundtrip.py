"""Hugging Face -> nemo_elastic -> Hugging Face: the exported directory is the original again.

`import_hf` then `export_hf`; `transformers.AutoModelForCausalLM.from_pretrained` reloads the
export with no custom code, its logits equal the original's, and the safetensors hold the same
tensors (names, shapes, dtypes, values - exactly).  Also: sharded files both ways, overwrite
protection, the exported config's fields.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from safetensors import safe_open
from tests.hf_util import hf_config, hf_logits, random_hf_model, save_hf, tokens

from nemo_elastic.checkpoint import CheckpointError
from nemo_elastic.export import export_hf, import_hf
from nemo_elastic.export.hf_adapter import NO_DT_CLAMP

INDEX = "model.safetensors.index.json"


def _tensors(directory) -> dict[str, torch.Tensor]:
    """All tensors of a HF directory (single file or shards)."""
    files = sorted(directory.glob("*.safetensors"))
    assert files, f"no safetensors in {directory}"
    out = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                assert name not in out, f"{name} in two shards"
                out[name] = f.get_tensor(name)
    return out


def _assert_same_tensors(a_dir, b_dir) -> None:
    a, b = _tensors(a_dir), _tensors(b_dir)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A random tiny HF model (attention with GQA, two Mamba layers) saved by transformers."""
    model = random_hf_model(hf_config("M-*M-", n_groups=2, eos_token_id=5, bos_token_id=3), seed=7)
    return model, save_hf(model, tmp_path_factory.mktemp("orig") / "hf")


def test_import_export_reload(original, tmp_path):
    from transformers import AutoModelForCausalLM

    model, hf_dir = original
    ckpt = import_hf(hf_dir, tmp_path / "ckpt")
    out = export_hf(ckpt, tmp_path / "export")

    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    _assert_same_tensors(hf_dir, out)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(reloaded).__name__ == "NemotronHForCausalLM"
    ids = tokens()
    torch.testing.assert_close(hf_logits(reloaded, ids), hf_logits(model, ids), rtol=0, atol=0)


def test_exported_config_fields(original, tmp_path):
    _, hf_dir = original
    out = export_hf(import_hf(hf_dir, tmp_path / "ckpt"), tmp_path / "export")
    orig = json.loads((hf_dir / "config.json").read_text())
    new = json.loads((out / "config.json").read_text())
    for key in ("model_type", "layers_block_type", "hidden_size", "intermediate_size",
                "num_attention_heads", "num_key_value_heads", "head_dim", "mamba_num_heads",
                "mamba_head_dim", "n_groups", "ssm_state_size", "conv_kernel", "chunk_size",
                "layer_norm_epsilon", "vocab_size", "max_position_embeddings",
                "tie_word_embeddings", "mlp_hidden_act", "use_conv_bias", "dtype",
                "bos_token_id", "eos_token_id", "pad_token_id", "num_nextn_predict_layers"):
        assert new[key] == orig[key], key
    assert new["architectures"] == ["NemotronHForCausalLM"]
    # transformers clamps dt >= time_step_min; Megatron does not: the export disables the clamp
    assert new["time_step_min"] == NO_DT_CLAMP
    assert new["time_step_limit"][0] == 0.0


def test_sharded_both_ways(original, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = original
    sharded_in = save_hf(model, tmp_path / "hf_sharded", max_shard_size="20KB")
    assert (sharded_in / INDEX).is_file()
    ckpt = import_hf(sharded_in, tmp_path / "ckpt")
    out = export_hf(ckpt, tmp_path / "export", max_shard_bytes=20_000)

    index = json.loads((out / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).is_file() for f in files)
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    tensors = _tensors(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in tensors.values())
    _assert_same_tensors(sharded_in, out)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = tokens(seed=3)
    torch.testing.assert_close(hf_logits(reloaded, ids), hf_logits(model, ids), rtol=0, atol=0)


def test_bfloat16_roundtrip_is_exact(original, tmp_path):
    """A bf16 HF model becomes a bf16 checkpoint (params_dtype) and exports bit-identically."""
    from nemo_elastic.checkpoint import config_from_checkpoint

    model, _ = original
    hf_dir = save_hf(model.to(torch.bfloat16), tmp_path / "hf_bf16")
    model.to(torch.float32)  # the module-scoped fixture is shared
    ckpt = import_hf(hf_dir, tmp_path / "ckpt")
    assert config_from_checkpoint(ckpt).model.params_dtype == "bfloat16"
    out = export_hf(ckpt, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    _assert_same_tensors(hf_dir, out)


def test_model_prefix_and_initialized_runtime(original, tmp_path, megatron_env):
    """Weights named `model.*` (the in-memory transformers names) import too, and conversions
    reuse an already initialized single-process Megatron runtime."""
    from safetensors.torch import save_file

    _, hf_dir = original
    src = tmp_path / "hf_model_prefix"
    src.mkdir()
    shutil.copy(hf_dir / "config.json", src / "config.json")
    renamed = {name.replace("backbone.", "model.", 1): t for name, t in _tensors(hf_dir).items()}
    save_file(renamed, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = export_hf(import_hf(src, tmp_path / "ckpt"), tmp_path / "export")
    _assert_same_tensors(hf_dir, out)


def test_overwrite_refused_without_flag(original, tmp_path):
    _, hf_dir = original
    ckpt = import_hf(hf_dir, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="already exists"):
        import_hf(hf_dir, ckpt)
    import_hf(hf_dir, ckpt, overwrite=True)

    out = export_hf(ckpt, tmp_path / "export")
    marker = out / "config.json"
    before = marker.read_text()
    with pytest.raises(CheckpointError, match="already exists"):
        export_hf(ckpt, out)
    assert marker.read_text() == before
    export_hf(ckpt, out, overwrite=True)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "temporary dir left"


def test_export_rejects_unrepresentable_model(tmp_path):
    """A checkpoint whose norm eps differs from Megatron's fixed Mamba gated-norm eps (1e-5)."""
    from tests.conftest import tiny_config

    from nemo_elastic.export import HFConfigError, hf_config_from_model

    cfg = tiny_config({"layernorm_epsilon": 1e-6})
    with pytest.raises(HFConfigError, match="layernorm_epsilon"):
        hf_config_from_model(cfg.model)
    assert math.isclose(hf_config_from_model(tiny_config().model).layer_norm_epsilon, 1e-5)
