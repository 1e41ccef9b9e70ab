"""Flash attention backward in Triton, the blocked structure of Triton's fused-attention
tutorial: one kernel whose programs each compute dK, dV of one key block and then dQ of the
query block of the same index.

Math (as attention_bwd.py, whose inner loops this file shares), with S = softmax_scale Q K^T
(+ mask), P = exp(S - lse) = exp2(softmax_scale_log2 Q K^T - lse2), lse2 = lse log2(e):
    delta = rowsum(dO o O)
    dV = P^T dO,   dP = dO V^T,   dS = P o (dP - delta)
    dQ = (softmax_scale dS) K,   dK = (softmax_scale dS)^T Q
summed over the group_size query heads of a kv head for dK, dV. softmax_scale * dS is formed
in fp32 and rounded to the input dtype once for its matmuls, as eager rounds it; P is rounded
to dO's dtype for dV. Hidden scores are -inf before exp2; query rows past Sq read lse2 = +inf.

Base 2: the loops compute exp2(softmax_scale_log2 * (q . k) - lse2) on the fp32 product, the
convention of _attention_common.py, with lse2 formed once per query row, not per score. K is
not pre-multiplied by softmax_scale_log2 as the tutorial does: that would round K a second time
in the input dtype (bf16: 8 bits), an error as large as eager's own rounding of the scores,
to save one FMUL per score (the sm_90 SASS of these loops, shared with attention_bwd.py, has
an FMUL and an FADD before each MUFU.EX2; tl.fma there would save it with no extra rounding).

Structure: grid (max(cdiv(Sk, BLOCK_N), cdiv(Sq, BLOCK_N)) * B * Hkv,); program (i, b, kv head)
    1. dK, dV of keys [i BLOCK_N, (i + 1) BLOCK_N) (BLOCK_N1 in the tutorial), held on chip in
       fp32 while, for each query head of the kv group in turn, query blocks stream by: first
       the causal diagonal in sub-blocks of MASK_BLOCK rows (masked), then the rest of the
       queries in blocks of BLOCK_M (BLOCK_M1) without a mask; query blocks that see none of
       these keys are never visited.
    2. dQ of queries [i BLOCK_N, (i + 1) BLOCK_N) (BLOCK_M2 = BLOCK_N1), for each query head of
       the group: key blocks of BLOCK_M keys (BLOCK_N2 = BLOCK_M1) that every row sees, without
       a mask, then the diagonal (and the ragged end of Sk) in masked sub-blocks of MASK_BLOCK
       keys; key blocks no row sees are never visited.
Every output tile is written by one program summing in a fixed order: no atomics,
deterministic, and the grouped-query reduction of dK, dV stays inside the program.
Why one kernel with two roles rather than two kernels with these tiles: at Sq == Sk causal,
key block i has (n - i) query blocks to visit and query block i has (i + 1) key blocks, so
every program does the same n + 1 block steps and no program is a tail; one launch fewer; and
the dK/dV role and the dQ role take the same number of programs. The cost is one register
budget for both roles (the larger), which the AOT compile checks (flash_attention.AOT_CASES);
it does not decide the warps: at the tutorial's 32 x 128 on 4 warps (d64, sm_90) the dK/dV role
alone spills 784 bytes and the dQ role alone 320, so two kernels would need 8 warps as well.
delta comes from attention_bwd.py's preprocess kernel, launched first.

Packed sequences (VARLEN) are not handled here: flash_attention_varlen.py keeps the kernels of
attention_bwd.py for them.

Preconditions (flash_attention.flash_attention_bwd checks or arranges them): unit stride along
head_dim; lse (natural log) and delta fp32 contiguous (B, Hq, Sq); causal => Sq <= Sk;
BLOCK_D = next_pow2(HEAD_DIM) >= 16; MASK_BLOCK divides BLOCK_M, both >= 16.
"""

from __future__ import annotations

import triton
import triton.language as tl

