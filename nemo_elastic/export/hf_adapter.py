"""Hugging Face `nemotron_h` <-> nemo_elastic mapping: config fields and tensor names / layouts.

Both directions live here so they cannot drift apart.  `hf_import` / `hf_export` do the I/O.

Config: `config.json` (transformers 5.x `NemotronHConfig`, which also reads the legacy NVIDIA
names such as `hybrid_override_pattern`, `mamba_n_groups`, `mamba_d_conv`) <-> `ModelConfig`.
Every HF field that changes the computed function is either mapped or checked: a value we cannot
represent stops with `HFConfigError` naming the field (never a silent wrong mapping).

Tensors (TP=1 Megatron names on the left; HF on-disk prefix `backbone.`, `model.` also read):

    embedding.word_embeddings.weight [V,h]          embeddings.weight
    decoder.layers.i.norm.weight (Mamba)            layers.i.norm.weight
    decoder.layers.i.mixer.in_proj.weight           layers.i.mixer.in_proj.weight  same packing
        [2d + 2GN + H, h], rows [z | x | B | C | dt]
    decoder.layers.i.mixer.conv1d_weight [d+2GN,1,k] layers.i.mixer.conv1d.weight  (over [x|B|C])
    decoder.layers.i.mixer.conv1d_bias               layers.i.mixer.conv1d.bias
    decoder.layers.i.mixer.{dt_bias,A_log,D} [H]     layers.i.mixer.{dt_bias,A_log,D}
    decoder.layers.i.mixer.norm.weight [d]           layers.i.mixer.norm.weight  (group d/G)
    decoder.layers.i.mixer.out_proj.weight [h,d]     layers.i.mixer.out_proj.weight
    decoder.layers.i.input_layernorm.weight (attn)   layers.i.norm.weight
    decoder.layers.i.self_attention.linear_qkv       layers.i.mixer.{q,k,v}_proj.weight (fused,
        [g*(a/g + 2)*c, h]: per query group [its a/g q heads | k | v], see `layout.fuse_qkv`)
    decoder.layers.i.self_attention.linear_proj      layers.i.mixer.o_proj.weight
    decoder.layers.i.pre_mlp_layernorm.weight (MLP)  layers.i.norm.weight
    decoder.layers.i.mlp.linear_fc1 / linear_fc2     layers.i.mixer.up_proj / down_proj
    decoder.layers.i.pre_mlp_layernorm.weight (MoE)  layers.i.norm.weight
    decoder.layers.i.mlp.router.weight [E,h]         layers.i.mixer.gate.weight  (fp32 in HF)
    decoder.layers.i.mlp.router.expert_bias [E]      layers.i.mixer.gate.e_score_correction_bias
        (a buffer on both sides; fp32)
    decoder.layers.i.mlp.experts.local_experts.j.    layers.i.mixer.experts.j.up_proj / down_proj
        linear_fc1 [f_e,h] / linear_fc2 [h,f_e]          (per expert on disk; transformers merges
                                                         them into 3-D tensors when loading)
    decoder.layers.i.mlp.shared_experts.linear_fc1/2 layers.i.mixer.shared_experts.up/down_proj
    decoder.final_norm.weight                        norm_f.weight
    output_layer.weight [V,h]                        lm_head.weight  (untied, no prefix)
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from nemo_elastic.config import ATTENTION, MAMBA, MLP, MOE, ConfigError, ModelConfig
from nemo_elastic.config_moe import MoEConfig
from nemo_elastic.layout import fuse_qkv, split_qkv  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

HF_MODEL_TYPE = "nemotron_h"
HF_ARCHITECTURE = "NemotronHForCausalLM"
HF_PREFIX = "backbone."  # what transformers' save_pretrained writes for NemotronH
HF_PREFIXES = ("backbone.", "model.")
HF_LAYER_TYPES = {"linear_attention": MAMBA, "full_attention": ATTENTION, "mlp": MLP, "moe": MOE}
MEGATRON_MAMBA_NORM_EPS = 1e-5  # MambaMixer's gated RMSNorm eps is hard-coded in Megatron-Core
# transformers 5.x clamps dt >= time_step_min at run time (the reference / Megatron: dt >= 0;
# huggingface/transformers PR #48989).  Exports use the smallest normal float32: the clamp then
# moves dt by < 1.2e-38, which no fp32/bf16 result resolves (0.0 would crash HF's dt init).
NO_DT_CLAMP = 1.1754943508222875e-38
HF_PASSTHROUGH = ("bos_token_id", "eos_token_id", "pad_token_id")  # kept in the checkpoint meta

# HF field -> (accepted values, why).  Anything else cannot be represented by our model.
# Read but without effect on the weights or the computed function, hence not checked:
# rescale_prenorm_residual, time_step_max/_floor (init only), residual_in_fp32 (unused by
# transformers' forward; precision only), expand (d_inner = heads * head_dim), use_cache,
# use_mamba_kernels, mamba_ssm_cache_dtype, num_logits_to_keep, moe_shared_expert_overlap
# (scheduling only), MoE fields when there are no 'moe' layers;
# dropouts are warned about (we train without dropout).
_REQUIRED = {
    "tie_word_embeddings": ((False,), "the output layer is untied from the embedding"),
    "mlp_hidden_act": (("relu2",), "MLP layers are non-gated squared-ReLU ('relu2')"),
    "mamba_hidden_act": (("silu", "swish"), "the Mamba2 conv activation is SiLU"),
    "use_bias": ((False,), "Mamba in_proj/out_proj have no bias"),
    "mlp_bias": ((False,), "MLP projections have no bias"),
    "attention_bias": ((False,), "attention projections have no bias (transformers' NemotronH "
                       "ignores this flag and would drop the biases)"),
    "mamba_proj_bias": ((False,), "Mamba projections have no bias"),
    "num_nextn_predict_layers": ((0,), "multi-token-prediction (MTP) heads are not supported"),
    "sliding_window": ((None,), "attention layers are full causal attention"),
    "norm_before_gate": ((False,), "the Mamba gated norm is rmsnorm(y * silu(z)) "
                         "(norm_before_gate=False)"),
}


class HFConfigError(ConfigError):
    """A Hugging Face config field has a value nemo_elastic cannot represent exactly."""


def _reject(field: str, value: Any, why: str) -> None:
    raise HFConfigError(f"Hugging Face config field {field!r}={value!r} is not supported: {why}")


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------

def _decode_float_tag(obj: dict) -> Any:
    """transformers writes non-finite floats as {"__float__": "Infinity"} (time_step_limit)."""
    if set(obj) == {"__float__"}:
        return float(obj["__float__"])
    return obj


def load_hf_config(hf_dir: str | Path):
    """Read `hf_dir/config.json` as a transformers `NemotronHConfig` (legacy names normalized)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
        from transformers import NemotronHConfig
    except ImportError as err:
        raise HFConfigError(f"reading a Hugging Face model needs `transformers` with nemotron_h "
                            f"support ({err}); install it: pip install transformers") from None

    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise HFConfigError(f"{str(path)!r} does not exist: pass a Hugging Face model directory "
                            "(config.json + *.safetensors)")
    try:
        raw = json.loads(path.read_text(), object_hook=_decode_float_tag)
    except (OSError, ValueError) as err:
        raise HFConfigError(f"{str(path)!r} is not readable JSON ({err})") from err
    if not isinstance(raw, dict):
        raise HFConfigError(f"{str(path)!r} must hold a JSON object, got {type(raw).__name__}")
    if raw.get("model_type") != HF_MODEL_TYPE:
        _reject("model_type", raw.get("model_type"), f"only {HF_MODEL_TYPE!r} (Nemotron-H) is mapped")
    # the fields that define the weights' shapes: transformers would fill in defaults (an MoE
    # layer pattern, other sizes) and the import would fail later on a misleading message
    missing = [key for key in ("hidden_size", "vocab_size", "intermediate_size",
                               "num_attention_heads", "mamba_num_heads", "mamba_head_dim",
                               "ssm_state_size") if key not in raw]
    if "layers_block_type" not in raw and "hybrid_override_pattern" not in raw:
        missing.insert(0, "layers_block_type (or hybrid_override_pattern)")
    if missing:
        raise HFConfigError(f"{str(path)!r} has no {missing[0]!r}: a nemotron_h config lists "
                            "the layer pattern and every size that shapes the weights (the file "
                            "is incomplete); restore it from the model's source")
    try:
        return NemotronHConfig.from_dict(raw)
    except (TypeError, ValueError, KeyError, StrictDataclassError) as err:
        raise HFConfigError(f"{str(path)!r}: transformers rejects this config ({err})") from err


