"""Flash attention over packed sequences (FlashAttention-2's varlen layout) in Triton, the host
side: input checks, launchers and the ahead-of-time case list. The kernels are the dense ones'
*_varlen_kernel twins (attention_fwd.py, attention_bwd.py): the same programs with VARLEN=True,
the layout in _attention_common.py.

Launchers (called by llama_kernels.ops.flash_attention_varlen):
    flash_attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               causal, softmax_scale) -> (out, lse)
    flash_attention_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                               max_seqlen_q, max_seqlen_k, causal, softmax_scale) -> (dq, dk, dv)
q (total_q, Hq, D), k and v (total_k, Hkv, D) with any strides over rows and heads (a tensor
whose last dimension is not unit-stride is copied first); 1 <= D <= MAX_HEAD_DIM; Hq % Hkv == 0
and query head h reads kv head h // (Hq // Hkv). cu_seqlens_q and cu_seqlens_k are int32
(B + 1,) on q's device: sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q and
cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k and v, and attends only to itself, causal aligned
bottom-right per sequence. Their values are not read here (that would cost a device sync):
they must run from 0, non-decreasing, to total_q / total_k, with max_seqlen_* at least the
longest sequence (llama_kernels.ops.flash_attention_varlen checks them in eager calls). A
sequence may be empty, and may have more queries than keys: a query that sees no key gets
out = 0, lse = -inf and zero gradients. out is contiguous in q's dtype, lse fp32 contiguous
(Hq, total_q); dq, dk, dv are contiguous with the shapes and dtypes of q, k, v.

Grids: one axis, cdiv(max_seqlen, block) * B * heads programs (the dense grid sized by the
longest sequence); a program past its own sequence's end exits at once. There is no split-KV
decode path: the prefill kernel runs every query count. Tiles, warps and stages:
varlen_launch_settings (the dense twins' attention_launch_settings, one exception it states).

Overrides and output buffers, keyword-only, as in flash_attention.py: settings {kernel:
AttentionLaunch} for "fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq"; out, lse (forward) and dq,
dk, dv (backward) written instead of fresh tensors.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Mapping

import torch
import triton

from llama_kernels.triton._attention_common import LOG2E, _dot_flags
from llama_kernels.triton.attention_bwd import (_attn_bwd_dkdv_varlen_kernel,
                                                _attn_bwd_dq_varlen_kernel,
                                                _attn_bwd_preprocess_varlen_kernel)
from llama_kernels.triton.attention_fwd import _attn_fwd_varlen_kernel
from llama_kernels.triton.attention_launch import (AttentionLaunch, _device_arch,
                                                   attention_launch_settings)
from llama_kernels.triton.flash_attention import (AOT_ARCHS, AOT_HEAD_DIMS, MAX_HEAD_DIM,
                                                  _aot_case, _check_output, _check_overrides,
                                                  _device_guard, _unit_last)

VARLEN_KERNELS = ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq")


# ------------------------------------------------------------------------------ checks, helpers


def _rows_heads(t: torch.Tensor) -> tuple[int, int]:
    return t.stride(0), t.stride(1)


def _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> int:
    """Shapes, dtypes and devices (not the cu_seqlens values); returns B."""
    shapes = {name: tuple(t.shape) for name, t in (("q", q), ("k", k), ("v", v))}
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q: expected q, k, v of (total_rows, heads, head_dim), got {shapes}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not (
            q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q: expected q, k, v of one dtype, fp16, bf16 or fp32; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q: expected q, k, v on one device, got {q.device}, {k.device}, "
                         f"{v.device}")
    d = q.shape[2]
    if k.shape != v.shape or k.shape[2] != d:
        raise ValueError(f"k, v: expected equal shapes (total_k, Hkv, head_dim {d}), got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"k: kv heads ({k.shape[1]}) must divide query heads ({q.shape[1]})")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q: head_dim must be in [1, {MAX_HEAD_DIM}], got {d}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if (cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] < 1
                or cu.shape != cu_seqlens_q.shape or cu.device != q.device
                or not cu.is_contiguous()):
            raise ValueError(f"{name}: expected contiguous int32 (B + 1,) on {q.device}, the "
                             f"shape of cu_seqlens_q; got {cu.dtype} {tuple(cu.shape)} on "
                             f"{cu.device}")
    for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {n!r}")
    return cu_seqlens_q.shape[0] - 1


def varlen_launch_settings(kernel: str, head_dim: int, arch: tuple[int, int] | None, *,
                           elem_bytes: int = 2) -> AttentionLaunch:
    """The dense twin's attention_launch_settings, with two changes on a GPU, both where the
    ahead-of-time compile under Triton 3.6 (the GPU image's) spills at the dense settings.

    The varlen programs hold their sequence's bounds and first rows (loaded from cu_seqlens,
    not kernel arguments), and ptxas gives them more registers than their dense twins at the
    same tiles (dK/dV at sm_80 d64 16 x 128: 255 against 172 on Triton 3.8). So past head_dim
    64 a dK/dV program takes at most 64 keys (sm_90 d128 16 x 128 spills 12 bytes, 16 x 64 needs
    253 registers and does not; 212 on 3.8), and delta's row kernel runs 8 warps (with 4,
    sm_90 d128 fp16 is squeezed into 32 registers with an 8-byte spill).
    """
    cfg = attention_launch_settings(kernel, head_dim, arch, elem_bytes=elem_bytes)
    if arch is not None and kernel == "bwd_dkdv" and head_dim > 64:
        cfg = cfg._replace(block_n=min(cfg.block_n, 64))
    if arch is not None and kernel == "bwd_preprocess":
        cfg = cfg._replace(num_warps=8)
    return cfg


def _check_settings(settings: Mapping[str, AttentionLaunch] | None):
    settings = _check_overrides(settings)
    unused = sorted(set(settings) - set(VARLEN_KERNELS))
    if unused:
        raise ValueError(f"settings: the varlen launchers run {VARLEN_KERNELS}, got {unused}")
    return settings


def _meta(q: torch.Tensor, causal: bool) -> dict:
    d = q.shape[2]
    return dict(CAUSAL=bool(causal), HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
                **_dot_flags(q.dtype))


def _launch(kernel, n_programs: int, cfg: AttentionLaunch, *args, **constexprs) -> None:
    """kernel[(n_programs,)](*args, **constexprs) with cfg's warps and stages; nothing when
    there is no program to run (no sequence, or every one empty)."""
    if n_programs > 0:
        kernel[(n_programs,)](*args, **constexprs, num_warps=cfg.num_warps,
                              num_stages=cfg.num_stages)


def _tiles(cfg: AttentionLaunch) -> dict:
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)


# ------------------------------------------------------------------------------ launchers


def flash_attention_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                               max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                               softmax_scale: float, *,
                               settings: Mapping[str, AttentionLaunch] | None = None,
                               out: torch.Tensor | None = None, lse: torch.Tensor | None = None):
    """``(out, lse)``: out contiguous (total_q, Hq, D) in q's dtype, lse fp32 (Hq, total_q)."""
    batch = _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    settings = _check_settings(settings)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((hq, total_q), dtype=torch.float32, device=q.device)
    _check_output("out", out, q.shape, q.dtype, q.device)
    _check_output("lse", lse, (hq, total_q), torch.float32, q.device, contiguous=True)
    arch, size = _device_arch(q.device), q.element_size()
    cfg = settings.get("fwd") or varlen_launch_settings("fwd", d, arch, elem_bytes=size)
    with _device_guard(q.device):
        _launch(_attn_fwd_varlen_kernel, triton.cdiv(max_seqlen_q, cfg.block_m) * batch * hq,
                cfg, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                max_seqlen_q, total_q, hq, hq // hkv, softmax_scale * LOG2E,
                *_rows_heads(q), *_rows_heads(k), *_rows_heads(v), *_rows_heads(out),
                **_tiles(cfg), **_meta(q, causal))
    return out, lse


