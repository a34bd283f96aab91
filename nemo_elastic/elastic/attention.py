"""`ElasticSelfAttention`: query heads pruned inside their query group; KV groups kept.

The per-head attention output (`linear_proj` input, `[s, b, heads_local * kv_channels]`, heads in
global order within this rank's block) is scaled by the head mask, so a pruned head contributes
nothing - the same as a model without it.  Then the residual-stream output is hidden-masked.
Both masks act outside core attention, so Megatron's "core_attn" recompute needs no masks.
"""

from __future__ import annotations

from megatron.core.transformer.attention import SelfAttention

from nemo_elastic.elastic.state import ElasticMixin


class ElasticSelfAttention(ElasticMixin, SelfAttention):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.linear_proj.register_forward_pre_hook(self._mask_heads)

    def _mask_heads(self, module, args):
        mask = self._local_inner()  # [heads_local]
        if mask is None:
            return None
        return (self._mask_last_dim_blocks(args[0], mask), *args[1:])

    def forward(self, *args, **kwargs):
        out, bias = super().forward(*args, **kwargs)
        return self._mask_hidden(out), bias