def model_config_from_hf(hf) -> ModelConfig:
    """`NemotronHConfig` -> `ModelConfig`; raises HFConfigError naming any unsupported field."""
    symbols = []
    for pos, kind in enumerate(hf.layers_block_type):
        if kind not in HF_LAYER_TYPES:
            _reject("layers_block_type", hf.layers_block_type,
                    f"layer {pos} is {kind!r}; only 'linear_attention' (Mamba2), 'full_attention', "
                    "'mlp' and 'moe' layers are supported")
        symbols.append(HF_LAYER_TYPES[kind])
    for field, (accepted, why) in _REQUIRED.items():
        value = getattr(hf, field, accepted[0])
        if value not in accepted:
            _reject(field, value, why)
    limit = tuple(float(v) for v in hf.time_step_limit)
    if limit != (0.0, math.inf):
        _reject("time_step_limit", hf.time_step_limit, "Megatron-Core's Mamba2 never clamps dt; "
                "only (0.0, inf) is supported")
    pattern = "".join(symbols)
    if MAMBA in pattern and hf.layer_norm_epsilon != MEGATRON_MAMBA_NORM_EPS:
        _reject("layer_norm_epsilon", hf.layer_norm_epsilon,
                f"transformers also uses it for the Mamba gated norm, whose eps is fixed to "
                f"{MEGATRON_MAMBA_NORM_EPS} in Megatron-Core")
    _warn_ignored(hf)
    dtype = str(getattr(hf, "dtype", None) or "float32").replace("torch.", "")
    try:
        return _model_config(hf, pattern, dtype)
    except HFConfigError:
        raise
    except ConfigError as err:
        raise HFConfigError(f"the Hugging Face config maps to an invalid model config: {err}") from err


