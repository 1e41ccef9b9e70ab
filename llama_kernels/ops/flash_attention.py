"""Causal / full attention (grouped-query, KV-cache decoding) as torch.library ops with autograd.

Registered ops (``backend`` already resolved):
    flash_attention_fwd(q, k, v, causal, softmax_scale, backend) -> (out, lse)
    flash_attention_bwd(dout, q, k, v, out, lse, causal, softmax_scale, backend) -> (dq, dk, dv)
q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), Hq % Hkv == 0, lse fp32 (B, Hq, Sq). With Sq < Sk the
causal mask is aligned bottom-right (query i sees keys j <= i + Sk - Sq), so a decoding step
against a KV cache is the same call.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from llama_kernels import reference
from llama_kernels.ops import _backend, _checks

CUDA_HEAD_DIMS = (64, 128)
TRITON_MAX_HEAD_DIM = 256
# What `auto` runs on a GPU, first choice first. Triton leads: the CUDA kernels
# (csrc/flash_attention*.cu) are proven here against the host emulator of their tensor-core
# primitives but not yet timed on a GPU; they lead once a GPU run shows them correct and faster.
AUTO_ORDER = ("triton", "cuda")


@torch.library.custom_op("llama_kernels::flash_attention_fwd", mutates_args=())
def flash_attention_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float,
                        backend: str) -> tuple[Tensor, Tensor]:
    if backend == "cuda":
        return _backend.cuda_op("flash_attention_fwd_cuda")(q, k, v, causal, softmax_scale)
    if backend == "triton":
        return _backend.triton_module("flash_attention").flash_attention_fwd(
            q, k, v, causal, softmax_scale)
    out, lse = reference.attention_with_lse(q, k, v, causal=causal, softmax_scale=softmax_scale)
    return out.contiguous(), lse.contiguous()


@flash_attention_fwd.register_fake
def _(q, k, v, causal, softmax_scale, backend):
    b, sq, hq, _d = q.shape
    return q.new_empty(q.shape), q.new_empty((b, hq, sq), dtype=torch.float32)


@torch.library.custom_op("llama_kernels::flash_attention_bwd", mutates_args=())
def flash_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                        causal: bool, softmax_scale: float,
                        backend: str) -> tuple[Tensor, Tensor, Tensor]:
    args = (dout, q, k, v, out, lse, causal, softmax_scale)
    if backend == "cuda":
        return _backend.cuda_op("flash_attention_bwd_cuda")(*args)
    if backend == "triton":
        return _backend.triton_module("flash_attention").flash_attention_bwd(*args)
    grads = reference.attention_backward(dout, q, k, v, out, lse, causal=causal,
                                         softmax_scale=softmax_scale)
    return tuple(g.contiguous() for g in grads)


@flash_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, causal, softmax_scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, causal, softmax_scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.softmax_scale, ctx.backend = causal, softmax_scale, backend


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = flash_attention_bwd(dout, q, k, v, out, lse, ctx.causal, ctx.softmax_scale,
                                     ctx.backend)
    return dq, dk, dv, None, None, None


flash_attention_fwd.register_autograd(_backward, setup_context=_setup)


def _check(q, k, v, causal, softmax_scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.check_tensor(name, t, ndim=4)
    _checks.check_same_device(q=q, k=k, v=v)
    _checks.check_same_dtype(q=q, k=k, v=v)
    b, sq, hq, d = q.shape
    if v.shape != k.shape:
        raise ValueError(f"v: expected shape {tuple(k.shape)} (that of k), got {tuple(v.shape)}")
    if k.shape[0] != b:
        raise ValueError(f"k: expected batch {b} (that of q), got shape {tuple(k.shape)}")
    if k.shape[3] != d:
        raise ValueError(f"k: expected head_dim {d} (that of q), got shape {tuple(k.shape)}")
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(f"k: the number of kv heads ({hkv}) must divide the number of query "
                         f"heads ({hq})")
    if causal and sq > k.shape[1]:
        raise ValueError(f"q: causal attention needs seqlen_q <= seqlen_k, got {sq} queries "
                         f"and {k.shape[1]} keys (query rows would see no key)")
    if softmax_scale is not None and (not _checks.is_real(softmax_scale)
                                      or not math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale: expected a finite float or None, got {softmax_scale!r}")


def _unsupported(q: Tensor) -> dict[str, str]:
    d, reasons = q.shape[-1], {}
    if d not in CUDA_HEAD_DIMS:
        reasons["cuda"] = f"head_dim {d} (cuda kernels are built for {CUDA_HEAD_DIMS})"
    elif q.dtype not in (torch.float16, torch.bfloat16):
        reasons["cuda"] = f"{q.dtype} inputs (cuda kernels take fp16 and bf16)"
    elif q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 0):
        reasons["cuda"] = "GPUs before sm_80 (the kernels use sm_80 tensor-core instructions)"
    if d > TRITON_MAX_HEAD_DIM:
        reasons["triton"] = f"head_dim {d} (triton kernels take head_dim <= 256)"
    return reasons


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True,
                    softmax_scale: float | None = None, backend: str | None = None) -> Tensor:
    """softmax(q k^T * scale [+ causal mask]) v without storing the attention matrix.

    q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D); query head h reads kv head h // (Hq // Hkv);
    the scale defaults to D**-0.5; the causal mask is aligned bottom-right when Sq < Sk.
    """
    _check(q, k, v, causal, softmax_scale)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    name = _backend.resolve(backend, op="flash_attention", device=q.device,
                            cuda_kernel="flash_attention_fwd_cuda",
                            triton_module="flash_attention", unsupported=_unsupported(q),
                            auto_order=AUTO_ORDER)
    return flash_attention_fwd(q, k, v, bool(causal), scale, name)[0]
