"""Split-KV forward (flash-decoding) in Triton: a few queries against a long KV cache.

A decode step has Sq <= DECODE_MAX_SEQLEN_Q queries (attention_launch.py). The prefill kernel
would run mostly empty 128-row tiles, one program per (query block, head) streaming the whole
cache: too few programs to fill a GPU. Here the Sq * group_size query rows that read one kv
head share a tile (each K/V tile is read once for the group), the keys are cut into splits,
one program per split, and a second kernel merges the splits' partial results.

Math, per query row i with the forward's scores s_j (attention_fwd.py), for split t of the
keys [t * keys_per_split, (t + 1) * keys_per_split) within [0, Sk):
    lse_i^t = log sum_{j in t, visible} exp(s_j)
    O_i^t   = sum_{j in t, visible} exp(s_j - lse_i^t) v_j      (fp32)
(a row that sees no key of split t, or an empty split: O^t = 0, lse^t = -inf). The merge:
    m = max_t lse^t  (0 when every split is empty),   L = m + log sum_t exp(lse^t - m)
    out_i = sum_t exp(lse^t - L) O^t,   lse_i = L
equals the unsplit forward, since exp(lse^t - L) is split t's share of the softmax sum. An
empty split is given weight 0 explicitly: when every split is empty L = -inf, and
exp(-inf - -inf) would be NaN; such a row gets out = 0, lse = -inf.

Kernels:
    _attn_fwd_splitkv_kernel      one program per (row block, batch, kv head) and split:
                                  O^t, lse^t into fp32 partial buffers
    _attn_kvcache_splitkv_kernel  the same against a KV cache, contiguous or paged, with a
                                  length per sequence (flash_attention_kvcache.py)
    _attn_splitkv_combine_kernel  one program per query row: the merge, SPLIT_CHUNK splits a step
The backward of a decode step is the ordinary one (attention_bwd.py): out and lse are those of
the unsplit forward. The dense split kernel inlines the KV-cache one with its constexpr switches
off, so it compiles as if the cache variants did not exist.

KV cache: sequence b has n_b = cache_seqlens[b] + S_new keys (the step's new ones already
appended) and query i sees keys j <= i + n_b - Sq when causal. The split count is one for the
whole grid (from the cache capacity: no device value reaches the host), and each sequence cuts
its own n_b keys into that many runs of whole key blocks, so a short sequence's programs finish
early and those past its last key block write empty partials. A paged cache (num_blocks,
PAGE_SIZE, Hkv, D) holds key t of sequence b at row t % PAGE_SIZE of block
block_table[b, t // PAGE_SIZE]; only the entries of keys < n_b are read.

Preconditions (the launchers, flash_attention.py and flash_attention_kvcache.py, check or
arrange them): unit stride along head_dim; keys_per_split a multiple of BLOCK_N; partial
buffers o_part (B * Hq, n_splits, Sq, HEAD_DIM) and lse_part (B * Hq, n_splits, Sq), fp32 with
unit inner strides; BLOCK_SPLITS = max(SPLIT_CHUNK, next_pow2(n_splits)); KV cache: n_b within
the cache (paged: PAGE_SIZE a power of two, the first cdiv(n_b, PAGE_SIZE) entries of the
table naming blocks of the pool).
"""

from __future__ import annotations

import triton
import triton.language as tl

from llama_kernels.triton._attention_common import _dot, _load_2d
from llama_kernels.triton.attention_fwd import _attn_fwd_inner

# Splits the combine kernel merges per loop step (a (SPLIT_CHUNK, BLOCK_D) fp32 tile).
SPLIT_CHUNK = 16


