"""One decoding step of Mamba2 in plain PyTorch (stand-ins for ``causal_conv1d_update`` and
``selective_state_update``).

Stateful decoding keeps, per Mamba layer and sequence,

* the conv state ``[b, c, w]``: the last ``w`` inputs of the packed ``[x | B | C]`` channels
  (oldest first), so the causal depthwise conv of the next token is one dot product per channel;
* the SSM state ``[b, h, p, n]``: ``h_t = exp(dt'_t * A) * h_{t-1} + dt'_t * x_t (outer) B_t``.

``ssd_chunk_scan(..., return_final_state=True)`` returns the state after a prefill;
``conv_state_of`` the conv state.  Feeding tokens one at a time through these steps from those
states gives the same outputs as one scan over the whole sequence (tests/test_ops_step.py).
States are updated in place (their buffers belong to the inference context).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["causal_conv1d_step", "conv_state_of", "ssd_step"]


def _cdt(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def conv_state_of(xbc: torch.Tensor, width: int) -> torch.Tensor:
    """The conv state after a prefill: ``xbc [b, l, c]`` (pre-conv) -> ``[b, c, width]``, the
    last ``width`` inputs, zero-padded on the left when ``l < width``."""
    xt = xbc.transpose(1, 2)  # [b, c, l]
    return F.pad(xt, (width - xt.shape[-1], 0)) if xt.shape[-1] < width else xt[..., -width:]


def causal_conv1d_step(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                       bias: Optional[torch.Tensor] = None,
                       activation: Optional[str] = None) -> torch.Tensor:
    """x ``[b, c]`` (the new token's pre-conv channels) -> ``[b, c]`` in ``x.dtype``.

    ``conv_state [b, c, w]`` is shifted left by one and ``x`` written at its end (in place);
    ``weight [c, w]`` as in ``causal_depthwise_conv1d`` (tap ``w - 1`` = current token)."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x.to(conv_state.dtype)
    cdt = _cdt(x)
    out = (conv_state.to(cdt) * weight.to(cdt)).sum(dim=-1)  # [b, c]
    if bias is not None:
        out = out + bias.to(cdt)
    if activation is not None:
        out = F.silu(out)
    return out.to(x.dtype)


def ssd_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
             B: torch.Tensor, C: torch.Tensor, *, D: Optional[torch.Tensor] = None,
             dt_bias: Optional[torch.Tensor] = None, dt_softplus: bool = True,
             dt_limit: Tuple[float, float] = (0.0, math.inf)) -> torch.Tensor:
    """One token of the SSD recurrence (same arguments as ``ssd_chunk_scan``, without ``l``).

    state ``[b, h, p, n]`` (updated in place, computed in float32/float64), x ``[b, h, p]``,
    dt ``[b, h]`` raw, A ``[h]``, B / C ``[b, g, n]``, D ``[h]`` or ``[h, p]``.
    Returns y ``[b, h, p]`` in the compute dtype (float32, float64 for float64 inputs)."""
    b, h, p = x.shape
    g, n = B.shape[-2:]
    if state.shape != (b, h, p, n) or dt.shape != (b, h) or C.shape != B.shape or h % g:
        raise ValueError(f"ssd_step shapes: state {tuple(state.shape)}, x {tuple(x.shape)}, "
                         f"dt {tuple(dt.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}")
    cdt = _cdt(x)
    dt = dt.to(cdt)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cdt)
    if dt_softplus:
        dt = F.softplus(dt)
    if not (dt_limit[0] == 0.0 and dt_limit[1] == math.inf):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    # heads of a group are contiguous: head i uses group i // (h // g)
    Bh = B.to(cdt).repeat_interleave(h // g, dim=1)  # [b, h, n]
    Ch = C.to(cdt).repeat_interleave(h // g, dim=1)  # [b, h, n]
    xf = x.to(cdt)
    decay = torch.exp(dt * A.to(cdt))  # [b, h], <= 1
    new = state.to(cdt) * decay[..., None, None] + (dt[..., None] * xf)[..., None] * Bh[:, :, None]
    state.copy_(new)
    y = torch.einsum("bhpn,bhn->bhp", new, Ch)
    if D is not None:
        Df = D.to(cdt)
        y = y + xf * (Df[:, None] if Df.dim() == 1 else Df)
    return y
