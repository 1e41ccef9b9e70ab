"""Flash attention forward (FlashAttention-2) in Triton: the prefill kernel.

Math, per query row i of head h (kv head h // group_size), over the keys j it sees (every
key, or j <= i + Sk - Sq when causal):
    s_j = softmax_scale * q_i . k_j
    out_i = sum_j softmax(s)_j v_j,    lse_i = log sum_j exp(s_j)   (natural log, fp32)
that is out = softmax(softmax_scale Q K^T + mask) V. Computed in base 2 (s2 = s * log2 e,
_attention_common.py) by the online softmax, one key block at a time, with a running max m
and sum l per row:
    m' = max(m, max_j s2_j),  p_j = exp2(s2_j - m'),  alpha = exp2(m - m')
    l' = alpha l + sum_j p_j,  acc' = alpha acc + P V      (P rounded to V's dtype, acc fp32)
and at the end out = acc / l, lse = (m + log2 l) * ln 2. A row that has seen no key keeps
m = -inf and subtracts 0 instead (-inf - -inf would be NaN), so its p and alpha are exp2(-inf)
= 0; a row that sees no key at all (impossible under the preconditions) gives out = 0 and
lse = -inf, never NaN.

Kernels:
    _attn_fwd_inner          the online-softmax loop over a range of key blocks, masked or not
                             (the split-KV decode kernel, attention_decode.py, runs it over its
                             keys)
    _attn_fwd_program        one program per (query block, sequence, query head); VARLEN
                             (constexpr) reads the sequence from cu_seqlens
    _attn_fwd_kernel         dense batches: the program with VARLEN=False
    _attn_fwd_varlen_kernel  packed sequences (_attention_common.py): VARLEN=True
The backward (attention_bwd.py) recomputes P from lse.

Preconditions (the launchers, flash_attention.py and flash_attention_varlen.py, check or
arrange them): unit stride along head_dim for q, k, v and out; lse contiguous fp32, (B, Hq,
Sq) dense, (Hq, total_q) packed; dense: Sk >= 1 and causal => Sq <= Sk; BLOCK_D =
next_pow2(HEAD_DIM) >= 16.
"""

from __future__ import annotations

import triton
import triton.language as tl