def flash_attention_varlen_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                               v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                               cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                               max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                               softmax_scale: float, *,
                               settings: Mapping[str, AttentionLaunch] | None = None,
                               dq: torch.Tensor | None = None, dk: torch.Tensor | None = None,
                               dv: torch.Tensor | None = None):
    """``(dq, dk, dv)``, contiguous, shapes and dtypes of q, k, v; deterministic (no atomics):
    every key row is written (zero where no query sees it), every query row too."""
    batch = _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    settings = _check_settings(settings)
    for name, t in (("dout", dout), ("out", out)):
        if t.shape != q.shape or t.device != q.device:
            raise ValueError(f"{name}: expected shape {tuple(q.shape)} on {q.device}, got "
                             f"{tuple(t.shape)} on {t.device}")
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    if lse.shape != (hq, total_q) or lse.dtype != torch.float32:
        raise ValueError(f"lse: expected fp32 shape {(hq, total_q)}, got {lse.dtype} "
                         f"{tuple(lse.shape)}")
    q, k, v, out, dout = (_unit_last(t) for t in (q, k, v, out, dout))
    lse = lse.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    for name, t, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        _check_output(name, t, like.shape, like.dtype, like.device)
    delta = torch.empty((hq, total_q), dtype=torch.float32, device=q.device)
    arch, size = _device_arch(q.device), q.element_size()
    meta = _meta(q, causal)
    scales = (softmax_scale, softmax_scale * LOG2E)
    with _device_guard(q.device):
        cfg = settings.get("bwd_preprocess") or varlen_launch_settings("bwd_preprocess", d, arch)
        _launch(_attn_bwd_preprocess_varlen_kernel,
                triton.cdiv(max_seqlen_q, cfg.block_m) * batch * hq, cfg,
                out, dout, delta, cu_seqlens_q, max_seqlen_q, total_q, hq, *_rows_heads(out),
                *_rows_heads(dout), HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_D=meta["BLOCK_D"])
        cfg = settings.get("bwd_dkdv") or varlen_launch_settings("bwd_dkdv", d, arch,
                                                                 elem_bytes=size)
        _launch(_attn_bwd_dkdv_varlen_kernel,
                triton.cdiv(max_seqlen_k, cfg.block_n) * batch * hkv, cfg,
                q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k,
                max_seqlen_k, total_q, hq, hkv, hq // hkv, *scales,
                *_rows_heads(q), *_rows_heads(k), *_rows_heads(v), *_rows_heads(dout),
                *_rows_heads(dk), *_rows_heads(dv), **_tiles(cfg), **meta)
        cfg = settings.get("bwd_dq") or varlen_launch_settings("bwd_dq", d, arch, elem_bytes=size)
        _launch(_attn_bwd_dq_varlen_kernel,
                triton.cdiv(max_seqlen_q, cfg.block_m) * batch * hq, cfg,
                q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k,
                max_seqlen_q, total_q, hq, hq // hkv, *scales,
                *_rows_heads(q), *_rows_heads(k), *_rows_heads(v), *_rows_heads(dout),
                *_rows_heads(dq), **_tiles(cfg), **meta)
    return dq, dk, dv


