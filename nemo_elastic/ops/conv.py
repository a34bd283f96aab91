"""Causal depthwise 1-D convolution (pure-torch stand-in for ``causal_conv1d_fn``).

Mamba2 convolves the packed ``[x | B | C]`` channels along time with a short
per-channel (depthwise) kernel. "Causal" means output ``t`` only sees inputs
``t - w + 1 .. t``; this is obtained by left-padding the sequence with
``w - 1`` zeros and running an unpadded grouped convolution.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["causal_depthwise_conv1d"]

_SILU_NAMES = ("silu", "swish")


def causal_depthwise_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
) -> torch.Tensor:
    """Causal depthwise conv over time.

    Args:
        x: ``[b, l, c]`` (time-major per batch, channels last).
        weight: ``[c, w]`` one width-``w`` filter per channel; tap ``w - 1``
            multiplies the current token, tap ``0`` the token ``w - 1`` steps back
            (same convention as ``causal_conv1d`` / ``nn.Conv1d``).
        bias: ``[c]`` or None.
        activation: None, or ``"silu"`` / ``"swish"``.

    Returns:
        ``[b, l, c]`` in ``x.dtype``; accumulation is done in float32 (float64
        kept for float64 inputs), like the CUDA kernel.
    """
    if activation not in (None, *_SILU_NAMES):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    if x.dim() != 3:
        raise ValueError(f"x must be [b, l, c], got shape {tuple(x.shape)}")
    c = x.shape[-1]
    if weight.dim() != 2 or weight.shape[0] != c:
        raise ValueError(f"weight must be [c={c}, w], got shape {tuple(weight.shape)}")
    if bias is not None and bias.shape != (c,):
        raise ValueError(f"bias must be [c={c}], got shape {tuple(bias.shape)}")
    width = weight.shape[1]
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32

    # conv1d wants [b, c, l]; left pad with w-1 zeros so the output is causal.
    xt = F.pad(x.to(cdt).transpose(1, 2), (width - 1, 0))  # [b, c, l + w - 1]
    out = F.conv1d(
        xt,
        weight.to(cdt).unsqueeze(1),  # [c, 1, w]: depthwise filters
        bias.to(cdt) if bias is not None else None,
        groups=c,
    )  # [b, c, l]
    if activation is not None:
        out = F.silu(out)
    return out.transpose(1, 2).to(x.dtype)
