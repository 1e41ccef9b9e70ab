"""Attention against a KV cache, contiguous or paged, appending the new keys in place: a
torch.library op for inference (no autograd).

Registered op (``backend`` already resolved):
    flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k, v, block_table,
                                 rotary_cos, rotary_sin, rotary_interleaved, causal,
                                 softmax_scale, backend) -> out
It mutates k_cache and v_cache (declared to torch.library, so torch.compile orders the write):
the new k, v (B, S_new, Hkv, D) land at rows cache_seqlens[b] + i, rotated first when tables are
given; q is rotated at the same positions; each sequence then attends to its
cache_seqlens[b] + S_new keys, causal aligned bottom-right. Caches are (B, S_cache, Hkv, D), or
paged (num_blocks, block_size, Hkv, D) with block_table int32 (B, max_blocks): token t of
sequence b is row t % block_size of block block_table[b, t // block_size]. This is one decoding
(or chunked-prefill) step of a server holding many sequences of different lengths.

Backends: triton (llama_kernels/triton/flash_attention_kvcache.py: an append kernel, the
split-KV decode kernel, its combine; no host sync on the launch path), what auto picks first on
a GPU; cuda (the extension's flash_attention_kvcache_cuda: csrc/kvcache_append_kernels.cuh and
the CUDA decode kernel's KVCACHE specialization, no host sync either; head_dim 64 or 128, fp16
and bf16, (Hq / Hkv) * Sq <= 64 packed query rows, caches with 16-byte aligned rows; auto
passes over it for anything else) and torch (reference.attention_with_kvcache). The value
checks below read cache_seqlens on the host, so they run on eager calls only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from llama_kernels import reference
from llama_kernels.ops import _backend, _checks
from llama_kernels.ops.flash_attention import AUTO_ORDER, CUDA_HEAD_DIMS

# Backends with a cached-attention kernel; auto passes over the others (to torch).
KERNEL_BACKENDS: tuple[str, ...] = ("triton", "cuda")
CUDA_KERNEL = "flash_attention_kvcache_cuda"
# The CUDA decode kernel packs the query heads of a kv group and their queries into at most
# 4 m16 tiles (csrc/flash_decode_kernels.cuh, kDecodeMaxRows).
CUDA_MAX_ROWS = 64


@torch.library.custom_op("llama_kernels::flash_attention_with_kvcache",
                         mutates_args=("k_cache", "v_cache"))
def flash_attention_with_kvcache_op(q: Tensor, k_cache: Tensor, v_cache: Tensor,
                                    cache_seqlens: Tensor, k: Tensor | None, v: Tensor | None,
                                    block_table: Tensor | None, rotary_cos: Tensor | None,
                                    rotary_sin: Tensor | None, rotary_interleaved: bool,
                                    causal: bool, softmax_scale: float, backend: str) -> Tensor:
    if backend == "cuda":
        return _backend.cuda_op(CUDA_KERNEL)(q, k_cache, v_cache, cache_seqlens, k, v,
                                             block_table, rotary_cos, rotary_sin,
                                             rotary_interleaved, causal, softmax_scale)
    if backend == "triton":
        return _backend.triton_module("flash_attention_kvcache").flash_attention_with_kvcache(
            q, k_cache, v_cache, cache_seqlens, k, v, block_table=block_table,
            rotary_cos=rotary_cos, rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved,
            causal=causal, softmax_scale=softmax_scale)
    return reference.attention_with_kvcache(
        q, k_cache, v_cache, cache_seqlens, k, v, block_table=block_table,
        rotary_cos=rotary_cos, rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved,
        causal=causal, softmax_scale=softmax_scale).contiguous()


@flash_attention_with_kvcache_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, k, v, block_table, rotary_cos, rotary_sin,
      rotary_interleaved, causal, softmax_scale, backend):
    return q.new_empty(q.shape)


def _check_like(name: str, t: Tensor, dtype: torch.dtype, device: torch.device, ndim: int,
                dtypes=_checks.FLOAT_DTYPES) -> None:
    _checks.check_tensor(name, t, dtypes=dtypes, ndim=ndim)
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (that of q), got {t.device}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {t.dtype}")


def _check(q, k_cache, v_cache, cache_seqlens, k, v, block_table, rotary_cos, rotary_sin,
           softmax_scale):
    _checks.check_tensor("q", q, ndim=4)
    batch, seqlen_q, hq, d = q.shape
    _check_like("k_cache", k_cache, q.dtype, q.device, 4)
    _check_like("v_cache", v_cache, q.dtype, q.device, 4)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: expected shape {tuple(k_cache.shape)} (that of k_cache), got "
                         f"{tuple(v_cache.shape)}")
    rows, hkv = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[3] != d:
        raise ValueError(f"k_cache: expected head_dim {d} (that of q), got shape "
                         f"{tuple(k_cache.shape)}")
    if hq % hkv:
        raise ValueError(f"k_cache: the number of kv heads ({hkv}) must divide the number of "
                         f"query heads ({hq})")
    if block_table is None:
        if k_cache.shape[0] != batch:
            raise ValueError(f"k_cache: expected batch {batch} (that of q) without a "
                             f"block_table, got shape {tuple(k_cache.shape)}")
        capacity = rows
    else:
        _check_like("block_table", block_table, torch.int32, q.device, 2, dtypes=(torch.int32,))
        if block_table.shape[0] != batch:
            raise ValueError(f"block_table: expected {batch} rows (the batch of q), got shape "
                             f"{tuple(block_table.shape)}")
        if rows < 16 or rows & (rows - 1):
            raise ValueError(f"k_cache: expected a block size (dimension 1) that is a power of "
                             f"two >= 16 with a block_table, got {rows}")
        capacity = rows * block_table.shape[1]
    _check_like("cache_seqlens", cache_seqlens, torch.int32, q.device, 1, dtypes=(torch.int32,))
    if cache_seqlens.shape[0] != batch:
        raise ValueError(f"cache_seqlens: expected shape ({batch},) (the batch of q), got "
                         f"{tuple(cache_seqlens.shape)}")
    if (k is None) != (v is None):
        raise ValueError("k, v: expected both new keys and values, or neither")
    s_new = 0
    if k is not None:
        _check_like("k", k, q.dtype, q.device, 4)
        if k.shape[0] != batch or k.shape[2:] != (hkv, d):
            raise ValueError(f"k: expected shape ({batch}, S_new, {hkv}, {d}), got "
                             f"{tuple(k.shape)}")
        if v.shape != k.shape:
            raise ValueError(f"v: expected shape {tuple(k.shape)} (that of k), got "
                             f"{tuple(v.shape)}")
        s_new = k.shape[1]
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos, rotary_sin: expected both tables, or neither")
    if rotary_cos is not None:
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            _check_like(name, t, None, q.device, 2)
            if t.shape[1] != d // 2 or d % 2:
                raise ValueError(f"{name}: expected shape (rows, {d // 2}) for head_dim {d}, "
                                 f"got {tuple(t.shape)}")
        if rotary_sin.shape != rotary_cos.shape:
            raise ValueError(f"rotary_sin: expected shape {tuple(rotary_cos.shape)} (that of "
                             f"rotary_cos), got {tuple(rotary_sin.shape)}")
    if softmax_scale is not None and (not _checks.is_real(softmax_scale)
                                      or not math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale: expected a finite float or None, got {softmax_scale!r}")
    # The values: lengths inside the caches, tables long enough, blocks that exist. One small
    # device sync, so eager calls only (not while torch.compile traces or a graph is captured).
    if torch.compiler.is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    lengths = cache_seqlens.tolist()
    if min(lengths) < 0 or max(lengths) + s_new > capacity:
        raise ValueError(f"cache_seqlens: expected values in [0, {capacity - s_new}] (cache "
                         f"capacity {capacity} minus {s_new} new tokens), got {lengths}")
    if rotary_cos is not None and max(lengths) + max(seqlen_q, s_new) > rotary_cos.shape[0]:
        raise ValueError(f"rotary_cos: expected at least {max(lengths) + max(seqlen_q, s_new)} "
                         f"rows (positions up to cache_seqlens + new tokens), got "
                         f"{rotary_cos.shape[0]}")
    if block_table is not None:
        used = [(n + s_new + rows - 1) // rows for n in lengths]
        for b, n_blocks in enumerate(used):
            ids = block_table[b, :n_blocks]
            if n_blocks and (int(ids.min()) < 0 or int(ids.max()) >= k_cache.shape[0]):
                raise ValueError(f"block_table: row {b} names blocks outside [0, "
                                 f"{k_cache.shape[0]}) among its first {n_blocks}: "
                                 f"{ids.tolist()}")


def cuda_unsupported_reason(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> str | None:
    """Why the cuda kernels cannot take these (otherwise valid) inputs, or None."""
    d, group = q.shape[-1], q.shape[2] // k_cache.shape[2]
    if d not in CUDA_HEAD_DIMS:
        return f"head_dim {d} (cuda kernels are built for {CUDA_HEAD_DIMS})"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"{q.dtype} inputs (cuda kernels take fp16 and bf16)"
    if group * q.shape[1] > CUDA_MAX_ROWS:
        return (f"(Hq / Hkv) * Sq = {group * q.shape[1]} packed query rows (the cuda decode "
                f"kernel takes at most {CUDA_MAX_ROWS})")
    # Allocations start 16-byte aligned, so the storage offset tells (and fake tensors have it).
    es = k_cache.element_size()
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.stride(-1) != 1 or c.storage_offset() * es % 16 or any(
                s * es % 16 and n > 1 for n, s in zip(c.shape[:3], c.stride()[:3])):
            return f"{name} without 16-byte aligned rows (the cache is written in place)"
    if q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 0):
        return "GPUs before sm_80 (the kernels use sm_80 tensor-core instructions)"
    return None


def flash_attention_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor,
                                 cache_seqlens: Tensor, k: Tensor | None = None,
                                 v: Tensor | None = None, *, block_table: Tensor | None = None,
                                 rotary_cos: Tensor | None = None,
                                 rotary_sin: Tensor | None = None,
                                 rotary_interleaved: bool = False, causal: bool = True,
                                 softmax_scale: float | None = None,
                                 backend: str | None = None) -> Tensor:
    """One attention step against a KV cache (inference; no autograd).

    q (B, Sq, Hq, D); caches (B, S_cache, Hkv, D), or paged (num_blocks, block_size, Hkv, D)
    with ``block_table`` int32 (B, max_blocks); ``cache_seqlens`` int32 (B,): tokens already
    cached. New ``k``, ``v`` (B, S_new, Hkv, D), when given, are written into the caches in
    place at ``cache_seqlens[b] + i`` (rotated first when ``rotary_cos`` / ``rotary_sin`` from
    ``rotary_tables`` are given): the one input any function of this package writes. q is
    rotated at the same positions. Each sequence attends to ``cache_seqlens[b] + S_new`` keys,
    causal bottom-right. ``cache_seqlens`` itself is not changed.
    """
    _check(q, k_cache, v_cache, cache_seqlens, k, v, block_table, rotary_cos, rotary_sin,
           softmax_scale)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    unsupported = {b: "cached attention (no kernel yet)" for b in ("cuda", "triton")
                   if b not in KERNEL_BACKENDS}
    triton_module = _backend.TRITON_AVAILABLE_MODULES.get("flash_attention_kvcache")
    why = triton_module and triton_module.unsupported_reason(q, k_cache, v_cache)
    if why:
        unsupported["triton"] = why
    why = "cuda" in KERNEL_BACKENDS and cuda_unsupported_reason(q, k_cache, v_cache)
    if why:
        unsupported["cuda"] = why
    name = _backend.resolve(backend, op="flash_attention_with_kvcache", device=q.device,
                            cuda_kernel=CUDA_KERNEL, triton_module="flash_attention_kvcache",
                            unsupported=unsupported, auto_order=AUTO_ORDER)
    return flash_attention_with_kvcache_op(q, k_cache, v_cache, cache_seqlens, k, v, block_table,
                                           rotary_cos, rotary_sin, bool(rotary_interleaved),
                                           bool(causal), scale, name)
