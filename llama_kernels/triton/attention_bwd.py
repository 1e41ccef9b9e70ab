"""Flash attention backward in Triton: dQ, dK and dV from the forward's out and lse.

Math, with the forward's S = softmax_scale Q K^T (+ mask) and P = exp(S - lse) recomputed
from lse (in base 2: P = exp2(softmax_scale_log2 Q K^T - lse * log2 e)):
    delta = rowsum(dO o O)          (= rowsum(P o dP), the softmax backward's row term)
    dV = P^T dO
    dP = dO V^T,   dS = P o (dP - delta)
    dQ = softmax_scale dS K,   dK = softmax_scale dS^T Q
with o the elementwise product; dK and dV of a kv head sum over the group_size query heads
that read it.
Rounding: the kernels form softmax_scale * dS in fp32 and round that product to the input
dtype for its matmul, as eager does (eager's rounded dS is the gradient of the scaled scores).
Rounding dS before scaling would overflow fp16 sooner: at the default scale D**-0.5, scaling
first moves fp16's overflow of dS 8x (d64) to 11x (d128) further out. P is rounded to dO's
dtype for dV = P^T dO.
Masking: hidden scores are set to -inf before exp2 (a hidden score may exceed lse and
overflow); query rows past Sq load lse = +inf, so their P is exactly 0.

Kernels, launched in this order (one grid axis each):
    _attn_bwd_preprocess_kernel  delta, one program per (query block, batch, query head)
    _attn_bwd_dkdv_kernel        dK, dV: one program per (key block, batch, kv head), looping
                                 over the group's query heads, then their query blocks
    _attn_bwd_dq_kernel          dQ: one program per (query block, batch, query head),
                                 looping over the key blocks it sees
Every output tile is summed by one program in a fixed order: no atomics, deterministic.
Each is a thin wrapper of a *_program function that its packed-sequence twin
(_attn_bwd_*_varlen_kernel, the layout in _attention_common.py) calls with VARLEN=True: there
a program reads its sequence's rows from cu_seqlens and exits when its block lies past them,
the batch strides are the sequence strides, lse and delta are (Hq, total_q), and a query that
saw no key (lse -inf) gets P = 0, so zero gradients.

Preconditions (the launchers, flash_attention.py and flash_attention_varlen.py, check or
arrange them): unit stride along head_dim for q, k, v, dout, out and the gradients; lse
(natural log) and delta fp32 contiguous, (B, Hq, Sq) dense; dense causal => Sq <= Sk;
BLOCK_D = next_pow2(HEAD_DIM) >= 16.
"""

from __future__ import annotations

import triton
import triton.language as tl

from llama_kernels.triton._attention_common import (_dot, _key_bounds, _load_2d, _load_lse2,
                                                    _packed_strides, _query_block, _sequence,
                                                    _varlen_seq)


