"""RMSNorm and residual-add + RMSNorm as torch.library ops with autograd, one impl per backend.

Registered ops (``torch.ops.llama_kernels.*``; ``backend`` is already resolved, never "auto"):
    rms_norm_fwd(x, weight, eps, backend) -> (y, rstd)
    add_rms_norm_fwd(x, residual, weight, eps, backend) -> (y, h, rstd)
    rms_norm_bwd(dy, x, weight, rstd, dh, backend) -> (dx, dweight)   # dx += dh when dh given
Kernels see rows: 2-D tensors (rows, dim) with unit stride along dim; rstd is fp32 (rows,).
"""

from __future__ import annotations

import torch
from torch import Tensor

from llama_kernels import reference
from llama_kernels.ops import _backend, _checks


def _rows(t: Tensor) -> Tensor:
    """``t`` as (rows, dim) with unit stride along dim, copied only where it must be."""
    t2 = t.reshape(-1, t.shape[-1])
    if t2.stride(-1) == 1:
        return t2
    if t2.shape[-1] == 1:
        # A size-1 dimension's stride is arbitrary (a (n, 1) slice keeps its parent's), and
        # contiguous() keeps it because the tensor already counts as contiguous: restate it
        # as 1, which addresses the same elements, so the kernels' unit-stride check holds.
        return t2.as_strided(t2.shape, (t2.stride(0), 1))
    return t2.contiguous()


@torch.library.custom_op("llama_kernels::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: Tensor, weight: Tensor, eps: float, backend: str) -> tuple[Tensor, Tensor]:
    if backend == "cuda":
        y, rstd = _backend.cuda_op("rms_norm_fwd_cuda")(_rows(x), weight.contiguous(), eps)
    elif backend == "triton":
        y, rstd = _backend.triton_module("rms_norm").rms_norm_fwd(_rows(x), weight, eps)
    else:
        y, rstd = reference.rms_norm(x, weight, eps), reference.rms_norm_rstd(x, eps)
        return y.contiguous(), rstd.contiguous()
    return y.view(x.shape), rstd.view(x.shape[:-1])


@rms_norm_fwd.register_fake
def _(x, weight, eps, backend):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("llama_kernels::add_rms_norm_fwd", mutates_args=())
def add_rms_norm_fwd(x: Tensor, residual: Tensor, weight: Tensor, eps: float,
                     backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "cuda":
        y, h, rstd = _backend.cuda_op("add_rms_norm_fwd_cuda")(
            _rows(x), _rows(residual), weight.contiguous(), eps)
    elif backend == "triton":
        y, h, rstd = _backend.triton_module("rms_norm").add_rms_norm_fwd(
            _rows(x), _rows(residual), weight, eps)
    else:
        y, h = reference.add_rms_norm(x, residual, weight, eps)
        return y.contiguous(), h.contiguous(), reference.rms_norm_rstd(h, eps).contiguous()
    return y.view(x.shape), h.view(x.shape), rstd.view(x.shape[:-1])


@add_rms_norm_fwd.register_fake
def _(x, residual, weight, eps, backend):
    rstd = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape), x.new_empty(x.shape), rstd


@torch.library.custom_op("llama_kernels::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, dh: Tensor | None,
                 backend: str) -> tuple[Tensor, Tensor]:
    if backend == "torch":
        dx, dw = reference.rms_norm_backward(dy, x, weight, rstd, dh)
        return dx.contiguous(), dw
    args = (_rows(dy), _rows(x), weight.contiguous(), rstd.reshape(-1).contiguous(),
            None if dh is None else _rows(dh))
    if backend == "cuda":
        dx, dw = _backend.cuda_op("rms_norm_bwd_cuda")(*args)
    else:
        dx, dw = _backend.triton_module("rms_norm").rms_norm_bwd(*args)
    return dx.view(x.shape), dw


@rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, dh, backend):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, eps, backend = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.backend = backend


def _rms_norm_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = rms_norm_bwd(dy, x, weight, rstd, None, ctx.backend)
    return dx, dw, None, None


rms_norm_fwd.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


def _add_rms_norm_setup(ctx, inputs, output):
    _x, _residual, weight, eps, backend = inputs
    ctx.save_for_backward(output[1], weight, output[2])
    ctx.backend = backend


def _add_rms_norm_backward(ctx, dy, dh, _drstd):
    h, weight, rstd = ctx.saved_tensors
    dh_total, dw = rms_norm_bwd(dy, h, weight, rstd, dh, ctx.backend)
    return dh_total, dh_total, dw, None, None


add_rms_norm_fwd.register_autograd(_add_rms_norm_backward, setup_context=_add_rms_norm_setup)


# ------------------------------------------------------------------------------ functional


def _check(x, weight, eps, **extra):
    _checks.check_tensor("x", x, min_ndim=1)
    for name, t in extra.items():
        _checks.check_tensor(name, t, min_ndim=1)
        if t.shape != x.shape:
            raise ValueError(f"{name}: expected shape {tuple(x.shape)} (that of x), "
                             f"got {tuple(t.shape)}")
    _checks.check_norm_weight(x, weight)
    _checks.check_same_device(x=x, **extra, weight=weight)
    _checks.check_same_dtype(x=x, **extra, weight=weight)
    _checks.check_eps(eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, *, backend: str | None = None):
    """``x * rsqrt(mean(x**2, -1) + eps) * weight`` over the last dimension of x."""
    _check(x, weight, eps)
    name = _backend.resolve(backend, op="rms_norm", device=x.device,
                            cuda_kernel="rms_norm_fwd_cuda", triton_module="rms_norm")
    return rms_norm_fwd(x, weight, float(eps), name)[0]


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6, *,
                 backend: str | None = None) -> tuple[Tensor, Tensor]:
    """``(rms_norm(h), h)`` with ``h = x + residual``: the pre-norm residual add, fused."""
    _check(x, weight, eps, residual=residual)
    name = _backend.resolve(backend, op="add_rms_norm", device=x.device,
                            cuda_kernel="add_rms_norm_fwd_cuda", triton_module="rms_norm")
    y, h, _rstd = add_rms_norm_fwd(x, residual, weight, float(eps), name)
    return y, h
