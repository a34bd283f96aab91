"""Megatron export format: a distributed checkpoint plus the config a PLAIN megatron-core
`HybridModel` is built from, with no class of this plugin.

    OUT/<budget>/
      .metadata  __0_0.distcp  metadata.json  common.pt   torch_dist checkpoint; the model under
                                                          the state-dict key "model", Megatron-Core
                                                          parameter names, pre-norms under the
                                                          Transformer-Engine fused keys
                                                          (`mixer.in_proj.layer_norm_weight`, ...)
      megatron_config.json                                TransformerConfig + HybridModel kwargs
      nemo_elastic.json                                   this plugin's metadata (config, budget)

Loading it with megatron-core alone (any TP size: the checkpoint reshards on load):

    cfg = json.load(open(f"{d}/megatron_config.json"))
    tc = TransformerConfig(**cfg["transformer_config"], params_dtype=torch.float32,
                           activation_func=squared_relu, tensor_model_parallel_size=TP)
    model = HybridModel(config=tc, hybrid_stack_spec=hybrid_stack_spec, **cfg["hybrid_model"])
    sd = dist_checkpointing.load({"model": model.sharded_state_dict()}, d)["model"]
    model.load_state_dict(sd, strict=False)     # strict except TE's `_extra_state` entries

(`hybrid_stack_spec` from `megatron.core.models.hybrid.hybrid_layer_specs` on GPU with
Transformer Engine; `get_hybrid_stack_modelopt_spec(local_core_attention=True,
remap_te_layernorm=True)` for torch modules).  `load_plain_hybrid_model` does exactly that.
Megatron-Core has no CPU implementation of two pieces: the Mamba2 kernels (mamba-ssm's
`mamba_split_conv1d_scan_combined` and gated `RMSNorm`) and the Transformer-Engine norms.  Where
those are not importable, `load_plain_hybrid_model` fills the missing kernel functions with the
torch references of `nemo_elastic.ops` and uses megatron-core's `WrappedTorchNorm` for the TE norms;
every module stays a megatron-core (or torch) class.

Heterogeneous budgets (per-layer sizes: the router chose different widths for layers of one
type) cannot be a plain HybridModel: a TransformerConfig has one size per layer type.  Their
`megatron_config.json` says so (`plain_megatron_core: false`) and lists the per-layer sizes
(`per_layer`, TransformerConfig field names by global layer); they load with this plugin's
`build_hybrid_model` (upstream layer classes, each rebuilt with its own sizes) +
`load_checkpoint`, e.g. `nemo-elastic eval --ckpt DIR`.  Mixture-of-experts models load the same
way for now (`why_not_plain`): their Nemotron 3 router is not yet described in this file.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from nemo_elastic.compat import megatron_cpu_kernels
from nemo_elastic.config import Config, ModelConfig
from nemo_elastic.errors import ConfigError

logger = logging.getLogger(__name__)

MEGATRON_CONFIG_FILE = "megatron_config.json"
FORMAT = "nemo_elastic.megatron_export/1"
# TransformerConfig fields (JSON-able) that fix the weights' shapes and the computed function.
_TC_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
              "num_query_groups", "kv_channels", "mamba_num_heads", "mamba_head_dim",
              "mamba_num_groups", "mamba_state_dim", "layernorm_epsilon", "init_method_std")
_TC_CONSTANTS = dict(is_hybrid_model=True, normalization="RMSNorm", gated_linear_unit=False,
                     add_bias_linear=False, add_qkv_bias=False, hidden_dropout=0.0,
                     attention_dropout=0.0)
HETEROGENEOUS_WHY = (
    "its layers of one type have different sizes (per-layer widths chosen by the router), and a "
    "megatron-core TransformerConfig has one size per layer type")


MOE_WHY = (
    "it has mixture-of-experts layers with the Nemotron 3 router (sigmoid scores, expert bias, "
    "grouped top-k, ungated shared expert), which megatron_config.json does not describe yet")


def is_heterogeneous(m: ModelConfig) -> bool:
    return bool(m.per_layer and any(m.per_layer))


def why_not_plain(m: ModelConfig) -> Optional[str]:
    """Why a model of config `m` cannot be rebuilt as a plain megatron-core HybridModel from
    `megatron_config.json` alone (None when it can)."""
    if is_heterogeneous(m):
        return HETEROGENEOUS_WHY
    if m.has_moe:
        return MOE_WHY
    return None


def megatron_config(m: ModelConfig) -> dict[str, Any]:
    """The JSON written as `megatron_config.json` for a model of config `m`."""
    tc = {name: getattr(m, name) for name in _TC_FIELDS if name != "num_layers"
          and name != "kv_channels"}
    tc.update(num_layers=m.num_layers, kv_channels=m.head_dim, **_TC_CONSTANTS)
    hetero = is_heterogeneous(m)
    why = why_not_plain(m)
    return {
        "format": FORMAT,
        "transformer_config": tc,
        "params_dtype": m.params_dtype,
        "activation_func": "squared_relu",  # megatron.core.activations.squared_relu
        "hybrid_model": {"vocab_size": m.vocab_size, "max_sequence_length": m.max_sequence_length,
                         "hybrid_layer_pattern": m.hybrid_layer_pattern,
                         "share_embeddings_and_output_weights": False,
                         "position_embedding_type": "none"},
        # MambaMixer constructor arguments (megatron-core's specs use d_conv=4, chunk_size=128;
        # chunk_size changes rounding only, d_conv the conv1d weight shape)
        "mamba_mixer": {"d_conv": m.mamba_conv_kernel, "chunk_size": m.mamba_chunk_size},
        "checkpoint": {"format": "torch_dist", "state_dict_key": "model",
                       "norm_keys": "transformer_engine_fused"},
        "plain_megatron_core": why is None,
        **({"why_not_plain": why,
            "loader": "nemo_elastic.model.build_hybrid_model + nemo_elastic.checkpoint."
                      "load_checkpoint (or `nemo-elastic eval --ckpt DIR`)"} if why else {}),
        **({"per_layer": m.per_layer} if hetero else {}),
    }


def write_megatron_config(directory: Path, m: ModelConfig) -> Path:
    path = Path(directory) / MEGATRON_CONFIG_FILE
    path.write_text(json.dumps(megatron_config(m), indent=2) + "\n")
    return path


def read_megatron_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MEGATRON_CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{str(path)!r} does not exist: pass a folder written by "
                          "`nemo-elastic export --format megatron`")
    from nemo_elastic.checkpoint import read_json_file

    cfg = read_json_file(path, repr(str(path)), error=ConfigError,
                         fix="export the budget again (`nemo-elastic export --format megatron`)")
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        got = cfg.get("format") if isinstance(cfg, dict) else type(cfg).__name__
        raise ConfigError(f"{str(path)!r}: format {got!r}, expected {FORMAT!r}; pass a folder "
                          "written by `nemo-elastic export --format megatron`")
    return cfg


# ---------------------------------------------------------------------------------------------
# loading with megatron-core classes only
# ---------------------------------------------------------------------------------------------

def _squared_relu_eager(x: torch.Tensor) -> torch.Tensor:
    # megatron.core.activations.squared_relu is torch.compile'd: seconds of codegen on CPU.
    return torch.square(torch.relu(x))


def plain_stack_spec(mamba_mixer: dict[str, int]):
    """megatron-core's own hybrid spec: TE (`hybrid_stack_spec`) when Transformer Engine is
    importable, else its torch spec (`get_hybrid_stack_modelopt_spec(local_core_attention=True,
    remap_te_layernorm=True)`), with the MambaMixer's d_conv / chunk_size set."""
    from nemo_elastic.model.specs import have_transformer_engine

    if have_transformer_engine():
        from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec as spec
    else:
        from megatron.core.post_training.modelopt.hybrid.model_specs import (
            get_hybrid_stack_modelopt_spec)

        spec = get_hybrid_stack_modelopt_spec(local_core_attention=True, remap_te_layernorm=True)
    spec = copy.deepcopy(spec)
    mixer = spec.submodules.mamba_layer.submodules.mixer
    mixer.params = {**mixer.params, **mamba_mixer}
    return spec


