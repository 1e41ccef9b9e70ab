"""Attention against a KV cache in Triton, the host side: the launcher and its ahead-of-time
cases. Three kernels, launched back to back on the current stream:
    _kvcache_append_kernel        (kvcache_append.py) the new k, v into the caches, rotated,
                                  and q rotated into a scratch tensor; skipped when there is
                                  nothing to write or rotate
    _attn_kvcache_splitkv_kernel  (attention_decode.py) each sequence's cache_seqlens[b] +
                                  S_new keys in splits, fp32 partials
    _attn_splitkv_combine_kernel  (attention_decode.py) the merge of the splits into out

Launcher (called by llama_kernels.ops.flash_attention_kvcache):
    flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k, v, *, block_table,
        rotary_cos, rotary_sin, rotary_interleaved, causal, softmax_scale) -> out
with the semantics of reference.attention_with_kvcache: q (B, Sq, Hq, D); caches (B, S_cache,
Hkv, D), or paged (num_blocks, block_size, Hkv, D) with block_table int32 (B, max_blocks), unit
stride along D (they are written in place, so never copied); cache_seqlens int32 (B,); new k, v
(B, S_new, Hkv, D) or None; tables (rows, D/2). out is contiguous (B, Sq, Hq, D) in q's dtype;
a query that sees no key gets 0. The ops layer checks the values (lengths within the caches,
table entries within the pool) on eager calls; the launcher trusts them.

No host sync: nothing on the launch path reads a device value (a CUDA-graph-captured decode
step calls it). The grids come from static shapes only: the split count from the capacity
(S_cache, or max_blocks * block_size), the append grid from S_new and Sq; each kernel reads the
lengths on the device, and a sequence shorter than the capacity cuts its own keys into the
splits (attention_decode.py).

Any Sq: a decode step (Sq <= DECODE_MAX_SEQLEN_Q) packs Sq * group rows in one tile per kv head;
a prefill chunk against a cache runs the same kernel with more 64-row tiles (each stopping at
its last query's causal edge), every key block masked: correct, not tuned for compute-bound
chunks.

Overrides, keyword-only (tests use them): settings ({"decode" / "combine": AttentionLaunch}, as
flash_attention.py), num_splits (>= 1), out (written instead of a fresh tensor).
"""

from __future__ import annotations

from typing import Mapping

import torch
import triton

from llama_kernels.triton import _aot
from llama_kernels.triton._attention_common import LOG2E, _dot_flags
from llama_kernels.triton.attention_decode import (SPLIT_CHUNK, _attn_kvcache_splitkv_kernel,
                                                   _attn_splitkv_combine_kernel)
from llama_kernels.triton.attention_launch import (AttentionLaunch, _device_arch, _num_sms,
                                                   attention_launch_settings,
                                                   num_splits_heuristic)
from llama_kernels.triton.flash_attention import (MAX_HEAD_DIM, _check_output, _check_overrides,
                                                  _device_guard, _settings, _strides, _unit_last)
from llama_kernels.triton.kvcache_append import _kvcache_append_kernel, append_launch_settings


def unsupported_reason(q: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor) -> str | None:
    """Why these (otherwise valid) inputs cannot run here, or None."""
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} (the triton kernels take head_dim <= {MAX_HEAD_DIM})"
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        return "caches without unit stride along head_dim (they are written in place)"
    return None


def _append(q, k_cache, v_cache, cache_seqlens, k, v, block_table, cos, sin, interleaved,
            page_size):
    """Launch the append kernel when there are new keys or a rotation; the q to attend with."""
    rotary = cos is not None
    s_new = 0 if k is None else k.shape[1]
    b, sq, hq, d = q.shape
    n_tokens = max(s_new, sq if rotary else 0)
    if n_tokens == 0:
        return q
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if rotary else None
    if s_new:
        k, v = _unit_last(k), _unit_last(v)
    if rotary:
        cos, sin = _unit_last(cos), _unit_last(sin)
    s = append_launch_settings(max(hq, k_cache.shape[2]), d)
    _kvcache_append_kernel[(b * n_tokens,)](
        q, k, v, k_cache, v_cache, q_out, cache_seqlens, block_table, cos, sin,
        sq, s_new, n_tokens, hq, k_cache.shape[2], d,
        *_strides(q), *(_strides(k) if s_new else (0, 0, 0)),
        *(_strides(v) if s_new else (0, 0, 0)), *_strides(k_cache), *_strides(v_cache),
        *(_strides(q_out) if rotary else (0, 0, 0)),
        block_table.stride(0) if page_size else 0,
        cos.stride(0) if rotary else 0, sin.stride(0) if rotary else 0,
        APPEND=bool(s_new), ROTARY=rotary, INTERLEAVED=bool(interleaved), PAGE_SIZE=page_size,
        BLOCK_H=s.block_h, BLOCK_D=s.block_d, num_warps=s.num_warps, num_stages=1,
    )
    return q_out if rotary else q


