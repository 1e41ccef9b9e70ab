"""Linear + cross entropy on the CUDA chunk kernel: the host side of the "cuda" backend.

The chunk loop of llama_kernels/triton/cross_entropy.py (its docstring gives the math, the
gradient strategy and the chunk rule), with the extension's kernel for the softmax / loss /
gradient pass: per chunk of rows, logits = x_c W^T (torch.mm: cuBLAS, in x's dtype with fp32
accumulation), ONE launch of ``torch.ops.llama_kernels.cross_entropy_chunk_cuda``
(csrc/cross_entropy_kernels.cuh: the loss of each row, then the logits overwritten in place by
dz in x's dtype), dx_c = dz W and dW += dz^T x_c (an fp32 accumulator, rounded to weight's dtype
once at the end). The chunk rule (``chunk_rows``) and the fp32 accumulation (``_accumulate_fp32``)
are the Triton module's, imported: plain Python and torch, no kernel of theirs runs here.

Launchers (called by llama_kernels.ops.linear_cross_entropy for backend "cuda"; x (N, dim),
weight (vocab, dim), target (N,) int64, all CUDA tensors):
    linear_cross_entropy_fwd(x, weight, target, ...) -> (loss, dx, dweight)
    linear_cross_entropy_bwd(grad_loss, x, weight, target, ...) -> (dx, dweight)   # "none"
    scale(grad, g) -> grad * g                                   # the scalar reductions' bwd
    cross_entropy_chunk(logits, target, loss, scale, ...)        # one kernel launch

``scale`` is torch: the product in fp32 rounded once (a 16-bit tensor times an fp32 0-dim tensor
in torch rounds g to 16 bits first), in pieces of SCALE_PIECE elements so that the fp32
temporary stays small (dW at vocab 128256, dim 4096 would be a 2 GiB fp32 copy at once).
"""

from __future__ import annotations

import torch

from llama_kernels.triton import cross_entropy as _triton_ce

# Elements per piece of ``scale``: a 64 MiB fp32 temporary, large enough that the launches per
# piece (three elementwise kernels) cost nothing next to the bytes moved.
SCALE_PIECE = 1 << 24


def cross_entropy_chunk(logits, target, loss, scale, *, ignore_index: int,
                        write_grad: bool) -> None:
    """One launch over a (rows, vocab) logits view (unit stride along vocab, any row stride):
    loss[i] for each row and, with ``write_grad``, the logits replaced by dz. ``scale`` fp32:
    0-dim (every row) or (rows,) (any stride). The op checks its arguments, naming them."""
    torch.ops.llama_kernels.cross_entropy_chunk_cuda(logits, target, loss, scale,
                                                     int(ignore_index), bool(write_grad))


def _walk(x, weight, target, losses, scale, *, ignore_index, write_grad, dx, dw_acc,
          rows_per_chunk=None) -> None:
    """The chunk loop: logits, one kernel, and (write_grad) the two gradient matmuls."""
    n, vocab = x.shape[0], weight.shape[0]
    rows = min(rows_per_chunk or _triton_ce.chunk_rows(n, vocab, x.dtype, x.device), n)
    buf = torch.empty((rows, vocab), dtype=x.dtype, device=x.device)
    wt = weight.t()
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        xc, zc = x[start:stop], buf[: stop - start]
        torch.mm(xc, wt, out=zc)
        cross_entropy_chunk(zc, target[start:stop], losses[start:stop],
                            scale if scale.dim() == 0 else scale[start:stop],
                            ignore_index=ignore_index, write_grad=write_grad)
        if write_grad:
            if dx is not None:
                torch.mm(zc, weight, out=dx[start:stop])
            if dw_acc is not None:
                _triton_ce._accumulate_fp32(dw_acc, zc.t(), xc)


def _grads_out(x, weight, grad_x, grad_weight):
    dx = torch.empty_like(x) if grad_x else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if grad_weight else None
    return dx, dw


def _finish(x, weight, dx, dw_acc):
    dx = x.new_empty(0) if dx is None else dx
    dw = weight.new_empty(0) if dw_acc is None else dw_acc.to(weight.dtype)
    return dx, dw


def linear_cross_entropy_fwd(x, weight, target, *, ignore_index: int, reduction: str,
                             grad_x: bool, grad_weight: bool, chunk_rows: int | None = None):
    """``(loss, dx, dweight)``: loss fp32 (a scalar, or (N,) for "none"); for "mean"/"sum" the
    gradients of that loss (grad_output 1) where asked for, else empty (0,) tensors.
    ``chunk_rows``: rows per chunk (None: the chunk rule)."""
    n = x.shape[0]
    with_grad = reduction != "none" and (grad_x or grad_weight)
    if reduction == "mean":
        count = (target != ignore_index).sum().to(torch.float32)
        scale = 1.0 / count  # inf with every target ignored: the kernel gives those rows 0
    else:
        scale = torch.ones((), dtype=torch.float32, device=x.device)
    losses = torch.empty((n,), dtype=torch.float32, device=x.device)
    dx, dw_acc = _grads_out(x, weight, with_grad and grad_x, with_grad and grad_weight)
    _walk(x, weight, target, losses, scale, ignore_index=ignore_index, write_grad=with_grad,
          dx=dx, dw_acc=dw_acc, rows_per_chunk=chunk_rows)
    if reduction == "none":
        loss = losses
    else:
        loss = losses.sum() if reduction == "sum" else losses.sum() / count  # 0 / 0 = nan
    return (loss, *_finish(x, weight, dx, dw_acc))


def linear_cross_entropy_bwd(grad_loss, x, weight, target, *, ignore_index: int, grad_x: bool,
                             grad_weight: bool, chunk_rows: int | None = None):
    """``(dx, dweight)`` of reduction "none" for the per-row ``grad_loss`` (N,): the chunks
    recomputed with row scale grad_loss[i]; empty (0,) where not asked for."""
    losses = torch.empty((x.shape[0],), dtype=torch.float32, device=x.device)  # unused
    dx, dw_acc = _grads_out(x, weight, grad_x, grad_weight)
    _walk(x, weight, target, losses, grad_loss.to(torch.float32), ignore_index=ignore_index,
          write_grad=True, dx=dx, dw_acc=dw_acc, rows_per_chunk=chunk_rows)
    return _finish(x, weight, dx, dw_acc)


def scale(grad: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``grad * g`` in fp32, rounded once to grad's dtype; g a one-element tensor."""
    g32 = g.to(torch.float32).reshape(())
    if grad.dtype == torch.float32:
        return grad * g32
    src = grad.contiguous().view(-1)
    out = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
    flat = out.view(-1)
    for start in range(0, src.numel(), SCALE_PIECE):
        piece = src[start:start + SCALE_PIECE]
        flat[start:start + SCALE_PIECE].copy_(piece.float().mul_(g32))
    return out