def load_plain_hybrid_model(directory: str | Path, *, tensor_model_parallel_size: Optional[int] = None):
    """A megatron-core `HybridModel` (megatron-core classes only) built from
    `megatron_config.json` and loaded from the checkpoint in `directory`, for this process's
    tensor-parallel rank (the Megatron runtime must be initialized; TP defaults to its size).

    Refuses a heterogeneous export (see the module doc) with the reason."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.models.hybrid.hybrid_model import HybridModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = read_megatron_config(directory)
    if not cfg["plain_megatron_core"]:
        raise ConfigError(f"{str(directory)!r} cannot be loaded as a plain megatron-core "
                          f"HybridModel: {cfg['why_not_plain']}; load it with {cfg['loader']}")
    tp = tensor_model_parallel_size or ps.get_tensor_model_parallel_world_size()
    dtype = getattr(torch, cfg["params_dtype"])
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        from megatron.core.activations import squared_relu as act
    else:
        act = _squared_relu_eager
    tc = TransformerConfig(
        **cfg["transformer_config"], params_dtype=dtype, pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, activation_func=act,
        tensor_model_parallel_size=tp, use_cpu_initialization=not on_gpu,
        bias_activation_fusion=False, masked_softmax_fusion=on_gpu, persist_layer_norm=False,
        bias_dropout_fusion=False, gradient_accumulation_fusion=False, apply_rope_fusion=False)
    with megatron_cpu_kernels():
        spec = plain_stack_spec(cfg["mamba_mixer"])
        model = HybridModel(config=tc, hybrid_stack_spec=spec, **cfg["hybrid_model"])
    if on_gpu:
        model.cuda(torch.cuda.current_device())
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(directory))
    result = model.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ConfigError(f"{str(directory)!r}: the checkpoint does not match the model of "
                          f"{MEGATRON_CONFIG_FILE}: missing {missing[:5]}, unexpected "
                          f"{result.unexpected_keys[:5]}")
    return model.eval()


def load_exported_model(directory: str | Path):
    """Any Megatron export (plain or heterogeneous) in one process: the plain megatron-core
    model when possible, else this plugin's loader.  Returns (Config, model)."""
    from nemo_elastic.checkpoint import config_from_checkpoint, load_checkpoint
    from nemo_elastic.model import build_hybrid_model

    cfg: Config = config_from_checkpoint(directory).single_process()
    if read_megatron_config(directory)["plain_megatron_core"]:
        return cfg, load_plain_hybrid_model(directory)
    model = build_hybrid_model(cfg, spec_backend="local", perform_initialization=False)
    load_checkpoint(directory, model=model, restore_rng=False)
    return cfg, model.eval()