def _moe_config(hf, pattern: str) -> Optional[MoEConfig]:
    """The MoE section of a config with 'moe' layers (None without): every HF field that changes
    the MoE function is mapped or rejected."""
    if MOE not in pattern:
        return None
    if getattr(hf, "moe_latent_size", None) is not None:
        _reject("moe_latent_size", hf.moe_latent_size, "latent MoE projections need "
                "Transformer-Engine in Megatron-Core 0.19 (not supported on this path)")
    if getattr(hf, "n_shared_experts", 1) != 1:
        _reject("n_shared_experts", hf.n_shared_experts, "transformers' NemotronH MoE always "
                "has exactly one shared expert (of moe_shared_expert_intermediate_size)")
    return MoEConfig(
        num_moe_experts=hf.n_routed_experts, moe_router_topk=hf.num_experts_per_tok,
        moe_ffn_hidden_size=hf.moe_intermediate_size,
        moe_shared_expert_intermediate_size=hf.moe_shared_expert_intermediate_size,
        moe_router_num_groups=hf.n_group, moe_router_group_topk=hf.topk_group,
        moe_router_topk_scaling_factor=float(hf.routed_scaling_factor),
        moe_norm_topk_prob=bool(hf.norm_topk_prob), moe_router_enable_expert_bias=True)


def _model_config(hf, pattern: str, dtype: str) -> ModelConfig:
    return ModelConfig(
        moe=_moe_config(hf, pattern),
        hybrid_layer_pattern=pattern, hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size, num_attention_heads=hf.num_attention_heads,
        num_query_groups=hf.num_key_value_heads, kv_channels=hf.head_dim,
        mamba_num_heads=hf.mamba_num_heads, mamba_head_dim=hf.mamba_head_dim,
        mamba_num_groups=hf.n_groups, mamba_state_dim=hf.ssm_state_size,
        mamba_conv_kernel=hf.conv_kernel, mamba_chunk_size=hf.chunk_size,
        vocab_size=hf.vocab_size, max_sequence_length=hf.max_position_embeddings,
        layernorm_epsilon=hf.layer_norm_epsilon, init_method_std=hf.initializer_range,
        params_dtype=dtype)


def _warn_ignored(hf) -> None:
    """Fields that do not change the weights or the inference function: say what is dropped."""
    for field in ("hidden_dropout", "attention_dropout"):
        if getattr(hf, field, 0.0):
            logger.warning("Hugging Face %s=%s ignored: nemo_elastic models train without dropout",
                           field, getattr(hf, field))
    if not hf.use_conv_bias:
        logger.info("use_conv_bias=False: importing zero Mamba conv1d biases (exact)")
    if hf.time_step_min > NO_DT_CLAMP:
        logger.warning(
            "time_step_min=%s: transformers' NemotronH clamps softplus(dt) >= time_step_min at run "
            "time, Megatron-Core (and NVIDIA's reference) does not; transformers' logits for this "
            "checkpoint can differ from ours where dt < %s (transformers PR #48989)",
            hf.time_step_min, hf.time_step_min)


