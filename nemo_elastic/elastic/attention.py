"""`ElasticSelfAttention`: query heads pruned inside their query group; KV groups kept.

The per-head attention output (`linear_proj` input, `[s, b, heads_local * kv_channels]`, heads in
global order within this rank's block) is scaled by the head mask, so a pruned head contributes
nothing - the same as a model without it.  Then the residual-stream output is hidden-masked.
Both masks act outside core attention, so Megatron's "core_attn" recompute needs no masks.

Sliced execution (`sliced.py`): upstream's forward runs with this rank's kept query heads only -
`linear_qkv` rows [kept q heads | k | v] of every local query group and the kept hidden columns,
`linear_proj` [kept hidden, kept heads], and the head counts it reads pinned for the call.  The
core attention takes its head count from the query it is given, so its "core_attn" recompute
(run in the backward pass, after the call) sees the kept heads too.
"""

from __future__ import annotations

import contextlib

from megatron.core.transformer.attention import SelfAttention

from nemo_elastic.elastic.sliced import Index, local, pinned, swapped_parameters, take
from nemo_elastic.elastic.state import ElasticMixin


class ElasticSelfAttention(ElasticMixin, SelfAttention):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.linear_proj.register_forward_pre_hook(self._mask_heads)
        core = self.core_attention
        if hasattr(core, "num_attention_heads_per_partition"):  # Megatron's DotProductAttention
            self._core_heads = (core.num_attention_heads_per_partition,
                                core.hidden_size_per_partition)
            core.register_forward_pre_hook(self._core_heads_of_query)
            core.register_forward_hook(self._core_heads_restore)

    def _mask_heads(self, module, args):
        sliced = self._sliced()
        mask = self._inner_multiplier(self._kept()[0] if sliced else None)  # [heads_local(kept)]
        if mask is None:
            return None
        return (self._mask_last_dim_blocks(args[0], mask), *args[1:])

    def forward(self, *args, **kwargs):
        if self._sliced() is None:
            out, bias = super().forward(*args, **kwargs)
        else:
            with self._sliced_weights():
                out, bias = super().forward(*args, **kwargs)
        return self._mask_hidden(out), bias

    def _core_heads_of_query(self, core, args):
        """Pre-hook of the core attention: its head count is the query's ([s, b, heads, c]) -
        fewer in a sliced call, also when Megatron's "core_attn" recompute re-runs it."""
        query = args[0]
        core.num_attention_heads_per_partition = query.shape[2]
        core.hidden_size_per_partition = query.shape[2] * query.shape[3]

    def _core_heads_restore(self, core, args, output):
        core.num_attention_heads_per_partition, core.hidden_size_per_partition = self._core_heads

    # ------------------------------------------------------------------ sliced execution
    def _kept(self) -> tuple[Index, Index, Index]:
        """(local kept heads, linear_qkv rows, linear_proj columns) of this rank."""
        from nemo_elastic.layout import first_of_each_group, head_channels, qkv_rows

        kept = self.elastic.sliced.choice.num_attention_heads
        rank, size = self._tp()
        # From the config: the per-partition head counts are pinned during a sliced call.
        heads_all, groups_all = self.config.num_attention_heads, self.config.num_query_groups
        heads_local, groups_local = heads_all // size, groups_all // size
        c = self.hidden_size_per_attention_head

        def build(part):
            heads = local(first_of_each_group(heads_all, groups_all, kept), heads_local, rank)
            if part == "heads":
                return heads, heads_local
            if part == "proj":
                return head_channels(heads, c, c), heads_local * c
            per = heads_local // groups_local  # query heads per group; rows per group (per+2)*c
            return qkv_rows(heads, groups_local, per, c), groups_local * (per + 2) * c

        return tuple(self._index(("attention", part, kept), lambda part=part: build(part))
                     for part in ("heads", "qkv", "proj"))

    @contextlib.contextmanager
    def _sliced_weights(self):
        heads, qkv_rows, proj_cols = self._kept()
        hidden = self._hidden_index(self.linear_proj.weight.shape[0])
        qkv = take(take(self.linear_qkv.weight, 0, qkv_rows), 1, hidden)
        proj = take(take(self.linear_proj.weight, 0, hidden), 1, proj_cols)
        n = heads.size
        with contextlib.ExitStack() as stack:
            stack.enter_context(swapped_parameters(self.linear_qkv, weight=qkv))
            stack.enter_context(swapped_parameters(self.linear_proj, weight=proj))
            stack.enter_context(pinned(self, num_attention_heads_per_partition=n))
            yield
