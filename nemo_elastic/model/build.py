"""Config -> Megatron-Core `TransformerConfig` and `HybridModel` (Nemotron-H conventions).

Nemotron-H: squared-ReLU non-gated MLP, RMSNorm, no bias, no dropout, no position embedding,
untied embedding / output layer.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core.activations import squared_relu
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_elastic.config import Config, ModelConfig, ParallelConfig
from nemo_elastic.model.specs import hybrid_stack_spec
from nemo_elastic.model.stack import NemoHybridStack

def squared_relu_eager(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2 without torch.compile.  Megatron's `squared_relu` is wrapped in torch.compile,
    which on CPU means seconds of C++ code generation (and recompiles per shape) for a tiny op."""
    return torch.square(torch.relu(x))


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def transformer_config(model: ModelConfig, parallel: ParallelConfig, **overrides) -> TransformerConfig:
    on_gpu = torch.cuda.is_available()
    dtype = DTYPES[model.params_dtype]
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        mamba_num_heads=model.mamba_num_heads,
        mamba_head_dim=model.mamba_head_dim,
        mamba_num_groups=model.mamba_num_groups,
        mamba_state_dim=model.mamba_state_dim,
        is_hybrid_model=True,
        normalization="RMSNorm",
        layernorm_epsilon=model.layernorm_epsilon,
        activation_func=squared_relu if on_gpu else squared_relu_eager,
        gated_linear_unit=False,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        sequence_parallel=False,
        # CPU: build full master weights on CPU and slice per TP rank; torch (unfused) kernels.
        use_cpu_initialization=not on_gpu,
        bias_activation_fusion=False,
        masked_softmax_fusion=on_gpu,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
    )
    if model.moe is not None:
        kwargs.update(model.moe.to_transformer_config())
        kwargs["expert_model_parallel_size"] = parallel.expert_model_parallel_size
        # The all-to-all dispatcher passes its split sizes as tensors, which gloo's
        # all_to_all_single does not take: on CPU the experts get their tokens by all-gather.
        kwargs["moe_token_dispatcher_type"] = "alltoall" if on_gpu else "allgather"
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_hybrid_model(cfg: Config, *, spec: Optional[ModuleSpec] = None,
                       model_cls: type = HybridModel, pre_process: Optional[bool] = None,
                       post_process: Optional[bool] = None, spec_backend: str = "auto",
                       **tc_overrides) -> HybridModel:
    """Build this rank's pipeline stage of the hybrid model described by `cfg`.

    `spec`/`model_cls` let the elastic subclasses reuse the same construction.
    Requires `nemo_elastic.runtime.initialize` to have run (parallel state).
    `cfg.model.per_layer` (heterogeneous sizes) is applied by `NemoHybridStack`; the global
    TransformerConfig keeps the global sizes.
    """
    from megatron.core import parallel_state as ps

    m = cfg.model
    tconf = transformer_config(m, cfg.parallel, **tc_overrides)
    if spec is None:
        spec = hybrid_stack_spec(backend=spec_backend, d_conv=m.mamba_conv_kernel,
                                 chunk_size=m.mamba_chunk_size)
    overrides = layer_overrides(m)
    if overrides:
        spec = _with_layer_overrides(spec, overrides)
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=True)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=True)
    model = model_cls(
        config=tconf,
        hybrid_stack_spec=spec,
        vocab_size=m.vocab_size,
        max_sequence_length=m.max_sequence_length,
        hybrid_layer_pattern=m.hybrid_layer_pattern,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="none",
    )
    if torch.cuda.is_available():
        # Megatron's own layers allocate on the current GPU; torch modules (norms of the local
        # spec, the torch gated norm) are created on CPU: move everything to this rank's GPU.
        model.cuda(torch.cuda.current_device())
    return model


def layer_overrides(m: ModelConfig) -> dict[int, dict[str, int]]:
    """`model.per_layer` as {global layer index: TransformerConfig overrides} (non-empty only)."""
    return {i: dict(entry) for i, entry in enumerate(m.per_layer or []) if entry}


def _with_layer_overrides(spec: ModuleSpec, overrides: dict[int, dict[str, int]]) -> ModuleSpec:
    """A copy of `spec` whose stack rebuilds the overridden layers (the caller's spec is kept)."""
    stack = spec.module if isinstance(spec.module, type) else None
    if stack is None or not issubclass(stack, NemoHybridStack):
        raise ValueError(
            f"model.per_layer sets per-layer sizes, but the stack spec builds {spec.module!r}, "
            "which cannot apply them; use a spec whose module is NemoHybridStack (or a subclass)")
    return dataclasses.replace(spec, params={**spec.params, "layer_overrides": overrides})


def module_parameters(model: torch.nn.Module) -> int:
    """Parameters of a built module, counted tensor by tensor on this rank (the closed form
    from a config is `cost_model.count_parameters`; across ranks `loop.global_param_count`)."""
    return sum(p.numel() for p in model.parameters())
