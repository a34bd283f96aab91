"""The mixture-of-experts section of a model recipe (`model.moe`), validated at construction.

A Nemotron 3 (hybrid Mamba + MoE) parent has `E` layers in `model.hybrid_layer_pattern`; each
is a Megatron-Core `MoELayer` (pre-norm, router, routed experts, shared expert) with the
Nemotron 3 router: sigmoid scores, an expert score-correction bias that only changes the choice
of experts (aux-loss-free load balancing, updated after every global batch by Megatron-Core's
`finalize_model_grads`), optional group-limited top-k, top-k weights normalised to sum to 1,
times a routed scaling factor.  Experts and the shared expert are squared-ReLU, not gated.

Field names are Megatron-Core `TransformerConfig` names (`to_transformer_config` passes them
through).  Hugging Face `NemotronHConfig` names, for reference:

    num_moe_experts                       n_routed_experts
    moe_router_topk                       num_experts_per_tok
    moe_ffn_hidden_size                   moe_intermediate_size
    moe_shared_expert_intermediate_size   moe_shared_expert_intermediate_size (None: no shared)
    moe_router_num_groups / group_topk    n_group / topk_group
    moe_router_topk_scaling_factor        routed_scaling_factor
    (always true)                         norm_topk_prob

Pure Python (no torch), like `config`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from nemo_elastic.errors import fail, require_positive


@dataclass(kw_only=True)
class MoEConfig:
    num_moe_experts: int
    moe_router_topk: int
    moe_ffn_hidden_size: int
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_router_num_groups: int = 1
    moe_router_group_topk: int = 1
    moe_router_topk_scaling_factor: float = 1.0
    moe_router_enable_expert_bias: bool = True
    moe_router_bias_update_rate: float = 1.0e-3
    # Hugging Face's `norm_topk_prob`; Megatron-Core's sigmoid router always normalises top-k>1
    moe_norm_topk_prob: bool = True
    # Hugging Face's `moe_latent_size`: Megatron-Core 0.19 builds the latent projections only
    # with Transformer-Engine, so a CPU run cannot have them (rejected below).
    moe_latent_size: Optional[int] = None

    def __post_init__(self) -> None:
        p = "model.moe."
        require_positive(self, "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size",
                         "moe_router_num_groups", "moe_router_group_topk", prefix=p)
        if self.moe_shared_expert_intermediate_size is not None:
            require_positive(self, "moe_shared_expert_intermediate_size", prefix=p)
        if self.moe_router_topk > self.num_moe_experts:
            fail(f"{p}moe_router_topk", self.moe_router_topk,
                 f"must be <= model.moe.num_moe_experts={self.num_moe_experts}")
        groups, group_topk = self.moe_router_num_groups, self.moe_router_group_topk
        if self.num_moe_experts % groups:
            fail(f"{p}moe_router_num_groups", groups,
                 f"must divide model.moe.num_moe_experts={self.num_moe_experts}")
        if group_topk > groups:
            fail(f"{p}moe_router_group_topk", group_topk,
                 f"must be <= model.moe.moe_router_num_groups={groups}")
        if groups > 1 and self.moe_router_topk != 2 * group_topk:
            # Megatron-Core scores a group by its top (topk / group_topk) experts, Hugging Face
            # (Nemotron 3 / DeepSeek-V3) by its top 2: equal only when topk = 2 * group_topk.
            fail(f"{p}moe_router_topk", self.moe_router_topk,
                 f"with moe_router_num_groups={groups} > 1 must equal 2 x "
                 f"moe_router_group_topk={group_topk} (groups are scored by their top-2 experts)")
        scale = self.moe_router_topk_scaling_factor
        if (not isinstance(scale, (int, float)) or isinstance(scale, bool)
                or not math.isfinite(scale) or scale <= 0):
            fail(f"{p}moe_router_topk_scaling_factor", scale, "must be a positive number")
        rate = self.moe_router_bias_update_rate
        if not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate < 0:
            fail(f"{p}moe_router_bias_update_rate", rate, "must be a number >= 0")
        if not self.moe_norm_topk_prob and self.moe_router_topk > 1:
            fail(f"{p}moe_norm_topk_prob", self.moe_norm_topk_prob,
                 "must be true with moe_router_topk > 1: Megatron-Core's sigmoid router "
                 "normalises the top-k weights to sum to 1")
        if self.moe_latent_size is not None:
            fail(f"{p}moe_latent_size", self.moe_latent_size,
                 "latent MoE projections need Transformer-Engine in Megatron-Core 0.19 and are "
                 "not supported; set it to null")

    def to_transformer_config(self) -> dict:
        """The Megatron-Core `TransformerConfig` keyword arguments of this MoE."""
        groups = self.moe_router_num_groups
        return dict(
            num_moe_experts=self.num_moe_experts,
            moe_router_topk=self.moe_router_topk,
            moe_ffn_hidden_size=self.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=self.moe_shared_expert_intermediate_size,
            moe_router_score_function="sigmoid",
            moe_router_pre_softmax=False,
            moe_router_num_groups=groups if groups > 1 else None,
            moe_router_group_topk=self.moe_router_group_topk if groups > 1 else None,
            moe_router_topk_scaling_factor=self.moe_router_topk_scaling_factor,
            moe_router_enable_expert_bias=self.moe_router_enable_expert_bias,
            moe_router_bias_update_rate=self.moe_router_bias_update_rate,
            # aux-loss-free: the expert bias balances the load, no auxiliary loss
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_router_dtype="fp32",
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=False,
            moe_permute_fusion=False,
            moe_router_fusion=False,
            moe_shared_expert_overlap=False,
        )