from llama_kernels.triton._attention_common import _key_bounds, _load_2d, _load_lse2
from llama_kernels.triton.attention_bwd import _attn_bwd_dkdv_inner, _attn_bwd_dq_inner

# The tutorial's BLK_SLICE_FACTOR: diagonal sub-blocks of BLOCK_M // 2 rows (16 at 32), as
# the tutorial has them (their speed against whole BLOCK_M steps is unmeasured here); never
# below 16, the smallest tl.dot side.
SLICE_FACTOR = 2


def mask_block(block_m: int) -> int:
    """MASK_BLOCK, the rows (dK/dV) or keys (dQ) of one masked diagonal sub-block."""
    return max(16, block_m // SLICE_FACTOR)


@triton.jit
def _attn_bwd_blocked_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr,
    seqlen_q, seqlen_k, n_heads_q, n_heads_kv, group_size, softmax_scale, softmax_scale_log2,
    stride_q_batch, stride_q_seq, stride_q_head,
    stride_k_batch, stride_k_seq, stride_k_head,
    stride_v_batch, stride_v_seq, stride_v_head,
    stride_dout_batch, stride_dout_seq, stride_dout_head,
    stride_dq_batch, stride_dq_seq, stride_dq_head,
    stride_dk_batch, stride_dk_seq, stride_dk_head,
    stride_dv_batch, stride_dv_seq, stride_dv_head,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # q, dout, dq (B, Sq, Hq, D); k, v, dk, dv (B, Sk, Hkv, D); lse, delta (B, Hq, Sq).
    # BLOCK_N: the resident side (keys of the dK/dV role, queries of the dQ role); BLOCK_M the
    # streamed side. Program index fastest, then kv head, then batch.
    n_blocks = tl.cdiv(tl.maximum(seqlen_q, seqlen_k), BLOCK_N)
    pid = tl.program_id(0) % n_blocks
    pid_bkv = tl.program_id(0) // n_blocks
    b = pid_bkv // n_heads_kv
    kv_h = pid_bkv % n_heads_kv
    start = pid * BLOCK_N
    diag = seqlen_k - seqlen_q
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    local = tl.arange(0, BLOCK_N)[:, None]
    k_head = (k_ptr + b.to(tl.int64) * stride_k_batch + kv_h.to(tl.int64) * stride_k_head)
    v_head = (v_ptr + b.to(tl.int64) * stride_v_batch + kv_h.to(tl.int64) * stride_v_head)

    # ---- role 1: dK, dV of keys [start, start + BLOCK_N)
    if start < seqlen_k:
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seqlen_k
        k = _load_2d(k_head + tl.cast(start, tl.int64) * stride_k_seq + local * stride_k_seq
                     + offs_d[None, :], n_ok, d_ok, 0.0, True, BLOCK_D != HEAD_DIM)
        v = _load_2d(v_head + tl.cast(start, tl.int64) * stride_v_seq + local * stride_v_seq
                     + offs_d[None, :], n_ok, d_ok, 0.0, True, BLOCK_D != HEAD_DIM)
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        if CAUSAL:
            # query i sees key j iff j <= i + diag: the first query that sees key `start`
            # (lo) up to the first that sees the whole block (start + BLOCK_N - 1 - diag) is
            # the diagonal, covered by whole sub-blocks [lo, mid); queries past mid need no mask
            lo = tl.maximum(start - diag, 0)
            n_masked = tl.cdiv(tl.minimum(start + BLOCK_N - diag, seqlen_q) - lo, MASK_BLOCK)
            mid = lo + tl.maximum(n_masked, 0) * MASK_BLOCK
        else:
            lo = 0
            mid = 0
        for g in range(0, group_size):
            h = kv_h * group_size + g
            bh = b * n_heads_q + h
            q_base = q_ptr + b.to(tl.int64) * stride_q_batch + h.to(tl.int64) * stride_q_head
            do_base = (dout_ptr + b.to(tl.int64) * stride_dout_batch
                       + h.to(tl.int64) * stride_dout_head)
            lse_row = lse_ptr + bh.to(tl.int64) * seqlen_q
            delta_row = delta_ptr + bh.to(tl.int64) * seqlen_q
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_row, delta_row, offs_n, lo, mid, seqlen_q,
                diag, softmax_scale, softmax_scale_log2, stride_q_seq, stride_dout_seq, True,
                HEAD_DIM, MASK_BLOCK, BLOCK_D, UPCAST_DOT, DOT_PRECISION, False)
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_row, delta_row, offs_n, mid, seqlen_q,
                seqlen_q, diag, softmax_scale, softmax_scale_log2, stride_q_seq, stride_dout_seq,
                False, HEAD_DIM, BLOCK_M, BLOCK_D, UPCAST_DOT, DOT_PRECISION, False)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        dk_base = (dk_ptr + b.to(tl.int64) * stride_dk_batch + kv_h.to(tl.int64) * stride_dk_head
                   + tl.cast(start, tl.int64) * stride_dk_seq)
        dv_base = (dv_ptr + b.to(tl.int64) * stride_dv_batch + kv_h.to(tl.int64) * stride_dv_head
                   + tl.cast(start, tl.int64) * stride_dv_seq)
        tl.store(dk_base + local * stride_dk_seq + offs_d[None, :],
                 dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(dv_base + local * stride_dv_seq + offs_d[None, :],
                 dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)

    # ---- role 2: dQ of queries [start, start + BLOCK_N), each query head of the group
    if start < seqlen_q:
        offs_m = start + tl.arange(0, BLOCK_N)
        m_ok = offs_m < seqlen_q
        # key blocks [0, full_end) seen by every row, [full_end, hi) the diagonal / ragged end
        full_end, hi = _key_bounds(start, seqlen_q, seqlen_k, CAUSAL, BLOCK_N, BLOCK_M)
        for g in range(0, group_size):
            h = kv_h * group_size + g
            bh = b * n_heads_q + h
            q = _load_2d(q_ptr + b.to(tl.int64) * stride_q_batch + h.to(tl.int64) * stride_q_head
                         + tl.cast(start, tl.int64) * stride_q_seq + local * stride_q_seq
                         + offs_d[None, :], m_ok, d_ok, 0.0, True, BLOCK_D != HEAD_DIM)
            do = _load_2d(dout_ptr + b.to(tl.int64) * stride_dout_batch
                          + h.to(tl.int64) * stride_dout_head
                          + tl.cast(start, tl.int64) * stride_dout_seq + local * stride_dout_seq
                          + offs_d[None, :], m_ok, d_ok, 0.0, True, BLOCK_D != HEAD_DIM)
            row = bh.to(tl.int64) * seqlen_q + offs_m
            lse2 = _load_lse2(lse_ptr, row, m_ok, False)  # rows past Sq: +inf, P exactly 0
            delta = tl.load(delta_ptr + row, mask=m_ok, other=0.0)
            dq = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
            dq = _attn_bwd_dq_inner(
                dq, q, do, lse2, delta, k_head, v_head, offs_m, 0, full_end, seqlen_k, diag,
                softmax_scale, softmax_scale_log2, stride_k_seq, stride_v_seq, False, CAUSAL,
                HEAD_DIM, BLOCK_M, BLOCK_D, UPCAST_DOT, DOT_PRECISION)
            dq = _attn_bwd_dq_inner(
                dq, q, do, lse2, delta, k_head, v_head, offs_m, full_end, hi, seqlen_k, diag,
                softmax_scale, softmax_scale_log2, stride_k_seq, stride_v_seq, True, CAUSAL,
                HEAD_DIM, MASK_BLOCK, BLOCK_D, UPCAST_DOT, DOT_PRECISION)
            dq_base = (dq_ptr + b.to(tl.int64) * stride_dq_batch
                       + h.to(tl.int64) * stride_dq_head + tl.cast(start, tl.int64) * stride_dq_seq)
            tl.store(dq_base + local * stride_dq_seq + offs_d[None, :],
                     dq.to(dq_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
