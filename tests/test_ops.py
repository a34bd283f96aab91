"""Tests for the pure-torch Mamba2 ops in ``nemo_elastic.ops``.

Every op is checked against an independent float64 oracle written here:
a token-by-token recurrence for the SSD scan, an explicit loop over taps for
the causal conv, and a per-group loop for the gated RMSNorm. All on CPU.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nemo_elastic.ops import (
    GatedRMSNorm,
    causal_depthwise_conv1d,
    gated_rms_norm,
    have_mamba_kernels,
    mamba_kernels,
    mamba_split_conv1d_scan,
    ssd_chunk_scan,
)
from nemo_elastic.ops import kernels as kernels_mod

F64 = torch.float64


# ----------------------------------------------------------------------------
# Independent float64 oracles
# ----------------------------------------------------------------------------


def oracle_ssd(x, dt, A, B, C, D=None, dt_bias=None, dt_limit=None, initial_state=None):
    """Sequential recurrence, one token at a time, in float64.

    x [b, l, h, p], dt [b, l, h], A [h], B/C [b, l, g, n], D [h] or [h, p],
    initial_state [b, h, p, n]. Returns (y [b, l, h, p], final state [b, h, p, n]).
    """
    x, dt, A, B, C = (t.detach().to(F64) for t in (x, dt, A, B, C))
    bsz, seqlen, nheads, hdim = x.shape
    ngroups, dstate = B.shape[-2:]
    per_group = nheads // ngroups
    if dt_bias is not None:
        dt = dt + dt_bias.detach().to(F64)
    dt = F.softplus(dt)
    if dt_limit is not None:
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    state = (
        initial_state.detach().to(F64).clone()
        if initial_state is not None
        else torch.zeros(bsz, nheads, hdim, dstate, dtype=F64)
    )
    ys = torch.zeros(bsz, seqlen, nheads, hdim, dtype=F64)
    for t in range(seqlen):
        for hh in range(nheads):
            gg = hh // per_group
            decay = torch.exp(dt[:, t, hh] * A[hh])  # [b]
            inp = dt[:, t, hh, None, None] * x[:, t, hh, :, None] * B[:, t, gg, None, :]  # [b, p, n]
            state[:, hh] = decay[:, None, None] * state[:, hh] + inp
            ys[:, t, hh] = (state[:, hh] * C[:, t, gg, None, :]).sum(-1)
    if D is not None:
        Dd = D.detach().to(F64)
        ys = ys + x * (Dd[:, None] if Dd.dim() == 1 else Dd)
    return ys, state


def oracle_conv(x, weight, bias=None, silu=False):
    """Causal depthwise conv by summing shifted inputs tap by tap. x [b, l, c], weight [c, w]."""
    x, weight = x.detach().to(F64), weight.detach().to(F64)
    width = weight.shape[1]
    out = torch.zeros_like(x)
    for k in range(width):
        shift = width - 1 - k  # tap k looks `shift` steps back
        shifted = torch.zeros_like(x)
        shifted[:, shift:] = x[:, : x.shape[1] - shift]
        out += shifted * weight[:, k]
    if bias is not None:
        out += bias.detach().to(F64)
    return F.silu(out) if silu else out


def oracle_gated_norm(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=False):
    """Gated grouped RMSNorm with an explicit loop over groups, float64."""
    x, weight = x.detach().to(F64), weight.detach().to(F64)
    z = z.detach().to(F64) if z is not None else None
    d = x.shape[-1]
    gs = group_size or d
    if z is not None and not norm_before_gate:
        x = x * z * torch.sigmoid(z)
    out = torch.empty_like(x)
    for start in range(0, d, gs):
        seg = x[..., start : start + gs]
        ms = (seg * seg).sum(-1, keepdim=True) / gs
        out[..., start : start + gs] = seg / torch.sqrt(ms + eps)
    out = out * weight
    if z is not None and norm_before_gate:
        out = out * z * torch.sigmoid(z)
    return out


def make_ssd_inputs(b, l, h, p, g, n, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    x = rnd(b, l, h, p)
    dt = -1.0 + 0.5 * rnd(b, l, h)  # pre-softplus, softplus(-1) ~ 0.31
    A = -(0.5 + 1.5 * torch.rand(h, generator=gen, dtype=F64))  # in [-2, -0.5]
    B = rnd(b, l, g, n)
    C = rnd(b, l, g, n)
    return [t.to(dtype) for t in (x, dt, A, B, C)]


def rel_errors(out, ref):
    out, ref = out.detach().to(F64), ref.detach().to(F64)
    fro = ((out - ref).norm() / ref.norm()).item()
    maxrel = ((out - ref).abs().max() / ref.abs().max()).item()
    return fro, maxrel


# ----------------------------------------------------------------------------
# SSD scan
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "l,chunk,g,use_init,d_kind,dt_limit",
    [
        (37, 8, 1, False, None, None),
        (37, 16, 2, True, "h", None),
        (37, 8, 4, True, "hp", None),
        (37, 16, 4, False, "h", (0.2, 0.5)),
        (32, 8, 2, True, "hp", (0.0, 0.4)),
        (5, 16, 1, True, "h", None),  # shorter than one chunk
    ],
)
def test_ssd_matches_sequential_oracle(l, chunk, g, use_init, d_kind, dt_limit):
    torch.manual_seed(0)
    b, h, p, n = 2, 4, 3, 5
    x, dt, A, B, C = make_ssd_inputs(b, l, h, p, g, n, seed=1)
    dt_bias = 0.1 * torch.randn(h)
    D = {None: None, "h": torch.randn(h), "hp": torch.randn(h, p)}[d_kind]
    init = torch.randn(b, h, p, n) if use_init else None
    kwargs = {} if dt_limit is None else {"dt_limit": dt_limit}

    y, state = ssd_chunk_scan(
        x, dt, A, B, C, chunk_size=chunk, D=D, dt_bias=dt_bias, initial_state=init,
        return_final_state=True, **kwargs,
    )
    y_ref, state_ref = oracle_ssd(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_limit=dt_limit, initial_state=init)

    assert y.shape == (b, l, h, p) and y.dtype == torch.float32
    assert state.shape == (b, h, p, n)
    for out, ref in ((y, y_ref), (state, state_ref)):
        fro, maxrel = rel_errors(out, ref)
        assert fro <= 1e-5 and maxrel <= 1e-5, (fro, maxrel)


def test_ssd_float64_exact_and_no_final_state():
    torch.manual_seed(0)
    x, dt, A, B, C = make_ssd_inputs(1, 13, 4, 2, 2, 3, dtype=F64, seed=2)
    y = ssd_chunk_scan(x, dt, A, B, C, chunk_size=4)
    assert isinstance(y, torch.Tensor) and y.dtype == F64
    y_ref, _ = oracle_ssd(x, dt, A, B, C)
    assert rel_errors(y, y_ref)[0] <= 1e-12


def test_ssd_dt_softplus_off():
    """With dt_softplus=False the given dt is used as is (must then be >= 0)."""
    torch.manual_seed(0)
    x, dt, A, B, C = make_ssd_inputs(1, 11, 2, 2, 1, 3, dtype=F64, seed=3)
    dt_pos = F.softplus(dt)
    y = ssd_chunk_scan(x, dt_pos, A, B, C, chunk_size=4, dt_softplus=False)
    y_ref, _ = oracle_ssd(x, dt, A, B, C)
    assert rel_errors(y, y_ref)[0] <= 1e-12


def test_ssd_low_precision_returns_input_dtype():
    torch.manual_seed(0)
    x, dt, A, B, C = make_ssd_inputs(1, 19, 2, 4, 1, 4, seed=4)
    y = ssd_chunk_scan(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), chunk_size=8)
    assert y.dtype == torch.bfloat16
    y_ref, _ = oracle_ssd(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16())
    assert rel_errors(y, y_ref)[0] <= 1e-2


def test_ssd_chunk_size_invariance():
    torch.manual_seed(0)
    x, dt, A, B, C = make_ssd_inputs(2, 70, 4, 8, 2, 16, seed=5)
    init = torch.randn(2, 4, 8, 16)
    outs = [
        ssd_chunk_scan(x, dt, A, B, C, chunk_size=q, D=torch.ones(4), initial_state=init, return_final_state=True)
        for q in (4, 16, 64)
    ]
    y0, s0 = outs[0]
    for y, s in outs[1:]:
        assert (y - y0).abs().max().item() <= 1e-6 * y0.abs().max().item()
        assert (s - s0).abs().max().item() <= 1e-6 * s0.abs().max().item()


def test_ssd_long_sequence_stays_finite():
    """Large cumulative decay (|sum dt*A| in the thousands) must not overflow."""
    torch.manual_seed(0)
    x, dt, A, B, C = make_ssd_inputs(1, 512, 2, 2, 1, 4, seed=6)
    dt = dt + 3.0  # softplus ~ 2-3 per step: total log-decay ~ -3000
    y, s = ssd_chunk_scan(x, dt, A * 2, B, C, chunk_size=128, return_final_state=True)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    y_ref, s_ref = oracle_ssd(x, dt, A * 2, B, C)
    assert rel_errors(y, y_ref)[0] <= 1e-5


def test_ssd_rejects_bad_shapes():
    x, dt, A, B, C = make_ssd_inputs(1, 8, 3, 2, 2, 4)
    with pytest.raises(ValueError):
        ssd_chunk_scan(x, dt, A, B, C)  # 3 heads, 2 groups


def test_ssd_gradcheck():
    torch.manual_seed(0)
    b, l, h, p, g, n = 1, 7, 4, 2, 2, 3
    x, dt, A, B, C = make_ssd_inputs(b, l, h, p, g, n, dtype=F64, seed=7)
    D = torch.randn(h, p, dtype=F64)
    dt_bias = 0.1 * torch.randn(h, dtype=F64)
    init = torch.randn(b, h, p, n, dtype=F64)
    inputs = [t.clone().requires_grad_(True) for t in (x, dt, A, B, C, D, dt_bias, init)]

    def fn(x, dt, A, B, C, D, dt_bias, init):
        return ssd_chunk_scan(
            x, dt, A, B, C, chunk_size=3, D=D, dt_bias=dt_bias, initial_state=init, return_final_state=True
        )

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_ssd_gradcheck_d_per_head_no_init():
    torch.manual_seed(0)
    x, dt, A, B, C = make_ssd_inputs(2, 5, 2, 2, 1, 2, dtype=F64, seed=8)
    D = torch.randn(2, dtype=F64)
    inputs = [t.clone().requires_grad_(True) for t in (x, dt, A, B, C, D)]

    def fn(x, dt, A, B, C, D):
        return ssd_chunk_scan(x, dt, A, B, C, chunk_size=2, D=D)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------
# Causal conv
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("width,activation,use_bias", [(4, "silu", True), (2, None, False), (1, "swish", True)])
def test_conv_matches_oracle(width, activation, use_bias):
    torch.manual_seed(0)
    x = torch.randn(2, 9, 6)
    w = torch.randn(6, width)
    bias = torch.randn(6) if use_bias else None
    out = causal_depthwise_conv1d(x, w, bias, activation=activation)
    ref = oracle_conv(x, w, bias, silu=activation is not None)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_errors(out, ref)[1] <= 1e-6


def test_conv_is_causal():
    torch.manual_seed(0)
    x = torch.randn(1, 10, 3)
    w = torch.randn(3, 4)
    base = causal_depthwise_conv1d(x, w)
    x2 = x.clone()
    x2[:, 6:] += 5.0  # perturb the future only
    out = causal_depthwise_conv1d(x2, w)
    assert torch.equal(out[:, :6], base[:, :6])
    assert not torch.allclose(out[:, 6:], base[:, 6:])


def test_conv_rejects_unknown_activation():
    with pytest.raises(ValueError):
        causal_depthwise_conv1d(torch.randn(1, 3, 2), torch.randn(2, 2), activation="relu")


def test_conv_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, dtype=F64, requires_grad=True)
    w = torch.randn(3, 4, dtype=F64, requires_grad=True)
    bias = torch.randn(3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: causal_depthwise_conv1d(*a, activation="silu"), (x, w, bias))


# ----------------------------------------------------------------------------
# Gated RMSNorm
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("group_size", [None, 4])
@pytest.mark.parametrize("use_z", [True, False])
def test_gated_norm_matches_oracle(norm_before_gate, group_size, use_z):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    z = torch.randn(3, 5, 8) if use_z else None
    w = torch.randn(8)
    out = gated_rms_norm(x, w, z, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate)
    ref = oracle_gated_norm(x, w, z, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate)
    assert out.dtype == x.dtype
    assert rel_errors(out, ref)[1] <= 1e-6


@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_gated_norm_gradcheck(norm_before_gate):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=F64, requires_grad=True)
    z = torch.randn(2, 3, 6, dtype=F64, requires_grad=True)
    w = torch.randn(6, dtype=F64, requires_grad=True)

    def fn(x, w, z):
        return gated_rms_norm(x, w, z, group_size=3, norm_before_gate=norm_before_gate)

    assert torch.autograd.gradcheck(fn, (x, w, z))


def test_gated_rms_norm_module_params_and_attrs():
    torch.manual_seed(0)
    m = GatedRMSNorm(8, eps=1e-6, group_size=4, norm_before_gate=True, dtype=torch.bfloat16)
    assert [name for name, _ in m.named_parameters()] == ["weight"]
    assert list(m.state_dict().keys()) == ["weight"]
    assert m.bias is None
    assert (m.eps, m.group_size, m.norm_before_gate) == (1e-6, 4, True)
    assert m.weight.dtype == torch.bfloat16 and torch.equal(m.weight, torch.ones(8, dtype=torch.bfloat16))
    with torch.no_grad():
        m.weight.mul_(3.0)
    m.reset_parameters()
    assert torch.equal(m.weight, torch.ones(8, dtype=torch.bfloat16))
    assert GatedRMSNorm(4).norm_before_gate is False

    x, z = torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(2, 8, dtype=torch.bfloat16)
    out = m(x, z)
    assert out.dtype == torch.bfloat16
    ref = oracle_gated_norm(x, m.weight, z, eps=1e-6, group_size=4, norm_before_gate=True)
    assert rel_errors(out, ref)[1] <= 1e-2


def test_gated_rms_norm_statistics_are_per_group():
    """Two groups with scales 1e-3 and 1e3: each is normalized on its own."""
    torch.manual_seed(0)
    x = torch.randn(4, 16, dtype=F64)
    x[:, :8] *= 1e-3
    x[:, 8:] *= 1e3
    grouped = GatedRMSNorm(16, eps=1e-18, group_size=8, dtype=F64)(x)
    rms = grouped.reshape(4, 2, 8).square().mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones(4, 2, dtype=F64))

    # A single group instead squashes the small-scale half towards zero.
    whole = GatedRMSNorm(16, eps=1e-18, dtype=F64)(x)
    assert whole[:, :8].abs().max() < 1e-4


# ----------------------------------------------------------------------------
# mamba_split_conv1d_scan
# ----------------------------------------------------------------------------


def _split_inputs(b, l, h, headdim, g, n, width, d_kind, d_nonssm=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dim = h * headdim
    conv_dim = dim + 2 * g * n
    zxbcdt = torch.randn(b, l, 2 * d_nonssm + dim + conv_dim + h, generator=gen, dtype=F64)
    zxbcdt[..., -h:] = -1.0 + 0.5 * zxbcdt[..., -h:]  # dt slice: small pre-softplus values
    conv_w = 0.5 * torch.randn(conv_dim, width, generator=gen, dtype=F64)
    conv_b = 0.1 * torch.randn(conv_dim, generator=gen, dtype=F64)
    dt_bias = 0.1 * torch.randn(h, generator=gen, dtype=F64)
    A = -(0.5 + 1.5 * torch.rand(h, generator=gen, dtype=F64))
    D = torch.randn(h, generator=gen, dtype=F64) if d_kind == "h" else torch.randn(h, headdim, generator=gen, dtype=F64)
    return zxbcdt, conv_w, conv_b, dt_bias, A, D


def oracle_split(zxbcdt, conv_w, conv_b, dt_bias, A, D, headdim, g, rmsnorm_weight=None, eps=1e-6,
                 norm_before_gate=True, initial_states=None, d_nonssm=0, outproj_weight=None, outproj_bias=None):
    """Hand-composed float64 reference: oracle conv + oracle recurrence + oracle gate/norm."""
    zxbcdt = zxbcdt.detach().to(F64)
    b, l, _ = zxbcdt.shape
    h = A.shape[0]
    dim = h * headdim
    conv_dim = conv_w.shape[0]
    n = (conv_dim - dim) // (2 * g)
    o = 2 * d_nonssm
    z = zxbcdt[..., o : o + dim]
    xbc = zxbcdt[..., o + dim : o + dim + conv_dim]
    dt = zxbcdt[..., o + dim + conv_dim :]
    xbc = oracle_conv(xbc, conv_w, conv_b, silu=True)
    x = xbc[..., :dim].reshape(b, l, h, headdim)
    Bm = xbc[..., dim : dim + g * n].reshape(b, l, g, n)
    Cm = xbc[..., dim + g * n :].reshape(b, l, g, n)
    y, state = oracle_ssd(x, dt, A, Bm, Cm, D=D, dt_bias=dt_bias, initial_state=initial_states)
    y = y.reshape(b, l, dim)
    if rmsnorm_weight is None:
        y = y * z * torch.sigmoid(z)
    else:
        y = oracle_gated_norm(y, rmsnorm_weight, z, eps=eps, group_size=dim // g, norm_before_gate=norm_before_gate)
    if d_nonssm:
        a, c = zxbcdt[..., :d_nonssm], zxbcdt[..., d_nonssm : 2 * d_nonssm]
        y = torch.cat([a * torch.sigmoid(a) * c, y], dim=-1)
    if outproj_weight is not None:
        y = y @ outproj_weight.detach().to(F64).T
        if outproj_bias is not None:
            y = y + outproj_bias.detach().to(F64)
    return y, state


@pytest.mark.parametrize(
    "h,headdim,g,d_kind,use_norm,norm_before_gate",
    [
        (4, 4, 1, "h", False, True),
        (4, 4, 2, "hp", True, False),
        (4, 2, 4, "h", True, True),
        (6, 3, 2, "hp", False, False),
        (8, 2, 2, "h", True, False),  # Megatron's setting: rmsnorm, norm_before_gate=False
    ],
)
def test_mamba_split_matches_reference(h, headdim, g, d_kind, use_norm, norm_before_gate):
    torch.manual_seed(0)
    b, l, n, width = 2, 21, 4, 4
    zxbcdt, conv_w, conv_b, dt_bias, A, D = _split_inputs(b, l, h, headdim, g, n, width, d_kind, seed=11)
    dim = h * headdim
    rms_w = (1.0 + 0.1 * torch.randn(dim, dtype=F64)) if use_norm else None
    init = torch.randn(b, h, headdim, n, dtype=F64)
    f32 = lambda t: None if t is None else t.float()  # noqa: E731

    out, state = mamba_split_conv1d_scan(
        zxbcdt.float(), conv_w.float(), conv_b.float(), dt_bias.float(), A.float(), D.float(),
        chunk_size=8, initial_states=init.float(), return_final_states=True,
        rmsnorm_weight=f32(rms_w), rmsnorm_eps=1e-6,
        headdim=headdim if d_kind == "h" else None, ngroups=g, norm_before_gate=norm_before_gate,
    )
    ref, state_ref = oracle_split(
        zxbcdt, conv_w, conv_b, dt_bias, A, D, headdim, g, rmsnorm_weight=rms_w, eps=1e-6,
        norm_before_gate=norm_before_gate, initial_states=init,
    )
    assert out.shape == (b, l, dim) and out.dtype == torch.float32
    for o, r in ((out, ref), (state, state_ref)):
        fro, maxrel = rel_errors(o, r)
        assert fro <= 1e-5 and maxrel <= 1e-5, (fro, maxrel)


def test_mamba_split_outproj_and_nonssm_float64():
    torch.manual_seed(0)
    b, l, h, headdim, g, n, width, d_nonssm = 1, 10, 4, 2, 2, 3, 3, 5
    zxbcdt, conv_w, conv_b, dt_bias, A, D = _split_inputs(
        b, l, h, headdim, g, n, width, "h", d_nonssm=d_nonssm, seed=12
    )
    dim = h * headdim
    rms_w = torch.rand(dim, dtype=F64) + 0.5
    W = torch.randn(7, d_nonssm + dim, dtype=F64)
    bias = torch.randn(7, dtype=F64)
    out = mamba_split_conv1d_scan(
        zxbcdt, conv_w, conv_b, dt_bias, A, D, chunk_size=4, rmsnorm_weight=rms_w,
        outproj_weight=W, outproj_bias=bias, headdim=headdim, ngroups=g, norm_before_gate=False,
    )
    ref, _ = oracle_split(
        zxbcdt, conv_w, conv_b, dt_bias, A, D, headdim, g, rmsnorm_weight=rms_w, norm_before_gate=False,
        d_nonssm=d_nonssm, outproj_weight=W, outproj_bias=bias,
    )
    assert out.shape == (b, l, 7) and out.dtype == F64
    assert rel_errors(out, ref)[1] <= 1e-10


def test_mamba_split_bf16_and_state_dtype():
    torch.manual_seed(0)
    zxbcdt, conv_w, conv_b, dt_bias, A, D = _split_inputs(1, 12, 2, 4, 1, 4, 4, "h", seed=13)
    out, state = mamba_split_conv1d_scan(
        zxbcdt.bfloat16(), conv_w.bfloat16(), conv_b.bfloat16(), dt_bias.float(), A.float(), D.float(),
        chunk_size=8, headdim=4, return_final_states=True, state_dtype=torch.bfloat16,
    )
    assert out.dtype == torch.bfloat16 and state.dtype == torch.bfloat16
    ref, _ = oracle_split(zxbcdt.bfloat16(), conv_w.bfloat16(), conv_b.bfloat16(), dt_bias, A, D, 4, 1)
    assert rel_errors(out, ref)[0] <= 3e-2


def test_mamba_split_backward_runs():
    torch.manual_seed(0)
    zxbcdt, conv_w, conv_b, dt_bias, A, D = _split_inputs(1, 9, 2, 2, 1, 3, 4, "h", seed=14)
    params = [t.float().requires_grad_(True) for t in (zxbcdt, conv_w, conv_b, dt_bias, A, D)]
    rms_w = torch.ones(4, requires_grad=True)
    out = mamba_split_conv1d_scan(*params, chunk_size=4, headdim=2, rmsnorm_weight=rms_w)
    out.square().sum().backward()
    for t in [*params, rms_w]:
        assert t.grad is not None and torch.isfinite(t.grad).all()


def test_mamba_split_rejects_seq_idx():
    zxbcdt, conv_w, conv_b, dt_bias, A, D = _split_inputs(1, 6, 2, 2, 1, 3, 4, "h")
    with pytest.raises(NotImplementedError, match="seq_idx"):
        mamba_split_conv1d_scan(
            zxbcdt, conv_w, conv_b, dt_bias, A, D, chunk_size=4, headdim=2,
            seq_idx=torch.zeros(1, 6, dtype=torch.int32),
        )


def test_mamba_split_requires_headdim_for_1d_d():
    zxbcdt, conv_w, conv_b, dt_bias, A, D = _split_inputs(1, 6, 2, 2, 1, 3, 4, "h")
    with pytest.raises(ValueError, match="headdim"):
        mamba_split_conv1d_scan(zxbcdt, conv_w, conv_b, dt_bias, A, D, chunk_size=4)


# ----------------------------------------------------------------------------
# Kernel detection
# ----------------------------------------------------------------------------


@pytest.fixture
def fresh_kernel_cache():
    kernels_mod.mamba_kernels.cache_clear()
    yield
    kernels_mod.mamba_kernels.cache_clear()


def test_kernels_none_on_cpu(fresh_kernel_cache):
    if torch.cuda.is_available():
        pytest.skip("CUDA machine: kernel availability depends on the install")
    assert mamba_kernels() is None
    assert have_mamba_kernels() is False


def test_kernels_swallow_non_import_errors(fresh_kernel_cache, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def broken_import(name, *args, **kwargs):
        raise RuntimeError(f"simulated broken install while importing {name}")

    monkeypatch.setattr(kernels_mod.importlib, "import_module", broken_import)
    with caplog.at_level(logging.DEBUG, logger=kernels_mod.__name__):
        assert kernels_mod.mamba_kernels() is None
        assert kernels_mod.mamba_kernels() is None  # cached: no second attempt / log
    msgs = [r for r in caplog.records if "simulated broken install" in r.getMessage()]
    assert len(msgs) == 1 and msgs[0].levelno == logging.DEBUG


def test_kernels_found_when_importable(fresh_kernel_cache, monkeypatch):
    """With CUDA 'available' and (fake) modules importable, handles are returned."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fakes = {}
    for name in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton",
                 "mamba_ssm.ops.triton.ssd_combined", "mamba_ssm.ops.triton.layernorm_gated", "causal_conv1d"):
        fakes[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, fakes[name])
    fakes["mamba_ssm.ops.triton.ssd_combined"].mamba_split_conv1d_scan_combined = split_fn = object()
    fakes["mamba_ssm.ops.triton.ssd_combined"].mamba_chunk_scan_combined = chunk_fn = object()
    fakes["mamba_ssm.ops.triton.layernorm_gated"].RMSNorm = GatedRMSNorm
    fakes["causal_conv1d"].causal_conv1d_fn = conv_fn = object()

    k = kernels_mod.mamba_kernels()
    assert k is not None and kernels_mod.have_mamba_kernels()
    assert k.mamba_split_conv1d_scan_combined is split_fn
    assert k.mamba_chunk_scan_combined is chunk_fn
    assert k.RMSNormGated is GatedRMSNorm
    assert k.causal_conv1d_fn is conv_fn


def test_ops_import_does_not_import_mamba_ssm():
    """Importing nemo_elastic.ops must not touch mamba_ssm / causal_conv1d (fresh interpreter)."""
    code = textwrap.dedent(
        """
        import sys

        class Forbid:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("mamba_ssm", "causal_conv1d"):
                    raise AssertionError("imported " + name)
                return None

        sys.meta_path.insert(0, Forbid())
        import nemo_elastic.ops
        """
    )
    repo_root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
