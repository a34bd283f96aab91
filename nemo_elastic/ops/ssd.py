"""Chunked SSD (state-space duality) scan for Mamba2 in plain PyTorch.

This is the fallback used when the mamba-ssm Triton kernels are unavailable
(e.g. on CPU). It computes the selective-state-space recurrence

    dt'_t = softplus(dt_t + dt_bias)            (optionally clamped to dt_limit)
    h_t   = exp(dt'_t * A) * h_{t-1} + dt'_t * x_t (outer) B_t      h: [h, p, n]
    y_t   = C_t . h_t + D * x_t

with the "chunked" SSD algorithm: the sequence is cut into chunks of
``chunk_size`` tokens; inside a chunk the output is a small masked
(chunk x chunk) quadratic form, and only a per-chunk state ``[b, h, p, n]``
is carried from one chunk to the next. Cost and memory are therefore linear
in sequence length (O(l * chunk_size) for the intra-chunk part).

Numerical stability: every decay factor is ``exp`` of a *segment sum*
``sum_{k=j+1..i} dt'_k * A_k`` which is <= 0 (A < 0, dt' >= 0), so the
exponentials never overflow. Segment sums are built with a masked cumulative
sum (not as a difference of two large prefix sums) and positions outside the
causal mask are set to -inf so they become exactly 0 after ``exp``.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["ssd_chunk_scan", "segment_sum"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (for gradcheck / oracles); everything else runs in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def segment_sum(a: torch.Tensor) -> torch.Tensor:
    """Causal segment sums of ``a`` along its last dim.

    a: ``[..., T]`` -> out ``[..., T, T]`` with
    ``out[..., i, j] = sum_{k=j+1..i} a[..., k]`` for ``i >= j`` (0 on the
    diagonal) and ``-inf`` for ``i < j``.

    Built as a cumulative sum over a strictly-lower-triangular masked copy
    instead of ``cumsum[i] - cumsum[j]``: the difference form loses precision
    when the prefix sums are large in magnitude, the masked cumsum does not.
    """
    T = a.shape[-1]
    # rep[..., k, j] = a[..., k]
    rep = a.unsqueeze(-1).expand(*a.shape, T)
    strictly_lower = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    rep = rep.masked_fill(~strictly_lower, 0.0)
    # seg[..., i, j] = sum_{k <= i, k > j} a[..., k]
    seg = torch.cumsum(rep, dim=-2)
    causal = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(0)
    return seg.masked_fill(~causal, -math.inf)


def _dt_limit_is_default(dt_limit: Sequence[float]) -> bool:
    return dt_limit[0] == 0.0 and dt_limit[1] == math.inf


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    chunk_size: int = 128,
    D: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    dt_softplus: bool = True,
    dt_limit: Tuple[float, float] = (0.0, math.inf),
    initial_state: Optional[torch.Tensor] = None,
    return_final_state: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Mamba2 SSD scan, chunked so that work is linear in sequence length.

    Args:
        x: ``[b, l, h, p]`` inputs (h heads of head dim p).
        dt: ``[b, l, h]`` raw time steps (bias / softplus / clamp applied here).
        A: ``[h]`` negative decay rates (already ``-exp(A_log)``).
        B, C: ``[b, l, g, n]`` input / output projections, g groups with
            ``h % g == 0``; head ``i`` uses group ``i // (h // g)``.
        chunk_size: chunk length; ``l`` need not be a multiple of it.
        D: ``[h]`` or ``[h, p]`` skip connection, ``y += D * x``.
        dt_bias: ``[h]``, added to dt before softplus.
        dt_softplus: apply softplus to ``dt + dt_bias``.
        dt_limit: clamp range for the processed dt (skipped for the default
            ``(0, inf)``, as in mamba-ssm).
        initial_state: ``[b, h, p, n]`` state before the first token.
        return_final_state: also return the state after the last token.

    Returns:
        y ``[b, l, h, p]`` in ``x.dtype``; with ``return_final_state`` also the
        final state ``[b, h, p, n]`` in the compute dtype (float32, or float64
        for float64 inputs) -- states are kept at full precision like mamba-ssm.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be [b, l, h, p], got shape {tuple(x.shape)}")
    b, l, h, p = x.shape
    if B.dim() != 4 or C.shape != B.shape:
        raise ValueError(f"B and C must both be [b, l, g, n]; got {tuple(B.shape)} and {tuple(C.shape)}")
    g, n = B.shape[-2:]
    if B.shape[:2] != (b, l) or dt.shape != (b, l, h) or A.shape != (h,):
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, dt {tuple(dt.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}"
        )
    if h % g != 0:
        raise ValueError(f"nheads ({h}) must be divisible by ngroups ({g})")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    r = h // g  # heads per group; heads of a group are contiguous
    cdt = _compute_dtype(x)
    out_dtype = x.dtype

    # --- time step processing, all in the compute dtype: dt [b, l, h] ---
    dt = dt.to(cdt)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cdt)
    if dt_softplus:
        dt = F.softplus(dt)
    if not _dt_limit_is_default(dt_limit):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])

    xf, Bf, Cf, Af = x.to(cdt), B.to(cdt), C.to(cdt), A.to(cdt)

    # --- pad to a whole number of chunks. Padding happens *after* the dt
    # transform so padded steps have dt' = 0: decay exp(0) = 1 and zero input,
    # i.e. they leave the state untouched and the final state stays exact.
    Q = chunk_size
    pad = (-l) % Q
    if pad:
        xf = F.pad(xf, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
    nc = (l + pad) // Q

    # Chunked views; heads split as (g, r) so B/C never need to be repeated.
    xc = xf.reshape(b, nc, Q, g, r, p)  # [b, c, Q, g, r, p]
    Bc = Bf.reshape(b, nc, Q, g, n)  # [b, c, Q, g, n]
    Cc = Cf.reshape(b, nc, Q, g, n)  # [b, c, Q, g, n]
    dtc = dt.reshape(b, nc, Q, g, r).permute(0, 3, 4, 1, 2)  # [b, g, r, c, Q]
    dA = dtc * Af.reshape(g, r, 1, 1)  # [b, g, r, c, Q], all <= 0

    # decay[..., i, j] = exp(sum_{k=j+1..i} dA_k) within a chunk, 0 for i < j.
    decay = torch.exp(segment_sum(dA))  # [b, g, r, c, Q, Q]

    # --- 1) intra-chunk (diagonal blocks): y_i += sum_{j<=i} (C_i.B_j) decay_ij dt_j x_j
    CB = torch.einsum("bcign,bcjgn->bgcij", Cc, Bc)  # [b, g, c, Q, Q]
    weights = CB.unsqueeze(2) * decay * dtc.unsqueeze(-2)  # [b, g, r, c, Q(i), Q(j)]
    y = torch.einsum("bgrcij,bcjgrp->bcigrp", weights, xc)  # [b, c, Q, g, r, p]

    # --- 2) each chunk's own contribution to the state at its end:
    # S_c = sum_j exp(sum_{k>j} dA_k) dt_j x_j (outer) B_j. The last row of
    # `decay` is exactly that decay-to-end factor.
    to_end = decay[..., -1, :] * dtc  # [b, g, r, c, Q]
    chunk_states = torch.einsum("bgrcj,bcjgn,bcjgrp->bcgrpn", to_end, Bc, xc)  # [b, c, g, r, p, n]

    # --- 3) pass states between chunks: H_c = exp(sum_chunk dA) H_{c-1} + S_c.
    # A loop over chunks keeps this linear in l (an nc x nc decay matrix would
    # be quadratic in the number of chunks).
    chunk_decay = torch.exp(dA.sum(dim=-1))  # [b, g, r, c]
    if initial_state is not None:
        if initial_state.shape != (b, h, p, n):
            raise ValueError(f"initial_state must be {(b, h, p, n)}, got {tuple(initial_state.shape)}")
        state = initial_state.to(cdt).reshape(b, g, r, p, n)
    else:
        state = xf.new_zeros(b, g, r, p, n)
    prev_states = []  # state entering each chunk, [b, g, r, p, n] each
    for c in range(nc):
        prev_states.append(state)
        state = chunk_decay[:, :, :, c, None, None] * state + chunk_states[:, c]
    prev = torch.stack(prev_states, dim=1)  # [b, c, g, r, p, n]

    # --- 4) inter-chunk (off-diagonal) output: y_i += exp(sum_{k<=i} dA_k) C_i . H_{c-1}
    from_start = torch.exp(torch.cumsum(dA, dim=-1))  # [b, g, r, c, Q], <= 1
    y = y + torch.einsum("bcign,bcgrpn,bgrci->bcigrp", Cc, prev, from_start)

    # --- skip connection
    if D is not None:
        Df = D.to(cdt)
        if Df.shape == (h,):
            Df = Df.reshape(g, r, 1)
        elif Df.shape == (h, p):
            Df = Df.reshape(g, r, p)
        else:
            raise ValueError(f"D must be [h] or [h, p] = {(h,)} or {(h, p)}, got {tuple(D.shape)}")
        y = y + xc * Df

    y = y.reshape(b, nc * Q, h, p)[:, :l].to(out_dtype)
    if return_final_state:
        return y, state.reshape(b, h, p, n)
    return y
