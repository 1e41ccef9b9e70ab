"""The append step of attention with a KV cache, in Triton: write the new keys and values into
the caches (contiguous or paged) in place, rotated first, and rotate the queries into a scratch
tensor, all at the positions cache_seqlens[b] + i.

One program per (sequence b, new token i), i < max(S_new, Sq if rotating else 0):
    i < S_new:  k[b, i] (all Hkv heads), rotated at position p = cache_seqlens[b] + i when
                ROTARY, goes to cache row p; v[b, i] is copied there unrotated
    i < Sq:     q[b, i] (all Hq heads) rotated at p into q_out[b, i] (ROTARY only)
Cache row p of sequence b is k_cache[b, p] (PAGE_SIZE = 0), or row p % PAGE_SIZE of block
block_table[b, p // PAGE_SIZE] of a paged cache (num_blocks, PAGE_SIZE, Hkv, D). Only the
table entries of the new rows are read; the split-KV kernel (attention_decode.py) then reads
the caches.

Rotation (reference.apply_rotary): each pair (a, b) of a head turns by the angle of table row
p, (a cos - b sin, a sin + b cos), in fp32; the pairs are (x[2i], x[2i + 1]) when INTERLEAVED,
else (x[i], x[i + D/2]). Written per element d: out[d] = x[d] cos[i_d] + sign_d x[partner_d]
sin[i_d], with i_d its pair, partner_d the other element of the pair, sign_d -1 for the first
element of a pair and +1 for the second; x[partner] is a second load of the same row (cached).

Preconditions (the launcher, flash_attention_kvcache.py, checks or arranges them): unit stride
along head_dim everywhere; D even when ROTARY, BLOCK_D = next_pow2(D); cos, sin (rows, D/2)
with unit stride along D/2 and rows > every position p; positions p within the caches, and,
when paged, the table entries of the new rows naming blocks of the pool.
"""

from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl

from llama_kernels.triton import _aot


@triton.jit
def _copy_heads(src, dst, n_heads, stride_src_head, stride_dst_head, offs_d, d_ok, partner,
                cos, sin, ROTARY: tl.constexpr, BLOCK_H: tl.constexpr):
    """The (n_heads, D) rows at src to dst, BLOCK_H heads a step; rotated when ROTARY (cos, sin
    per element, sin already signed), else copied bit for bit."""
    for h_start in range(0, n_heads, BLOCK_H):
        h = (h_start + tl.arange(0, BLOCK_H)).to(tl.int64)
        ok = (h < n_heads)[:, None] & d_ok[None, :]
        row = src + h[:, None] * stride_src_head
        x = tl.load(row + offs_d[None, :], mask=ok)
        if ROTARY:
            pair = tl.load(row + partner[None, :], mask=ok).to(tl.float32)
            x = x.to(tl.float32) * cos[None, :] + pair * sin[None, :]
        tl.store(dst + h[:, None] * stride_dst_head + offs_d[None, :],
                 x.to(dst.dtype.element_ty), mask=ok)