def hf_passthrough(hf) -> dict[str, Any]:
    """HF fields without a ModelConfig counterpart that an export should restore (token ids)."""
    return {key: getattr(hf, key) for key in HF_PASSTHROUGH if getattr(hf, key, None) is not None}


def hf_config_from_model(m: ModelConfig, passthrough: Optional[dict[str, Any]] = None):
    """`ModelConfig` -> transformers `NemotronHConfig` that loads with no custom code."""
    if m.per_layer and any(m.per_layer):
        raise HFConfigError(
            f"model.per_layer={m.per_layer!r}: Hugging Face NemotronH has one size per layer "
            "type, so heterogeneous per-layer sizes cannot be exported; export a sub-network "
            "with uniform sizes (or keep this checkpoint in the nemo_elastic format)")
    from transformers import NemotronHConfig

    if MAMBA in m.layer_symbols and m.layernorm_epsilon != MEGATRON_MAMBA_NORM_EPS:
        raise HFConfigError(
            f"model.layernorm_epsilon={m.layernorm_epsilon!r}: transformers' NemotronH uses it "
            f"for the Mamba gated norm too, which Megatron-Core fixes to {MEGATRON_MAMBA_NORM_EPS}; "
            "the export would not compute the same function")
    reverse = {sym: kind for kind, sym in HF_LAYER_TYPES.items()}
    d_inner = m.mamba_d_inner
    moe_fields = _hf_moe_fields(m)
    extra = {key: value for key, value in (passthrough or {}).items() if key in HF_PASSTHROUGH}
    return NemotronHConfig(
        architectures=[HF_ARCHITECTURE],
        layers_block_type=[reverse[s] for s in m.layer_symbols],
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, tie_word_embeddings=False,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups,
        head_dim=m.head_dim, max_position_embeddings=m.max_sequence_length, attention_bias=False,
        intermediate_size=m.ffn_hidden_size, mlp_hidden_act="relu2", mlp_bias=False,
        mamba_num_heads=m.mamba_num_heads, mamba_head_dim=m.mamba_head_dim,
        n_groups=m.mamba_num_groups, ssm_state_size=m.mamba_state_dim,
        conv_kernel=m.mamba_conv_kernel, chunk_size=m.mamba_chunk_size, mamba_hidden_act="silu",
        use_conv_bias=True, use_bias=False, mamba_proj_bias=False,
        # `expand` is informational in transformers (d_inner = heads * head_dim)
        expand=d_inner // m.hidden_size if d_inner % m.hidden_size == 0 else 2,
        time_step_min=NO_DT_CLAMP, time_step_limit=(0.0, math.inf),
        layer_norm_epsilon=m.layernorm_epsilon, initializer_range=m.init_method_std,
        num_nextn_predict_layers=0, dtype=m.params_dtype, **moe_fields, **extra)


def _hf_moe_fields(m: ModelConfig) -> dict[str, Any]:
    """NemotronHConfig MoE fields of `m` ({} for a dense model)."""
    moe = m.moe
    if moe is None or not m.has_moe:
        return {}
    if moe.moe_shared_expert_intermediate_size is None:
        raise HFConfigError(
            "model.moe.moe_shared_expert_intermediate_size=None: transformers' NemotronH MoE "
            "always has a shared expert, so a model without one cannot be exported to HF")
    return dict(
        n_routed_experts=moe.num_moe_experts, num_experts_per_tok=moe.moe_router_topk,
        moe_intermediate_size=moe.moe_ffn_hidden_size, n_shared_experts=1,
        moe_shared_expert_intermediate_size=moe.moe_shared_expert_intermediate_size,
        n_group=moe.moe_router_num_groups, topk_group=moe.moe_router_group_topk,
        routed_scaling_factor=moe.moe_router_topk_scaling_factor,
        norm_topk_prob=moe.moe_norm_topk_prob, moe_latent_size=None)


# ---------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorMap:
    """One Megatron parameter and the HF tensor(s) it is made of.

    kind: 'copy' (same layout), 'copy32' (same layout, float32 in the HF file: the MoE router
    gate and score-correction bias, which transformers keeps in fp32), 'qkv' (hf = (q, k, v),
    fused per query group) or 'zeros' (no HF tensor: a use_conv_bias=False conv bias), or
    'zero_bias' (a MoE router without expert bias: zeros in the HF file, nothing here).
    """

    megatron: str
    hf: tuple[str, ...]
    kind: str = "copy"
    layer: Optional[int] = None  # global layer (qkv: its per-layer head count)


