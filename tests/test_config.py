"""Config validation: every structural rule fails with a message naming field, value and fix."""

import pytest

from nemo_elastic.config import Config, ConfigError, from_dict, load_config, parse_layer_pattern
from tests.conftest import tiny_model_dict


def _config(model=None, **sections):
    data = {"model": tiny_model_dict(**(model or {}))}
    data.update(sections)
    return from_dict(Config, data)


def test_tiny_recipe_loads_with_overrides():
    cfg = load_config("conf/tiny.yaml", ["train.iters=70", "model.hidden_size=128"])
    assert cfg.train.iters == 70 and cfg.model.hidden_size == 128
    assert cfg.model.num_layers == len(cfg.model.hybrid_layer_pattern)


@pytest.mark.parametrize("pattern,needle", [
    ("M-X*", "unknown symbol 'X' at position 2"),
    ("M-E*", "has MoE layers ('E') but model.moe is not set"),
    ("M-M*/MM", "MTP"),
    ("", "non-empty"),
    ("M-||M", "empty pipeline segment"),
])
def test_invalid_layer_pattern(pattern, needle):
    with pytest.raises(ConfigError, match="model.hybrid_layer_pattern") as err:
        _config({"hybrid_layer_pattern": pattern})
    assert needle in str(err.value)


@pytest.mark.parametrize("model,field", [
    ({"num_attention_heads": 6, "num_query_groups": 4}, "model.num_attention_heads=6"),
    ({"mamba_num_heads": 6, "mamba_num_groups": 4}, "model.mamba_num_heads=6"),
    ({"hidden_size": 30, "kv_channels": None}, "model.hidden_size=30"),
    ({"hidden_size": 0}, "model.hidden_size=0"),
])
def test_sizes_that_do_not_divide(model, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as err:
        _config(model)
    assert "divisible" in str(err.value) or "positive" in str(err.value)


@pytest.mark.parametrize("model,field", [
    ({"ffn_hidden_size": 65}, "model.ffn_hidden_size=65"),
    ({"mamba_num_groups": 1, "mamba_num_heads": 4}, "model.mamba_num_groups=1"),
    ({"num_query_groups": 1, "num_attention_heads": 4}, "model.num_query_groups=1"),
    ({"vocab_size": 63}, "model.vocab_size=63"),
])
def test_sizes_tensor_parallel_cannot_split(model, field):
    with pytest.raises(ConfigError) as err:
        _config(model, parallel={"tensor_model_parallel_size": 2})
    assert field in str(err.value) and "parallel.tensor_model_parallel_size=2" in str(err.value)


def test_pipeline_segments_must_match_pp():
    with pytest.raises(ConfigError, match=r"separate the stages with '\|'"):
        _config(parallel={"pipeline_model_parallel_size": 2})
    cfg = _config({"hybrid_layer_pattern": "M-|M*"}, parallel={"pipeline_model_parallel_size": 2})
    assert cfg.model.layer_symbols == "M-M*"
    with pytest.raises(ConfigError, match="pipeline_model_parallel_size=1"):
        _config({"hybrid_layer_pattern": "M-|M*"})


def test_unknown_key_names_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.iterz'; did you mean 'iters'"):
        load_config("conf/tiny.yaml", ["train.iterz=5"])
    with pytest.raises(ConfigError, match=r"'model.hiden_size'; did you mean 'hidden_size'"):
        load_config("conf/tiny.yaml", ["model.hiden_size=5"])
    with pytest.raises(ConfigError, match="unknown config key 'trian'; did you mean 'train'"):
        load_config("conf/tiny.yaml", ["trian.iters=5"])


def test_missing_required_and_bad_override_syntax(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: 64\n")
    with pytest.raises(ConfigError, match="missing required config key"):
        load_config(bad)
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config("conf/tiny.yaml", ["train.iters"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_parse_layer_pattern_segments():
    assert parse_layer_pattern("M-M*|M-") == ["M-M*", "M-"]


def test_config_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, nemo_elastic.config; print('torch' in sys.modules, 'megatron' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_section_errors_are_config_errors_with_the_section_path():
    with pytest.raises(ConfigError, match=r"data.synthetic: .*min_steps=4.*max_steps"):
        load_config("conf/tiny.yaml", ["data.synthetic.min_steps=4", "data.synthetic.max_steps=2"])
