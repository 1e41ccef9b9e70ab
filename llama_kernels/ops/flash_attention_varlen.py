"""Attention over packed sequences (flash-attn's varlen layout) as torch.library ops with autograd.

Registered ops (``backend`` already resolved):
    flash_attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               causal, softmax_scale, backend) -> (out, lse)
    flash_attention_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                               max_seqlen_q, max_seqlen_k, causal, softmax_scale, backend)
                               -> (dq, dk, dv)
q (total_q, Hq, D), k/v (total_k, Hkv, D), cu_seqlens int32 (B + 1,) from 0, lse fp32
(Hq, total_q). Sequence b is rows cu_seqlens[b]:cu_seqlens[b+1] of q (and of k, v with
cu_seqlens_k) and attends only to itself, causal aligned bottom-right per sequence; a query that
sees no key outputs 0. This is what padding-free training (several documents in one row) and
padded batches without the padding need.

Backends: "triton" runs llama_kernels/triton/flash_attention_varlen.py (what auto picks first on
a GPU, as for the dense attention), "cuda" the extension's flash_attention_varlen_fwd_cuda /
flash_attention_varlen_bwd_cuda (the dense CUDA kernels' packed specializations: head_dim 64 or
128, fp16 and bf16; auto passes over it for anything else), "torch" the reference
(reference.attention_varlen_with_lse / attention_varlen_backward).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from llama_kernels import reference
from llama_kernels.ops import _backend, _checks
from llama_kernels.ops.flash_attention import AUTO_ORDER, CUDA_HEAD_DIMS, TRITON_MAX_HEAD_DIM

# Backends with a packed kernel; auto passes over the others (to torch).
KERNEL_BACKENDS: tuple[str, ...] = ("triton", "cuda")
TRITON_MODULE = "flash_attention_varlen"
CUDA_FWD, CUDA_BWD = "flash_attention_varlen_fwd_cuda", "flash_attention_varlen_bwd_cuda"


@torch.library.custom_op("llama_kernels::flash_attention_varlen_fwd", mutates_args=())
def flash_attention_varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                               cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                               causal: bool, softmax_scale: float,
                               backend: str) -> tuple[Tensor, Tensor]:
    if backend == "cuda":
        return _backend.cuda_op(CUDA_FWD)(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                          max_seqlen_k, causal, softmax_scale)
    if backend == "triton":
        return _backend.triton_module(TRITON_MODULE).flash_attention_varlen_fwd(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
            softmax_scale)
    out, lse = reference.attention_varlen_with_lse(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                   causal=causal, softmax_scale=softmax_scale)
    return out.contiguous(), lse.contiguous()


@flash_attention_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
      backend):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("llama_kernels::flash_attention_varlen_bwd", mutates_args=())
def flash_attention_varlen_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                               lse: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                               max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                               softmax_scale: float,
                               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "cuda":
        return _backend.cuda_op(CUDA_BWD)(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                          max_seqlen_q, max_seqlen_k, causal, softmax_scale)
    if backend == "triton":
        return _backend.triton_module(TRITON_MODULE).flash_attention_varlen_bwd(
            dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            causal, softmax_scale)
    grads = reference.attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q,
                                                cu_seqlens_k, causal=causal,
                                                softmax_scale=softmax_scale)
    return tuple(g.contiguous() for g in grads)


@flash_attention_varlen_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
      softmax_scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, softmax_scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, causal, softmax_scale, backend)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = flash_attention_varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None


flash_attention_varlen_fwd.register_autograd(_backward, setup_context=_setup)


def check_cu_seqlens(name: str, cu: Tensor, total: int, max_name: str, max_seqlen,
                     device: torch.device, batch: int | None = None) -> None:
    """cu_seqlens: int32 (B + 1,) on the tensors' device, from 0, non-decreasing, ending at the
    packed length; max_seqlen at least its longest sequence. The values cost one small device
    sync (as flash-attn's callers pay for their own max_seqlen), so they are checked in eager
    calls only: not while torch.compile traces or a CUDA graph is captured."""
    _checks.check_tensor(name, cu, dtypes=(torch.int32,), ndim=1)
    if cu.device != device:
        raise ValueError(f"{name}: expected device {device} (that of q), got {cu.device}")
    if batch is not None and cu.shape[0] != batch + 1:
        raise ValueError(f"{name}: expected shape ({batch + 1},) (that of cu_seqlens_q), got "
                         f"{tuple(cu.shape)}")
    if not _checks.is_real(max_seqlen) or isinstance(max_seqlen, float) or max_seqlen < 0:
        raise ValueError(f"{max_name}: expected a non-negative int, got {max_seqlen!r}")
    if torch.compiler.is_compiling() or (cu.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    values = cu.tolist()
    lengths = [b - a for a, b in zip(values, values[1:])]
    if values[0] != 0 or any(n < 0 for n in lengths) or values[-1] != total:
        raise ValueError(f"{name}: expected cumulative lengths from 0, non-decreasing, ending at "
                         f"{total} (the packed rows), got {values}")
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"{max_name}: expected at least the longest sequence ({max(lengths)}), "
                         f"got {max_seqlen}")


def _check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.check_tensor(name, t, ndim=3)
    _checks.check_same_device(q=q, k=k, v=v)
    _checks.check_same_dtype(q=q, k=k, v=v)
    _total_q, hq, d = q.shape
    if v.shape != k.shape:
        raise ValueError(f"v: expected shape {tuple(k.shape)} (that of k), got {tuple(v.shape)}")
    if k.shape[2] != d:
        raise ValueError(f"k: expected head_dim {d} (that of q), got shape {tuple(k.shape)}")
    if hq % k.shape[1]:
        raise ValueError(f"k: the number of kv heads ({k.shape[1]}) must divide the number of "
                         f"query heads ({hq})")
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "max_seqlen_q", max_seqlen_q,
                     q.device)
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k", max_seqlen_k,
                     q.device, batch=cu_seqlens_q.shape[0] - 1)
    if softmax_scale is not None and (not _checks.is_real(softmax_scale)
                                      or not math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale: expected a finite float or None, got {softmax_scale!r}")


def unsupported_reasons(q: Tensor) -> dict[str, str]:
    """The kernel backends that cannot take packed q (total_q, Hq, D), each with the reason."""
    d, reasons = q.shape[-1], {}
    if d not in CUDA_HEAD_DIMS:
        reasons["cuda"] = f"head_dim {d} (cuda kernels are built for {CUDA_HEAD_DIMS})"
    elif q.dtype not in (torch.float16, torch.bfloat16):
        reasons["cuda"] = f"{q.dtype} inputs (cuda kernels take fp16 and bf16)"
    elif q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 0):
        reasons["cuda"] = "GPUs before sm_80 (the kernels use sm_80 tensor-core instructions)"
    if d > TRITON_MAX_HEAD_DIM:
        reasons["triton"] = f"head_dim {d} (triton kernels take head_dim <= {TRITON_MAX_HEAD_DIM})"
    return reasons


def flash_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                           cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                           causal: bool = True, softmax_scale: float | None = None,
                           backend: str | None = None) -> Tensor:
    """Attention of packed sequences, each only to itself (flash-attn's varlen layout).

    q (total_q, Hq, D), k and v (total_k, Hkv, D); ``cu_seqlens_q`` / ``cu_seqlens_k`` int32
    (B + 1,) cumulative lengths from 0 (a sequence may be empty); ``max_seqlen_*`` at least the
    longest sequence. Causal is aligned bottom-right per sequence; a query that sees no key
    outputs 0. Differentiable in q, k and v.
    """
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    name = _backend.resolve(backend, op="flash_attention_varlen", device=q.device,
                            cuda_kernel=CUDA_FWD, triton_module=TRITON_MODULE,
                            unsupported=unsupported_reasons(q), auto_order=AUTO_ORDER)
    return flash_attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                      int(max_seqlen_k), bool(causal), scale, name)[0]