def _combine(o_part, lse_part, out, lse, cfg: AttentionLaunch) -> None:
    """The merge of the split partials o_part (B * Hq, n_splits, Sq, D), lse_part into out
    (B, Sq, Hq, D) and lse (B, Hq, Sq): one program per query row."""
    n_rows, n_splits, sq, d = o_part.shape
    _attn_splitkv_combine_kernel[(n_rows * sq,)](
        o_part, lse_part, out, lse, sq, out.shape[2], n_splits,
        *o_part.stride()[:3], *lse_part.stride()[:2], *_strides(out),
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_SPLITS=max(SPLIT_CHUNK, triton.next_power_of_2(n_splits)), SPLIT_CHUNK=SPLIT_CHUNK,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def flash_attention_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 cache_seqlens: torch.Tensor, k: torch.Tensor | None = None,
                                 v: torch.Tensor | None = None, *,
                                 block_table: torch.Tensor | None = None,
                                 rotary_cos: torch.Tensor | None = None,
                                 rotary_sin: torch.Tensor | None = None,
                                 rotary_interleaved: bool = False, causal: bool = True,
                                 softmax_scale: float | None = None,
                                 settings: Mapping[str, AttentionLaunch] | None = None,
                                 num_splits: int | None = None,
                                 out: torch.Tensor | None = None) -> torch.Tensor:
    """One attention step against a KV cache (module docstring); writes k, v into the caches."""
    why = unsupported_reason(q, k_cache, v_cache)
    if why is not None:
        raise ValueError(f"flash_attention_with_kvcache: triton does not support {why}")
    settings = _check_overrides(settings, num_splits)
    q = _unit_last(q)
    b, sq, hq, d = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    page_size = k_cache.shape[1] if block_table is not None else 0
    if page_size:
        block_table = _unit_last(block_table)
        capacity = page_size * block_table.shape[1]
    else:
        capacity = k_cache.shape[1]
    cache_seqlens = cache_seqlens.contiguous()
    s_new = 0 if k is None else k.shape[1]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _check_output("out", out, q.shape, q.dtype, q.device)
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    arch = _device_arch(q.device)
    block_d = max(16, triton.next_power_of_2(d))
    with _device_guard(q.device):
        q_attn = _append(q, k_cache, v_cache, cache_seqlens, k, v, block_table, rotary_cos,
                         rotary_sin, rotary_interleaved, page_size)
        cfg = _settings("decode", settings, d, arch, rows=sq * group,
                        elem_bytes=q.element_size())
        row_blocks = triton.cdiv(sq * group, cfg.block_m)
        if num_splits is None:
            num_splits = num_splits_heuristic(b * hkv * row_blocks,
                                              triton.cdiv(capacity, cfg.block_n),
                                              _num_sms(q.device))
        o_part = torch.empty((b * hq, num_splits, sq, d), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((b * hq, num_splits, sq), dtype=torch.float32, device=q.device)
        lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
        _attn_kvcache_splitkv_kernel[(row_blocks * b * hkv, num_splits)](
            q_attn, k_cache, v_cache, o_part, lse_part, cache_seqlens, block_table,
            sq, s_new, hq, hkv, group, 0, scale * LOG2E,
            *_strides(q_attn), *_strides(k_cache), *_strides(v_cache),
            *o_part.stride()[:3], *lse_part.stride()[:2],
            block_table.stride(0) if page_size else 0,
            CAUSAL=bool(causal), HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_D=block_d, KVCACHE=True, PAGE_SIZE=page_size, **_dot_flags(q.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        _combine(o_part, lse_part, out, lse, _settings("combine", settings, d, arch))
    return out


# ------------------------------------------------------------------------------ AOT cases

# The split-KV kernel against a cache at the settings attention_launch_settings picks per arch
# (each case for one arch, AOT_CASE_ARCH[case.name], as flash_attention.AOT_CASES), and the
# append kernel's cases (kvcache_append.AOT_CASES, the same on every arch): tests/
# test_triton_kvcache.py compiles both for sm_80 and sm_90.
AOT_ARCHS = (80, 90)
AOT_HEAD_DIMS = (64, 128)
# (packed rows Sq * group, page size (0: contiguous), dtype): a 1 x 4 GQA decode step and a
# 16-token speculative step of 8 heads a group (flash_attention.AOT_DECODE_ROWS), contiguous
# and in pages of 16.
AOT_KVCACHE = ((4, 0, "fp16"), (4, 16, "bf16"), (128, 16, "fp16"), (128, 0, "bf16"))
# Sizes that are not multiples of 16 at real shapes (no divisibility hint).
_NOT_DIVISIBLE = ("seqlen_q", "seqlen_k", "n_heads_q", "n_heads_kv", "group_size")


def _aot_cases() -> tuple[list[_aot.AotCase], dict[str, int]]:
    cases, arch_of = [], {}
    fn = _attn_kvcache_splitkv_kernel
    for arch in AOT_ARCHS:
        for d in AOT_HEAD_DIMS:
            for rows, page, dtype in AOT_KVCACHE:
                cfg = attention_launch_settings("decode", d, (arch // 10, arch % 10), rows=rows)
                types = {a: "*" + dtype if a.endswith("_ptr") else "i32" for a in fn.arg_names}
                types.update(o_part_ptr="*fp32", lse_part_ptr="*fp32", cache_seqlens_ptr="*i32",
                             block_table_ptr="*i32", softmax_scale_log2="fp32")
                # keys_per_split is 0 (unused): Triton passes it as an int divisible by 16
                name = (f"attn_kvcache rows={rows}{f' page={page}' if page else ''} d{d} "
                        f"{dtype} sm_{arch}")
                cases.append(_aot.case(
                    name, fn, types=types, none=() if page else ("block_table_ptr",),
                    constexprs=dict(CAUSAL=True, HEAD_DIM=d, BLOCK_M=cfg.block_m,
                                    BLOCK_N=cfg.block_n, BLOCK_D=d, UPCAST_DOT=False,
                                    DOT_PRECISION="tf32", KVCACHE=True, PAGE_SIZE=page),
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                    not_divisible=_NOT_DIVISIBLE))
                arch_of[name] = arch
    return cases, arch_of


AOT_CASES, AOT_CASE_ARCH = _aot_cases()