@triton.jit
def _attn_bwd_preprocess_kernel(
    out_ptr, dout_ptr, delta_ptr,
    seqlen_q, n_heads_q,
    stride_out_batch, stride_out_seq, stride_out_head,
    stride_dout_batch, stride_dout_seq, stride_dout_head,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # delta (B, Hq, Sq) of dense out, dout (B, Sq, Hq, D).
    _attn_bwd_preprocess_program(
        out_ptr, dout_ptr, delta_ptr, None, seqlen_q, n_heads_q, seqlen_q,
        (stride_out_batch, stride_out_seq, stride_out_head),
        (stride_dout_batch, stride_dout_seq, stride_dout_head), HEAD_DIM, BLOCK_M, BLOCK_D, False)


@triton.jit
def _attn_bwd_preprocess_varlen_kernel(
    out_ptr, dout_ptr, delta_ptr, cu_seqlens_q_ptr, max_seqlen_q, total_q, n_heads_q,
    stride_out_row, stride_out_head, stride_dout_row, stride_dout_head,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # delta (Hq, total_q) of packed out, dout (total_q, Hq, D).
    out_strides = _packed_strides(stride_out_row, stride_out_head)
    dout_strides = _packed_strides(stride_dout_row, stride_dout_head)
    _attn_bwd_preprocess_program(out_ptr, dout_ptr, delta_ptr, cu_seqlens_q_ptr, max_seqlen_q,
                                 n_heads_q, total_q, out_strides, dout_strides, HEAD_DIM, BLOCK_M,
                                 BLOCK_D, True)


@triton.jit
def _attn_bwd_preprocess_program(
    out_ptr, dout_ptr, delta_ptr, cu_seqlens_q_ptr,
    seqlen_q, n_heads_q, stride_delta_head, out_strides, dout_strides,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr,
):
    # delta = rowsum(dO o O), fp32. Grid (cdiv(Sq, BLOCK_M) * B * Hq,), query block fastest.
    # *_strides: (batch, sequence, head); VARLEN as in the other programs (module docstring).
    n_blocks_m = tl.cdiv(seqlen_q, BLOCK_M)
    pid_m = tl.program_id(0) % n_blocks_m
    pid_bh = tl.program_id(0) // n_blocks_m
    b = pid_bh // n_heads_q
    h = pid_bh % n_heads_q
    start_m = pid_m * BLOCK_M
    row_q = b
    if VARLEN:
        row_q, seqlen_q = _varlen_seq(cu_seqlens_q_ptr, b)
        if start_m >= seqlen_q:
            return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q
    d_ok = offs_d < HEAD_DIM
    stride_out_batch, stride_out_seq, stride_out_head = out_strides
    stride_dout_batch, stride_dout_seq, stride_dout_head = dout_strides
    o_base = (out_ptr + row_q.to(tl.int64) * stride_out_batch
              + h.to(tl.int64) * stride_out_head + tl.cast(start_m, tl.int64) * stride_out_seq)
    do_base = (dout_ptr + row_q.to(tl.int64) * stride_dout_batch
               + h.to(tl.int64) * stride_dout_head + tl.cast(start_m, tl.int64) * stride_dout_seq)
    local = tl.arange(0, BLOCK_M)[:, None]
    o = _load_2d(o_base + local * stride_out_seq + offs_d[None, :], m_ok, d_ok, 0.0, True,
                 BLOCK_D != HEAD_DIM).to(tl.float32)
    do = _load_2d(do_base + local * stride_dout_seq + offs_d[None, :], m_ok, d_ok, 0.0, True,
                  BLOCK_D != HEAD_DIM).to(tl.float32)
    if VARLEN:
        delta_row = delta_ptr + h.to(tl.int64) * stride_delta_head + row_q
    else:
        delta_row = delta_ptr + pid_bh.to(tl.int64) * seqlen_q
    tl.store(delta_row + offs_m, tl.sum(o * do, 1), mask=m_ok)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_row, delta_row,
    offs_n, start, end, seqlen_q, diag, softmax_scale, softmax_scale_log2,
    stride_q_seq, stride_do_seq,
    MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr,
):
    # Query blocks [start, end) against one key block, transposed (rows = keys):
    #   P^T = exp2(softmax_scale_log2 * K Q^T - lse2), dV += P^T dO,
    #   dS^T = P^T o (V dO^T - delta), dK += (softmax_scale dS^T) Q.
    # MASK applies the causal mask (diagonal blocks).
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    local = tl.arange(0, BLOCK_M)
    q_offs = local[:, None] * stride_q_seq + offs_d[None, :]
    do_offs = local[:, None] * stride_do_seq + offs_d[None, :]
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + local
        m_ok = offs_m < seqlen_q
        q = _load_2d(q_base + tl.cast(start_m, tl.int64) * stride_q_seq + q_offs, m_ok, d_ok, 0.0,
                     True, BLOCK_D != HEAD_DIM)
        lse2 = _load_lse2(lse_row, offs_m, m_ok, VARLEN)
        qk_t = _dot(k, tl.trans(q), None, UPCAST_DOT, DOT_PRECISION) * softmax_scale_log2
        if MASK:  # masked before exp2: a hidden score may exceed lse and overflow
            qk_t = tl.where(offs_n[:, None] <= offs_m[None, :] + diag, qk_t, float("-inf"))
        p_t = tl.exp2(qk_t - lse2[None, :])
        do = _load_2d(do_base + tl.cast(start_m, tl.int64) * stride_do_seq + do_offs, m_ok,
                      d_ok, 0.0, True, BLOCK_D != HEAD_DIM)
        dv = _dot(p_t.to(do.dtype), do, dv, UPCAST_DOT, DOT_PRECISION)
        delta = tl.load(delta_row + offs_m, mask=m_ok, other=0.0)
        dp_t = _dot(v, tl.trans(do), None, UPCAST_DOT, DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :]) * softmax_scale
        dk = _dot(ds_t.to(q.dtype), q, dk, UPCAST_DOT, DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    seqlen_q, seqlen_k, n_heads_q, n_heads_kv, group_size, softmax_scale, softmax_scale_log2,
    stride_q_batch, stride_q_seq, stride_q_head,
    stride_k_batch, stride_k_seq, stride_k_head,
    stride_v_batch, stride_v_seq, stride_v_head,
    stride_dout_batch, stride_dout_seq, stride_dout_head,
    stride_dk_batch, stride_dk_seq, stride_dk_head,
    stride_dv_batch, stride_dv_seq, stride_dv_head,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Dense: q, dout (B, Sq, Hq, D), k, v, dk, dv (B, Sk, Hkv, D), lse, delta (B, Hq, Sq).
    _attn_bwd_dkdv_program(
        q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, None, None, seqlen_q,
        seqlen_k, n_heads_q, n_heads_kv, group_size, softmax_scale, softmax_scale_log2, seqlen_q,
        (stride_q_batch, stride_q_seq, stride_q_head),
        (stride_k_batch, stride_k_seq, stride_k_head),
        (stride_v_batch, stride_v_seq, stride_v_head),
        (stride_dout_batch, stride_dout_seq, stride_dout_head),
        (stride_dk_batch, stride_dk_seq, stride_dk_head),
        (stride_dv_batch, stride_dv_seq, stride_dv_head), CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N,
        BLOCK_D, UPCAST_DOT, DOT_PRECISION, False)


@triton.jit
def _attn_bwd_dkdv_varlen_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_seqlens_q_ptr,
    cu_seqlens_k_ptr, max_seqlen_k, total_q, n_heads_q, n_heads_kv, group_size, softmax_scale,
    softmax_scale_log2, stride_q_row, stride_q_head, stride_k_row, stride_k_head, stride_v_row,
    stride_v_head, stride_dout_row, stride_dout_head, stride_dk_row, stride_dk_head,
    stride_dv_row, stride_dv_head,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Packed: q, dout (total_q, Hq, D), k, v, dk, dv (total_k, Hkv, D), lse, delta (Hq,
    # total_q); grid (cdiv(max_seqlen_k, BLOCK_N) * B * Hkv,).
    _attn_bwd_dkdv_program(
        q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_seqlens_q_ptr,
        cu_seqlens_k_ptr, 0, max_seqlen_k, n_heads_q, n_heads_kv, group_size, softmax_scale,
        softmax_scale_log2, total_q, _packed_strides(stride_q_row, stride_q_head),
        _packed_strides(stride_k_row, stride_k_head), _packed_strides(stride_v_row, stride_v_head),
        _packed_strides(stride_dout_row, stride_dout_head),
        _packed_strides(stride_dk_row, stride_dk_head),
        _packed_strides(stride_dv_row, stride_dv_head), CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D,
        UPCAST_DOT, DOT_PRECISION, True)


@triton.jit
def _attn_bwd_dkdv_program(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    cu_seqlens_q_ptr, cu_seqlens_k_ptr, seqlen_q, seqlen_k, n_heads_q, n_heads_kv, group_size,
    softmax_scale, softmax_scale_log2, stride_lse_head,
    q_strides, k_strides, v_strides, dout_strides, dk_strides, dv_strides,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    VARLEN: tl.constexpr,
):
    # One program per (key block, b, kv head) keeps its K, V tiles and fp32 dK, dV accumulators
    # on chip and loops over the group's query heads, then their query blocks: every
    # contribution lands in one program, so no atomics and a fixed summation order.
    # Causal: query blocks wholly above the diagonal (i < j - (Sk - Sq) for every pair) are
    # skipped by the loop bound, the diagonal-straddling ones are masked, the rest are not.
    # Grid (cdiv(Sk, BLOCK_N) * B * Hkv,), key block fastest (VARLEN: Sk is max_seqlen_k).
    n_blocks_n = tl.cdiv(seqlen_k, BLOCK_N)
    pid_n = tl.program_id(0) % n_blocks_n
    pid_bkv = tl.program_id(0) // n_blocks_n
    b = pid_bkv // n_heads_kv
    kv_h = pid_bkv % n_heads_kv
    start_n = pid_n * BLOCK_N
    row_q, seqlen_q, row_k, seqlen_k = _sequence(cu_seqlens_q_ptr, cu_seqlens_k_ptr, b, seqlen_q,
                                                 seqlen_k, VARLEN)
    if VARLEN:  # a block past the sequence's keys
        if start_n >= seqlen_k:
            return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < seqlen_k
    d_ok = offs_d < HEAD_DIM
    local_n = tl.arange(0, BLOCK_N)[:, None]
    stride_k_batch, stride_k_seq, stride_k_head = k_strides
    stride_v_batch, stride_v_seq, stride_v_head = v_strides
    k_base = (k_ptr + row_k.to(tl.int64) * stride_k_batch + kv_h.to(tl.int64) * stride_k_head
              + tl.cast(start_n, tl.int64) * stride_k_seq)
    v_base = (v_ptr + row_k.to(tl.int64) * stride_v_batch + kv_h.to(tl.int64) * stride_v_head
              + tl.cast(start_n, tl.int64) * stride_v_seq)
    k = _load_2d(k_base + local_n * stride_k_seq + offs_d[None, :], n_ok, d_ok, 0.0, True,
                 BLOCK_D != HEAD_DIM)
    v = _load_2d(v_base + local_n * stride_v_seq + offs_d[None, :], n_ok, d_ok, 0.0, True,
                 BLOCK_D != HEAD_DIM)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)

    diag = seqlen_k - seqlen_q
    if CAUSAL:
        # first query that sees key start_n, and first query block that sees the whole block
        lo = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M
        full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M
        full = tl.minimum(full, tl.cdiv(seqlen_q, BLOCK_M) * BLOCK_M)
    else:
        lo = 0
        full = 0
    stride_q_batch, stride_q_seq, stride_q_head = q_strides
    stride_dout_batch, stride_dout_seq, stride_dout_head = dout_strides
    for g in range(0, group_size):
        h = kv_h * group_size + g
        bh = b * n_heads_q + h
        q_base = q_ptr + row_q.to(tl.int64) * stride_q_batch + h.to(tl.int64) * stride_q_head
        do_base = (dout_ptr + row_q.to(tl.int64) * stride_dout_batch
                   + h.to(tl.int64) * stride_dout_head)
        if VARLEN:
            lse_row = lse_ptr + h.to(tl.int64) * stride_lse_head + row_q
            delta_row = delta_ptr + h.to(tl.int64) * stride_lse_head + row_q
        else:
            lse_row = lse_ptr + bh.to(tl.int64) * seqlen_q
            delta_row = delta_ptr + bh.to(tl.int64) * seqlen_q
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_row, delta_row, offs_n, lo, full, seqlen_q,
            diag, softmax_scale, softmax_scale_log2, stride_q_seq, stride_dout_seq, True,
            HEAD_DIM, BLOCK_M, BLOCK_D, UPCAST_DOT, DOT_PRECISION, VARLEN)
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_row, delta_row, offs_n, full, seqlen_q,
            seqlen_q, diag, softmax_scale, softmax_scale_log2, stride_q_seq, stride_dout_seq,
            False, HEAD_DIM, BLOCK_M, BLOCK_D, UPCAST_DOT, DOT_PRECISION, VARLEN)

    stride_dk_batch, stride_dk_seq, stride_dk_head = dk_strides
    stride_dv_batch, stride_dv_seq, stride_dv_head = dv_strides
    dk_base = (dk_ptr + row_k.to(tl.int64) * stride_dk_batch + kv_h.to(tl.int64) * stride_dk_head
               + tl.cast(start_n, tl.int64) * stride_dk_seq)
    dv_base = (dv_ptr + row_k.to(tl.int64) * stride_dv_batch + kv_h.to(tl.int64) * stride_dv_head
               + tl.cast(start_n, tl.int64) * stride_dv_seq)
    mask = n_ok[:, None] & d_ok[None, :]
    tl.store(dk_base + local_n * stride_dk_seq + offs_d[None, :],
             dk.to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_base + local_n * stride_dv_seq + offs_d[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse2, delta, k_base, v_base,
    offs_m, start, end, seqlen_k, diag, softmax_scale, softmax_scale_log2,
    stride_k_seq, stride_v_seq,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Key blocks [start, end) against one query block: P = exp2(softmax_scale_log2 Q K^T -
    # lse2), dP = dO V^T, dS = P o (dP - delta), dQ += (softmax_scale dS) K.
    # MASK: ragged-end / diagonal blocks.
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kt_offs = offs_n[None, :] * stride_k_seq + offs_d[:, None]
    vt_offs = offs_n[None, :] * stride_v_seq + offs_d[:, None]
    for start_n in range(start, end, BLOCK_N):
        n_ok = start_n + offs_n < seqlen_k
        kt = _load_2d(k_base + tl.cast(start_n, tl.int64) * stride_k_seq + kt_offs, d_ok, n_ok, 0.0,
                      BLOCK_D != HEAD_DIM, MASK)
        vt = _load_2d(v_base + tl.cast(start_n, tl.int64) * stride_v_seq + vt_offs, d_ok, n_ok, 0.0,
                      BLOCK_D != HEAD_DIM, MASK)
        qk = _dot(q, kt, None, UPCAST_DOT, DOT_PRECISION) * softmax_scale_log2
        if MASK:  # masked before exp2: a hidden score may exceed lse and overflow
            keep = n_ok[None, :]
            if CAUSAL:
                keep = keep & ((start_n + offs_n)[None, :] <= offs_m[:, None] + diag)
            qk = tl.where(keep, qk, float("-inf"))
        p = tl.exp2(qk - lse2[:, None])
        dp = _dot(do, vt, None, UPCAST_DOT, DOT_PRECISION)
        ds = p * (dp - delta[:, None]) * softmax_scale
        dq = _dot(ds.to(kt.dtype), tl.trans(kt), dq, UPCAST_DOT, DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr,
    seqlen_q, seqlen_k, n_heads_q, group_size, softmax_scale, softmax_scale_log2,
    stride_q_batch, stride_q_seq, stride_q_head,
    stride_k_batch, stride_k_seq, stride_k_head,
    stride_v_batch, stride_v_seq, stride_v_head,
    stride_dout_batch, stride_dout_seq, stride_dout_head,
    stride_dq_batch, stride_dq_seq, stride_dq_head,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Dense: q, dout, dq (B, Sq, Hq, D), k, v (B, Sk, Hkv, D), lse, delta (B, Hq, Sq).
    _attn_bwd_dq_program(
        q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, None, None, seqlen_q, seqlen_k,
        n_heads_q, group_size, softmax_scale, softmax_scale_log2, seqlen_q,
        (stride_q_batch, stride_q_seq, stride_q_head),
        (stride_k_batch, stride_k_seq, stride_k_head),
        (stride_v_batch, stride_v_seq, stride_v_head),
        (stride_dout_batch, stride_dout_seq, stride_dout_head),
        (stride_dq_batch, stride_dq_seq, stride_dq_head), CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N,
        BLOCK_D, UPCAST_DOT, DOT_PRECISION, False)


@triton.jit
def _attn_bwd_dq_varlen_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, cu_seqlens_q_ptr,
    cu_seqlens_k_ptr, max_seqlen_q, total_q, n_heads_q, group_size, softmax_scale,
    softmax_scale_log2, stride_q_row, stride_q_head, stride_k_row, stride_k_head, stride_v_row,
    stride_v_head, stride_dout_row, stride_dout_head, stride_dq_row, stride_dq_head,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Packed: q, dout, dq (total_q, Hq, D), k, v (total_k, Hkv, D), lse, delta (Hq, total_q);
    # grid (cdiv(max_seqlen_q, BLOCK_M) * B * Hq,).
    _attn_bwd_dq_program(
        q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, cu_seqlens_q_ptr,
        cu_seqlens_k_ptr, max_seqlen_q, 0, n_heads_q, group_size, softmax_scale, softmax_scale_log2,
        total_q, _packed_strides(stride_q_row, stride_q_head),
        _packed_strides(stride_k_row, stride_k_head), _packed_strides(stride_v_row, stride_v_head),
        _packed_strides(stride_dout_row, stride_dout_head),
        _packed_strides(stride_dq_row, stride_dq_head), CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D,
        UPCAST_DOT, DOT_PRECISION, True)


@triton.jit
def _attn_bwd_dq_program(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, cu_seqlens_q_ptr,
    cu_seqlens_k_ptr, seqlen_q, seqlen_k, n_heads_q, group_size, softmax_scale,
    softmax_scale_log2, stride_lse_head,
    q_strides, k_strides, v_strides, dout_strides, dq_strides,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    VARLEN: tl.constexpr,
):
    # One program per (query block, b, query head) holds Q, dO and an fp32 dQ on chip and walks
    # the key blocks it can see (the forward's loop bounds, _key_bounds).
    # Grid (cdiv(Sq, BLOCK_M) * B * Hq,), query blocks last-first as in the forward (VARLEN:
    # Sq is max_seqlen_q).
    start_m, pid_bh, b, h, kv_h = _query_block(seqlen_q, n_heads_q, group_size, BLOCK_M)
    row_q, seqlen_q, row_k, seqlen_k = _sequence(cu_seqlens_q_ptr, cu_seqlens_k_ptr, b, seqlen_q,
                                                 seqlen_k, VARLEN)
    if VARLEN:  # a block past the sequence's queries
        if start_m >= seqlen_q:
            return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q
    d_ok = offs_d < HEAD_DIM
    local_m = tl.arange(0, BLOCK_M)[:, None]
    stride_q_batch, stride_q_seq, stride_q_head = q_strides
    stride_dout_batch, stride_dout_seq, stride_dout_head = dout_strides
    q_base = (q_ptr + row_q.to(tl.int64) * stride_q_batch + h.to(tl.int64) * stride_q_head
              + tl.cast(start_m, tl.int64) * stride_q_seq)
    do_base = (dout_ptr + row_q.to(tl.int64) * stride_dout_batch
               + h.to(tl.int64) * stride_dout_head + tl.cast(start_m, tl.int64) * stride_dout_seq)
    q = _load_2d(q_base + local_m * stride_q_seq + offs_d[None, :], m_ok, d_ok, 0.0, True,
                 BLOCK_D != HEAD_DIM)
    do = _load_2d(do_base + local_m * stride_dout_seq + offs_d[None, :], m_ok, d_ok, 0.0, True,
                  BLOCK_D != HEAD_DIM)
    if VARLEN:
        row = h.to(tl.int64) * stride_lse_head + row_q + offs_m
    else:
        row = pid_bh.to(tl.int64) * seqlen_q + offs_m
    lse2 = _load_lse2(lse_ptr, row, m_ok, VARLEN)  # rows past Sq: +inf, P exactly 0
    delta = tl.load(delta_ptr + row, mask=m_ok, other=0.0)
    stride_k_batch, stride_k_seq, stride_k_head = k_strides
    stride_v_batch, stride_v_seq, stride_v_head = v_strides
    k_base = k_ptr + row_k.to(tl.int64) * stride_k_batch + kv_h.to(tl.int64) * stride_k_head
    v_base = v_ptr + row_k.to(tl.int64) * stride_v_batch + kv_h.to(tl.int64) * stride_v_head

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    diag = seqlen_k - seqlen_q
    full_end, hi = _key_bounds(start_m, seqlen_q, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)
    if VARLEN:  # more queries than keys: no key block is whole, none starts before key 0
        full_end = tl.maximum(full_end, 0)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, offs_m, 0, full_end, seqlen_k, diag, softmax_scale,
        softmax_scale_log2, stride_k_seq, stride_v_seq, False, CAUSAL, HEAD_DIM, BLOCK_N, BLOCK_D,
        UPCAST_DOT, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, offs_m, full_end, hi, seqlen_k, diag, softmax_scale,
        softmax_scale_log2, stride_k_seq, stride_v_seq, True, CAUSAL, HEAD_DIM, BLOCK_N, BLOCK_D,
        UPCAST_DOT, DOT_PRECISION)

    stride_dq_batch, stride_dq_seq, stride_dq_head = dq_strides
    dq_base = (dq_ptr + row_q.to(tl.int64) * stride_dq_batch + h.to(tl.int64) * stride_dq_head
               + tl.cast(start_m, tl.int64) * stride_dq_seq)
    tl.store(dq_base + local_m * stride_dq_seq + offs_d[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
