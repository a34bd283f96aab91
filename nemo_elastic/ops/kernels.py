"""Lazy detection of the optional mamba-ssm / causal-conv1d GPU kernels.

Nothing here imports ``mamba_ssm`` at module import time: importing it pulls
in Triton and CUDA extensions, which is slow and, on CPU-only or mismatched
installs, can fail with arbitrary exceptions (ImportError, OSError for a
missing ``.so``, RuntimeError from a CUDA/ABI check, ...). Detection runs on
first use, is cached, and any failure simply means "use the pure-torch path"
(logged once at debug level).
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

logger = logging.getLogger(__name__)

__all__ = ["MambaKernels", "mamba_kernels", "have_mamba_kernels"]


@dataclass(frozen=True)
class MambaKernels:
    """Handles to the fused GPU kernels used by the Mamba2 mixer."""

    mamba_split_conv1d_scan_combined: Callable[..., Any]
    mamba_chunk_scan_combined: Callable[..., Any]
    RMSNormGated: type
    causal_conv1d_fn: Callable[..., Any]


def _load() -> MambaKernels:
    """Import the kernels; raises on any problem (caller turns that into None)."""
    ssd_combined = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    layernorm_gated = importlib.import_module("mamba_ssm.ops.triton.layernorm_gated")
    # The fused split/conv/scan kernel calls into causal_conv1d's CUDA
    # extension, so without it the kernel set is unusable as a whole.
    causal_conv1d = importlib.import_module("causal_conv1d")
    return MambaKernels(
        mamba_split_conv1d_scan_combined=ssd_combined.mamba_split_conv1d_scan_combined,
        mamba_chunk_scan_combined=ssd_combined.mamba_chunk_scan_combined,
        RMSNormGated=layernorm_gated.RMSNorm,
        causal_conv1d_fn=causal_conv1d.causal_conv1d_fn,
    )


@functools.lru_cache(maxsize=None)
def mamba_kernels() -> Optional[MambaKernels]:
    """The GPU kernels if CUDA is available and mamba-ssm imports cleanly, else None.

    Cached: the (possibly slow) import is attempted once per process.
    """
    try:
        if not torch.cuda.is_available():
            logger.debug("CUDA not available; using the pure-torch Mamba2 ops")
            return None
        return _load()
    except Exception as exc:  # broken installs raise more than ImportError
        logger.debug("mamba-ssm kernels unavailable (%s: %s); using the pure-torch Mamba2 ops",
                     type(exc).__name__, exc)
        return None


def have_mamba_kernels() -> bool:
    """True when :func:`mamba_kernels` found usable GPU kernels."""
    return mamba_kernels() is not None
