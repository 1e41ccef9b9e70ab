"""Rotary position embedding in Triton (forward; the backward is the same kernel, conjugated).

Launcher (called by llama_kernels.ops.rotary):
    rotary(x, cos, sin, positions, interleaved, conjugate) -> out
x (B, S, H, D) with unit stride along D and any strides over B, S, H (q and k sliced out of a
fused qkv projection); cos/sin fp32 contiguous (T, D/2); positions None or int64 (B, S).
Output contiguous (B, S, H, D) in x's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from llama_kernels.triton import _aot


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, pos_ptr, out_ptr,
    n_tokens, seqlen, n_heads, head_dim,
    stride_x_batch, stride_x_seq, stride_x_head,
    stride_out_batch, stride_out_seq, stride_out_head,
    stride_cos_row, stride_sin_row, stride_pos_batch, stride_pos_seq,
    HAS_POSITIONS: tl.constexpr, INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # Forward:  each pair (a, b) of a head is rotated by the angle t of its token's table row
    #           r (r = positions[b, s], or s):  (a cos t - b sin t, a sin t + b cos t),
    #           cos t = cos[r, i] for pair i. Pairs are (x[2i], x[2i+1]) when INTERLEAVED,
    #           else (x[i], x[i + D/2]).
    # Backward: the rotation by -t (CONJUGATE, sin negated), since R(t)^T = R(-t).
    # Each program takes BLOCK_T tokens (flattened over batch and sequence), loads their table
    # rows once, and walks all heads BLOCK_H at a time. Every access to x and out is a
    # contiguous run: the two halves, or (INTERLEAVED) the whole row split into even/odd
    # lanes in registers.
    # Preconditions: unit stride along D; D even, BLOCK_HALF >= D/2; tables fp32 (T, D/2) with
    # unit stride along D/2; rows r within the tables (checked by the caller).
    pid = tl.program_id(0).to(tl.int64)
    tok = pid * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    tok_mask = tok < n_tokens
    b = tok // seqlen
    s = tok % seqlen
    if HAS_POSITIONS:
        r = tl.load(pos_ptr + b * stride_pos_batch + s * stride_pos_seq, mask=tok_mask, other=0)
        r = r.to(tl.int64)
    else:
        r = s

    half = head_dim // 2
    i = tl.arange(0, BLOCK_HALF)
    tab_mask = tok_mask[:, None] & (i < half)[None, :]
    c = tl.load(cos_ptr + r[:, None] * stride_cos_row + i[None, :], mask=tab_mask, other=0.0)
    sn = tl.load(sin_ptr + r[:, None] * stride_sin_row + i[None, :], mask=tab_mask, other=0.0)
    c = c.to(tl.float32)[:, None, :]
    sn = sn.to(tl.float32)[:, None, :]
    if CONJUGATE:
        sn = -sn

    x_tok = (b * stride_x_batch + s * stride_x_seq)[:, None, None]
    out_tok = (b * stride_out_batch + s * stride_out_seq)[:, None, None]
    for h0 in range(0, n_heads, BLOCK_H):
        h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
        tok_head_mask = tok_mask[:, None, None] & (h < n_heads)[None, :, None]
        x_head = x_ptr + x_tok + h[None, :, None] * stride_x_head
        out_head = out_ptr + out_tok + h[None, :, None] * stride_out_head
        if INTERLEAVED:
            d = tl.arange(0, 2 * BLOCK_HALF)
            mask = tok_head_mask & (d < head_dim)[None, None, :]
            xv = tl.load(x_head + d[None, None, :], mask=mask, other=0.0).to(tl.float32)
            xa, xb = tl.split(tl.reshape(xv, (BLOCK_T, BLOCK_H, BLOCK_HALF, 2)))
            out = tl.join(xa * c - xb * sn, xa * sn + xb * c)
            out = tl.reshape(out, (BLOCK_T, BLOCK_H, 2 * BLOCK_HALF))
            tl.store(out_head + d[None, None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            mask = tok_head_mask & (i < half)[None, None, :]
            xa = tl.load(x_head + i[None, None, :], mask=mask, other=0.0).to(tl.float32)
            xb = tl.load(x_head + half + i[None, None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(out_head + i[None, None, :], (xa * c - xb * sn).to(out_ptr.dtype.element_ty),
                     mask=mask)
            tl.store(out_head + half + i[None, None, :],
                     (xa * sn + xb * c).to(out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------ settings

# Tokens per program: 4 when there are that many (a few tokens share one program so its
# head loop is long enough to hide latency; flash-attn's rotary uses 4-8), fewer at decode.
MAX_BLOCK_T = 4
# Elements per loop step: 2048 over 4 warps = 16 values per thread (two 128-bit accesses of a
# 16-bit type) plus the table values, well under the register limit (AOT_CASES).
STEP_ELEMS = 2048
NUM_WARPS = 4


class RotaryLaunch(NamedTuple):
    block_t: int
    block_h: int
    block_half: int
    num_warps: int
    num_stages: int


def rotary_launch_settings(n_tokens: int, n_heads: int, head_dim: int) -> RotaryLaunch:
    """Launch settings of the rotary kernel; used by the launcher and AOT_CASES."""
    block_half = triton.next_power_of_2(head_dim // 2)
    block_d = 2 * block_half
    block_t = min(MAX_BLOCK_T, triton.next_power_of_2(n_tokens))
    block_h = min(max(1, STEP_ELEMS // (block_t * block_d)), triton.next_power_of_2(n_heads))
    num_warps = min(NUM_WARPS, max(1, block_t * block_h * block_d // 256))  # >= 8 per thread
    # one stage: the head loop is a few steps (H / BLOCK_H), not worth prefetch buffers
    return RotaryLaunch(block_t, block_h, block_half, num_warps, 1)


# ------------------------------------------------------------------------------ launchers


def _launch(x, cos, sin, positions, interleaved, conjugate, out, settings=None):
    if x.dim() != 4 or x.stride(-1) != 1 or x.shape[-1] % 2:
        raise ValueError(f"x: expected (B, S, H, D) with even D and unit stride along D, got "
                         f"shape {tuple(x.shape)} strides {x.stride()}")
    batch, seqlen, n_heads, head_dim = x.shape
    if out.shape != x.shape or out.stride(-1) != 1:
        raise ValueError(f"out: expected shape {tuple(x.shape)} with unit stride along D")
    for name, t in (("cos", cos), ("sin", sin)):
        if (t.dim() != 2 or t.shape[1] != head_dim // 2 or t.stride(1) != 1
                or t.dtype != torch.float32):
            raise ValueError(f"{name}: expected fp32 (rows, {head_dim // 2}) with unit stride, "
                             f"got {t.dtype} {tuple(t.shape)} strides {t.stride()}")
    if positions is None and cos.shape[0] < seqlen:
        raise ValueError(f"cos: expected at least {seqlen} rows without positions")
    if positions is not None and (positions.shape != (batch, seqlen)
                                  or positions.dtype != torch.int64):
        raise ValueError(f"positions: expected int64 {(batch, seqlen)}, got "
                         f"{positions.dtype} {tuple(positions.shape)}")
    n_tokens = batch * seqlen
    s = settings or rotary_launch_settings(n_tokens, n_heads, head_dim)
    has_pos = positions is not None
    _rotary_kernel[(triton.cdiv(n_tokens, s.block_t),)](
        x, cos, sin, positions, out,
        n_tokens, seqlen, n_heads, head_dim,
        x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        cos.stride(0), sin.stride(0),
        positions.stride(0) if has_pos else 0, positions.stride(1) if has_pos else 0,
        HAS_POSITIONS=has_pos, INTERLEAVED=bool(interleaved), CONJUGATE=bool(conjugate),
        BLOCK_T=s.block_t, BLOCK_H=s.block_h, BLOCK_HALF=s.block_half,
        num_warps=s.num_warps, num_stages=s.num_stages,
    )


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           positions: torch.Tensor | None, interleaved: bool, conjugate: bool, *,
           settings=None) -> torch.Tensor:
    """x rotated by the tables (by minus the angles when ``conjugate``), contiguous."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, cos, sin, positions, interleaved, conjugate, out, settings)
    return out


