"""Megatron-Core parameter names of the hybrid model (TP=1 state dicts), shared by the tools
that rewrite whole state dicts (slicing, importance reordering, HF conversion)."""

import re

# "decoder.layers.<global index>.<name inside the layer>"
LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# Pre-norm weights [h]: local spec names and their Transformer-Engine fused-norm aliases.
PRE_NORM_KEYS = ("norm.weight", "mixer.in_proj.layer_norm_weight", "input_layernorm.weight",
                 "self_attention.linear_qkv.layer_norm_weight", "pre_mlp_layernorm.weight",
                 "mlp.linear_fc1.layer_norm_weight")