def tensor_maps(m: ModelConfig, *, hf_prefix: str = HF_PREFIX,
                conv_bias: bool = True) -> list[TensorMap]:
    """All parameters of the TP=1 model, in Megatron order."""
    p = hf_prefix
    maps = [TensorMap("embedding.word_embeddings.weight", (f"{p}embeddings.weight",))]
    for i, sym in enumerate(m.layer_symbols):
        meg, hf = f"decoder.layers.{i}.", f"{p}layers.{i}."
        if sym == MAMBA:
            maps.append(TensorMap(meg + "norm.weight", (hf + "norm.weight",)))
            maps += [TensorMap(f"{meg}mixer.{a}", (f"{hf}mixer.{b}",)) for a, b in (
                ("in_proj.weight", "in_proj.weight"), ("conv1d_weight", "conv1d.weight"))]
            maps.append(TensorMap(meg + "mixer.conv1d_bias", (hf + "mixer.conv1d.bias",))
                        if conv_bias else TensorMap(meg + "mixer.conv1d_bias", (), "zeros"))
            maps += [TensorMap(f"{meg}mixer.{a}", (f"{hf}mixer.{a}",)) for a in (
                "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight")]
        elif sym == ATTENTION:
            maps.append(TensorMap(meg + "input_layernorm.weight", (hf + "norm.weight",)))
            maps.append(TensorMap(meg + "self_attention.linear_qkv.weight", tuple(
                f"{hf}mixer.{x}_proj.weight" for x in "qkv"), "qkv", layer=i))
            maps.append(TensorMap(meg + "self_attention.linear_proj.weight",
                                  (hf + "mixer.o_proj.weight",)))
        elif sym == MOE:
            maps += moe_tensor_maps(m, meg, hf)
        else:
            maps.append(TensorMap(meg + "pre_mlp_layernorm.weight", (hf + "norm.weight",)))
            maps.append(TensorMap(meg + "mlp.linear_fc1.weight", (hf + "mixer.up_proj.weight",)))
            maps.append(TensorMap(meg + "mlp.linear_fc2.weight", (hf + "mixer.down_proj.weight",)))
    maps.append(TensorMap("decoder.final_norm.weight", (f"{p}norm_f.weight",)))
    maps.append(TensorMap("output_layer.weight", ("lm_head.weight",)))
    return maps


def moe_tensor_maps(m: ModelConfig, meg: str, hf: str) -> list[TensorMap]:
    """One MoE layer's tensors (`meg` / `hf`: the layer's Megatron / HF name prefixes)."""
    moe = m.moe
    maps = [TensorMap(meg + "pre_mlp_layernorm.weight", (hf + "norm.weight",)),
            TensorMap(meg + "mlp.router.weight", (hf + "mixer.gate.weight",), "copy32")]
    bias = (hf + "mixer.gate.e_score_correction_bias",)
    maps.append(TensorMap(meg + "mlp.router.expert_bias", bias, "copy32")
                if moe.moe_router_enable_expert_bias else
                TensorMap(meg + "mlp.router.expert_bias", bias, "zero_bias"))
    for j in range(moe.num_moe_experts):
        e, h = f"{meg}mlp.experts.local_experts.{j}.", f"{hf}mixer.experts.{j}."
        maps.append(TensorMap(e + "linear_fc1.weight", (h + "up_proj.weight",)))
        maps.append(TensorMap(e + "linear_fc2.weight", (h + "down_proj.weight",)))
    if moe.moe_shared_expert_intermediate_size is not None:
        for a, b in (("linear_fc1", "up_proj"), ("linear_fc2", "down_proj")):
            maps.append(TensorMap(f"{meg}mlp.shared_experts.{a}.weight",
                                  (f"{hf}mixer.shared_experts.{b}.weight",)))
    return maps


def model_tensors(model) -> dict[str, Any]:
    """The tensors `tensor_maps` names: every parameter plus the MoE routers' expert-bias
    buffers (persistent state that changes the function, but not trained by gradients)."""
    out = dict(model.named_parameters())
    out.update((name, buf) for name, buf in model.named_buffers()
               if name.endswith("router.expert_bias"))
    return out
