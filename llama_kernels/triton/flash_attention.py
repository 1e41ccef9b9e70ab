"""Flash attention in Triton, the host side: input checks, launchers and the ahead-of-time
case list. The math and the kernels are in one file per kernel family:
    attention_fwd.py      prefill forward (FlashAttention-2): out, lse
    attention_decode.py   split-KV (flash-decoding) forward for Sq <= DECODE_MAX_SEQLEN_Q, and
                          the merge of its splits
    attention_bwd.py      backward: delta, dK and dV, dQ (deterministic, no atomics)
    attention_bwd_blocked.py  the backward's second structure: one kernel whose programs do
                          dK, dV of a key block and then dQ of a query block (Triton's
                          fused-attention tutorial), after the same delta kernel
    attention_launch.py   block sizes, warps and stages (attention_launch_settings), the decode
                          threshold and split count
    _attention_common.py  layouts, base-2 convention and the @triton.jit helpers they share

Launchers (called by llama_kernels.ops.flash_attention):
    flash_attention_fwd(q, k, v, causal, softmax_scale) -> (out, lse)
    flash_attention_bwd(dout, q, k, v, out, lse, causal, softmax_scale) -> (dq, dk, dv)
q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D) with any strides over batch, sequence and head (a
tensor whose last dimension is not unit-stride is copied first); 1 <= D <= MAX_HEAD_DIM;
Hq % Hkv == 0 and query head h reads kv head h // (Hq // Hkv); Sk >= 1, and with causal=True,
Sq <= Sk and the mask is aligned bottom-right (query i sees keys j <= i + Sk - Sq). out is
contiguous in q's dtype, lse fp32 (B, Hq, Sq) is the natural-log log-sum-exp of the scaled
scores over the visible keys; dq, dk, dv are contiguous with the shapes and dtypes of q, k, v
(dk, dv summed over each query-head group).

Overrides, keyword-only (the ops layer passes none; tests use them to reach paths, split counts
and tile shapes the rules would not pick at test sizes):
    settings    {kernel name: AttentionLaunch}, for names in KERNELS: replaces
                attention_launch_settings for those kernels, the others keep theirs
    decode      (forward) True / False takes the split-KV / prefill path; default
                Sq <= DECODE_MAX_SEQLEN_Q
    num_splits  (forward, decode path) key splits, >= 1; default num_splits_heuristic
    structure   (backward) "split" or "blocked" (BWD_STRUCTURES); default: "blocked" when
                settings has a bwd_blocked entry, "split" when it has bwd_dkdv or bwd_dq
                (so a tuning run times the structure it names), else
                attention_bwd_structure
Output buffers, keyword-only: out, lse (forward) and dq, dk, dv (backward) are written instead
of fresh tensors: the given shape and dtype, unit stride along head_dim (lse contiguous).

The launchers read the kernels as globals of this module (tests replace them here to record
launch grids).
"""

from __future__ import annotations

import contextlib
from typing import Mapping

import torch
import triton

from llama_kernels.triton import _aot
from llama_kernels.triton._attention_common import LOG2E, _dot_flags
from llama_kernels.triton.attention_bwd import (_attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel,
                                                _attn_bwd_preprocess_kernel)
from llama_kernels.triton.attention_bwd_blocked import _attn_bwd_blocked_kernel, mask_block
from llama_kernels.triton.attention_decode import (SPLIT_CHUNK, _attn_fwd_splitkv_kernel,
                                                   _attn_splitkv_combine_kernel)
from llama_kernels.triton.attention_fwd import _attn_fwd_kernel
from llama_kernels.triton.attention_launch import (BWD_STRUCTURES, DECODE_MAX_SEQLEN_Q, KERNELS,
                                                   MAX_SPLITS, AttentionLaunch, _device_arch,
                                                   _num_sms, attention_bwd_structure,
                                                   attention_launch_settings,
                                                   num_splits_heuristic)

MAX_HEAD_DIM = 256


# ------------------------------------------------------------------------------ checks, helpers


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


def _check_overrides(settings: Mapping[str, AttentionLaunch] | None,
                     num_splits: int | None = None) -> Mapping[str, AttentionLaunch]:
    settings = settings or {}
    for kernel, s in settings.items():
        if kernel not in KERNELS or not isinstance(s, AttentionLaunch):
            raise ValueError(f"settings: expected {{kernel: AttentionLaunch}} with kernels from "
                             f"{KERNELS}, got {kernel!r}: {s!r}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits: expected >= 1, got {num_splits}")
    return settings


def _settings(kernel: str, overrides: Mapping[str, AttentionLaunch], head_dim: int,
              arch: tuple[int, int] | None, **kwargs) -> AttentionLaunch:
    """overrides[kernel] when the caller gave one, else attention_launch_settings."""
    if kernel in overrides:
        return overrides[kernel]
    return attention_launch_settings(kernel, head_dim, arch, **kwargs)


# ------------------------------------------------------------------------------ launchers


