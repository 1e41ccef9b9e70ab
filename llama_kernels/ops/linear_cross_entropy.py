"""The LM head's loss, ``F.cross_entropy(x @ weight.T, target)``, as torch.library ops.

Registered ops (``backend`` already resolved; x (N, dim), weight (vocab, dim), target (N,)):
    linear_cross_entropy_fwd(x, weight, target, ignore_index, reduction, grad_x, grad_weight,
                             backend) -> (loss, dx, dweight)
    linear_cross_entropy_bwd(grad_loss, x, weight, target, ignore_index, grad_x, grad_weight,
                             backend) -> (dx, dweight)               # reduction "none"
    linear_cross_entropy_scale(grad, g, backend) -> grad * g          # "mean" / "sum"
Backends: "triton" walks the tokens in chunks and never holds the (N, vocab) logits
(llama_kernels/triton/cross_entropy.py says how, and how big a chunk is); "cuda" walks the same
chunks with the extension's chunk kernel (llama_kernels/cuda_cross_entropy.py,
csrc/cross_entropy_kernels.cuh); "torch" is reference.py with the logits materialized in fp32,
the ground truth. Auto tries triton before cuda on a GPU (AUTO_ORDER) until the CUDA kernel has
been timed against it there.

Gradients. For "mean" and "sum" the forward makes dx and dweight of the scalar loss (grad_x /
grad_weight say which: the ones that require grad while grad mode is on; none in eval) and the
backward scales them by the scalar grad_output, as Liger-Kernel does: 3 matmuls in all. For
"none" the forward makes only the losses and the backward recomputes the chunks with each row's
grad_output: 4 matmuls (the per-row scale of dweight is not known until the backward). Not
twice differentiable.

Dtypes: x and weight fp32, fp16 or bf16 (the same); the loss is fp32 whatever their dtype (the
math is fp32 after the logits; a training loop wants the fp32 loss); dx and dweight in the
inputs' dtype. "none" gives target's shape with 0 where the target is ignored; "mean" divides
by the number of non-ignored targets (all ignored: nan, and zero gradients, as torch).
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from llama_kernels import reference
from llama_kernels.ops import _backend, _checks

REDUCTIONS = ("mean", "sum", "none")
CUDA_KERNEL = "cross_entropy_chunk_cuda"
AUTO_ORDER = ("triton", "cuda")


def _chunked(backend: str):
    """The chunked launchers of a kernel backend: the Triton module, or the CUDA host loop
    (imported on first use: it needs the extension's op only when it runs)."""
    if backend == "triton":
        return _backend.triton_module("cross_entropy")
    from llama_kernels import cuda_cross_entropy
    return cuda_cross_entropy


def _torch_grads(x, weight, target, ignore_index, row_scale, grad_x, grad_weight):
    """dx, dweight from the materialized fp32 logits: dz = (softmax - onehot) * row scale."""
    xf, wf = x.float(), weight.float()
    dz = torch.softmax(xf @ wf.T, dim=-1)
    valid = target != ignore_index
    dz.scatter_add_(1, torch.where(valid, target, 0)[:, None], -valid.float()[:, None])
    c = torch.where(valid, row_scale.float().expand(target.shape), 0.0)
    dz = dz * c[:, None]
    dx = (dz @ wf).to(x.dtype) if grad_x else x.new_empty(0)
    dw = (dz.T @ xf).to(weight.dtype) if grad_weight else weight.new_empty(0)
    return dx, dw


@torch.library.custom_op("llama_kernels::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(x: Tensor, weight: Tensor, target: Tensor, ignore_index: int,
                             reduction: str, grad_x: bool, grad_weight: bool,
                             backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend in ("triton", "cuda"):
        return _chunked(backend).linear_cross_entropy_fwd(
            x, weight, target, ignore_index=ignore_index, reduction=reduction, grad_x=grad_x,
            grad_weight=grad_weight)
    loss = reference.linear_cross_entropy(x, weight, target, ignore_index=ignore_index,
                                          reduction=reduction).clone()
    if reduction == "none" or not (grad_x or grad_weight):
        return loss, x.new_empty(0), weight.new_empty(0)
    if reduction == "mean":
        row_scale = 1.0 / (target != ignore_index).sum().float()
    else:
        row_scale = torch.ones((), device=x.device)
    return (loss, *_torch_grads(x, weight, target, ignore_index, row_scale, grad_x,
                                grad_weight))


@linear_cross_entropy_fwd.register_fake
def _(x, weight, target, ignore_index, reduction, grad_x, grad_weight, backend):
    with_grad = reduction != "none"
    loss = x.new_empty((x.shape[0],) if reduction == "none" else (), dtype=torch.float32)
    dx = x.new_empty(x.shape) if with_grad and grad_x else x.new_empty(0)
    dw = weight.new_empty(weight.shape) if with_grad and grad_weight else weight.new_empty(0)
    return loss, dx, dw


@torch.library.custom_op("llama_kernels::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(grad_loss: Tensor, x: Tensor, weight: Tensor, target: Tensor,
                             ignore_index: int, grad_x: bool, grad_weight: bool,
                             backend: str) -> tuple[Tensor, Tensor]:
    if backend in ("triton", "cuda"):
        return _chunked(backend).linear_cross_entropy_bwd(
            grad_loss, x, weight, target, ignore_index=ignore_index, grad_x=grad_x,
            grad_weight=grad_weight)
    return _torch_grads(x, weight, target, ignore_index, grad_loss, grad_x, grad_weight)


@linear_cross_entropy_bwd.register_fake
def _(grad_loss, x, weight, target, ignore_index, grad_x, grad_weight, backend):
    dx = x.new_empty(x.shape) if grad_x else x.new_empty(0)
    dw = weight.new_empty(weight.shape) if grad_weight else weight.new_empty(0)
    return dx, dw


@torch.library.custom_op("llama_kernels::linear_cross_entropy_scale", mutates_args=())
def linear_cross_entropy_scale(grad: Tensor, g: Tensor, backend: str) -> Tensor:
    if backend in ("triton", "cuda"):
        return _chunked(backend).scale(grad, g)
    return (grad.float() * g.float()).to(grad.dtype)


@linear_cross_entropy_scale.register_fake
def _(grad, g, backend):
    return grad.new_empty(grad.shape)


def _setup(ctx, inputs, output):
    x, weight, target, ignore_index, reduction, grad_x, grad_weight, backend = inputs
    _loss, dx, dw = output
    ctx.mark_non_differentiable(dx, dw)
    ctx.args = (ignore_index, reduction, grad_x, grad_weight, backend)
    if reduction == "none":
        ctx.save_for_backward(x, weight, target)
    else:
        ctx.save_for_backward(dx, dw)


def _backward(ctx, dloss, _ddx, _ddw):
    ignore_index, reduction, grad_x, grad_weight, backend = ctx.args
    if reduction == "none":
        x, weight, target = ctx.saved_tensors
        dx, dw = linear_cross_entropy_bwd(dloss, x, weight, target, ignore_index, grad_x,
                                          grad_weight, backend)
    else:
        dx, dw = ctx.saved_tensors
        dx = linear_cross_entropy_scale(dx, dloss, backend) if grad_x else dx
        dw = linear_cross_entropy_scale(dw, dloss, backend) if grad_weight else dw
    return (dx if grad_x else None, dw if grad_weight else None,
            None, None, None, None, None, None)


linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------ functional


def check_target_range(target: Tensor, vocab: int, ignore_index: int) -> None:
    """Every target in [0, vocab) or ignore_index. Reading the values costs a device sync, so
    this runs in eager calls only: not while torch.compile traces or a CUDA graph is captured
    (a bad target there gives its row a NaN loss in the triton and cuda kernels)."""
    if torch.compiler.is_compiling() or (target.is_cuda
                                         and torch.cuda.is_current_stream_capturing()):
        return
    bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
    if bool(bad.any()):
        raise ValueError(f"target: expected class indices in [0, {vocab}) or ignore_index "
                         f"({ignore_index}), got {target[bad][0].item()}")


def _check(x, weight, target, ignore_index, reduction) -> None:
    _checks.check_tensor("x", x, min_ndim=1)
    _checks.check_tensor("weight", weight, ndim=2)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight: expected shape (vocab, {x.shape[-1]}) (dim, the last "
                         f"dimension of x), got {tuple(weight.shape)}")
    _checks.check_same_device(x=x, weight=weight)
    _checks.check_same_dtype(x=x, weight=weight)
    _checks.check_tensor("target", target, dtypes=(torch.int64,))
    if target.shape != x.shape[:-1]:
        raise ValueError(f"target: expected shape {tuple(x.shape[:-1])} (x's without its last "
                         f"dimension), got {tuple(target.shape)}")
    _checks.check_same_device(x=x, target=target)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index: expected an int, got {ignore_index!r}")
    check_target_range(target, weight.shape[0], int(ignore_index))


def linear_cross_entropy(x: Tensor, weight: Tensor, target: Tensor, *, ignore_index: int = -100,
                         reduction: str = "mean", backend: str | None = None) -> Tensor:
    """``F.cross_entropy(x @ weight.T, target, ignore_index=..., reduction=...)`` in fp32 math,
    without holding the (N, vocab) logits at once (backends "triton" and "cuda").

    x ``(..., dim)``, weight ``(vocab, dim)`` (an nn.Linear weight: the LM head), target
    ``x.shape[:-1]`` int64 class indices. Returns the fp32 loss: a scalar for "mean" / "sum",
    target's shape for "none" (0 where ignored). Differentiable in x and weight.
    """
    _check(x, weight, target, ignore_index, reduction)
    name = _backend.resolve(backend, op="linear_cross_entropy", device=x.device,
                            cuda_kernel=CUDA_KERNEL, triton_module="cross_entropy",
                            auto_order=AUTO_ORDER)
    grad = torch.is_grad_enabled()
    loss = linear_cross_entropy_fwd(
        x.reshape(-1, x.shape[-1]), weight, target.reshape(-1), int(ignore_index), reduction,
        grad and x.requires_grad, grad and weight.requires_grad, name)[0]
    return loss.view(target.shape) if reduction == "none" else loss
