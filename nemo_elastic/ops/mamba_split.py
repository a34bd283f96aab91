"""Pure-torch ``mamba_split_conv1d_scan_combined`` (the Mamba2 training path).

Mirrors the signature and semantics of
``mamba_ssm.ops.triton.ssd_combined.mamba_split_conv1d_scan_combined`` as
called from Megatron's ``MambaMixer._ssm_training``:

1. split the in-projection output ``zxbcdt`` ``[b, l, 2*d_nonssm + 2*dim + 2*g*n + h]``
   into ``[zx0 | z | xBC | dt]`` (``dim = h * headdim``; ``d_nonssm`` is 0 for
   Megatron, a leading SwiGLU "MLP" slice otherwise);
2. causal depthwise conv over ``xBC`` ``[b, l, dim + 2*g*n]`` (+ SiLU);
3. split into x ``[b, l, h, p]``, B/C ``[b, l, g, n]``;
4. chunked SSD scan with ``D`` skip, ``dt_bias`` + softplus and ``dt_limit``;
5. gate: ``y * silu(z)`` if ``rmsnorm_weight`` is None, otherwise the gated
   grouped RMSNorm with ``group_size = dim // ngroups`` (what mamba-ssm passes
   to its layer-norm kernel; it matches ``MambaMixer.norm``'s
   ``d_inner_local_tp // ngroups_local_tp``);
6. optional output projection.

Autograd handles the backward pass (no recomputation tricks -- this path is
for correctness and CPU use, not memory efficiency).
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .conv import causal_depthwise_conv1d
from .norm import gated_rms_norm
from .ssd import ssd_chunk_scan

logger = logging.getLogger(__name__)

__all__ = ["mamba_split_conv1d_scan"]


def mamba_split_conv1d_scan(
    zxbcdt: torch.Tensor,
    conv1d_weight: torch.Tensor,
    conv1d_bias: Optional[torch.Tensor],
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int,
    initial_states: Optional[torch.Tensor] = None,
    seq_idx: Optional[torch.Tensor] = None,
    dt_limit: Tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    activation: Optional[str] = "silu",
    rmsnorm_weight: Optional[torch.Tensor] = None,
    rmsnorm_eps: float = 1e-6,
    outproj_weight: Optional[torch.Tensor] = None,
    outproj_bias: Optional[torch.Tensor] = None,
    headdim: Optional[int] = None,
    ngroups: int = 1,
    norm_before_gate: bool = True,
    state_dtype: Optional[torch.dtype] = None,
):
    """Fused Mamba2 block body (conv -> SSD scan -> gate/norm -> out proj).

    Args:
        zxbcdt: ``[b, l, 2*d_nonssm + 2*dim + 2*ngroups*n + h]``, packed ``[zx0 | z | x | B | C | dt]``.
        conv1d_weight: ``[dim + 2*ngroups*n, w]`` over ``[x | B | C]``.
        conv1d_bias: ``[dim + 2*ngroups*n]`` or None.
        dt_bias: ``[h]``.
        A: ``[h]`` negative decay (``-exp(A_log)``).
        D: ``[h]`` (then ``headdim`` is required) or ``[h, headdim]``.
        chunk_size: SSD chunk length.
        initial_states: ``[b, h, headdim, n]`` or None.
        seq_idx: packed-sequence ids; not supported here (must be None).
        dt_limit: clamp range for softplus(dt + dt_bias).
        return_final_states: also return the final SSM state ``[b, h, headdim, n]``.
        activation: conv activation, None / "silu" / "swish".
        rmsnorm_weight: ``[dim]``; if given apply the gated grouped RMSNorm.
        rmsnorm_eps: RMSNorm epsilon.
        outproj_weight / outproj_bias: ``[out, d_nonssm + dim]`` / ``[out]``.
        headdim: head dim when D is 1-D.
        ngroups: number of B/C groups (also the number of RMSNorm groups).
        norm_before_gate: True -> ``rmsnorm(y) * silu(z)``; False -> ``rmsnorm(y * silu(z))``.
        state_dtype: accepted for signature compatibility with newer mamba-ssm.
            States are always accumulated in float32 (float64 for float64
            inputs); if given, the *returned* final state is cast to it.

    Returns:
        out ``[b, l, d_nonssm + dim]`` (or ``[b, l, out]`` with out projection)
        in ``zxbcdt.dtype``; with ``return_final_states`` a tuple ``(out, final_states)``.
    """
    if seq_idx is not None:
        raise NotImplementedError(
            "mamba_split_conv1d_scan (pure-torch Mamba2 path) does not support packed sequences "
            "(seq_idx must be None); install mamba-ssm + causal-conv1d on a CUDA machine for "
            "sequence packing."
        )
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    if D.dim() == 1:
        if headdim is None:
            raise ValueError("headdim must be given when D is 1-D ([nheads])")
        nheads = D.shape[0]
    elif D.dim() == 2:
        nheads, headdim = D.shape
    else:
        raise ValueError(f"D must be [h] or [h, headdim], got shape {tuple(D.shape)}")
    if nheads % ngroups != 0:
        raise ValueError(f"nheads ({nheads}) must be divisible by ngroups ({ngroups})")
    batch, seqlen, packed = zxbcdt.shape
    dim = nheads * headdim
    conv_dim = conv1d_weight.shape[0]
    if (conv_dim - dim) <= 0 or (conv_dim - dim) % (2 * ngroups) != 0:
        raise ValueError(
            f"conv1d_weight rows ({conv_dim}) must be dim ({dim}) + 2 * ngroups ({ngroups}) * d_state"
        )
    dstate = (conv_dim - dim) // (2 * ngroups)
    rest = packed - 2 * dim - 2 * ngroups * dstate - nheads
    if rest < 0 or rest % 2 != 0:
        raise ValueError(
            f"zxbcdt last dim {packed} is inconsistent with dim={dim}, ngroups={ngroups}, "
            f"d_state={dstate}, nheads={nheads}"
        )
    d_nonssm = rest // 2
    if dt_bias.shape != (nheads,) or A.shape != (nheads,):
        raise ValueError(f"dt_bias and A must be [{nheads}], got {tuple(dt_bias.shape)} / {tuple(A.shape)}")
    if rmsnorm_weight is not None and rmsnorm_weight.shape != (dim,):
        raise ValueError(f"rmsnorm_weight must be [{dim}], got {tuple(rmsnorm_weight.shape)}")
    if outproj_weight is None and outproj_bias is not None:
        raise ValueError("outproj_bias given without outproj_weight")

    # [b, l, packed] -> zx0 [b, l, 2*d_nonssm], z [b, l, dim], xBC [b, l, conv_dim], dt [b, l, h]
    zx0, z, xBC, dt = torch.split(zxbcdt, [2 * d_nonssm, dim, conv_dim, nheads], dim=-1)

    xBC = causal_depthwise_conv1d(xBC, conv1d_weight, conv1d_bias, activation=activation)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    x = x.reshape(batch, seqlen, nheads, headdim)  # [b, l, h, p]
    B = B.reshape(batch, seqlen, ngroups, dstate)  # [b, l, g, n]
    C = C.reshape(batch, seqlen, ngroups, dstate)  # [b, l, g, n]

    # Scan output, gate and norm stay in float32 (float64 kept for float64)
    # and are rounded to the activation dtype once at the end, as in the
    # fused kernel.
    cdt = torch.float64 if zxbcdt.dtype == torch.float64 else torch.float32
    y, final_states = ssd_chunk_scan(
        x.to(cdt),
        dt,
        A,
        B,
        C,
        chunk_size=chunk_size,
        D=D,
        dt_bias=dt_bias,
        dt_softplus=True,
        dt_limit=dt_limit,
        initial_state=initial_states,
        return_final_state=True,
    )
    y = y.reshape(batch, seqlen, dim)  # [b, l, dim], compute dtype

    if rmsnorm_weight is None:
        y = y * F.silu(z.to(cdt))
    else:
        y = gated_rms_norm(
            y,
            rmsnorm_weight,
            z,
            eps=rmsnorm_eps,
            group_size=dim // ngroups,
            norm_before_gate=norm_before_gate,
        )
    y = y.to(zxbcdt.dtype)

    if d_nonssm > 0:
        # SwiGLU on the non-SSM slice: silu(first half) * second half.
        zx0_a, zx0_b = zx0.chunk(2, dim=-1)
        y = torch.cat([(F.silu(zx0_a.to(cdt)) * zx0_b.to(cdt)).to(zxbcdt.dtype), y], dim=-1)

    if outproj_weight is not None:
        y = F.linear(
            y,
            outproj_weight.to(y.dtype),
            outproj_bias.to(y.dtype) if outproj_bias is not None else None,
        )

    if return_final_states:
        if state_dtype is not None:
            final_states = final_states.to(state_dtype)
        return y, final_states
    return y

