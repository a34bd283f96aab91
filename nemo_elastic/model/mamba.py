"""`NemoMambaMixer`: Megatron-Core's `MambaMixer` with a torch path where mamba-ssm is unusable.

Parameter names, shapes, initialization order and checkpoint keys are exactly upstream's
(`in_proj.weight` packed `[z | x | B | C | dt]` per TP rank, `conv1d_weight [conv_dim, 1, w]`,
`conv1d_bias`, `dt_bias`, `A_log`, `D`, `norm.weight`, `out_proj.weight`).  On a GPU with the
mamba-ssm kernels importable nothing changes; otherwise the training scan runs
`nemo_elastic.ops.mamba_split_conv1d_scan` (same math, torch) and the gated norm is the torch
`GatedRMSNorm`.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from einops import rearrange
from megatron.core import parallel_state
from megatron.core.ssm import mamba_mixer as upstream
from megatron.core.ssm.mamba_mixer import MambaMixer
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from nemo_elastic.ops import GatedRMSNorm, have_mamba_kernels, mamba_split_conv1d_scan

logger = logging.getLogger(__name__)


class ShardedGatedRMSNorm(GatedRMSNorm):
    """Torch gated RMSNorm with upstream `ExtendedRMSNorm`'s checkpoint layout (TP axis 0)."""

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        if not hasattr(self, "tp_group"):
            self.tp_group = parallel_state.get_tensor_model_parallel_group()
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state_dict, prefix, {"weight": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])


@contextlib.contextmanager
def _torch_construction():
    """Let upstream `__init__` run without mamba-ssm: it checks `HAVE_MAMBA_SSM` and builds the
    gated norm from the (otherwise MagicMock) `ExtendedRMSNorm` module global."""
    saved = upstream.HAVE_MAMBA_SSM, upstream.ExtendedRMSNorm
    upstream.HAVE_MAMBA_SSM, upstream.ExtendedRMSNorm = True, ShardedGatedRMSNorm
    try:
        yield
    finally:
        upstream.HAVE_MAMBA_SSM, upstream.ExtendedRMSNorm = saved


class NemoMambaMixer(MambaMixer):
    """Upstream mixer; `use_torch_path` is decided once at construction."""

    def __init__(self, *args, **kwargs):
        self.use_torch_path = not have_mamba_kernels()
        ctx = _torch_construction() if self.use_torch_path else contextlib.nullcontext()
        with ctx:
            super().__init__(*args, **kwargs)

    def _ssm_training(self, zxBCdt: torch.Tensor, packed_seq_params=None) -> torch.Tensor:
        if not self.use_torch_path:
            return super()._ssm_training(zxBCdt, packed_seq_params)
        if packed_seq_params is not None:
            raise NotImplementedError(
                "packed sequences (packed_seq_params) need the mamba-ssm CUDA kernels; "
                "the CPU torch path supports unpacked batches only")
        return self._torch_scan(zxBCdt)

    def _ssm_prefill(self, zxBCdt, conv_state=None, ssm_state=None, **kwargs):
        if not self.use_torch_path:
            return super()._ssm_prefill(zxBCdt, conv_state=conv_state, ssm_state=ssm_state, **kwargs)
        if conv_state is not None or ssm_state is not None or any(v is not None for v in kwargs.values()):
            raise NotImplementedError(
                "stateful/varlen Mamba inference needs the mamba-ssm CUDA kernels; on CPU run "
                "full-sequence forwards (no inference_context)")
        return self._torch_scan(zxBCdt)

    def _torch_scan(self, zxBCdt: torch.Tensor) -> torch.Tensor:
        """zxBCdt [l, b, 2*d_inner_l + 2*g_l*n + h_l] -> normed y [l, b, d_inner_l]."""
        zxBCdt = rearrange(zxBCdt, "l b d -> b l d")
        D = self.cp.get_D()
        if self.D_has_hdim:
            D = rearrange(D.float(), "(h p) -> h p", p=self.headdim)
        y = mamba_split_conv1d_scan(
            zxBCdt,
            rearrange(self.cp.get_conv1d_weight(), "d 1 w -> d w"),
            self.cp.get_conv1d_bias(),
            self.cp.get_dt_bias().float(),
            -torch.exp(self.cp.get_A_log().float()),
            D,
            chunk_size=self.chunk_size,
            activation=self.activation,
            headdim=None if self.D_has_hdim else self.headdim,
            ngroups=self.cp.ngroups_local_tpcp,
            norm_before_gate=self.norm_before_gate,
        )  # [b, l, d_inner_l], already gated: y * silu(z)
        y = rearrange(y, "b l d -> l b d").contiguous()
        y = self.cp.post_conv_ssm(y)
        if self.rmsnorm:
            y = self.norm(y)
        return y
