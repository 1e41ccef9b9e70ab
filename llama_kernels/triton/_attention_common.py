"""What the attention kernels share: their layouts, the base-2 softmax convention, and the
@triton.jit helpers that the forward (attention_fwd.py), decode (attention_decode.py) and
backward (attention_bwd.py) kernels inline.

Layouts: q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D), addressed through their batch, sequence
and head strides with unit stride along D (head_dim); query head h reads kv head
h // group_size, group_size = Hq // Hkv. The causal mask is aligned bottom-right: query i sees
keys j <= i + diag, diag = Sk - Sq. Tiles are BLOCK_M query rows by BLOCK_N keys by BLOCK_D =
next_pow2(D) >= 16 columns; the columns past D are masked.

Base 2: the kernels keep every score as s2 = softmax_scale_log2 * q . k with
softmax_scale_log2 = softmax_scale * log2(e), so that exp(s) = exp2(s2), and turn a base-2
log-sum-exp into the natural-log lse the launchers return as (m2 + log2 l) * ln 2. They spell
log2(e) = 1.4426950408889634 and ln(2) = 0.6931471805599453 as literals: a @triton.jit
function reads only the module globals that are tl.constexpr, and a literal works the same on
Triton 3.6 and 3.8. LOG2E is the host's copy.

Grids: the (batch, head) programs share grid axis 0 with the query or key blocks, because
axes 1 and 2 stop at 65535, which B * Hq passes in large batches (2048 sequences x 32 heads).

Packed sequences (the VARLEN constexpr of the forward and backward kernels): q (total_q, Hq,
D), k and v (total_k, Hkv, D); sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q and
cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k and v (int32 (B + 1,), a sequence may be empty) and
attends only to itself, the causal mask aligned bottom-right per sequence (diag = Sk_b - Sq_b,
negative when a sequence has more queries than keys). lse (and the backward's delta) is fp32
(Hq, total_q). The grid is the dense one sized by max_seqlen; a program reads its sequence's
first rows and lengths (_sequence) and one past the sequence's end exits at once. A packed
tensor's row stride serves as its batch stride too (_packed_strides), so the dense addressing
b * stride_batch becomes first_row * stride_row. A query that sees no key (an empty key
sequence, or the first Sq_b - Sk_b queries of a causal one) gets out = 0, lse = -inf and zero
gradients.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# Read once: Triton itself reads TRITON_INTERPRET when it is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


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
def _varlen_seq(cu_seqlens_ptr, b):
    """Packed sequence b's (first row, length), from its cu_seqlens (int32 (B + 1,))."""
    row = tl.load(cu_seqlens_ptr + b)
    return row, tl.load(cu_seqlens_ptr + b + 1) - row


@triton.jit
def _packed_strides(stride_row, stride_head):
    """A packed tensor's (batch, sequence, head) strides as the programs take them: the row
    stride twice, since a program offsets its sequence by the first row times the batch
    stride."""
    return stride_row, stride_row, stride_head


@triton.jit
def _sequence(cu_seqlens_q_ptr, cu_seqlens_k_ptr, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """Batch entry b's (first q row, Sq, first k row, Sk): dense, b itself (the kernels scale
    it by the batch strides) and the given lengths; VARLEN, its packed rows and lengths."""
    row_q, row_k = b, b
    if VARLEN:
        row_q, seqlen_q = _varlen_seq(cu_seqlens_q_ptr, b)
        row_k, seqlen_k = _varlen_seq(cu_seqlens_k_ptr, b)
    return row_q, seqlen_q, row_k, seqlen_k


@triton.jit
def _load_lse2(lse_row, offs_m, m_ok, VARLEN: tl.constexpr):
    """The backward's base-2 lse of rows offs_m: +inf for rows past Sq (their P is exactly 0)
    and, under VARLEN, for rows that saw no key (lse -inf: their scores are all masked to
    -inf, and P = exp2(s2 - lse2) would be exp2(-inf - -inf) = NaN)."""
    lse2 = tl.load(lse_row + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
    if VARLEN:
        lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
    return lse2


def _dot_flags(dtype: torch.dtype) -> dict:
    """The UPCAST_DOT and DOT_PRECISION constexprs (see _dot) of a kernel taking ``dtype``."""
    return dict(UPCAST_DOT=INTERPRET and dtype == torch.bfloat16,
                DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")
