"""The two-pass Triton kernels: ``shrink_kernel`` (x A^T, split over K) then ``expand_kernel`` (add into open rows).

The one-pass kernel (``triton_kernel.gated_lora_add_kernel``) runs one program per row block (times
``n_split`` at small M), and every program walks all of K and then all of its N tiles. At M=4096 that is 64
programs on 132 SMs (12.5% achieved occupancy, 18% of DRAM bandwidth on an H100; a shrink by cuBLAS followed by
a 2-D expand kernel took 43.5 us where the one-pass kernel took 121 us: benchmarks/results/gpu-notes.md).
The two passes split the same work the way vLLM's LoRA shrink/expand kernels do:

* ``shrink_kernel``, grid ``(cdiv(M, BLOCK_M), split_k)``: program ``(i, s)`` computes the partial rank-r
  products of row block ``i`` over its share ``s`` of K (and the partial token-gate logit), into an fp32
  scratch ``[split_k, M, BLOCK_R]``. Given gates are decided first: a closed row block returns at once,
  closed rows are not read.
* ``expand_kernel``, grid ``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))``: sums the partials in a fixed order
  (so results do not depend on scheduling), decides the gate (token gates from the summed logit), rounds
  the rank-r products to the LoRA dtype as PEFT does, and adds ``scaling * g * (x A^T) B^T`` into ``out``
  for open rows only. Closed rows are neither read nor written.

Everything is decided on the device: no host sync, so a call can be captured in a CUDA graph. The launcher
(``triton_backend.py``) picks the tiles and ``split_k``; this file knows nothing about modules or dispatch.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernel import GATE_GIVEN, GATE_TOKEN, gate_from_probability


# As in triton_kernel: M, R, the split and hard vary at run time; specialising them would multiply variants.
@triton.jit(do_not_specialize=["M", "R", "k_per_split", "hard"])
def shrink_kernel(
    x_ptr, a_ptr, gate_ptr, gw_ptr, xa_ptr, logit_ptr,
    M, K, R, k_per_split,
    stride_xm, stride_ar, stride_g,
    threshold, hard,
    GATE_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """xa[s, m, :] = x[m, ks] A[:, ks]^T and logit[s, m] = x[m, ks] . w_g[ks] over the split's K range ks.

    x [M, K], a [R, K] with unit inner strides; gate [M] (GATE_GIVEN); gw [K] fp32 (GATE_TOKEN);
    xa [split_k, M, BLOCK_R] and logit [split_k, M] fp32 scratch. k_per_split is a multiple of BLOCK_K.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    lora_ty = a_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = offs_m < M
    rows64 = offs_m.to(tl.int64)  # M * K can pass 2^31 elements at prefill sizes
    offs_r = tl.arange(0, BLOCK_R)
    r_in = offs_r < R
    load_rows = row_in
    if GATE_KIND == GATE_GIVEN:
        p = tl.load(gate_ptr + rows64 * stride_g, mask=row_in, other=0.0).to(tl.float32)
        is_open, g = gate_from_probability(p, threshold, hard)
        load_rows = is_open & row_in
        if tl.max(load_rows.to(tl.int32), axis=0) == 0:
            return
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    k_start = pid_s * k_per_split
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_in = offs_k < K
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + offs_k[None, :],
                    mask=load_rows[:, None] & k_in[None, :], other=0.0)
        if GATE_KIND == GATE_TOKEN:
            w = tl.load(gw_ptr + offs_k, mask=k_in, other=0.0)
            logit += tl.sum(x.to(tl.float32) * w[None, :], axis=1)
        a = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None], mask=k_in[:, None] & r_in[None, :],
                    other=0.0)
        xa = tl.dot(x.to(lora_ty), a, xa, input_precision=DOT_PRECISION)  # PEFT casts x to the LoRA dtype
    slot = pid_s.to(tl.int64) * M + rows64
    tl.store(xa_ptr + slot[:, None] * BLOCK_R + offs_r[None, :], xa, mask=load_rows[:, None])
    if GATE_KIND == GATE_TOKEN:
        tl.store(logit_ptr + slot, logit, mask=load_rows)


@triton.jit(do_not_specialize=["M", "R", "split_k", "hard"])
def expand_kernel(
    xa_ptr, logit_ptr, gate_ptr, gb_ptr, b_ptr, out_ptr,
    M, N, R, split_k,
    stride_g, stride_bn, stride_om,
    scaling, threshold, hard,
    GATE_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[m, ns] += scaling * g_m * round_l(sum_s xa[s, m, :]) B[ns, :]^T for open rows m; others untouched.

    b [N, R] with unit inner stride, out [M, N] with unit inner stride holding the base output; gate [M]
    (GATE_GIVEN); gb a 0-dim fp32 bias (GATE_TOKEN); xa, logit the shrink's scratch.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    lora_ty = b_ptr.dtype.element_ty
    out_ty = out_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = offs_m < M
    rows64 = offs_m.to(tl.int64)
    if GATE_KIND == GATE_GIVEN:
        p = tl.load(gate_ptr + rows64 * stride_g, mask=row_in, other=0.0).to(tl.float32)
        is_open, g = gate_from_probability(p, threshold, hard)
    elif GATE_KIND == GATE_TOKEN:
        logit = tl.load(gb_ptr).to(tl.float32) + tl.zeros((BLOCK_M,), dtype=tl.float32)
        for s in range(0, split_k):
            logit += tl.load(logit_ptr + s * M + rows64, mask=row_in, other=0.0)
        is_open, g = gate_from_probability(tl.sigmoid(logit), threshold, hard)
    else:
        is_open = row_in
        g = tl.full((BLOCK_M,), 1.0, tl.float32)
    is_open = is_open & row_in
    if tl.max(is_open.to(tl.int32), axis=0) == 0:
        return
    offs_r = tl.arange(0, BLOCK_R)
    r_in = offs_r < R
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for s in range(0, split_k):  # a fixed order: the same bits whatever the schedule
        xa += tl.load(xa_ptr + (s * M + rows64)[:, None] * BLOCK_R + offs_r[None, :], mask=is_open[:, None],
                      other=0.0)
    # PEFT's lora_A output is a tensor in the LoRA dtype: round the rank-r products the same way.
    xa_l = xa.to(lora_ty)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = offs_n < N
    b = tl.load(b_ptr + offs_r[:, None] + offs_n[None, :] * stride_bn, mask=r_in[:, None] & n_in[None, :],
                other=0.0)
    delta = tl.dot(xa_l, b, input_precision=DOT_PRECISION)
    o_ptrs = out_ptr + rows64[:, None] * stride_om + offs_n[None, :]
    o_mask = is_open[:, None] & n_in[None, :]
    base = tl.load(o_ptrs, mask=o_mask, other=0.0)
    tl.store(o_ptrs, (base.to(tl.float32) + delta * (g * scaling)[:, None]).to(out_ty), mask=o_mask)
