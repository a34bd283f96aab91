"""Heterogeneous budgets as Hugging Face `nemotron_h` folders: a per-layer extension of
config.json and our loader.

Stock transformers' `NemotronHConfig` has one size per layer type (one `mamba_num_heads`, one
`intermediate_size`, ...); a budget whose router chose different sizes for layers of one type
cannot be expressed in it.  The extension:

    config.json = the NemotronH config with the most common size of every field, plus
      "model_type": "nemotron_h_per_layer"       (so stock AutoConfig/AutoModel refuse it by
                                                  name instead of failing on a tensor shape)
      "nemo_elastic_per_layer": {"base_model_type": "nemotron_h",
                                 "layers": [{}, {"intermediate_size": 16}, ...]}
          one dict per layer, HF field names (mamba_num_heads, mamba_head_dim,
          num_attention_heads, intermediate_size), empty = the global size

Weights are the usual `backbone.layers.<i>.mixer.*` safetensors, each of its layer's shape.
`load_hf_per_layer(dir)` builds transformers' own `NemotronHForCausalLM` from the global config and
rebuilds every overridden layer's mixer with transformers' own mixer class and a config copy that
carries that layer's sizes, then loads the weights strictly.  `generate` works with its cache
(`use_cache=True`, the default): transformers (>= 5) allocates each layer's cache lazily from the
states that layer produces, so every layer's KV cache / conv / SSM state has that layer's own
sizes (tests/test_decode.py: cached and uncached generate equal our cached decoding).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

from nemo_elastic.config import ModelConfig
from nemo_elastic.errors import ConfigError

PER_LAYER_MODEL_TYPE = "nemotron_h_per_layer"
PER_LAYER_KEY = "nemo_elastic_per_layer"
HF_ON_DISK = re.compile(r"^backbone\.")
# ModelConfig.per_layer field -> NemotronHConfig field
HF_FIELD = {"mamba_num_heads": "mamba_num_heads", "mamba_head_dim": "mamba_head_dim",
            "num_attention_heads": "num_attention_heads", "ffn_hidden_size": "intermediate_size"}


def hf_per_layer_config(m: ModelConfig, passthrough: dict[str, Any] | None = None) -> dict:
    """config.json (a dict) of heterogeneous model `m` in the per-layer extension."""
    import dataclasses

    from nemo_elastic.export.hf_adapter import hf_config_from_model

    base = hf_config_from_model(dataclasses.replace(m, per_layer=None), passthrough).to_dict()
    base["model_type"] = PER_LAYER_MODEL_TYPE
    base[PER_LAYER_KEY] = {"base_model_type": "nemotron_h", "layers": [
        {HF_FIELD[k]: v for k, v in entry.items()} for entry in (m.per_layer or [])]}
    return base


def write_hf_per_layer_config(directory: Path, m: ModelConfig,
                              passthrough: dict[str, Any] | None = None) -> None:
    (Path(directory) / "config.json").write_text(
        json.dumps(hf_per_layer_config(m, passthrough), indent=2, sort_keys=True) + "\n")


def load_hf_per_layer(directory: str | Path, dtype=None):
    """transformers `NemotronHForCausalLM` of a per-layer folder (see the module doc), eval mode."""
    import torch
    from safetensors.torch import load_file
    from transformers import NemotronHConfig, NemotronHForCausalLM
    from transformers.models.nemotron_h.modeling_nemotron_h import MIXER_TYPES

    directory = Path(directory)
    from nemo_elastic.checkpoint import read_json_file

    raw = read_json_file(directory / "config.json", repr(str(directory / "config.json")),
                         error=ConfigError, fix="export the budget again with --hf-per-layer")
    if not isinstance(raw, dict):
        raise ConfigError(f"{str(directory / 'config.json')!r} holds {type(raw).__name__}, not a "
                          "config object; export the budget again with --hf-per-layer")
    ext = raw.pop(PER_LAYER_KEY, None)
    if raw.get("model_type") != PER_LAYER_MODEL_TYPE or ext is None:
        raise ConfigError(f"{str(directory)!r} is not a per-layer NemotronH export "
                          f"(model_type {raw.get('model_type')!r}); load it with "
                          "transformers' AutoModelForCausalLM")
    for key in ("model_type", "transformers_version", "architectures"):
        raw.pop(key, None)
    config = NemotronHConfig(**raw)
    model = NemotronHForCausalLM(config)
    for i, (entry, block) in enumerate(zip(ext["layers"], model.model.layers)):
        if entry:
            layer_config = copy.deepcopy(config)
            for key, value in entry.items():
                setattr(layer_config, key, value)
            block.mixer = MIXER_TYPES[config.layers_block_type[i]](layer_config, layer_idx=i)
    state = {}
    for path in sorted(directory.glob("*.safetensors")):
        # on disk `backbone.` (what save_pretrained writes), in memory `model.` (transformers 5)
        state.update({HF_ON_DISK.sub("model.", k): v for k, v in load_file(str(path)).items()})
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model.to(dtype)
    else:
        model.to(getattr(torch, str(raw.get("dtype") or "float32").replace("torch.", "")))
    return model.eval()