@triton.jit
def _attn_paged_inner(
    acc, l_i, m_i, q, k_base, v_base, table_row,
    offs_m, start, end, diag, softmax_scale_log2,
    stride_k_block, stride_k_seq, stride_v_block, stride_v_seq,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # _attn_fwd_inner's masked pass over the keys [start, end) of a paged cache: key t is row
    # t % PAGE_SIZE of block table_row[t // PAGE_SIZE]. A tile of BLOCK_N keys may span several
    # blocks (BLOCK_N > PAGE_SIZE) or part of one, so every key row gets its own address; each
    # row is still HEAD_DIM contiguous elements, loaded as vectors. Keys at or past end (<= the
    # sequence's length) are masked before their block number is read: table entries past the
    # sequence may name no block at all.
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(start, end, BLOCK_N):
        keys = start_n + offs_n
        n_ok = keys < end
        block = tl.load(table_row + keys // PAGE_SIZE, mask=n_ok, other=0).to(tl.int64)
        row = keys % PAGE_SIZE
        k_rows = block * stride_k_block + row * stride_k_seq
        kt = _load_2d(k_base + k_rows[None, :] + offs_d[:, None], d_ok, n_ok, 0.0,
                      BLOCK_D != HEAD_DIM, True)
        visible = n_ok[None, :]
        if CAUSAL:
            visible = visible & (keys[None, :] <= offs_m[:, None] + diag)
        s2 = tl.where(visible, _dot(q, kt, None, UPCAST_DOT, DOT_PRECISION) * softmax_scale_log2,
                      float("-inf"))
        m_next = tl.maximum(m_i, tl.max(s2, 1))
        m_safe = tl.where(m_next == float("-inf"), 0.0, m_next)  # no key seen yet: see fwd
        scale_old = tl.exp2(m_i - m_safe)
        p = tl.exp2(s2 - m_safe[:, None])
        l_i = l_i * scale_old + tl.sum(p, 1)
        v_rows = block * stride_v_block + row * stride_v_seq
        vt = _load_2d(v_base + v_rows[:, None] + offs_d[None, :], n_ok, d_ok, 0.0, True,
                      BLOCK_D != HEAD_DIM)
        acc = _dot(p.to(vt.dtype), vt, acc * scale_old[:, None], UPCAST_DOT, DOT_PRECISION)
        m_i = m_next
    return acc, l_i, m_i


@triton.jit
def _attn_kvcache_splitkv_kernel(
    q_ptr, k_ptr, v_ptr, o_part_ptr, lse_part_ptr, cache_seqlens_ptr, block_table_ptr,
    seqlen_q, seqlen_k, n_heads_q, n_heads_kv, group_size, keys_per_split, softmax_scale_log2,
    stride_q_batch, stride_q_seq, stride_q_head,
    stride_k_batch, stride_k_seq, stride_k_head,
    stride_v_batch, stride_v_seq, stride_v_head,
    stride_op_head, stride_op_split, stride_op_seq,
    stride_lp_head, stride_lp_split, stride_bt_batch,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KVCACHE: tl.constexpr, PAGE_SIZE: tl.constexpr,
):
    # One (row block, batch, kv head, split) program: the loop of _attn_fwd_kernel over this
    # split's keys [start, end) only. Launched with KVCACHE=True against a KV cache (after the
    # step's append, kvcache_append.py); with KVCACHE=False and PAGE_SIZE=0 it is the dense
    # program, which _attn_fwd_splitkv_kernel below inlines.
    # GQA packing: the M tile holds the rows (query s, head g of the group) r = s * group_size +
    # g of one kv head, so each K/V tile is read once for all group_size query heads.
    # Grid (cdiv(Sq * group_size, BLOCK_M) * B * Hkv, n_splits): row block fastest, then kv
    # head (sharing axis 0), then split (axis 1: at most MAX_SPLITS by the heuristic).
    # KVCACHE: seqlen_k is the count of new keys S_new, sequence b has cache_seqlens[b] +
    # S_new keys and cuts them itself into n_splits runs of whole key blocks (keys_per_split
    # unused); a split past its sequence's keys loops zero times and writes an empty partial.
    # PAGE_SIZE > 0: the caches are paged (num_blocks, PAGE_SIZE, Hkv, D), the batch strides of
    # k and v are block strides and block_table is (B, max_blocks) int32.
    split = tl.program_id(1)
    n_blocks_r = tl.cdiv(seqlen_q * group_size, BLOCK_M)
    pid_r = tl.program_id(0) % n_blocks_r
    pid_bkv = tl.program_id(0) // n_blocks_r
    b = pid_bkv // n_heads_kv
    kv_h = pid_bkv % n_heads_kv
    h0 = kv_h * group_size  # first query head of the group
    q_base = q_ptr + b.to(tl.int64) * stride_q_batch + h0.to(tl.int64) * stride_q_head
    if PAGE_SIZE == 0:
        k_base = k_ptr + b.to(tl.int64) * stride_k_batch + kv_h.to(tl.int64) * stride_k_head
        v_base = v_ptr + b.to(tl.int64) * stride_v_batch + kv_h.to(tl.int64) * stride_v_head
    else:  # the block of each key is looked up in the loop
        k_base = k_ptr + kv_h.to(tl.int64) * stride_k_head
        v_base = v_ptr + kv_h.to(tl.int64) * stride_v_head

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
    if KVCACHE:
        seqlen_k += tl.load(cache_seqlens_ptr + b)
        keys_per_split = tl.cdiv(tl.cdiv(seqlen_k, BLOCK_N), tl.num_programs(1)) * BLOCK_N
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, seqlen_k)
    if KVCACHE and CAUSAL:
        # the tile's last query sees no key past last_s + diag: more than one key block less
        # only with many queries (a prefill chunk)
        last_s = (tl.minimum(pid_r * BLOCK_M + BLOCK_M, seqlen_q * group_size) - 1) // group_size
        end = tl.minimum(end, last_s + seqlen_k - seqlen_q + 1)
    # every block is masked (the split end, the causal edge of the last keys): decoding is
    # bound by memory, not by the few extra instructions of a mask
    if PAGE_SIZE == 0:
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, s_idx, start, end, end, seqlen_k - seqlen_q,
            softmax_scale_log2, stride_k_seq, stride_v_seq, True, CAUSAL, HEAD_DIM, BLOCK_N,
            BLOCK_D, UPCAST_DOT, DOT_PRECISION)
    else:
        acc, l_i, m_i = _attn_paged_inner(
            acc, l_i, m_i, q, k_base, v_base, block_table_ptr + b.to(tl.int64) * stride_bt_batch,
            s_idx, start, end, seqlen_k - seqlen_q, softmax_scale_log2,
            stride_k_batch, stride_k_seq, stride_v_batch, stride_v_seq, CAUSAL, HEAD_DIM,
            PAGE_SIZE, BLOCK_N, BLOCK_D, UPCAST_DOT, DOT_PRECISION)

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
def _attn_fwd_splitkv_kernel(
    q_ptr, k_ptr, v_ptr, o_part_ptr, lse_part_ptr,
    seqlen_q, seqlen_k, n_heads_q, n_heads_kv, group_size, keys_per_split, softmax_scale_log2,
    stride_q_batch, stride_q_seq, stride_q_head,
    stride_k_batch, stride_k_seq, stride_k_head,
    stride_v_batch, stride_v_seq, stride_v_head,
    stride_op_head, stride_op_split, stride_op_seq,
    stride_lp_head, stride_lp_split,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Dense k, v (B, Sk, Hkv, D), every sequence Sk keys in splits of keys_per_split.
    _attn_kvcache_splitkv_kernel(
        q_ptr, k_ptr, v_ptr, o_part_ptr, lse_part_ptr, None, None,
        seqlen_q, seqlen_k, n_heads_q, n_heads_kv, group_size, keys_per_split, softmax_scale_log2,
        stride_q_batch, stride_q_seq, stride_q_head, stride_k_batch, stride_k_seq, stride_k_head,
        stride_v_batch, stride_v_seq, stride_v_head, stride_op_head, stride_op_split,
        stride_op_seq, stride_lp_head, stride_lp_split, 0,
        CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST_DOT, DOT_PRECISION, False, 0)


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
    # The merge of the split-KV partials of one query row (b, h, s); grid (B * Hq * Sq,).
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