@triton.jit
def _kvcache_append_kernel(
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, q_out_ptr, cache_seqlens_ptr,
    block_table_ptr, cos_ptr, sin_ptr,
    seqlen_q, seqlen_new, n_tokens, n_heads_q, n_heads_kv, head_dim,
    stride_q_batch, stride_q_seq, stride_q_head,
    stride_k_batch, stride_k_seq, stride_k_head,
    stride_v_batch, stride_v_seq, stride_v_head,
    stride_kc_batch, stride_kc_seq, stride_kc_head,
    stride_vc_batch, stride_vc_seq, stride_vc_head,
    stride_qo_batch, stride_qo_seq, stride_qo_head,
    stride_bt_batch, stride_cos_row, stride_sin_row,
    APPEND: tl.constexpr, ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Grid (B * n_tokens,), n_tokens = max(S_new, Sq if ROTARY else 0): token fastest. APPEND:
    # there are new keys and values (k, v, the caches are read only then).
    pid = tl.program_id(0)
    b = (pid // n_tokens).to(tl.int64)
    i = pid % n_tokens
    pos = tl.load(cache_seqlens_ptr + b) + i
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    partner = offs_d
    cos = tl.zeros((BLOCK_D,), dtype=tl.float32)
    sin = cos
    if ROTARY:
        half = head_dim // 2
        if INTERLEAVED:
            pair = offs_d // 2
            first = offs_d % 2 == 0
            partner = offs_d ^ 1
        else:
            first = offs_d < half
            pair = tl.where(first, offs_d, offs_d - half)
            partner = tl.where(first, offs_d + half, offs_d - half)
        pos64 = pos.to(tl.int64)
        cos = tl.load(cos_ptr + pos64 * stride_cos_row + pair, mask=d_ok, other=0.0)
        sin = tl.load(sin_ptr + pos64 * stride_sin_row + pair, mask=d_ok, other=0.0)
        cos = cos.to(tl.float32)
        sin = tl.where(first, -sin.to(tl.float32), sin.to(tl.float32))
    if APPEND:  # nested: the branch must not be compiled without k, v
        if i < seqlen_new:
            if PAGE_SIZE == 0:
                kc_row = k_cache_ptr + b * stride_kc_batch + pos.to(tl.int64) * stride_kc_seq
                vc_row = v_cache_ptr + b * stride_vc_batch + pos.to(tl.int64) * stride_vc_seq
            else:
                block = tl.load(block_table_ptr + b * stride_bt_batch + pos // PAGE_SIZE)
                row = (pos % PAGE_SIZE).to(tl.int64)
                kc_row = k_cache_ptr + block.to(tl.int64) * stride_kc_batch + row * stride_kc_seq
                vc_row = v_cache_ptr + block.to(tl.int64) * stride_vc_batch + row * stride_vc_seq
            _copy_heads(k_ptr + b * stride_k_batch + i * stride_k_seq, kc_row, n_heads_kv,
                        stride_k_head, stride_kc_head, offs_d, d_ok, partner, cos, sin, ROTARY,
                        BLOCK_H)
            _copy_heads(v_ptr + b * stride_v_batch + i * stride_v_seq, vc_row, n_heads_kv,
                        stride_v_head, stride_vc_head, offs_d, d_ok, partner, cos, sin, False,
                        BLOCK_H)
    if ROTARY:
        if i < seqlen_q:
            _copy_heads(q_ptr + b * stride_q_batch + i * stride_q_seq,
                        q_out_ptr + b * stride_qo_batch + i * stride_qo_seq, n_heads_q,
                        stride_q_head, stride_qo_head, offs_d, d_ok, partner, cos, sin, True,
                        BLOCK_H)


# ------------------------------------------------------------------------------ settings

# Elements per head step: 2048 over 4 warps = 16 a thread (two 128-bit accesses of a 16-bit
# type), with the partner element and the fp32 tables beside them.
STEP_ELEMS = 2048
NUM_WARPS = 4


class AppendLaunch(NamedTuple):
    block_h: int
    block_d: int
    num_warps: int


def append_launch_settings(n_heads: int, head_dim: int) -> AppendLaunch:
    """Launch settings of the append kernel for the larger of Hq and Hkv heads; used by the
    launcher and AOT_CASES."""
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(max(1, STEP_ELEMS // block_d), triton.next_power_of_2(n_heads))
    num_warps = min(NUM_WARPS, max(1, block_h * block_d // 256))  # >= 8 values a thread
    return AppendLaunch(block_h, block_d, num_warps)


# ------------------------------------------------------------------------------ AOT cases

AOT_HEAD_DIMS = (64, 128)
AOT_HEADS = (32, 8)  # LLaMA-2 70B-like GQA: Hq, Hkv


def _aot_cases() -> list[_aot.AotCase]:
    cases = []
    hq, hkv = AOT_HEADS
    for head_dim in AOT_HEAD_DIMS:
        s = append_launch_settings(hq, head_dim)
        for dtype, rotary, interleaved, page in (("fp16", False, False, 0),
                                                 ("bf16", True, False, 16),
                                                 ("fp16", True, True, 0)):
            t = "*" + dtype
            types = {a: t if a.endswith("_ptr") else "i32"
                     for a in _kvcache_append_kernel.arg_names}
            types.update(cache_seqlens_ptr="*i32", block_table_ptr="*i32", cos_ptr="*fp32",
                         sin_ptr="*fp32")
            none = tuple(n for n, used in (("q_out_ptr", rotary), ("cos_ptr", rotary),
                                           ("sin_ptr", rotary), ("block_table_ptr", page))
                         if not used)
            name = (f"kvcache_append d={head_dim} {dtype}"
                    f"{' rotary' if rotary else ''}{' inter' if interleaved else ''}"
                    f"{f' page={page}' if page else ''}")
            cases.append(_aot.case(
                name, _kvcache_append_kernel, types=types, none=none,
                constexprs=dict(APPEND=True, ROTARY=rotary, INTERLEAVED=interleaved, PAGE_SIZE=page,
                                BLOCK_H=s.block_h, BLOCK_D=s.block_d),
                num_warps=s.num_warps, num_stages=1,
                not_divisible=("seqlen_q", "seqlen_new", "n_tokens", "n_heads_kv")))
    return cases


AOT_CASES = _aot_cases()
