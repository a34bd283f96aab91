"""Mamba2 operators: pure-torch fallbacks and lazy access to the GPU kernels.

The pure-torch ops (``ssd_chunk_scan``, ``causal_depthwise_conv1d``,
``gated_rms_norm`` / ``GatedRMSNorm``, ``mamba_split_conv1d_scan``) and the one-token decoding steps
(``causal_conv1d_step``, ``ssd_step``) are used
whenever :func:`mamba_kernels` returns None, which is always the case on CPU.
"""

from .conv import causal_depthwise_conv1d
from .kernels import MambaKernels, have_mamba_kernels, mamba_kernels
from .mamba_split import mamba_split_conv1d_scan
from .norm import GatedRMSNorm, gated_rms_norm
from .ssd import segment_sum, ssd_chunk_scan
from .step import causal_conv1d_step, conv_state_of, ssd_step

__all__ = [
    "GatedRMSNorm",
    "MambaKernels",
    "causal_conv1d_step",
    "causal_depthwise_conv1d",
    "conv_state_of",
    "gated_rms_norm",
    "have_mamba_kernels",
    "mamba_kernels",
    "mamba_split_conv1d_scan",
    "segment_sum",
    "ssd_chunk_scan",
    "ssd_step",
]
