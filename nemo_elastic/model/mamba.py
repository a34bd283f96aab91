"""`NemoMambaMixer`: Megatron-Core's `MambaMixer` with a torch path where mamba-ssm is unusable.

Parameter names, shapes, initialization order and checkpoint keys are exactly upstream's
(`in_proj.weight` packed `[z | x | B | C | dt]` per TP rank, `conv1d_weight [conv_dim, 1, w]`,
`conv1d_bias`, `dt_bias`, `A_log`, `D`, `norm.weight`, `out_proj.weight`).  On a GPU with the
mamba-ssm kernels importable nothing changes; otherwise the training scan runs
`nemo_elastic.ops.mamba_split_conv1d_scan` (same math, torch) and the gated norm is the torch
`GatedRMSNorm`.  Stateful decoding through Megatron's `StaticInferenceContext` works too: the
prefill scan fills the layer's conv / SSM states and each decoding step runs the torch step
functions (`nemo_elastic.ops.step`); see `nemo_elastic.inference`.
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

from nemo_elastic.ops import (GatedRMSNorm, causal_conv1d_step, conv_state_of, have_mamba_kernels,
                              mamba_split_conv1d_scan, ssd_step)

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
        """Static-batching prefill (Megatron's `StaticInferenceContext`): the torch scan, which
        also fills this layer's conv state (last d_conv pre-conv inputs) and SSM state (the
        scan's final state) in place.  Varlen / dynamic batching still needs the kernels."""
        if not self.use_torch_path:
            return super()._ssm_prefill(zxBCdt, conv_state=conv_state, ssm_state=ssm_state, **kwargs)
        if any(v is not None for v in kwargs.values()):
            raise NotImplementedError(
                "dynamic-batching (varlen) Mamba inference needs the mamba-ssm CUDA kernels; on "
                "CPU use a StaticInferenceContext (nemo_elastic.inference)")
        return self._torch_scan(zxBCdt, conv_state=conv_state, ssm_state=ssm_state)

    def _ssm_decode(self, zxBCdt, conv_state, ssm_state, batch_indices=None, **kwargs):
        """One token for every sequence of a static batch, torch step functions.

        Upstream's static `_decode` hands over zxBCdt as [1, b, d] (sequence-major) and
        expects y [1, b, d_inner_l]; its own CPU fallback is unreachable because Megatron now
        always imports its Triton `causal_conv1d_update` / `selective_state_update`."""
        if not self.use_torch_path:
            return super()._ssm_decode(zxBCdt, conv_state, ssm_state,
                                       batch_indices=batch_indices, **kwargs)
        if batch_indices is not None or any(v is not None for v in kwargs.values()):
            raise NotImplementedError(
                "dynamic-batching Mamba decoding needs the mamba-ssm CUDA kernels; on CPU use "
                "a StaticInferenceContext (nemo_elastic.inference)")
        if zxBCdt.shape[0] != 1:
            raise ValueError(f"static decoding takes one token per step, got zxBCdt "
                             f"{tuple(zxBCdt.shape)} ([1, b, d] expected)")
        d_inner, g, n = self.cp.d_inner_local_tpcp, self.cp.ngroups_local_tpcp, self.d_state
        h = self.cp.nheads_local_tpcp
        z, xBC, dt = torch.split(zxBCdt[0], [d_inner, d_inner + 2 * g * n, h], dim=-1)  # [b, *]
        xBC = causal_conv1d_step(xBC, conv_state,
                                 rearrange(self.cp.get_conv1d_weight(), "d 1 w -> d w"),
                                 self.cp.get_conv1d_bias(), activation=self.activation)
        x, B, C = torch.split(xBC, [d_inner, g * n, g * n], dim=-1)
        D = self.cp.get_D()
        if self.D_has_hdim:
            D = rearrange(D.float(), "(h p) -> h p", p=self.headdim)
        y = ssd_step(ssm_state, rearrange(x, "b (h p) -> b h p", p=self.headdim), dt,
                     -torch.exp(self.cp.get_A_log().float()),
                     rearrange(B, "b (g n) -> b g n", n=n), rearrange(C, "b (g n) -> b g n", n=n),
                     D=D, dt_bias=self.cp.get_dt_bias().float())  # [b, h, p], float32
        y = rearrange(y, "b h p -> b (h p)")
        # same gate / norm as the scan path: y * silu(z), then the grouped RMSNorm
        y = (y * torch.nn.functional.silu(z.to(y.dtype))).to(zxBCdt.dtype)
        if self.rmsnorm:
            y = self.norm(y)
        return y.unsqueeze(0)  # [1, b, d_inner_l]

    def _torch_scan(self, zxBCdt: torch.Tensor, conv_state=None, ssm_state=None) -> torch.Tensor:
        """zxBCdt [l, b, 2*d_inner_l + 2*g_l*n + h_l] -> normed y [l, b, d_inner_l].

        With `conv_state [b, conv_dim_l, d_conv]` / `ssm_state [b, h_l, p, n]` (an inference
        prefill) they are overwritten with the states after the last token."""
        zxBCdt = rearrange(zxBCdt, "l b d -> b l d")
        if conv_state is not None:
            d_inner = self.cp.d_inner_local_tpcp
            xBC = zxBCdt[..., d_inner:2 * d_inner + 2 * self.cp.ngroups_local_tpcp * self.d_state]
            conv_state.copy_(conv_state_of(xBC, conv_state.shape[-1]))
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
            return_final_states=ssm_state is not None,
        )  # [b, l, d_inner_l], already gated: y * silu(z)
        if ssm_state is not None:
            y, final = y
            ssm_state.copy_(final)
        y = rearrange(y, "b l d -> l b d").contiguous()
        y = self.cp.post_conv_ssm(y)
        if self.rmsnorm:
            y = self.norm(y)
        return y