# ------------------------------------------------------------------------------ AOT cases

AOT_HEAD_DIMS = (64, 128)
AOT_HEADS = 32  # the 7B model; more heads only lengthen the head loop
# (tokens, with positions): training/prefill without positions, decoding a batch of 8 with them
AOT_SHAPES = ((8 * 2048, False), (8, True))


def _aot_cases() -> list[_aot.AotCase]:
    # Triton's launcher turns an integer argument equal to 1 into a constexpr: at decoding,
    # seqlen and both strides of a (B, 1) positions tensor.
    decode_ones = dict(seqlen=1, stride_pos_batch=1, stride_pos_seq=1)
    cases = []
    for dtype in ("fp16", "bf16"):
        t = "*" + dtype
        for head_dim in AOT_HEAD_DIMS:
            for n_tokens, has_pos in AOT_SHAPES:
                s = rotary_launch_settings(n_tokens, AOT_HEADS, head_dim)
                # conjugate is the backward, run in training only (no positions)
                for interleaved, conjugate in ((False, False), (True, False),
                                               *(((False, True), (True, True)) if not has_pos
                                                 else ())):
                    name = (f"rotary d={head_dim} tokens={n_tokens}"
                            f"{' pos' if has_pos else ''}{' inter' if interleaved else ''}"
                            f"{' conj' if conjugate else ''} {dtype}")
                    cases.append(_aot.case(
                        name, _rotary_kernel,
                        types=dict(x_ptr=t, cos_ptr="*fp32", sin_ptr="*fp32", pos_ptr="*i64",
                                   out_ptr=t, n_tokens="i32", seqlen="i32", n_heads="i32",
                                   head_dim="i32", stride_x_batch="i32", stride_x_seq="i32",
                                   stride_x_head="i32", stride_out_batch="i32",
                                   stride_out_seq="i32", stride_out_head="i32",
                                   stride_cos_row="i32", stride_sin_row="i32",
                                   stride_pos_batch="i32", stride_pos_seq="i32"),
                        none=() if has_pos else ("pos_ptr",),
                        constexprs=dict(HAS_POSITIONS=has_pos, INTERLEAVED=interleaved,
                                        CONJUGATE=conjugate, BLOCK_T=s.block_t,
                                        BLOCK_H=s.block_h, BLOCK_HALF=s.block_half,
                                        **decode_ones if has_pos else {}),
                        num_warps=s.num_warps, num_stages=s.num_stages))
    return cases


AOT_CASES = _aot_cases()
