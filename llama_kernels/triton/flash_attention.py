"""Flash attention in Triton: causal or full, forward and backward, grouped-query heads, and a
split-KV (flash-decoding) forward for few queries against a long KV cache.

Launchers (called by llama_kernels.ops.flash_attention):
    flash_attention_fwd(q, k, v, causal, softmax_scale) -> (out, lse)
    flash_attention_bwd(dout, q, k, v, out, lse, causal, softmax_scale) -> (dq, dk, dv)
q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D) with any strides over batch, sequence and head (a
tensor whose last dimension is not unit-stride is copied first); Hq % Hkv == 0 and query head h
reads kv head h // (Hq // Hkv); with causal=True, Sq <= Sk and the mask is aligned bottom-right
(query i sees keys j <= i + Sk - Sq). out is contiguous in q's dtype, lse fp32 (B, Hq, Sq) is
the natural-log log-sum-exp of the scaled scores over the visible keys; dq, dk, dv are
contiguous with the shapes and dtypes of q, k, v (dk, dv summed over each query-head group).

Kernels, and which launcher runs them:
    _attn_fwd_kernel              prefill forward, FlashAttention-2 (grid: query blocks * B*Hq)
    _attn_fwd_splitkv_kernel      decode forward, Sq <= DECODE_MAX_SEQLEN_Q: the keys are split
    _attn_splitkv_combine_kernel  across programs, each writes an fp32 partial (O, lse) and the
                                  combine kernel merges them (grid: row blocks * B*Hkv x splits)
    _attn_bwd_preprocess_kernel   delta = rowsum(dO * O)
    _attn_bwd_dkdv_kernel         dK, dV: one program per key block and kv head, looping over
                                  the group's query heads and their query blocks (no atomics)
    _attn_bwd_dq_kernel           dQ: one program per query block and query head, looping over
                                  key blocks (no atomics: the backward is deterministic)
Block sizes, warps and stages come from ``attention_config`` alone (launchers and AOT_CASES).
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from llama_kernels.triton import _aot

# log2(e): exp(x) = exp2(x * LOG2E). The kernels spell it (1.4426950408889634) and ln(2)
# (0.6931471805599453, log(x) = log2(x) * ln 2) as literals: Triton only lets a @jit function
# read module globals that are tl.constexpr, and literals work the same on Triton 3.6 and 3.8.
LOG2E = 1.4426950408889634

# Read once: Triton itself reads TRITON_INTERPRET when it is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

MAX_HEAD_DIM = 256
# Up to this many queries the forward takes the split-KV decode path: a 128-row prefill tile
# would be 1/128 .. 1/8 full and its grid (one program per head) far too small to fill a GPU
# while it streams the whole KV cache.
DECODE_MAX_SEQLEN_Q = 16
# Upper bound on the number of key splits: past 64, each split's fixed cost (Q load, fp32
# partial O write, combine read) outweighs the few key blocks it streams.
MAX_SPLITS = 64
# Splits the combine kernel reduces per loop step (a (SPLIT_CHUNK, BLOCK_D) fp32 tile).
SPLIT_CHUNK = 16


# ------------------------------------------------------------------------------ helpers


@triton.jit
def _load_2d(ptrs, rows_ok, cols_ok, other, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a 2-D tile, masking only the axes that can be out of bounds (constexpr choice, so an
    interior tile at a power-of-two head_dim issues unpredicated vector loads)."""
    if CHECK_ROWS:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=other)
        else:
            x = tl.load(ptrs, mask=rows_ok[:, None], other=other)
    else:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=cols_ok[None, :], other=other)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """tl.dot with two interpreter/precision switches.

    UPCAST (only ever True under TRITON_INTERPRET=1, for bf16 inputs): Triton 3.8's interpreter
    multiplies the raw uint16 bits of bf16 operands, so they are widened to fp32 first (exact:
    every bf16 is an fp32). PRECISION is "ieee" for fp32 inputs (the default, tf32, keeps 10
    mantissa bits on a GPU) and ignored by Triton for fp16/bf16 inputs.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


# ------------------------------------------------------------------------------ forward


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q, k_base, v_base,
    offs_m, start, end, seqlen_k, diag, qk_scale,
    stride_k_seq, stride_v_seq,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One pass of the online softmax over key blocks [start, end). MASK=False: every key of
    # every block is inside Sk and visible to every row of the tile (no per-element mask);
    # MASK=True: ragged-end and diagonal-straddling blocks.
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kt_offs = offs_n[None, :] * stride_k_seq + offs_d[:, None]  # K^T tile (BLOCK_D, BLOCK_N)
    v_offs = offs_n[:, None] * stride_v_seq + offs_d[None, :]  # V tile (BLOCK_N, BLOCK_D)
    for start_n in range(start, end, BLOCK_N):
        n_ok = start_n + offs_n < seqlen_k
        kt = _load_2d(k_base + tl.cast(start_n, tl.int64) * stride_k_seq + kt_offs, d_ok, n_ok, 0.0,
                      BLOCK_D != HEAD_DIM, MASK)
        qk = _dot(q, kt, None, UPCAST_DOT, DOT_PRECISION)
        if MASK:
            keep = n_ok[None, :]
            if CAUSAL:
                keep = keep & ((start_n + offs_n)[None, :] <= offs_m[:, None] + diag)
            qk = tl.where(keep, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # a row that has seen no key yet keeps m = -inf: subtract 0 instead (-inf - -inf
            # would be NaN); its p is exp2(-inf) = 0 and its alpha exp2(-inf) = 0.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            qk = qk * qk_scale
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_sub = m_new
        p = tl.exp2(qk - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_2d(v_base + tl.cast(start_n, tl.int64) * stride_v_seq + v_offs, n_ok, d_ok, 0.0,
                     MASK, BLOCK_D != HEAD_DIM)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST_DOT, DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _query_block(seqlen_q, n_heads_q, group_size, BLOCK_M: tl.constexpr):
    """This program's (query block start, b * Hq + h, b, h, kv head) on the one-axis grid
    (cdiv(Sq, BLOCK_M) * B * Hq,): query block fastest and launched last-first, so the causal
    blocks with the most keys start first and shorten the tail."""
    n_blocks_m = tl.cdiv(seqlen_q, BLOCK_M)
    pid_m = n_blocks_m - 1 - tl.program_id(0) % n_blocks_m
    pid_bh = tl.program_id(0) // n_blocks_m
    h = pid_bh % n_heads_q
    return pid_m * BLOCK_M, pid_bh, pid_bh // n_heads_q, h, h // group_size


@triton.jit
def _key_bounds(start_m, seqlen_q, seqlen_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """(full_end, hi): key blocks [0, full_end) are visible to every row of the query block
    starting at start_m and need no mask; [full_end, hi) straddle the causal diagonal or the
    ragged end of Sk; keys past hi are never loaded (bottom-right mask, diag = Sk - Sq)."""
    diag = seqlen_k - seqlen_q
    if CAUSAL:
        # rows of this tile see keys < start_m + BLOCK_M + diag at most; a key block is fully
        # visible to all of them when it ends at or before start_m + diag + 1
        hi = tl.minimum(seqlen_k, start_m + BLOCK_M + diag)
        full_end = tl.minimum(start_m + diag + 1, seqlen_k) // BLOCK_N * BLOCK_N
    else:
        hi = seqlen_k
        full_end = seqlen_k // BLOCK_N * BLOCK_N
    return full_end, hi


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    seqlen_q, seqlen_k, n_heads_q, group_size, qk_scale,
    stride_q_batch, stride_q_seq, stride_q_head,
    stride_k_batch, stride_k_seq, stride_k_head,
    stride_v_batch, stride_v_seq, stride_v_head,
    stride_out_batch, stride_out_seq, stride_out_head,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Forward (FlashAttention-2), per query row i of head h (kv head h // group_size):
    #   s_j = scale * q_i . k_j over visible keys j (causal: j <= i + Sk - Sq),
    #   out_i = sum_j softmax(s)_j v_j,   lse_i = log(sum_j exp(s_j))   (natural log, fp32).
    # Computed in base 2 with the scale folded, qk_scale = scale * log2(e): a running max m and
    # sum l per row, acc rescaled by exp2(m_old - m_new) at each key block; lse = (m + log2 l)
    # * ln 2. Backward: _attn_bwd_dkdv_kernel / _attn_bwd_dq_kernel.
    # Grid (cdiv(Sq, BLOCK_M) * B * Hq,), query block fastest: one axis, because grid axes 1
    # and 2 stop at 65535, which B * Hq passes in large batches (2048 x 32 heads). Query
    # blocks launched last-first (the causal ones with the most keys start first, shortening
    # the tail), in the order of the former (query block, B * Hq) grid. Causal key blocks
    # above the diagonal are never loaded (loop bound); only the diagonal-straddling and
    # ragged-end blocks are masked.
    # Preconditions: unit stride along head_dim for q, k, v, out; lse contiguous (B, Hq, Sq);
    # causal => Sq <= Sk; BLOCK_D = next_pow2(HEAD_DIM) >= 16; Sk >= 1.
    start_m, pid_bh, b, h, kv_h = _query_block(seqlen_q, n_heads_q, group_size, BLOCK_M)
    q_base = (q_ptr + b.to(tl.int64) * stride_q_batch + h.to(tl.int64) * stride_q_head
              + tl.cast(start_m, tl.int64) * stride_q_seq)
    k_base = k_ptr + b.to(tl.int64) * stride_k_batch + kv_h.to(tl.int64) * stride_k_head
    v_base = v_ptr + b.to(tl.int64) * stride_v_batch + kv_h.to(tl.int64) * stride_v_head

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q
    d_ok = offs_d < HEAD_DIM
    tile = tl.arange(0, BLOCK_M)[:, None] * stride_q_seq + offs_d[None, :]
    q = _load_2d(q_base + tile, m_ok, d_ok, 0.0, True, BLOCK_D != HEAD_DIM)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    diag = seqlen_k - seqlen_q
    full_end, hi = _key_bounds(start_m, seqlen_q, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, offs_m, 0, full_end, seqlen_k, diag, qk_scale,
        stride_k_seq, stride_v_seq, False, CAUSAL, HEAD_DIM, BLOCK_N, BLOCK_D, UPCAST_DOT,
        DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, offs_m, full_end, hi, seqlen_k, diag, qk_scale,
        stride_k_seq, stride_v_seq, True, CAUSAL, HEAD_DIM, BLOCK_N, BLOCK_D, UPCAST_DOT,
        DOT_PRECISION)

    # l == 0 only for a row that saw no key (impossible for a real row under the
    # preconditions): out 0, lse -inf, never NaN.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    out_base = (out_ptr + b.to(tl.int64) * stride_out_batch + h.to(tl.int64) * stride_out_head
                + tl.cast(start_m, tl.int64) * stride_out_seq)
    out_tile = tl.arange(0, BLOCK_M)[:, None] * stride_out_seq + offs_d[None, :]
    tl.store(out_base + out_tile, out.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + pid_bh.to(tl.int64) * seqlen_q + offs_m, lse, mask=m_ok)


# ------------------------------------------------------------------------------ decode


@triton.jit
def _attn_fwd_splitkv_kernel(
    q_ptr, k_ptr, v_ptr, o_part_ptr, lse_part_ptr,
    seqlen_q, seqlen_k, n_heads_q, n_heads_kv, group_size, keys_per_split, qk_scale,
    stride_q_batch, stride_q_seq, stride_q_head,
    stride_k_batch, stride_k_seq, stride_k_head,
    stride_v_batch, stride_v_seq, stride_v_head,
    stride_op_head, stride_op_split, stride_op_seq,
    stride_lp_head, stride_lp_split,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Split-KV forward (flash-decoding), same math as _attn_fwd_kernel restricted to the keys
    # [split * keys_per_split, (split + 1) * keys_per_split) ∩ [0, Sk):
    #   O_split,i = sum_{j in split, visible} exp(s_j - lse_split,i) v_j  (fp32, unnormalized by
    #   the other splits), lse_split,i = log(sum_{j in split, visible} exp(s_j)); a row (or a
    #   whole split) with no visible key writes O = 0, lse = -inf. _attn_splitkv_combine_kernel
    #   merges the splits. Forward only (the backward is the ordinary one).
    # GQA packing: the M tile holds the rows (query s, head g of the group) r = s * group_size +
    # g of one kv head, so each K/V tile is read once for all group_size query heads.
    # Grid (cdiv(Sq * group_size, BLOCK_M) * B * Hkv, n_splits): row block fastest, then kv
    # head (sharing axis 0, since axes 1 and 2 stop at 65535), then split (at most MAX_SPLITS).
    # Partial buffers: o_part (B*Hq, n_splits, Sq, HEAD_DIM) and lse_part (B*Hq, n_splits,
    # Sq), fp32, inner strides 1.
    # Preconditions: unit stride along head_dim; keys_per_split a multiple of BLOCK_N.
    split = tl.program_id(1)
    n_blocks_r = tl.cdiv(seqlen_q * group_size, BLOCK_M)
    pid_r = tl.program_id(0) % n_blocks_r
    pid_bkv = tl.program_id(0) // n_blocks_r
    b = pid_bkv // n_heads_kv
    kv_h = pid_bkv % n_heads_kv
    h0 = kv_h * group_size  # first query head of the group
    q_base = q_ptr + b.to(tl.int64) * stride_q_batch + h0.to(tl.int64) * stride_q_head
    k_base = k_ptr + b.to(tl.int64) * stride_k_batch + kv_h.to(tl.int64) * stride_k_head
    v_base = v_ptr + b.to(tl.int64) * stride_v_batch + kv_h.to(tl.int64) * stride_v_head

    rows = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    s_idx = rows // group_size
    g_idx = rows % group_size
    r_ok = rows < seqlen_q * group_size
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_tile = s_idx[:, None] * stride_q_seq + g_idx[:, None] * stride_q_head + offs_d[None, :]
    q = _load_2d(q_base + q_tile, r_ok, d_ok, 0.0, True, BLOCK_D != HEAD_DIM)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, seqlen_k)
    # every block is masked (the split end, the causal edge of the last keys): decoding is
    # bound by memory, not by the few extra instructions of a mask
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, s_idx, start, end, end, seqlen_k - seqlen_q,
        qk_scale, stride_k_seq, stride_v_seq, True, CAUSAL, HEAD_DIM, BLOCK_N, BLOCK_D,
        UPCAST_DOT, DOT_PRECISION)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    bh = (b * n_heads_q + h0 + g_idx).to(tl.int64)
    op_ptrs = (o_part_ptr + bh[:, None] * stride_op_head + split.to(tl.int64) * stride_op_split
               + s_idx[:, None] * stride_op_seq + offs_d[None, :])
    tl.store(op_ptrs, o, mask=r_ok[:, None] & d_ok[None, :])
    lp_ptrs = lse_part_ptr + bh * stride_lp_head + split.to(tl.int64) * stride_lp_split + s_idx
    tl.store(lp_ptrs, lse, mask=r_ok)


@triton.jit
def _attn_splitkv_combine_kernel(
    o_part_ptr, lse_part_ptr, out_ptr, lse_ptr,
    seqlen_q, n_heads_q, n_splits,
    stride_op_head, stride_op_split, stride_op_seq,
    stride_lp_head, stride_lp_split,
    stride_out_batch, stride_out_seq, stride_out_head,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
):
    # Merge of the split-KV partials of one query row (b, h, s):
    #   m = max_i lse_i (0 if every split is empty), L = m + log(sum_i exp(lse_i - m)),
    #   out = sum_i exp(lse_i - L) O_i,  lse = L.
    # An empty split (lse_i = -inf) gets weight 0 (explicitly: if all are empty, L = -inf and
    # exp(-inf - -inf) would be NaN); all empty -> out 0, lse -inf.
    # Grid (B * Hq * Sq,). Preconditions: BLOCK_SPLITS = next_pow2(n_splits) (>= SPLIT_CHUNK).
    pid = tl.program_id(0)
    bh = (pid // seqlen_q).to(tl.int64)
    s = pid % seqlen_q
    b = bh // n_heads_q
    h = bh % n_heads_q
    splits = tl.arange(0, BLOCK_SPLITS)
    lp_row = lse_part_ptr + bh * stride_lp_head + s
    lse_all = tl.load(lp_row + splits * stride_lp_split, mask=splits < n_splits,
                      other=float("-inf"))
    m = tl.max(lse_all, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp2((lse_all - m) * 1.4426950408889634), 0)
    lse = m + tl.log(total)  # -inf when every split is empty

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    chunk = tl.arange(0, SPLIT_CHUNK)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    op_row = o_part_ptr + bh * stride_op_head + s * stride_op_seq
    for start in range(0, n_splits, SPLIT_CHUNK):
        idx = start + chunk
        ok = idx < n_splits
        lse_i = tl.load(lp_row + idx * stride_lp_split, mask=ok, other=float("-inf"))
        w = tl.where(lse_i == float("-inf"), 0.0,
                     tl.exp2((lse_i - lse) * 1.4426950408889634))
        o = tl.load(op_row + idx[:, None] * stride_op_split + offs_d[None, :],
                    mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(w[:, None] * o, 0)
    out_ptrs = (out_ptr + b * stride_out_batch + h * stride_out_head + s * stride_out_seq
                + offs_d)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=d_ok)
    tl.store(lse_ptr + bh * seqlen_q + s, lse)


# ------------------------------------------------------------------------------ backward


@triton.jit
def _attn_bwd_preprocess_kernel(
    out_ptr, dout_ptr, delta_ptr,
    seqlen_q, n_heads_q,
    stride_out_batch, stride_out_seq, stride_out_head,
    stride_dout_batch, stride_dout_seq, stride_dout_head,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # delta_i = sum_d dO_i,d * O_i,d  (= sum_j P_ij dP_ij, the softmax-backward row term), fp32
    # (B, Hq, Sq). Grid (cdiv(Sq, BLOCK_M) * B * Hq,), query block fastest.
    n_blocks_m = tl.cdiv(seqlen_q, BLOCK_M)
    pid_m = tl.program_id(0) % n_blocks_m
    pid_bh = tl.program_id(0) // n_blocks_m
    b = pid_bh // n_heads_q
    h = pid_bh % n_heads_q
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q
    d_ok = offs_d < HEAD_DIM
    o_base = (out_ptr + b.to(tl.int64) * stride_out_batch + h.to(tl.int64) * stride_out_head
              + tl.cast(start_m, tl.int64) * stride_out_seq)
    do_base = (dout_ptr + b.to(tl.int64) * stride_dout_batch
               + h.to(tl.int64) * stride_dout_head + tl.cast(start_m, tl.int64) * stride_dout_seq)
    local = tl.arange(0, BLOCK_M)[:, None]
    o = _load_2d(o_base + local * stride_out_seq + offs_d[None, :], m_ok, d_ok, 0.0, True,
                 BLOCK_D != HEAD_DIM).to(tl.float32)
    do = _load_2d(do_base + local * stride_dout_seq + offs_d[None, :], m_ok, d_ok, 0.0, True,
                  BLOCK_D != HEAD_DIM).to(tl.float32)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * seqlen_q + offs_m, tl.sum(o * do, 1), mask=m_ok)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_row, delta_row,
    offs_n, start, end, seqlen_q, diag, sm_scale, qk_scale,
    stride_q_seq, stride_do_seq,
    MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Query blocks [start, end) against one key block, transposed (rows = keys):
    #   P^T = exp2(qk_scale * K Q^T - lse2), dV += P^T dO, dS^T = P^T * (V dO^T - delta),
    #   dK += (scale dS^T) Q. The scale goes into dS before it is rounded to the input dtype,
    #   as in eager (whose rounded dS is the gradient of the scaled scores): at the default
    #   scale that moves fp16's overflow of dS 8x (d64) to 11x (d128) further out.
    # MASK applies the causal mask (diagonal blocks). Query rows past Sq load lse = +inf, so
    # their P is exactly 0.
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
        lse2 = tl.load(lse_row + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
        qk_t = _dot(k, tl.trans(q), None, UPCAST_DOT, DOT_PRECISION) * qk_scale
        if MASK:  # masked before exp2: a hidden score may exceed lse and overflow
            qk_t = tl.where(offs_n[:, None] <= offs_m[None, :] + diag, qk_t, float("-inf"))
        p_t = tl.exp2(qk_t - lse2[None, :])
        do = _load_2d(do_base + tl.cast(start_m, tl.int64) * stride_do_seq + do_offs, m_ok,
                      d_ok, 0.0, True, BLOCK_D != HEAD_DIM)
        dv = _dot(p_t.to(do.dtype), do, dv, UPCAST_DOT, DOT_PRECISION)
        delta = tl.load(delta_row + offs_m, mask=m_ok, other=0.0)
        dp_t = _dot(v, tl.trans(do), None, UPCAST_DOT, DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :]) * sm_scale
        dk = _dot(ds_t.to(q.dtype), q, dk, UPCAST_DOT, DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    seqlen_q, seqlen_k, n_heads_q, n_heads_kv, group_size, sm_scale, qk_scale,
    stride_q_batch, stride_q_seq, stride_q_head,
    stride_k_batch, stride_k_seq, stride_k_head,
    stride_v_batch, stride_v_seq, stride_v_head,
    stride_dout_batch, stride_dout_seq, stride_dout_head,
    stride_dk_batch, stride_dk_seq, stride_dk_head,
    stride_dv_batch, stride_dv_seq, stride_dv_head,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Backward, dK and dV (forward: _attn_fwd_kernel). With P = exp(S - lse), S = scale Q K^T:
    #   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  delta = rowsum(dO * O),
    #   dK = scale dS^T Q,   summed over the group_size query heads that read this kv head.
    # One program per (key block, b, kv head) keeps its K, V tiles and fp32 dK, dV accumulators
    # on chip and loops over the group's query heads, then their query blocks: every
    # contribution lands in one program, so no atomics and a fixed summation order.
    # Causal: query blocks wholly above the diagonal (i < j - (Sk - Sq) for every pair) are
    # skipped by the loop bound, the diagonal-straddling ones are masked, the rest are not.
    # Grid (cdiv(Sk, BLOCK_N) * B * Hkv,), key block fastest. Preconditions: unit stride
    # along head_dim; lse (natural log) and delta fp32 contiguous (B, Hq, Sq); causal =>
    # Sq <= Sk.
    n_blocks_n = tl.cdiv(seqlen_k, BLOCK_N)
    pid_n = tl.program_id(0) % n_blocks_n
    pid_bkv = tl.program_id(0) // n_blocks_n
    b = pid_bkv // n_heads_kv
    kv_h = pid_bkv % n_heads_kv
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < seqlen_k
    d_ok = offs_d < HEAD_DIM
    local_n = tl.arange(0, BLOCK_N)[:, None]
    k_base = (k_ptr + b.to(tl.int64) * stride_k_batch + kv_h.to(tl.int64) * stride_k_head
              + tl.cast(start_n, tl.int64) * stride_k_seq)
    v_base = (v_ptr + b.to(tl.int64) * stride_v_batch + kv_h.to(tl.int64) * stride_v_head
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
    for g in range(0, group_size):
        h = kv_h * group_size + g
        bh = b * n_heads_q + h
        q_base = q_ptr + b.to(tl.int64) * stride_q_batch + h.to(tl.int64) * stride_q_head
        do_base = (dout_ptr + b.to(tl.int64) * stride_dout_batch
                   + h.to(tl.int64) * stride_dout_head)
        lse_row = lse_ptr + bh.to(tl.int64) * seqlen_q
        delta_row = delta_ptr + bh.to(tl.int64) * seqlen_q
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_row, delta_row, offs_n, lo, full, seqlen_q,
            diag, sm_scale, qk_scale, stride_q_seq, stride_dout_seq, True, HEAD_DIM, BLOCK_M,
            BLOCK_D, UPCAST_DOT, DOT_PRECISION)
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_row, delta_row, offs_n, full, seqlen_q,
            seqlen_q, diag, sm_scale, qk_scale, stride_q_seq, stride_dout_seq, False, HEAD_DIM,
            BLOCK_M, BLOCK_D, UPCAST_DOT, DOT_PRECISION)

    dk_base = (dk_ptr + b.to(tl.int64) * stride_dk_batch + kv_h.to(tl.int64) * stride_dk_head
               + tl.cast(start_n, tl.int64) * stride_dk_seq)
    dv_base = (dv_ptr + b.to(tl.int64) * stride_dv_batch + kv_h.to(tl.int64) * stride_dv_head
               + tl.cast(start_n, tl.int64) * stride_dv_seq)
    mask = n_ok[:, None] & d_ok[None, :]
    tl.store(dk_base + local_n * stride_dk_seq + offs_d[None, :],
             dk.to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_base + local_n * stride_dv_seq + offs_d[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse2, delta, k_base, v_base,
    offs_m, start, end, seqlen_k, diag, sm_scale, qk_scale,
    stride_k_seq, stride_v_seq,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Key blocks [start, end) against one query block: P = exp2(qk_scale Q K^T - lse2),
    # dP = dO V^T, dS = P * (dP - delta), dQ += (scale dS) K (scaled before rounding, as in
    # _attn_bwd_dkdv_inner). MASK: ragged-end / diagonal blocks.
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
        qk = _dot(q, kt, None, UPCAST_DOT, DOT_PRECISION) * qk_scale
        if MASK:  # masked before exp2: a hidden score may exceed lse and overflow
            keep = n_ok[None, :]
            if CAUSAL:
                keep = keep & ((start_n + offs_n)[None, :] <= offs_m[:, None] + diag)
            qk = tl.where(keep, qk, float("-inf"))
        p = tl.exp2(qk - lse2[:, None])
        dp = _dot(do, vt, None, UPCAST_DOT, DOT_PRECISION)
        ds = p * (dp - delta[:, None]) * sm_scale
        dq = _dot(ds.to(kt.dtype), tl.trans(kt), dq, UPCAST_DOT, DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr,
    seqlen_q, seqlen_k, n_heads_q, group_size, sm_scale, qk_scale,
    stride_q_batch, stride_q_seq, stride_q_head,
    stride_k_batch, stride_k_seq, stride_k_head,
    stride_v_batch, stride_v_seq, stride_v_head,
    stride_dout_batch, stride_dout_seq, stride_dout_head,
    stride_dq_batch, stride_dq_seq, stride_dq_head,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Backward, dQ = scale * dS K with dS = P * (dO V^T - delta) (see _attn_bwd_dkdv_kernel).
    # One program per (query block, b, query head) holds Q, dO and an fp32 dQ on chip and walks
    # the key blocks it can see (the forward's loop bounds): no atomics, deterministic.
    # Grid (cdiv(Sq, BLOCK_M) * B * Hq,), query blocks last-first as in the forward.
    # Preconditions: those of _attn_bwd_dkdv_kernel.
    start_m, pid_bh, b, h, kv_h = _query_block(seqlen_q, n_heads_q, group_size, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q
    d_ok = offs_d < HEAD_DIM
    local_m = tl.arange(0, BLOCK_M)[:, None]
    q_base = (q_ptr + b.to(tl.int64) * stride_q_batch + h.to(tl.int64) * stride_q_head
              + tl.cast(start_m, tl.int64) * stride_q_seq)
    do_base = (dout_ptr + b.to(tl.int64) * stride_dout_batch + h.to(tl.int64) * stride_dout_head
               + tl.cast(start_m, tl.int64) * stride_dout_seq)
    q = _load_2d(q_base + local_m * stride_q_seq + offs_d[None, :], m_ok, d_ok, 0.0, True,
                 BLOCK_D != HEAD_DIM)
    do = _load_2d(do_base + local_m * stride_dout_seq + offs_d[None, :], m_ok, d_ok, 0.0, True,
                  BLOCK_D != HEAD_DIM)
    row = pid_bh.to(tl.int64) * seqlen_q + offs_m
    # rows past Sq: lse = +inf makes their P exactly 0 (their dQ is never stored anyway)
    lse2 = tl.load(lse_ptr + row, mask=m_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_ptr + row, mask=m_ok, other=0.0)
    k_base = k_ptr + b.to(tl.int64) * stride_k_batch + kv_h.to(tl.int64) * stride_k_head
    v_base = v_ptr + b.to(tl.int64) * stride_v_batch + kv_h.to(tl.int64) * stride_v_head

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    diag = seqlen_k - seqlen_q
    full_end, hi = _key_bounds(start_m, seqlen_q, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, offs_m, 0, full_end, seqlen_k, diag, sm_scale,
        qk_scale, stride_k_seq, stride_v_seq, False, CAUSAL, HEAD_DIM, BLOCK_N, BLOCK_D,
        UPCAST_DOT, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, offs_m, full_end, hi, seqlen_k, diag, sm_scale,
        qk_scale, stride_k_seq, stride_v_seq, True, CAUSAL, HEAD_DIM, BLOCK_N, BLOCK_D,
        UPCAST_DOT, DOT_PRECISION)

    dq_base = (dq_ptr + b.to(tl.int64) * stride_dq_batch + h.to(tl.int64) * stride_dq_head
               + tl.cast(start_m, tl.int64) * stride_dq_seq)
    tl.store(dq_base + local_m * stride_dq_seq + offs_d[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


# ------------------------------------------------------------------------------ settings


class AttnConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


KERNELS = ("fwd", "decode", "combine", "bwd_preprocess", "bwd_dkdv", "bwd_dq")


def attention_config(kernel: str, head_dim: int, arch: tuple[int, int] | None, *,
                     rows: int = 1, elem_bytes: int = 2) -> AttnConfig:
    """Block sizes, warps and stages of one kernel; the launchers and AOT_CASES both use it.

    ``arch`` is the device capability (``torch.cuda.get_device_capability``), None under the
    interpreter; ``rows`` (decode only) is Sq * group_size, the packed query rows of a kv head;
    ``elem_bytes`` the input element size (4 = fp32, accepted for correctness, not speed).
    Starting points from KERNEL-NOTES (FlashAttention-2 tiles, Triton tutorial 06), kept where
    the ahead-of-time compile shows no register spills (tests/test_triton_attention.py).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    d = max(16, triton.next_power_of_2(head_dim))
    if arch is None:
        # Interpreter: programs run one at a time and each tile op is a numpy call, so tiles
        # are small enough to exercise multi-block loops, ragged edges and diagonal tiles on
        # short test sequences, and BLOCK_M != BLOCK_N so the diagonal logic is not symmetric.
        return {"fwd": AttnConfig(32, 16, 1, 1), "decode": AttnConfig(16, 16, 1, 1),
                "combine": AttnConfig(1, 1, 1, 1), "bwd_preprocess": AttnConfig(32, 1, 1, 1),
                "bwd_dkdv": AttnConfig(16, 32, 1, 1), "bwd_dq": AttnConfig(32, 16, 1, 1)}[kernel]
    sm90 = arch[0] >= 9
    # sm_80 has 164 KB of shared memory per block, sm_86/89 only 99 KB: one stage fewer there.
    small_smem = arch[0] == 8 and arch[1] != 0
    big = d > 128  # 256 (and 192 padded to 256): correct, not tuned
    if kernel == "fwd":
        # FA2's tiles: 128 query rows x 64 keys. 8 warps, not FA2's 4: Triton keeps Q, S, P
        # and the fp32 accumulator in registers, and with 4 warps the AOT compile spills
        # (d64 sm80: 8 bytes; d128: 348 bytes); 8 warps need 187 (d64) and 222 (d128). sm90
        # (wgmma, two warpgroups of 64 rows) takes 128 keys at d64 (165 registers, 112 KB of
        # shared memory, half the loop trips) and a third stage (d128: 128 KB of 227 KB).
        if big:  # 4 warps spill (sm80); 64 keys need 255 registers at 8
            cfg = AttnConfig(64, 32, 8, 2)
        elif sm90:
            cfg = AttnConfig(128, 128, 8, 3) if d <= 64 else AttnConfig(128, 64, 8, 3)
        else:
            cfg = AttnConfig(128, 64, 8, 3) if d <= 64 else AttnConfig(128, 64, 8, 2)
    elif kernel == "decode":
        # M = the packed (query, group head) rows, at least 16 (the smallest mma tile); N = 64
        # keys a step (32 at d256). Memory-bound: stages keep several K/V tiles in flight.
        # A 64-row tile at d128 needs 255 registers with 4 warps, 159 with 8.
        block_m = min(64, max(16, triton.next_power_of_2(rows)))
        warps = 8 if block_m * d >= 64 * 128 else 4
        cfg = AttnConfig(block_m, 32 if big else 64, warps, 2 if big else 3)
    elif kernel == "combine":
        # one query row per program: a (SPLIT_CHUNK, d) fp32 tile a step, 16 values a thread
        cfg = AttnConfig(1, 1, 4 if d >= 128 else 2, 1)
    elif kernel == "bwd_preprocess":
        cfg = AttnConfig(64, 1, 4, 1)
    elif kernel == "bwd_dkdv":
        # BLOCK_N keys held on chip (K, V and two fp32 accumulators) while BLOCK_M query rows
        # stream by (tutorial 06: 128 keys x 32 queries at d64). 8 warps throughout: 4 spill
        # at d64 (sm90: 248 bytes) and d128. sm90 d128: 32 x 64 needs 254 registers (one
        # Triton change from spilling), 16 x 128 needs 224 and reads Q, dO once per 128 keys.
        # sm80 needs smaller tiles under Triton 3.6 (the GPU image's) than under 3.8: its
        # AOT compile of 32 x 128 (d64) and 32 x 64 (d128) spills 44 and 12 bytes at 255
        # registers. 16 x 128 (d64: 255 / 174 registers on 3.6 / 3.8) and 32 x 32 (d128:
        # 224 / 164) do not; their speed on an A100 is unmeasured.
        if big:  # 4 warps spill; 16 x 32 at 8 warps needs 216 registers
            cfg = AttnConfig(16, 32, 8, 2)
        elif d <= 64:
            cfg = AttnConfig(32, 128, 8, 3) if sm90 else AttnConfig(16, 128, 8, 2)
        else:
            cfg = AttnConfig(16, 128, 8, 2) if sm90 else AttnConfig(32, 32, 8, 2)
    else:  # bwd_dq
        # BLOCK_M queries held (Q, dO, fp32 dQ) while key blocks stream by (tutorial 06:
        # 128 x 32 at d64). 8 warps: with 4, sm80 spills at d64 (24 bytes) and d128 (44).
        if big:
            cfg = AttnConfig(32, 32, 4, 2)
        elif d <= 64:
            cfg = AttnConfig(128, 64, 8, 3) if sm90 else AttnConfig(128, 32, 8, 3)
        else:
            cfg = AttnConfig(64, 64, 8, 3 if sm90 else 2)
    if elem_bytes > 2 and kernel in ("fwd", "decode", "bwd_dkdv", "bwd_dq"):
        # fp32 tiles take twice the shared memory and registers (and run on FMA units with
        # input_precision="ieee"): halve both tile sides (at most 32) and keep two stages,
        # which stays in every shared-memory budget (d256 prefill 32 x 16: 66 KB). fp32 is
        # for correctness: Triton 3.8's ieee dot at d128 still spills on sm_90 (AOT: 600 bytes
        # fwd, 850 dq at 32 x 32; smaller tiles or 4 warps spill more).
        cfg = AttnConfig(min(32, max(16, cfg.block_m // 2)), min(32, max(16, cfg.block_n // 2)),
                         cfg.num_warps, min(cfg.num_stages, 2))
    if small_smem and cfg.num_stages > 2:
        cfg = cfg._replace(num_stages=cfg.num_stages - 1)
    return cfg


def _device_arch(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def _sm_count(device: torch.device) -> int:
    """SMs on a GPU; under the interpreter a fixed 4 so that the split heuristic still splits
    test-sized decodes (programs run one at a time there, so the count is only a shape)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# Decode programs resident per SM: 4 warps and (16..64 + 2 x 64) x 128 x 2 x stages bytes of
# shared memory leave room for at least two, and two per SM hide load latency better than one
# (KERNEL-NOTES: 1 CTA/SM decoding ran at 60-75% of bandwidth).
DECODE_PROGRAMS_PER_SM = 2


def num_splits_heuristic(n_programs: int, n_key_blocks: int, n_sm: int,
                         max_splits: int = MAX_SPLITS) -> int:
    """How many programs share one (row block, kv head)'s keys (FA2's num_splits_heuristic).

    No split when the unsplit grid already fills most of two waves (splitting would only add
    the partial writes and the combine). Otherwise the smallest split count whose wave
    efficiency (busy slots / launched slots over whole waves) is within 85% of the best,
    skipping counts that give some split no more key blocks than a smaller count does (same
    per-program time, more partials).
    """
    slots = n_sm * DECODE_PROGRAMS_PER_SM
    if n_programs >= 0.8 * slots:
        return 1
    max_splits = max(1, min(max_splits, n_key_blocks, slots))

    def efficiency(s: int) -> float:
        waves = math.ceil(n_programs * s / slots)
        return n_programs * s / (waves * slots)

    def eligible(s: int) -> bool:
        return s == 1 or math.ceil(n_key_blocks / s) != math.ceil(n_key_blocks / (s - 1))

    best = max(efficiency(s) for s in range(1, max_splits + 1) if eligible(s))
    for s in range(1, max_splits + 1):
        if eligible(s) and efficiency(s) >= 0.85 * best:
            return s
    return 1


def _dot_flags(dtype: torch.dtype) -> dict:
    return dict(UPCAST_DOT=INTERPRET and dtype == torch.bfloat16,
                DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _device_guard(device: torch.device):
    # Triton launches on the current device, not the tensors': make them the same.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name}: expected (batch, seqlen, heads, head_dim), got shape "
                             f"{tuple(t.shape)}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32) or t.dtype != q.dtype:
            raise ValueError(f"{name}: expected dtype {q.dtype} (fp16, bf16 or fp32), got "
                             f"{t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device}, got {t.device}")
    b, sq, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k, v: expected equal shapes (batch {b}, Sk, Hkv, head_dim {d}), got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if hq % k.shape[2]:
        raise ValueError(f"k: kv heads ({k.shape[2]}) must divide query heads ({hq})")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q: head_dim must be in [1, {MAX_HEAD_DIM}], got {d}")
    if k.shape[1] < 1 or (causal and sq > k.shape[1]):
        raise ValueError(f"k: need 1 <= seqlen_q <= seqlen_k when causal (seqlen_k >= 1 "
                         f"always), got seqlen_q {sq}, seqlen_k {k.shape[1]}")


def _check_output(name: str, t: torch.Tensor, shape, dtype: torch.dtype, device: torch.device,
                  contiguous: bool = False) -> None:
    ok = tuple(t.shape) == tuple(shape) and t.dtype == dtype and t.device == device
    ok = ok and (t.is_contiguous() if contiguous else t.stride(-1) == 1)
    if not ok:
        layout = "contiguous" if contiguous else "unit stride along the last dimension"
        raise ValueError(f"{name}: expected {dtype} {tuple(shape)} on {device}, {layout}; got "
                         f"{t.dtype} {tuple(t.shape)} strides {t.stride()} on {t.device}")


# ------------------------------------------------------------------------------ launchers


def flash_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                        softmax_scale: float, *, configs: dict | None = None,
                        num_splits: int | None = None, decode: bool | None = None,
                        out: torch.Tensor | None = None, lse: torch.Tensor | None = None):
    """``(out, lse)``: out contiguous (B, Sq, Hq, D) in q's dtype, lse fp32 (B, Hq, Sq).

    For tests: ``decode`` (default: Sq <= DECODE_MAX_SEQLEN_Q) picks the split-KV path,
    ``num_splits`` overrides its heuristic, ``configs`` ({kernel: AttnConfig}) overrides
    attention_config, and ``out`` (any strides, unit along head_dim) and ``lse`` (contiguous)
    are written instead of fresh tensors.
    """
    _check_inputs(q, k, v, causal)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    arch = _device_arch(q.device)
    configs = configs or {}
    if out is None:
        out = torch.empty((b, sq, hq, d), dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    _check_output("out", out, q.shape, q.dtype, q.device)
    _check_output("lse", lse, (b, hq, sq), torch.float32, q.device, contiguous=True)
    block_d = max(16, triton.next_power_of_2(d))
    qk_scale = softmax_scale * LOG2E
    meta = dict(CAUSAL=bool(causal), HEAD_DIM=d, BLOCK_D=block_d, **_dot_flags(q.dtype))
    if decode is None:
        decode = sq <= DECODE_MAX_SEQLEN_Q
    with _device_guard(q.device):
        if not decode:
            cfg = configs.get("fwd") or attention_config("fwd", d, arch,
                                                         elem_bytes=q.element_size())
            grid = (triton.cdiv(sq, cfg.block_m) * b * hq,)
            _attn_fwd_kernel[grid](
                q, k, v, out, lse,
                sq, sk, hq, hq // hkv, qk_scale,
                *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **meta,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
            return out, lse
        group = hq // hkv
        cfg = configs.get("decode") or attention_config("decode", d, arch, rows=sq * group,
                                                       elem_bytes=q.element_size())
        row_blocks = triton.cdiv(sq * group, cfg.block_m)
        n_key_blocks = triton.cdiv(sk, cfg.block_n)
        if num_splits is None:
            num_splits = num_splits_heuristic(b * hkv * row_blocks, n_key_blocks,
                                              _sm_count(q.device))
        keys_per_split = triton.cdiv(n_key_blocks, num_splits) * cfg.block_n
        o_part = torch.empty((b * hq, num_splits, sq, d), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((b * hq, num_splits, sq), dtype=torch.float32, device=q.device)
        _attn_fwd_splitkv_kernel[(row_blocks * b * hkv, num_splits)](
            q, k, v, o_part, lse_part,
            sq, sk, hq, hkv, group, keys_per_split, qk_scale,
            *_strides(q), *_strides(k), *_strides(v),
            o_part.stride(0), o_part.stride(1), o_part.stride(2),
            lse_part.stride(0), lse_part.stride(1),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **meta,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        ccfg = configs.get("combine") or attention_config("combine", d, arch)
        _attn_splitkv_combine_kernel[(b * hq * sq,)](
            o_part, lse_part, out, lse,
            sq, hq, num_splits,
            o_part.stride(0), o_part.stride(1), o_part.stride(2),
            lse_part.stride(0), lse_part.stride(1),
            *_strides(out),
            HEAD_DIM=d, BLOCK_D=block_d,
            BLOCK_SPLITS=max(SPLIT_CHUNK, triton.next_power_of_2(num_splits)),
            SPLIT_CHUNK=SPLIT_CHUNK, num_warps=ccfg.num_warps, num_stages=ccfg.num_stages,
        )
    return out, lse


def flash_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        out: torch.Tensor, lse: torch.Tensor, causal: bool, softmax_scale: float,
                        *, configs: dict | None = None, dq: torch.Tensor | None = None,
                        dk: torch.Tensor | None = None, dv: torch.Tensor | None = None):
    """``(dq, dk, dv)``, contiguous, shapes and dtypes of q, k, v; deterministic (no atomics).

    For tests: ``configs`` overrides attention_config; ``dq``, ``dk``, ``dv`` (any strides,
    unit along head_dim) are written instead of fresh tensors.
    """
    _check_inputs(q, k, v, causal)
    for name, t in (("dout", dout), ("out", out)):
        if t.shape != q.shape or t.device != q.device:
            raise ValueError(f"{name}: expected shape {tuple(q.shape)} on {q.device}, got "
                             f"{tuple(t.shape)} on {t.device}")
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    if lse.shape != (b, hq, sq) or lse.dtype != torch.float32:
        raise ValueError(f"lse: expected fp32 shape {(b, hq, sq)}, got {lse.dtype} "
                         f"{tuple(lse.shape)}")
    q, k, v, out, dout = (_unit_last(t) for t in (q, k, v, out, dout))
    lse = lse.contiguous()
    arch = _device_arch(q.device)
    configs = configs or {}
    block_d = max(16, triton.next_power_of_2(d))
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    for name, t, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        _check_output(name, t, like.shape, like.dtype, like.device)
    delta = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    meta = dict(CAUSAL=bool(causal), HEAD_DIM=d, BLOCK_D=block_d, **_dot_flags(q.dtype))
    qk_scale = softmax_scale * LOG2E
    with _device_guard(q.device):
        cfg = configs.get("bwd_preprocess") or attention_config("bwd_preprocess", d, arch)
        _attn_bwd_preprocess_kernel[(triton.cdiv(sq, cfg.block_m) * b * hq,)](
            out, dout, delta, sq, hq, *_strides(out), *_strides(dout),
            HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_D=block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        cfg = configs.get("bwd_dkdv") or attention_config("bwd_dkdv", d, arch,
                                                         elem_bytes=q.element_size())
        _attn_bwd_dkdv_kernel[(triton.cdiv(sk, cfg.block_n) * b * hkv,)](
            q, k, v, dout, lse, delta, dk, dv,
            sq, sk, hq, hkv, hq // hkv, softmax_scale, qk_scale,
            *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk),
            *_strides(dv),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **meta,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        cfg = configs.get("bwd_dq") or attention_config("bwd_dq", d, arch,
                                                     elem_bytes=q.element_size())
        _attn_bwd_dq_kernel[(triton.cdiv(sq, cfg.block_m) * b * hq,)](
            q, k, v, dout, lse, delta, dq,
            sq, sk, hq, hq // hkv, softmax_scale, qk_scale,
            *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dq),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **meta,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return dq, dk, dv


# ------------------------------------------------------------------------------ AOT cases

# What runs on the target GPUs at the LLaMA head dims: each kernel with the settings
# attention_config picks for that arch. A case's settings differ per arch, so each case is
# meant for one arch: AOT_CASE_ARCH[case.name] (compile it with _aot.compile_case(case, arch)).
AOT_ARCHS = (80, 90)
AOT_HEAD_DIMS = (64, 128)
# Decode packs Sq * group rows of a kv head into the M tile: 1 x 4 (LLaMA-2 70B-like GQA,
# 16 rows) and 16 x 8 (a 16-token speculative step with 8 heads per group, 64 rows).
AOT_DECODE_ROWS = (4, 128)
# Sizes that are not multiples of 16 at real shapes (no divisibility hint); strides and
# pointers are (head_dim 64/128 times a head count).
_NOT_DIVISIBLE = ("seqlen_q", "seqlen_k", "n_heads_q", "n_heads_kv", "group_size", "n_splits")


def _aot_case(name, fn, ptr_types: dict, constexprs: dict, cfg: AttnConfig) -> _aot.AotCase:
    types = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            continue
        if arg.endswith("_ptr"):
            types[arg] = ptr_types.get(arg, ptr_types["default"])
        elif arg in ("qk_scale", "sm_scale"):
            types[arg] = "fp32"
        else:
            types[arg] = "i32"
    return _aot.case(name, fn, types=types, constexprs=constexprs, num_warps=cfg.num_warps,
                     num_stages=cfg.num_stages,
                     not_divisible=tuple(a for a in _NOT_DIVISIBLE if a in types))


def _aot_cases() -> tuple[list[_aot.AotCase], dict[str, int]]:
    cases, arch_of = [], {}
    f32 = "*fp32"
    for arch in AOT_ARCHS:
        cap = (arch // 10, arch % 10)
        for d in AOT_HEAD_DIMS:
            for dtype in ("fp16", "bf16"):
                t = "*" + dtype
                base = dict(HEAD_DIM=d, BLOCK_D=d, UPCAST_DOT=False, DOT_PRECISION="tf32")
                tag = f"d{d} {dtype} sm_{arch}"
                new = []
                cfg = attention_config("fwd", d, cap)
                for causal in (True, False):
                    new.append(_aot_case(
                        f"attn_fwd{'_causal' if causal else ''} {tag}", _attn_fwd_kernel,
                        dict(default=t, lse_ptr=f32),
                        dict(base, CAUSAL=causal, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n),
                        cfg))
                for rows in AOT_DECODE_ROWS:
                    cfg = attention_config("decode", d, cap, rows=rows)
                    new.append(_aot_case(
                        f"attn_decode rows={rows} {tag}", _attn_fwd_splitkv_kernel,
                        dict(default=t, o_part_ptr=f32, lse_part_ptr=f32),
                        dict(base, CAUSAL=True, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n), cfg))
                cfg = attention_config("combine", d, cap)
                new.append(_aot_case(
                    f"attn_combine {tag}", _attn_splitkv_combine_kernel,
                    dict(default=f32, out_ptr=t),
                    dict(HEAD_DIM=d, BLOCK_D=d, BLOCK_SPLITS=MAX_SPLITS,
                         SPLIT_CHUNK=SPLIT_CHUNK), cfg))
                cfg = attention_config("bwd_preprocess", d, cap)
                new.append(_aot_case(
                    f"attn_bwd_preprocess {tag}", _attn_bwd_preprocess_kernel,
                    dict(default=t, delta_ptr=f32),
                    dict(HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_D=d), cfg))
                for kernel, fn in (("bwd_dkdv", _attn_bwd_dkdv_kernel),
                                   ("bwd_dq", _attn_bwd_dq_kernel)):
                    cfg = attention_config(kernel, d, cap)
                    new.append(_aot_case(
                        f"attn_{kernel}_causal {tag}", fn,
                        dict(default=t, lse_ptr=f32, delta_ptr=f32),
                        dict(base, CAUSAL=True, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n), cfg))
                for c in new:
                    arch_of[c.name] = arch
                cases += new
    return cases, arch_of


AOT_CASES, AOT_CASE_ARCH = _aot_cases()
