"""Gated, grouped RMSNorm (pure-torch stand-in for mamba-ssm's ``RMSNormGated``).

Mamba2 normalizes the SSM output ``x`` together with the gate branch ``z``:

* ``norm_before_gate=False``: ``rmsnorm(x * silu(z)) * weight``
* ``norm_before_gate=True``:  ``rmsnorm(x) * weight * silu(z)``

Statistics are taken per group of ``group_size`` consecutive channels (Mamba2
uses ``group_size = d_inner / ngroups`` so that the norm does not mix the
B/C groups -- which also keeps it tensor-parallel friendly, since a TP shard
always holds whole groups).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["gated_rms_norm", "GatedRMSNorm"]


def gated_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    z: Optional[torch.Tensor] = None,
    *,
    eps: float = 1e-5,
    group_size: Optional[int] = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """Grouped RMSNorm with optional SiLU gate.

    Args:
        x: ``[..., d]``.
        weight: ``[d]`` scale.
        z: ``[..., d]`` gate branch, or None (plain grouped RMSNorm).
        eps: added to the mean square.
        group_size: channels per normalization group (default ``d``: one group).
        norm_before_gate: see module docstring.

    Returns:
        ``[..., d]`` in ``x.dtype`` (computed in float32; float64 stays float64).
    """
    d = x.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"weight must be [{d}], got {tuple(weight.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    gs = d if group_size is None else int(group_size)
    if gs <= 0 or d % gs != 0:
        raise ValueError(f"group_size ({group_size}) must divide the last dim ({d})")
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32

    xf = x.to(cdt)
    zf = z.to(cdt) if z is not None else None
    if zf is not None and not norm_before_gate:
        xf = xf * F.silu(zf)
    # [..., d] -> [..., d/gs, gs]: statistics per group of consecutive channels
    xg = xf.reshape(*xf.shape[:-1], d // gs, gs)
    rstd = torch.rsqrt(xg.square().mean(dim=-1, keepdim=True) + eps)
    out = (xg * rstd).reshape(xf.shape) * weight.to(cdt)
    if zf is not None and norm_before_gate:
        out = out * F.silu(zf)
    return out.to(x.dtype)


class GatedRMSNorm(torch.nn.Module):
    """Drop-in replacement for ``mamba_ssm.ops.triton.layernorm_gated.RMSNorm``.

    Same attribute names (``eps``, ``group_size``, ``norm_before_gate``,
    ``weight``, ``bias`` -- the latter registered as None) so that code such as
    Megatron's ``ExtendedRMSNorm`` (sharded state dict over ``weight``) works
    unchanged. Note: the default ``norm_before_gate`` here is False (the
    Megatron Mamba mixer setting); mamba-ssm's default is True. Callers that
    care should pass it explicitly, as Megatron does.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        group_size: Optional[int] = None,
        norm_before_gate: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if group_size is not None and hidden_size % group_size != 0:
            raise ValueError(f"group_size ({group_size}) must divide hidden_size ({hidden_size})")
        self.hidden_size = hidden_size
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        return gated_rms_norm(
            x,
            self.weight,
            z,
            eps=self.eps,
            group_size=self.group_size,
            norm_before_gate=self.norm_before_gate,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.hidden_size}, eps={self.eps}, group_size={self.group_size}, "
            f"norm_before_gate={self.norm_before_gate}"
        )
