"""RMSNorm correction for masked channels (paper-digest §3.4).

RMSNorm over d channels of which only a fraction f is non-zero computes the mean square over all d:
ms_all = f * ms_active.  Normalizing with eps * f and multiplying the output by sqrt(f) gives
    x / sqrt(f*ms_active + f*eps) * sqrt(f) = x / sqrt(ms_active + eps),
the RMSNorm of the surviving channels alone - what the physically sliced model computes.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def scaled_eps(norm: torch.nn.Module, fraction: float):
    """Temporarily use eps * fraction in any norm module with an `eps` attribute
    (torch.nn.RMSNorm, the torch/mamba-ssm gated RMSNorm, Transformer-Engine norms)."""
    eps = norm.eps
    norm.eps = eps * fraction
    try:
        yield
    finally:
        norm.eps = eps


def corrected(norm: torch.nn.Module, fraction: float, *args, **kwargs) -> torch.Tensor:
    """norm(*args) as if only the active `fraction` of its channels existed."""
    if fraction == 1.0:
        return norm(*args, **kwargs)
    with scaled_eps(norm, fraction):
        out = norm(*args, **kwargs)
    return out * math.sqrt(fraction)


class ElasticRMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm over the residual stream; `elastic_fraction` is set by the elastic model for
    the duration of a masked forward, `elastic_width` for a sliced one (the input then has only
    the first `elastic_width` channels; None = plain upstream behaviour)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.elastic_fraction: Optional[float] = None
        self.elastic_width: Optional[int] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.elastic_width is not None:
            w = self.elastic_width
            return F.rms_norm(x, (w,), self.weight[:w], self.eps)
        if self.elastic_fraction is None or self.elastic_fraction == 1.0:
            return super().forward(x)
        with scaled_eps(self, self.elastic_fraction):
            out = super().forward(x)
        return out * math.sqrt(self.elastic_fraction)


def elastic_norm_builder(config, hidden_size: int, eps: float = 1e-5, **unused):
    """Spec-compatible builder (same call as Megatron's `WrappedTorchNorm`), RMSNorm only."""
    if config.normalization != "RMSNorm":
        raise ValueError(f"normalization={config.normalization!r}: elastic models use RMSNorm "
                         "(Nemotron-H); the masked-channel correction is derived for RMSNorm")
    if config.sequence_parallel:
        raise ValueError("sequence_parallel=True is not supported by the torch norm of the "
                         "local (CPU) spec; use the Transformer-Engine spec on GPU")
    return ElasticRMSNorm(hidden_size, eps=eps)
