"""ModuleSpecs for the hybrid parent: local (torch, runs on CPU) and Transformer-Engine (GPU).

Both specs build the same parameter names under the same modules.  The local spec also maps its
separate pre-norms onto TE's fused-norm checkpoint keys (`mixer.in_proj.layer_norm_weight`, ...),
so a distributed checkpoint written on CPU loads into a TE model on GPU and back.
"""

from __future__ import annotations

from functools import partial

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.hybrid.hybrid_block import HybridStackSubmodules
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mamba_mixer import MambaMixerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import (MoETransformerLayer, TransformerLayer,
                                                         TransformerLayerSubmodules)

from nemo_elastic.model.mamba import NemoMambaMixer
from nemo_elastic.model.stack import NemoHybridStack

# Local pre-norm key -> TE fused-norm key (ModelOpt's `remap_te_layernorm` convention).
MAMBA_TE_KEYS = {"norm.": "mixer.in_proj.layer_norm_"}
ATTENTION_TE_KEYS = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
MLP_TE_KEYS = {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def moe_mlp_builder(*, experts, linear_fc1, linear_fc2, moe_layer=MoELayer, router=TopKRouter,
                    shared_expert=SharedExpertMLP):
    """The `mlp` builder of an 'E' layer: Megatron-Core's `MoELayer` with the given routed
    experts (`SequentialMLP` on CPU, `TEGroupedMLP` with Transformer-Engine), its `TopKRouter`
    (sigmoid + expert bias, set by the TransformerConfig) and the shared expert (Nemotron 3's
    is an ungated squared-ReLU MLP added to the routed output: `moe_shared_expert_gate` off)."""
    mlp = MLPSubmodules(linear_fc1=linear_fc1, linear_fc2=linear_fc2)
    return partial(moe_layer, submodules=MoESubmodules(
        experts=experts, router=router,
        shared_experts=partial(shared_expert, submodules=mlp)))


def local_moe_layer_spec(*, norm=WrappedTorchNorm, **kwargs) -> ModuleSpec:
    """'E' layer, torch only: pre-norm + MoELayer with sequential local experts."""
    experts = partial(SequentialMLP, submodules=MLPSubmodules(
        linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))
    return _moe_layer_spec(norm, experts, ColumnParallelLinear, RowParallelLinear, **kwargs)


def te_moe_layer_spec(**kwargs) -> ModuleSpec:
    """'E' layer with Transformer-Engine: TE norm, grouped-GEMM experts (`TEGroupedMLP`).
    Checkpoint keys differ from the local spec's (`experts.linear_fc1.weight<i>` vs
    `experts.local_experts.<i>.linear_fc1.weight`), as in Megatron-Core itself."""
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelGroupedLinear, TEColumnParallelLinear, TENorm, TERowParallelGroupedLinear,
        TERowParallelLinear)
    from megatron.core.transformer.moe.experts import GroupedMLPSubmodules, TEGroupedMLP

    experts = partial(TEGroupedMLP, submodules=GroupedMLPSubmodules(
        linear_fc1=TEColumnParallelGroupedLinear, linear_fc2=TERowParallelGroupedLinear))
    return _moe_layer_spec(TENorm, experts, TEColumnParallelLinear, TERowParallelLinear, **kwargs)


def _moe_layer_spec(norm, experts, linear_fc1, linear_fc2, **kwargs) -> ModuleSpec:
    """An 'E' layer: pre-norm + MoELayer with `experts`; the shared expert's linears are
    `linear_fc1` / `linear_fc2` (local or TE, as the experts)."""
    return ModuleSpec(
        module=MoETransformerLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=norm,
            mlp=moe_mlp_builder(experts=experts, linear_fc1=linear_fc1, linear_fc2=linear_fc2,
                                **kwargs),
            mlp_bda=get_bias_dropout_add))


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a broken TE install raises RuntimeError/OSError, not only ImportError
        return False
    return True