def flash_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                        softmax_scale: float, *,
                        settings: Mapping[str, AttentionLaunch] | None = None,
                        decode: bool | None = None, num_splits: int | None = None,
                        out: torch.Tensor | None = None, lse: torch.Tensor | None = None):
    """``(out, lse)``: out contiguous (B, Sq, Hq, D) in q's dtype, lse fp32 (B, Hq, Sq).

    ``settings``, ``decode``, ``num_splits`` override the launch rules and ``out``, ``lse``
    are written instead of fresh tensors (module docstring).
    """
    _check_inputs(q, k, v, causal)
    settings = _check_overrides(settings, num_splits)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    arch = _device_arch(q.device)
    if out is None:
        out = torch.empty((b, sq, hq, d), dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    _check_output("out", out, q.shape, q.dtype, q.device)
    _check_output("lse", lse, (b, hq, sq), torch.float32, q.device, contiguous=True)
    block_d = max(16, triton.next_power_of_2(d))
    softmax_scale_log2 = softmax_scale * LOG2E
    meta = dict(CAUSAL=bool(causal), HEAD_DIM=d, BLOCK_D=block_d, **_dot_flags(q.dtype))
    if decode is None:
        decode = sq <= DECODE_MAX_SEQLEN_Q
    with _device_guard(q.device):
        if not decode:
            cfg = _settings("fwd", settings, d, arch, elem_bytes=q.element_size())
            grid = (triton.cdiv(sq, cfg.block_m) * b * hq,)
            _attn_fwd_kernel[grid](
                q, k, v, out, lse,
                sq, sk, hq, hq // hkv, softmax_scale_log2,
                *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **meta,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
            return out, lse
        group = hq // hkv
        cfg = _settings("decode", settings, d, arch, rows=sq * group,
                        elem_bytes=q.element_size())
        row_blocks = triton.cdiv(sq * group, cfg.block_m)
        n_key_blocks = triton.cdiv(sk, cfg.block_n)
        if num_splits is None:
            num_splits = num_splits_heuristic(b * hkv * row_blocks, n_key_blocks,
                                              _num_sms(q.device))
        keys_per_split = triton.cdiv(n_key_blocks, num_splits) * cfg.block_n
        o_part = torch.empty((b * hq, num_splits, sq, d), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((b * hq, num_splits, sq), dtype=torch.float32, device=q.device)
        _attn_fwd_splitkv_kernel[(row_blocks * b * hkv, num_splits)](
            q, k, v, o_part, lse_part,
            sq, sk, hq, hkv, group, keys_per_split, softmax_scale_log2,
            *_strides(q), *_strides(k), *_strides(v),
            o_part.stride(0), o_part.stride(1), o_part.stride(2),
            lse_part.stride(0), lse_part.stride(1),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **meta,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        ccfg = _settings("combine", settings, d, arch)
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
                        *, settings: Mapping[str, AttentionLaunch] | None = None,
                        structure: str | None = None,
                        dq: torch.Tensor | None = None, dk: torch.Tensor | None = None,
                        dv: torch.Tensor | None = None):
    """``(dq, dk, dv)``, contiguous, shapes and dtypes of q, k, v; deterministic (no atomics).

    ``settings`` and ``structure`` override the launch rules and ``dq``, ``dk``, ``dv`` are
    written instead of fresh tensors (module docstring).
    """
    _check_inputs(q, k, v, causal)
    settings = _check_overrides(settings)
    if structure is not None and structure not in BWD_STRUCTURES:
        raise ValueError(f"structure: expected one of {BWD_STRUCTURES}, got {structure!r}")
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
    block_d = max(16, triton.next_power_of_2(d))
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    for name, t, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        _check_output(name, t, like.shape, like.dtype, like.device)
    delta = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    meta = dict(CAUSAL=bool(causal), HEAD_DIM=d, BLOCK_D=block_d, **_dot_flags(q.dtype))
    softmax_scale_log2 = softmax_scale * LOG2E
    if structure is None:
        if "bwd_blocked" in settings:
            structure = "blocked"
        elif "bwd_dkdv" in settings or "bwd_dq" in settings:
            structure = "split"
        else:
            structure = attention_bwd_structure(d, arch, elem_bytes=q.element_size())
    with _device_guard(q.device):
        cfg = _settings("bwd_preprocess", settings, d, arch)
        _attn_bwd_preprocess_kernel[(triton.cdiv(sq, cfg.block_m) * b * hq,)](
            out, dout, delta, sq, hq, *_strides(out), *_strides(dout),
            HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_D=block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if structure == "blocked":
            cfg = _settings("bwd_blocked", settings, d, arch, elem_bytes=q.element_size())
            _attn_bwd_blocked_kernel[(triton.cdiv(max(sq, sk), cfg.block_n) * b * hkv,)](
                q, k, v, dout, lse, delta, dq, dk, dv,
                sq, sk, hq, hkv, hq // hkv, softmax_scale, softmax_scale_log2,
                *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dq),
                *_strides(dk), *_strides(dv),
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, MASK_BLOCK=mask_block(cfg.block_m),
                **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
            return dq, dk, dv
        cfg = _settings("bwd_dkdv", settings, d, arch, elem_bytes=q.element_size())
        _attn_bwd_dkdv_kernel[(triton.cdiv(sk, cfg.block_n) * b * hkv,)](
            q, k, v, dout, lse, delta, dk, dv,
            sq, sk, hq, hkv, hq // hkv, softmax_scale, softmax_scale_log2,
            *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk),
            *_strides(dv),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **meta,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        cfg = _settings("bwd_dq", settings, d, arch, elem_bytes=q.element_size())
        _attn_bwd_dq_kernel[(triton.cdiv(sq, cfg.block_m) * b * hq,)](
            q, k, v, dout, lse, delta, dq,
            sq, sk, hq, hq // hkv, softmax_scale, softmax_scale_log2,
            *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dq),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **meta,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return dq, dk, dv


# ------------------------------------------------------------------------------ AOT cases

# What runs on the target GPUs at the LLaMA head dims: each kernel with the settings
# attention_launch_settings picks for that arch. A case's settings differ per arch, so each
# case is meant for one arch, AOT_CASE_ARCH[case.name]: tests/test_triton_attention.py
# compiles each with _aot.compile_case(case, arch) (the row kernels' AOT_CASES, which hold
# for every arch, go through _aot.all_cases instead).
AOT_ARCHS = (80, 90)
AOT_HEAD_DIMS = (64, 128)
# Decode packs Sq * group rows of a kv head into the M tile: 1 x 4 (LLaMA-2 70B-like GQA,
# 16 rows) and 16 x 8 (a 16-token speculative step with 8 heads per group, 64 rows).
AOT_DECODE_ROWS = (4, 128)
# Sizes that are not multiples of 16 at real shapes (no divisibility hint); strides and
# pointers are (head_dim 64/128 times a head count).
_NOT_DIVISIBLE = ("seqlen_q", "seqlen_k", "n_heads_q", "n_heads_kv", "group_size", "n_splits")


def _aot_case(name, fn, ptr_types: dict, constexprs: dict,
              cfg: AttentionLaunch) -> _aot.AotCase:
    types = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            continue
        if arg.endswith("_ptr"):
            types[arg] = ptr_types.get(arg, ptr_types["default"])
        elif arg in ("softmax_scale_log2", "softmax_scale"):
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
                cfg = attention_launch_settings("fwd", d, cap)
                for causal in (True, False):
                    new.append(_aot_case(
                        f"attn_fwd{'_causal' if causal else ''} {tag}", _attn_fwd_kernel,
                        dict(default=t, lse_ptr=f32),
                        dict(base, CAUSAL=causal, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n),
                        cfg))
                for rows in AOT_DECODE_ROWS:
                    cfg = attention_launch_settings("decode", d, cap, rows=rows)
                    new.append(_aot_case(
                        f"attn_decode rows={rows} {tag}", _attn_fwd_splitkv_kernel,
                        dict(default=t, o_part_ptr=f32, lse_part_ptr=f32),
                        dict(base, CAUSAL=True, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n), cfg))
                cfg = attention_launch_settings("combine", d, cap)
                new.append(_aot_case(
                    f"attn_combine {tag}", _attn_splitkv_combine_kernel,
                    dict(default=f32, out_ptr=t),
                    dict(HEAD_DIM=d, BLOCK_D=d, BLOCK_SPLITS=MAX_SPLITS,
                         SPLIT_CHUNK=SPLIT_CHUNK), cfg))
                cfg = attention_launch_settings("bwd_preprocess", d, cap)
                new.append(_aot_case(
                    f"attn_bwd_preprocess {tag}", _attn_bwd_preprocess_kernel,
                    dict(default=t, delta_ptr=f32),
                    dict(HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_D=d), cfg))
                for kernel, fn in (("bwd_dkdv", _attn_bwd_dkdv_kernel),
                                   ("bwd_dq", _attn_bwd_dq_kernel)):
                    cfg = attention_launch_settings(kernel, d, cap)
                    new.append(_aot_case(
                        f"attn_{kernel}_causal {tag}", fn,
                        dict(default=t, lse_ptr=f32, delta_ptr=f32),
                        dict(base, CAUSAL=True, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n), cfg))
                cfg = attention_launch_settings("bwd_blocked", d, cap)
                for causal in (True, False):
                    new.append(_aot_case(
                        f"attn_bwd_blocked{'_causal' if causal else ''} {tag}",
                        _attn_bwd_blocked_kernel, dict(default=t, lse_ptr=f32, delta_ptr=f32),
                        dict(base, CAUSAL=causal, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                             MASK_BLOCK=mask_block(cfg.block_m)), cfg))
                for c in new:
                    arch_of[c.name] = arch
                cases += new
    return cases, arch_of


AOT_CASES, AOT_CASE_ARCH = _aot_cases()
