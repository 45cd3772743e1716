"""Triton kernels of the all-pairs repulsion energy (launchers and registration: ``repulsion.py``).

Metric ids are ``drp_kernels._constants.METRIC_ID`` (linf 0, l2 1, cosine 2), shared with every
other kernel. The math, the tiling and the two backward kernels are described in ``repulsion.py``.
D offsets are int64, so strided views whose addresses pass 2**31 elements are read correctly.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._triton_utils import even_d_heuristic, sign


# ------------------------------------------------------------------------------ kernels
@triton.jit
def _dist_tile(X, offs_i, offs_j, mask_i, mask_j, D, stride_c, stride_d,
               METRIC: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
               BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    """(BLOCK_I, BLOCK_J) fp32 distances d_ij; also the number of arg-max ties for linf."""
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    ties = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        offs_k = (k0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        a_ptr = X + offs_i[:, None] * stride_c + offs_k[None, :] * stride_d
        b_ptr = X + offs_j[:, None] * stride_c + offs_k[None, :] * stride_d
        if EVEN_D:
            a = tl.load(a_ptr, mask=mask_i[:, None], other=0.0).to(tl.float32)
            b = tl.load(b_ptr, mask=mask_j[:, None], other=0.0).to(tl.float32)
        else:
            mk = offs_k < D
            a = tl.load(a_ptr, mask=mask_i[:, None] & mk[None, :], other=0.0).to(tl.float32)
            b = tl.load(b_ptr, mask=mask_j[:, None] & mk[None, :], other=0.0).to(tl.float32)
        if METRIC == 2:
            acc += tl.dot(a, tl.trans(b), input_precision=PRECISION)
        else:
            diff = a[:, None, :] - b[None, :, :]
            if METRIC == 1:
                acc += tl.sum(diff * diff, axis=2)
            else:
                ad = tl.abs(diff)
                cmax = tl.max(ad, axis=2)
                ccount = tl.sum((ad == cmax[:, :, None]).to(tl.float32), axis=2)
                # padded coordinates give |diff| = 0; they only count when the true max is 0
                if not EVEN_D:
                    npad = (BLOCK_D - tl.minimum(D - k0, BLOCK_D)).to(tl.float32)
                    ccount = ccount - tl.where(cmax == 0.0, npad, 0.0)
                ties = tl.where(cmax > acc, ccount, tl.where(cmax == acc, ties + ccount, ties))
                acc = tl.maximum(acc, cmax)
    if METRIC == 2:
        dist = 1.0 - acc
    elif METRIC == 1:
        dist = tl.sqrt(acc)
    else:
        dist = acc
    return dist, ties


@even_d_heuristic()
@triton.jit
def _repulsion_fwd_kernel(
    X, ROW, C, D, stride_c, stride_d, temperature,
    METRIC: tl.constexpr, KIND: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < C
    t = tl.cast(temperature, tl.float32)
    m_i = tl.full((BLOCK_I,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for j0 in range(0, C, BLOCK_J):
        offs_j = (j0 + tl.arange(0, BLOCK_J)).to(tl.int64)
        mask_j = offs_j < C
        dist, _ties = _dist_tile(X, offs_i, offs_j, mask_i, mask_j, D, stride_c, stride_d,
                                 METRIC, BLOCK_I, BLOCK_J, BLOCK_D, EVEN_D, PRECISION)
        valid = mask_i[:, None] & mask_j[None, :] & (offs_i[:, None] != offs_j[None, :])
        if KIND == 0:
            l_i += tl.sum(tl.where(valid, dist, 0.0), axis=1)
        else:
            z = tl.where(valid, -dist / t, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
            m_i = m_new
    if KIND == 0:
        out = l_i
    else:
        out = m_i + tl.log(tl.where(mask_i, l_i, 1.0))
    tl.store(ROW + offs_i, out, mask=mask_i)


@triton.jit
def _pair_coef(dist, valid, g, log_s, t, KIND: tl.constexpr):
    """coef_ij = 2 G_ij (see the module docstring), zero off the valid pairs."""
    if KIND == 0:
        coef = tl.where(valid, -g, 0.0)
    else:
        # exponent masked first: off the valid pairs (e.g. the diagonal) it could overflow
        coef = -2.0 * g * tl.exp(tl.where(valid, -dist / t - log_s, float("-inf")))
    return coef


@even_d_heuristic()
@triton.jit
def _repulsion_bwd_dot_kernel(
    X, SCAL, GRAD, C, D, stride_c, stride_d, stride_gc, stride_gd, temperature,
    KIND: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    pid_i = tl.program_id(0).to(tl.int64)
    pid_o = tl.program_id(1).to(tl.int64)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < C
    offs_o = pid_o * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mask_o = offs_o < D
    t = tl.cast(temperature, tl.float32)
    g = tl.load(SCAL).to(tl.float32)
    log_s = tl.load(SCAL + 1).to(tl.float32)
    acc = tl.zeros((BLOCK_I, BLOCK_DO), dtype=tl.float32)
    for j0 in range(0, C, BLOCK_J):
        offs_j = (j0 + tl.arange(0, BLOCK_J)).to(tl.int64)
        mask_j = offs_j < C
        dist, _ties = _dist_tile(X, offs_i, offs_j, mask_i, mask_j, D, stride_c, stride_d,
                                 2, BLOCK_I, BLOCK_J, BLOCK_D, EVEN_D, PRECISION)
        valid = mask_i[:, None] & mask_j[None, :] & (offs_i[:, None] != offs_j[None, :])
        coef = _pair_coef(dist, valid, g, log_s, t, KIND)
        xj = tl.load(X + offs_j[:, None] * stride_c + offs_o[None, :] * stride_d,
                     mask=mask_j[:, None] & mask_o[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(coef, xj, input_precision=PRECISION)
    tl.store(GRAD + offs_i[:, None] * stride_gc + offs_o[None, :] * stride_gd, -acc,
             mask=mask_i[:, None] & mask_o[None, :])


@even_d_heuristic()
@triton.jit
def _repulsion_bwd_diff_kernel(
    X, SCAL, GRAD, C, D, stride_c, stride_d, stride_gc, stride_gd, temperature,
    METRIC: tl.constexpr, KIND: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    # GRAD is fp32, zero-initialised, and only this program touches its rows.
    pid = tl.program_id(0).to(tl.int64)
    offs_i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < C
    t = tl.cast(temperature, tl.float32)
    g = tl.load(SCAL).to(tl.float32)
    log_s = tl.load(SCAL + 1).to(tl.float32)
    for j0 in range(0, C, BLOCK_J):
        offs_j = (j0 + tl.arange(0, BLOCK_J)).to(tl.int64)
        mask_j = offs_j < C
        # pass 1 over D: the distances (and linf arg-max tie counts) of this tile
        dist, ties = _dist_tile(X, offs_i, offs_j, mask_i, mask_j, D, stride_c, stride_d,
                                METRIC, BLOCK_I, BLOCK_J, BLOCK_D, EVEN_D, "ieee")
        valid = mask_i[:, None] & mask_j[None, :] & (offs_i[:, None] != offs_j[None, :])
        coef = _pair_coef(dist, valid, g, log_s, t, KIND)
        if METRIC == 1:
            # d ||x_i - x_j|| / d x_i = (x_i - x_j) / d_ij, taken as 0 at d_ij = 0 like torch
            coef = tl.where(dist > 0.0, coef / tl.where(dist > 0.0, dist, 1.0), 0.0)
        else:
            coef = coef / tl.maximum(ties, 1.0)
        # pass 2 over D: add this tile's contribution to rows i of the gradient
        for k0 in range(0, D, BLOCK_D):
            offs_k = (k0 + tl.arange(0, BLOCK_D)).to(tl.int64)
            mk = offs_k < D
            a = tl.load(X + offs_i[:, None] * stride_c + offs_k[None, :] * stride_d,
                        mask=mask_i[:, None] & mk[None, :], other=0.0).to(tl.float32)
            b = tl.load(X + offs_j[:, None] * stride_c + offs_k[None, :] * stride_d,
                        mask=mask_j[:, None] & mk[None, :], other=0.0).to(tl.float32)
            diff = a[:, None, :] - b[None, :, :]
            if METRIC == 1:
                contrib = tl.sum(coef[:, :, None] * diff, axis=1)
            else:
                hit = tl.abs(diff) == dist[:, :, None]
                contrib = tl.sum(tl.where(hit, coef[:, :, None] * sign(diff), 0.0), axis=1)
            gptr = GRAD + offs_i[:, None] * stride_gc + offs_k[None, :] * stride_gd
            gmask = mask_i[:, None] & mk[None, :]
            cur = tl.load(gptr, mask=gmask, other=0.0)
            tl.store(gptr, cur + contrib, mask=gmask)
            # the next read of these addresses may come from other threads of the program
            tl.debug_barrier()