# ------------------------------------------------------------------------------ AOT cases

# The varlen kernels at the settings they run with on each arch (varlen_launch_settings),
# d64/d128, fp16/bf16, causal; the forward also full.
# tests/test_triton_varlen.py compiles each for VARLEN_AOT_CASE_ARCH[case.name] and checks
# for register spills. Sizes that are not multiples of 16 at real shapes: the lengths, the
# packed row count and the head counts.
_NOT_DIVISIBLE = ("max_seqlen_q", "max_seqlen_k", "total_q", "n_heads_q", "n_heads_kv",
                  "group_size")


def _varlen_case(name, fn, ptr_types, constexprs, cfg):
    c = _aot_case(name, fn, dict(ptr_types, cu_seqlens_q_ptr="*i32", cu_seqlens_k_ptr="*i32"),
                  constexprs, cfg)
    return dataclasses.replace(
        c, divisible_16=tuple(a for a in c.divisible_16 if a not in _NOT_DIVISIBLE))


# (case name, launch-settings kernel, kernel, causal or None (no CAUSAL constexpr), fp32
# pointer arguments)
_AOT_KERNELS = (
    ("attn_fwd_varlen_causal", "fwd", _attn_fwd_varlen_kernel, True, ("lse_ptr",)),
    ("attn_fwd_varlen", "fwd", _attn_fwd_varlen_kernel, False, ("lse_ptr",)),
    ("attn_bwd_preprocess_varlen", "bwd_preprocess", _attn_bwd_preprocess_varlen_kernel, None,
     ("delta_ptr",)),
    ("attn_bwd_dkdv_varlen_causal", "bwd_dkdv", _attn_bwd_dkdv_varlen_kernel, True,
     ("lse_ptr", "delta_ptr")),
    ("attn_bwd_dq_varlen_causal", "bwd_dq", _attn_bwd_dq_varlen_kernel, True,
     ("lse_ptr", "delta_ptr")),
)


def _aot_cases():
    cases, arch_of = [], {}
    for arch, d, dtype in itertools.product(AOT_ARCHS, AOT_HEAD_DIMS, ("fp16", "bf16")):
        for name, kernel, fn, causal, fp32_ptrs in _AOT_KERNELS:
            cfg = varlen_launch_settings(kernel, d, divmod(arch, 10))
            constexprs = dict(HEAD_DIM=d, BLOCK_D=d, BLOCK_M=cfg.block_m)
            if causal is not None:  # the kernels with a dot
                constexprs.update(CAUSAL=causal, BLOCK_N=cfg.block_n, UPCAST_DOT=False,
                                  DOT_PRECISION="tf32")
            ptr_types = dict.fromkeys(fp32_ptrs, "*fp32")
            case = _varlen_case(f"{name} d{d} {dtype} sm_{arch}", fn,
                                dict(ptr_types, default="*" + dtype), constexprs, cfg)
            cases.append(case)
            arch_of[case.name] = arch
    return cases, arch_of


VARLEN_AOT_CASES, VARLEN_AOT_CASE_ARCH = _aot_cases()