def local_hybrid_stack_spec(*, d_conv: int = 4, chunk_size: int = 128,
                            mixer=NemoMambaMixer, attention=SelfAttention, mlp=MLP,
                            stack=NemoHybridStack, norm=WrappedTorchNorm,
                            moe=MoELayer) -> ModuleSpec:
    """Torch-only hybrid spec (column/row-parallel linears, torch RMSNorm, DotProductAttention).

    The module classes are parameters so the elastic subclasses reuse this exact wiring.
    """
    return ModuleSpec(
        module=stack,
        params={"final_norm": norm},
        submodules=HybridStackSubmodules(
            mamba_layer=ModuleSpec(
                module=MambaLayer,
                submodules=MambaLayerSubmodules(
                    norm=norm,
                    mixer=ModuleSpec(
                        module=mixer,
                        params={"d_conv": d_conv, "chunk_size": chunk_size},
                        submodules=MambaMixerSubmodules(
                            in_proj=ColumnParallelLinear, out_proj=RowParallelLinear),
                    ),
                    mamba_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map=MAMBA_TE_KEYS,
                ),
            ),
            attention_layer=ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    input_layernorm=norm,
                    self_attention=ModuleSpec(
                        module=attention,
                        params={"attn_mask_type": AttnMaskType.causal},
                        submodules=SelfAttentionSubmodules(
                            linear_qkv=ColumnParallelLinear,
                            core_attention=DotProductAttention,
                            linear_proj=RowParallelLinear),
                    ),
                    self_attn_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map=ATTENTION_TE_KEYS,
                ),
            ),
            mlp_layer=ModuleSpec(
                module=MLPLayer,
                submodules=TransformerLayerSubmodules(
                    pre_mlp_layernorm=norm,
                    mlp=partial(mlp.as_mlp_submodule, submodules=MLPSubmodules(
                        linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)),
                    mlp_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map=MLP_TE_KEYS,
                ),
            ),
            moe_layer=local_moe_layer_spec(norm=norm, moe_layer=moe),
        ),
    )


def te_hybrid_stack_spec(*, d_conv: int = 4, chunk_size: int = 128,
                         mixer=NemoMambaMixer, attention=SelfAttention, mlp=MLP,
                         stack=NemoHybridStack) -> ModuleSpec:
    """Transformer-Engine hybrid spec (fused norm+linear), for GPU runs with TE installed."""
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention, TELayerNormColumnParallelLinear, TENorm, TERowParallelLinear)

    return ModuleSpec(
        module=stack,
        params={"final_norm": TENorm},
        submodules=HybridStackSubmodules(
            mamba_layer=ModuleSpec(
                module=MambaLayer,
                submodules=MambaLayerSubmodules(
                    mixer=ModuleSpec(
                        module=mixer,
                        params={"d_conv": d_conv, "chunk_size": chunk_size},
                        submodules=MambaMixerSubmodules(
                            in_proj=TELayerNormColumnParallelLinear, out_proj=TERowParallelLinear)),
                    mamba_bda=get_bias_dropout_add)),
            attention_layer=ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    self_attention=ModuleSpec(
                        module=attention,
                        params={"attn_mask_type": AttnMaskType.causal},
                        submodules=SelfAttentionSubmodules(
                            linear_qkv=TELayerNormColumnParallelLinear,
                            core_attention=TEDotProductAttention,
                            linear_proj=TERowParallelLinear)),
                    self_attn_bda=get_bias_dropout_add)),
            mlp_layer=ModuleSpec(
                module=MLPLayer,
                submodules=TransformerLayerSubmodules(
                    mlp=partial(mlp.as_mlp_submodule, submodules=MLPSubmodules(
                        linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=TERowParallelLinear)),
                    mlp_bda=get_bias_dropout_add)),
            moe_layer=te_moe_layer_spec(),
        ),
    )


def hybrid_stack_spec(*, backend: str = "auto", **kwargs) -> ModuleSpec:
    """`backend`: 'local' (torch), 'te' (Transformer-Engine) or 'auto' (TE if importable)."""
    if backend not in ("auto", "local", "te"):
        raise ValueError(f"spec backend={backend!r}: must be 'auto', 'local' or 'te'")
    if backend == "te" or (backend == "auto" and have_transformer_engine()):
        return te_hybrid_stack_spec(**kwargs)
    return local_hybrid_stack_spec(**kwargs)