from llama_kernels.triton._attention_common import (_dot, _key_bounds, _load_2d, _packed_strides,
                                                    _query_block, _sequence)


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q, k_base, v_base,
    offs_m, start, end, seqlen_k, diag, softmax_scale_log2,
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
            qk = tl.where(keep, qk * softmax_scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # a row that has seen no key yet keeps m = -inf: subtract 0 instead (-inf - -inf
            # would be NaN); its p is exp2(-inf) = 0 and its alpha exp2(-inf) = 0.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            qk = qk * softmax_scale_log2
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
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    seqlen_q, seqlen_k, n_heads_q, group_size, softmax_scale_log2,
    stride_q_batch, stride_q_seq, stride_q_head,
    stride_k_batch, stride_k_seq, stride_k_head,
    stride_v_batch, stride_v_seq, stride_v_head,
    stride_out_batch, stride_out_seq, stride_out_head,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Dense batches: q, out (B, Sq, Hq, D), k, v (B, Sk, Hkv, D), lse (B, Hq, Sq).
    _attn_fwd_program(
        q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, None, None, seqlen_q, seqlen_k, n_heads_q,
        group_size, softmax_scale_log2, seqlen_q, (stride_q_batch, stride_q_seq, stride_q_head),
        (stride_k_batch, stride_k_seq, stride_k_head),
        (stride_v_batch, stride_v_seq, stride_v_head),
        (stride_out_batch, stride_out_seq, stride_out_head), CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N,
        BLOCK_D, UPCAST_DOT, DOT_PRECISION, False)


@triton.jit
def _attn_fwd_varlen_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    max_seqlen_q, total_q, n_heads_q, group_size, softmax_scale_log2,
    stride_q_row, stride_q_head, stride_k_row, stride_k_head, stride_v_row, stride_v_head,
    stride_out_row, stride_out_head,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Packed sequences: q, out (total_q, Hq, D), k, v (total_k, Hkv, D), lse (Hq, total_q);
    # grid (cdiv(max_seqlen_q, BLOCK_M) * B * Hq,).
    _attn_fwd_program(
        q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr, max_seqlen_q, 0,
        n_heads_q, group_size, softmax_scale_log2, total_q,
        _packed_strides(stride_q_row, stride_q_head), _packed_strides(stride_k_row, stride_k_head),
        _packed_strides(stride_v_row, stride_v_head),
        _packed_strides(stride_out_row, stride_out_head), CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N,
        BLOCK_D, UPCAST_DOT, DOT_PRECISION, True)


@triton.jit
def _attn_fwd_program(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    seqlen_q, seqlen_k, n_heads_q, group_size, softmax_scale_log2, stride_lse_head,
    q_strides, k_strides, v_strides, out_strides,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    VARLEN: tl.constexpr,
):
    # Grid (cdiv(Sq, BLOCK_M) * B * Hq,), query block fastest, launched last-first
    # (_query_block: the causal blocks with the most keys start first, shortening the tail).
    # Key blocks [0, full_end) run unmasked; [full_end, hi) straddle the causal diagonal or
    # the ragged end of Sk and are masked; causal key blocks past hi are never loaded.
    # *_strides are (batch, sequence, head) strides. VARLEN: seqlen_q is max_seqlen_q, the
    # sequence's lengths and first rows come from cu_seqlens, the batch strides are the
    # sequence strides (the first row times them is the sequence's offset), lse is (Hq,
    # total_q) with head stride stride_lse_head, and a block past the sequence's queries exits.
    start_m, pid_bh, b, h, kv_h = _query_block(seqlen_q, n_heads_q, group_size, BLOCK_M)
    row_q, seqlen_q, row_k, seqlen_k = _sequence(cu_seqlens_q_ptr, cu_seqlens_k_ptr, b, seqlen_q,
                                                 seqlen_k, VARLEN)
    if VARLEN:  # a block past the sequence's queries
        if start_m >= seqlen_q:
            return
    stride_q_batch, stride_q_seq, stride_q_head = q_strides
    q_base = (q_ptr + row_q.to(tl.int64) * stride_q_batch + h.to(tl.int64) * stride_q_head
              + tl.cast(start_m, tl.int64) * stride_q_seq)
    stride_k_batch, stride_k_seq, stride_k_head = k_strides
    stride_v_batch, stride_v_seq, stride_v_head = v_strides
    k_base = k_ptr + row_k.to(tl.int64) * stride_k_batch + kv_h.to(tl.int64) * stride_k_head
    v_base = v_ptr + row_k.to(tl.int64) * stride_v_batch + kv_h.to(tl.int64) * stride_v_head

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
    if VARLEN:  # more queries than keys: no key block is whole, none starts before key 0
        full_end = tl.maximum(full_end, 0)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, offs_m, 0, full_end, seqlen_k, diag, softmax_scale_log2,
        stride_k_seq, stride_v_seq, False, CAUSAL, HEAD_DIM, BLOCK_N, BLOCK_D, UPCAST_DOT,
        DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, offs_m, full_end, hi, seqlen_k, diag, softmax_scale_log2,
        stride_k_seq, stride_v_seq, True, CAUSAL, HEAD_DIM, BLOCK_N, BLOCK_D, UPCAST_DOT,
        DOT_PRECISION)

    # l == 0 only for a row that saw no key (dense: impossible under the preconditions;
    # VARLEN: an empty key sequence, or a causal one with more queries than keys): out 0,
    # lse -inf, never NaN.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    stride_out_batch, stride_out_seq, stride_out_head = out_strides
    out_base = (out_ptr + row_q.to(tl.int64) * stride_out_batch
                + h.to(tl.int64) * stride_out_head + tl.cast(start_m, tl.int64) * stride_out_seq)
    out_tile = tl.arange(0, BLOCK_M)[:, None] * stride_out_seq + offs_d[None, :]
    tl.store(out_base + out_tile, out.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    if VARLEN:
        lse_row = lse_ptr + h.to(tl.int64) * stride_lse_head + row_q
    else:
        lse_row = lse_ptr + pid_bh.to(tl.int64) * seqlen_q
    tl.store(lse_row + offs_m, lse, mask=m_ok)
