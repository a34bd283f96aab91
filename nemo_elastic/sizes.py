"""The layer symbols and their size fields, written down once.

Pure Python and a leaf of the import graph (it imports nothing of the package), so that the
config validation (`config`, `config_elastic`), `SubNetwork`, the Megatron stack's per-layer
overrides (`model/stack.py`), the router and the parameter layout (`layout`) all read the same
tables instead of each spelling them out:

* `LAYER_FIELDS`: which per-layer size fields each layer symbol has (`SIZE_FIELDS`: all of
  them, in one order);
* `GROUPED`: the grouped size fields, whose value must be a multiple of a group count because
  the same number of units is kept in every group ("k heads per group"), and why
  (`GROUPED_WHY`); *which* heads a prefix keeps is `layout.kept_heads`;
* `ELASTIC_AXES`: the router's width axes: axis name -> (layer symbol, or None for the global
  hidden size; size field).  The group count of an axis follows from `GROUPED`.
"""

from __future__ import annotations

from typing import Optional

# Hybrid layer symbols we support (Megatron-Core `Symbols`): Mamba2, self-attention, dense MLP,
# mixture-of-experts (`model.moe`), plus the pipeline-stage separator.
MAMBA, ATTENTION, MLP, PIPE = "M", "*", "-", "|"
MOE = "E"

LAYER_FIELDS: dict[str, tuple[str, ...]] = {
    MAMBA: ("mamba_num_heads", "mamba_head_dim"),
    ATTENTION: ("num_attention_heads",),
    MLP: ("ffn_hidden_size",),
    # routed experts kept (a prefix of the importance-ordered experts), expert FFN width,
    # shared-expert width; the parent's values live in `model.moe`
    MOE: ("num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"),
}
# The MoE size fields (values in `ModelConfig.moe`, not on ModelConfig itself).
MOE_FIELDS: tuple[str, ...] = LAYER_FIELDS[MOE]
SIZE_FIELDS: tuple[str, ...] = tuple(f for fields in LAYER_FIELDS.values() for f in fields)

GROUPED: dict[str, str] = {"mamba_num_heads": "mamba_num_groups",
                           "num_attention_heads": "num_query_groups"}
GROUPED_WHY: dict[str, str] = {
    "mamba_num_heads": "the same number of heads is kept in every Mamba group",
    "num_attention_heads": "heads are pruned inside query groups; KV groups are kept"}

ELASTIC_AXES: dict[str, tuple[Optional[str], str]] = {
    "hidden": (None, "hidden_size"),
    "mamba_heads": (MAMBA, "mamba_num_heads"),
    "mamba_head_dim": (MAMBA, "mamba_head_dim"),
    "attention_heads": (ATTENTION, "num_attention_heads"),
    "ffn": (MLP, "ffn_hidden_size"),
    "moe_experts": (MOE, "num_moe_experts"),
    "moe_expert_ffn": (MOE, "moe_ffn_hidden_size"),
    "moe_shared_ffn": (MOE, "moe_shared_expert_intermediate_size"),
}


def group_field(size_field: str) -> Optional[str]:
    """The ModelConfig field holding the group count `size_field` must be a multiple of."""
    return GROUPED.get(size_field)
