"""`ElasticMambaMixer`: Mamba2 mixer whose heads / head channels / hidden output can be masked.

Masking point: the gated SSM output y * silu(z) `[l, b, d_inner_local]`, before the grouped
gated RMSNorm.  Heads are independent given the (unpruned) B/C, so zeroing a head's gated output
is exactly removing the head: the paper masks z, x and dt at the projection, but that leaves
pruned channels non-zero through the conv bias and dt_bias; masking the gated output does not,
is linear in a soft mask, and works unchanged behind mamba-ssm's fused kernel (which returns
the gated, un-normalized y that Megatron then normalizes).  Every group keeps the same share of
channels, so the norm correction uses one fraction for all groups.
"""

from __future__ import annotations

import contextlib

import torch

from nemo_elastic.elastic.norm import corrected
from nemo_elastic.elastic.state import ElasticMixin
from nemo_elastic.model.mamba import NemoMambaMixer


class ElasticMambaMixer(ElasticMixin, NemoMambaMixer):
    def forward(self, hidden_states, *args, **kwargs):
        out, out_bias = super().forward(hidden_states, *args, **kwargs)
        return self._mask_hidden(out), out_bias

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

    def _ssm_training(self, zxBCdt, packed_seq_params=None):
        mask = self._local_inner()
        if mask is None:
            return super()._ssm_training(zxBCdt, packed_seq_params)
        with self._unnormalized():
            y = super()._ssm_training(zxBCdt, packed_seq_params)
        return self._masked_norm(y, mask)

    def _ssm_prefill(self, zxBCdt, conv_state=None, ssm_state=None, **kwargs):
        mask = self._local_inner()
        if mask is None:
            return super()._ssm_prefill(zxBCdt, conv_state=conv_state, ssm_state=ssm_state, **kwargs)
        with self._unnormalized():
            y = super()._ssm_prefill(zxBCdt, conv_state=conv_state, ssm_state=ssm_state, **kwargs)
        return self._masked_norm(y, mask)
