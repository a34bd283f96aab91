"""`ElasticMambaMixer`: Mamba2 mixer whose heads / head channels / hidden output can be masked.

Masking point: the gated SSM output y * silu(z) `[l, b, d_inner_local]`, before the grouped
gated RMSNorm.  Heads are independent given the (unpruned) B/C, so zeroing a head's gated output
is exactly removing the head: the paper masks z, x and dt at the projection, but that leaves
pruned channels non-zero through the conv bias and dt_bias; masking the gated output does not,
is linear in a soft mask, and works unchanged behind mamba-ssm's fused kernel (which returns
the gated, un-normalized y that Megatron then normalizes).  Every group keeps the same share of
channels, so the norm correction uses one fraction for all groups.

Sliced execution (`sliced.py`): upstream's forward runs on this rank's kept heads and head
channels only - `in_proj` rows [z | x of the kept channels | all B, C | dt of the kept heads] and
the kept hidden columns, conv1d over [kept x | B | C], dt_bias / A_log / D of the kept heads, the
gated norm over the kept channels (same groups, smaller), `out_proj` [kept hidden, kept
channels] - with the head dim pinned to the kept one.  B, C and the state size are never pruned.
"""

from __future__ import annotations

import contextlib

import torch

from nemo_elastic.elastic.norm import corrected
from nemo_elastic.elastic.sliced import Index, local, pinned, swapped_parameters, take
from nemo_elastic.elastic.state import ElasticMixin
from nemo_elastic.model.mamba import NemoMambaMixer


class ElasticMambaMixer(ElasticMixin, NemoMambaMixer):
    def forward(self, hidden_states, *args, **kwargs):
        if self._sliced() is None:
            out, out_bias = super().forward(hidden_states, *args, **kwargs)
        else:
            with self._sliced_weights():
                out, out_bias = super().forward(hidden_states, *args, **kwargs)
        return self._mask_hidden(out), out_bias

    # ------------------------------------------------------------------ sliced execution
    def _kept(self) -> dict[str, Index]:
        """This rank's kept positions: heads, channels [H_l*P], in_proj rows, conv channels."""
        from nemo_elastic.layout import conv_channels, first_of_each_group, head_channels, \
            in_proj_rows

        choice = self.elastic.sliced.choice
        k, p = choice.mamba_num_heads, choice.mamba_head_dim
        # From the config: the head dim is pinned during a sliced call.
        P = self.config.mamba_head_dim
        H_l, G_l, N = self.nheads_local_tp, self.ngroups_local_tp, self.d_state
        d_l, bc = H_l * P, 2 * G_l * N
        rank, size = self._tp()

        def build(part):
            heads = local(first_of_each_group(H_l * size, G_l * size, k), H_l, rank)
            inner = head_channels(heads, P, p)
            if part == "heads":
                return heads, H_l
            if part == "inner":
                return inner, d_l
            if part == "in_proj":  # [z | x | B | C | dt] at this rank's sizes
                return in_proj_rows(inner, heads, d_l, bc), 2 * d_l + bc + H_l
            return conv_channels(inner, d_l, bc), d_l + bc  # conv [x | B | C]

        return {part: self._index(("mamba", part, k, p), lambda part=part: build(part))
                for part in ("heads", "inner", "in_proj", "conv")}

    @contextlib.contextmanager
    def _sliced_weights(self):
        if self.cp.cp_size != 1:
            raise ValueError("execution='sliced' does not support context parallelism in Mamba "
                             "layers; use execution='masked'")
        kept = self._kept()
        heads, inner = kept["heads"], kept["inner"]
        hidden = self._hidden_index(self.out_proj.weight.shape[0])
        cp = self.cp
        D = take(cp.D_cp1, 0, inner if self.D_has_hdim else heads)
        with contextlib.ExitStack() as stack:
            in_proj = take(take(self.in_proj.weight, 0, kept["in_proj"]), 1, hidden)
            stack.enter_context(swapped_parameters(self.in_proj, weight=in_proj))
            stack.enter_context(swapped_parameters(
                self.out_proj, weight=take(take(self.out_proj.weight, 0, hidden), 1, inner)))
            stack.enter_context(pinned(
                cp, conv1d_weight_cp1=take(cp.conv1d_weight_cp1, 0, kept["conv"]),
                conv1d_bias_cp1=take(cp.conv1d_bias_cp1, 0, kept["conv"]),
                dt_bias_cp1=take(cp.dt_bias_cp1, 0, heads), A_log_cp1=take(cp.A_log_cp1, 0, heads),
                D_cp1=D))
            stack.enter_context(pinned(
                self, headdim=self.elastic.sliced.choice.mamba_head_dim))
            if self.rmsnorm:
                stack.enter_context(swapped_parameters(
                    self.norm, weight=take(self.norm.weight, 0, inner)))
                stack.enter_context(pinned(
                    self.norm, group_size=inner.size // self.ngroups_local_tp))
            yield

    @contextlib.contextmanager
    def _unnormalized(self):
        """Run upstream's scan but skip its norm: we mask, then normalize with correction."""
        rmsnorm = self.rmsnorm
        self.rmsnorm = False
        try:
            yield
        finally:
            self.rmsnorm = rmsnorm

    def _masked_norm(self, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = y * mask  # mask [d_inner_local]: head-major channel mask of this rank's heads
        return corrected(self.norm, self.elastic.layer.inner.fraction, y) if self.rmsnorm else y

    def _sliced_norm(self, y: torch.Tensor) -> torch.Tensor:
        """Sliced: y [l, b, kept channels] times the mask's kept entries, then the gated norm
        (pinned to the kept channels) - the masked forward's `_masked_norm` on the kept part."""
        mask = self._inner_multiplier(self._kept()["inner"])
        y = y if mask is None else y * mask
        return self.norm(y) if self.rmsnorm else y

    def _ssm_training(self, zxBCdt, packed_seq_params=None):
        if self._sliced() is not None:
            with self._unnormalized():
                y = super()._ssm_training(zxBCdt, packed_seq_params)
            return self._sliced_norm(y)
        mask = self._local_inner()
        if mask is None:
            return super()._ssm_training(zxBCdt, packed_seq_params)
        with self._unnormalized():
            y = super()._ssm_training(zxBCdt, packed_seq_params)
        return self._masked_norm(y, mask)

    def _ssm_prefill(self, zxBCdt, conv_state=None, ssm_state=None, **kwargs):
        if self._sliced() is not None:
            if not self.use_torch_path:
                raise ValueError("execution='sliced' runs Mamba's training scan only (the "
                                 "kernels' prefill path reads the parent's sizes); set "
                                 "use_mamba_mem_eff_path or use execution='masked'")
            with self._unnormalized():
                y = super()._ssm_prefill(zxBCdt, conv_state=conv_state, ssm_state=ssm_state,
                                         **kwargs)
            return self._sliced_norm(y)
        mask = self._local_inner()
        if mask is None:
            return super()._ssm_prefill(zxBCdt, conv_state=conv_state, ssm_state=ssm_state, **kwargs)
        with self._unnormalized():
            y = super()._ssm_prefill(zxBCdt, conv_state=conv_state, ssm_state=ssm_state, **kwargs)
        return self._masked_norm(y, mask)
