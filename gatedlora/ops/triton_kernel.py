"""The fused gated-LoRA Triton kernel (``base_mode="exact"``): gate, skip branch and both LoRA matmuls.

One launch adds ``scaling * g_m * (x_m A^T) B^T`` into ``out`` (which holds the base output) for the
open rows. Grid: ``(cdiv(M, BLOCK_M), n_split)``. Program ``(i, j)`` owns rows
``[i*BLOCK_M, (i+1)*BLOCK_M)`` and the N tiles ``j, j + n_split, j + 2*n_split, ...``:

* ``n_split == 1`` (large M): the rank-r product ``x A^T`` is computed once per row block and
  reused for every N tile.
* ``n_split > 1`` (small M, decode): the N tiles are spread over programs so one token still
  occupies many SMs; each program recomputes the rank-r product for its rows (``BLOCK_M x K x r``
  multiply-adds, cheap when M is small).

The launcher (``triton_backend.py``) picks ``n_split`` and the tile sizes. This file knows
nothing about modules or dispatch; the gate kinds are the contract's (``contract.GateKind``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .contract import GateKind

# Kernels may read module globals only as constexprs.
GATE_GIVEN = tl.constexpr(int(GateKind.GIVEN))  # per-row probabilities read from gate_ptr
GATE_TOKEN = tl.constexpr(int(GateKind.TOKEN))  # p = sigmoid(x . w_g + b_g), in the K loop that computes x A^T


@triton.jit
def gate_from_probability(p, threshold, hard):
    """(is_open, g) for probabilities p [BLOCK_M] fp32. Hard: p >= threshold (NaN compares false,
    so NaN closes); soft: g = p with NaN -> 0, open where g != 0."""
    if hard != 0:
        is_open = p >= threshold
        g = tl.where(is_open, 1.0, 0.0)
    else:
        g = tl.where(p != p, 0.0, p)
        is_open = g != 0.0
    return is_open, g


# M varies with every prompt length and R and hard are runtime switches: specialising them on ==1
# or %16 would only multiply compiled variants.
@triton.jit(do_not_specialize=["M", "R", "hard"])
def gated_lora_add_kernel(
    x_ptr, a_ptr, b_ptr, out_ptr, gate_ptr, gw_ptr, gb_ptr,
    M, N, K, R,
    stride_xm, stride_ar, stride_bn, stride_om, stride_g,
    scaling, threshold, hard,
    GATE_KIND: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[m, :] += scaling * g_m * (x[m] A^T) B^T for rows with g_m != 0; other rows untouched.

    x [M, K], a [R, K] (lora_A.weight), b [N, R] (lora_B.weight), out [M, N] holding the base
    output, all with unit stride along their last dim (rows may have any stride); gate [M]
    probabilities (GATE_GIVEN, any stride); gw [K] contiguous token-gate weight and gb its 0-dim
    bias (GATE_TOKEN), all fp32. Unit inner strides let every tile load as contiguous vectors
    (``contract.unit_inner_stride``). ``hard`` is a runtime int: both paths cost a scalar branch,
    and keeping it out of the constexprs halves the number of compiled variants (tools/aot_check.py).
    BLOCK_R >= R is a power of two >= 16 (tl.dot's minimum); the padded ranks load as zeros.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_split = tl.num_programs(1)
    lora_ty = a_ptr.dtype.element_ty
    out_ty = out_ptr.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = offs_m < M
    # int64 row offsets: M * K can pass 2^31 elements at prefill sizes (e.g. 80k rows x 28672).
    rows64 = offs_m.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_in = offs_r < R

    if GATE_KIND == GATE_GIVEN:
        # Given gates: decide before touching x or the LoRA weights, so a closed block costs one
        # load of BLOCK_M gate values; closed rows of a partly open block are not even read.
        p = tl.load(gate_ptr + rows64 * stride_g, mask=row_in, other=0.0).to(tl.float32)
        is_open, g = gate_from_probability(p, threshold, hard)
        is_open = is_open & row_in
        if tl.max(is_open.to(tl.int32), axis=0) == 0:
            return
        load_rows = is_open
    else:
        g = tl.full((BLOCK_M,), 1.0, tl.float32)
        is_open = row_in
        load_rows = row_in

    # One pass over x: the token-gate logit and the rank-r product share every x tile.
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_in = offs_k < K
        x = tl.load(
            x_ptr + rows64[:, None] * stride_xm + offs_k[None, :],
            mask=load_rows[:, None] & k_in[None, :], other=0.0,
        )
        if GATE_KIND == GATE_TOKEN:
            # Gate in fp32 on x in its own dtype, as gates.token_gate_probabilities does.
            w = tl.load(gw_ptr + offs_k, mask=k_in, other=0.0).to(tl.float32)
            logit += tl.sum(x.to(tl.float32) * w[None, :], axis=1)
        a = tl.load(
            a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None],
            mask=k_in[:, None] & r_in[None, :], other=0.0,
        )
        # PEFT casts x to the LoRA dtype before lora_A.
        xa = tl.dot(x.to(lora_ty), a, xa, input_precision=DOT_PRECISION)

    if GATE_KIND == GATE_TOKEN:
        p = tl.sigmoid(logit + tl.load(gb_ptr))
        is_open, g = gate_from_probability(p, threshold, hard)
        is_open = is_open & row_in
        # The token gate needs the whole K loop, so only the B side can be skipped here.
        if tl.max(is_open.to(tl.int32), axis=0) == 0:
            return

    coef = g * scaling
    # PEFT's lora_A output is a tensor in the LoRA dtype: round the rank-r product the same way
    # (also what tl.dot needs: both operands of one dtype).
    xa_l = xa.to(lora_ty)
    for n0 in range(pid_n * BLOCK_N, N, n_split * BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_in = offs_n < N
        b = tl.load(
            b_ptr + offs_r[:, None] + offs_n[None, :] * stride_bn,
            mask=r_in[:, None] & n_in[None, :], other=0.0,
        )
        delta = tl.dot(xa_l, b, input_precision=DOT_PRECISION)
        o_ptrs = out_ptr + rows64[:, None] * stride_om + offs_n[None, :]
        # Closed rows are neither read nor written: they stay bitwise equal to the base output.
        o_mask = is_open[:, None] & n_in[None, :]
        base = tl.load(o_ptrs, mask=o_mask, other=0.0)
        y = base.to(tl.float32) + delta * coef[:, None]
        tl.store(o_ptrs, y.to(out_ty), mask=o_mask)
