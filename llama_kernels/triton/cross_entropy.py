"""Linear + cross entropy in Triton, chunked over the tokens, without the (N, vocab) logits.

Math, per row i of a chunk (z_i = x_i W^T, the row's logits; t_i its target):
    lse_i  = log sum_v exp(z_iv)                 (online: running max m, running sum s)
    loss_i = lse_i - z_i[t_i]                    (0 where t_i == ignore_index)
    dz_i   = (softmax(z_i) - onehot(t_i)) * c_i  (c_i: the row's scale, 0 where ignored)
    dx_i   = dz_i W,   dW = sum_i dz_i^T x_i
c_i is 1/(non-ignored count) for "mean", 1 for "sum", grad_output_i for "none".

Launchers (called by llama_kernels.ops.linear_cross_entropy; x (N, dim), weight (vocab, dim),
target (N,) int64):
    linear_cross_entropy_fwd(x, weight, target, ...) -> (loss, dx, dweight)
    linear_cross_entropy_bwd(grad_loss, x, weight, target, ...) -> (dx, dweight)   # "none"
    scale(grad, g) -> grad * g                                   # the scalar reductions' bwd
    cross_entropy_chunk(logits, target, loss, scale, ...)        # one kernel launch
Per chunk of rows the host does: logits = x_c W^T (torch.mm: cuBLAS, in x's dtype with fp32
accumulation), ONE launch of _ce_chunk_kernel (loss per row, then the logits overwritten in place
by dz, in x's dtype), dx_c = dz W (written into its rows of dx) and dW += dz^T x_c (an fp32
accumulator, rounded to weight's dtype once at the end; a 16-bit accumulator would round every
chunk's partial sum).

Gradient strategy. "mean"/"sum" (a scalar loss): the gradients are made in the forward, as
Liger-Kernel's fused linear cross entropy does, and the backward only scales dx and dW by the
scalar grad_output (``scale``: fp32 multiply, one rounding; exact for 1 and powers of two): 3
matmuls in all (eager: 3, and it holds the logits). "none": grad_output is per row and unknown
in the forward, and dW = sum_i g_i dz_i^T x_i cannot be split per row without an (N, vocab)
tensor, so the forward makes only the losses (1 matmul) and the backward recomputes each chunk
with c_i = grad_output_i (3 matmuls): 4 in all, nothing saved but the inputs.

Chunk size (``chunk_rows``): the chunk's logits take at most 1/FREE_FRACTION of the free device
memory (torch.cuda.mem_get_info plus the caching allocator's unused blocks, read after dx and
the dW accumulator are allocated), so a 128k vocabulary gets fewer rows than a 32k one; clamped
to [MIN_CHUNK_ROWS, MAX_CHUNK_ROWS] and balanced so the chunks are equal (multiples of 128). A
fixed byte budget is what made Liger launch-bound at vocab 128k (few rows a chunk): below ~1024
rows each chunk's three GEMMs re-read all of W for too little work (a GEMM with M rows does M
flops per byte of W; the H100's ridge is ~300), past 8192 more rows only cost memory.

Precision: the logits are rounded to x's dtype by the matmul (as eager's F.linear), then all the
softmax math is fp32; the loss is fp32; dz is rounded to x's dtype once; dx and dW in the inputs'
dtypes. A target outside [0, vocab) that is not ignore_index reaches the kernel only when the
host check is skipped (torch.compile, CUDA graph capture): its row's loss is NaN and nothing is
read out of bounds.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple

import torch
import triton
import triton.language as tl

from llama_kernels.triton import _aot


@triton.jit
def _ce_chunk_kernel(
    logits_ptr, target_ptr, loss_ptr, scale_ptr,
    n_vocab, stride_row, stride_scale, ignore_index,
    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # Forward:  lse = m + log(s) over BLOCK_V pieces of the row (m running max, s running sum of
    #           exp(z - m), rescaled by exp(m_old - m_new): one exp per logit), then
    #           loss = lse - z[t], 0 where t == ignore_index.                        (fp32)
    # Backward (WRITE_GRAD): z <- (exp(z - lse) - [v == t]) * c, c = scale[row * stride_scale]
    #           (0 where ignored), in place, rounded to the logits' dtype once.
    # Preconditions: one program per row; unit stride along the vocabulary; target int64;
    # loss fp32 (rows,); scale fp32 (stride 0: one scalar for every row).
    row = tl.program_id(0).to(tl.int64)
    z_row = logits_ptr + row * stride_row
    t = tl.load(target_ptr + row)
    ignored = t == ignore_index
    in_range = (t >= 0) & (t < n_vocab)
    cols = tl.arange(0, BLOCK_V)

    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    for start in range(0, n_vocab, BLOCK_V):
        offs = start + cols
        z = tl.load(z_row + offs, mask=offs < n_vocab, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    z_t = tl.load(z_row + tl.where(in_range, t, 0)).to(tl.float32)
    loss = tl.where(in_range, lse - z_t, float("nan"))
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))

    if WRITE_GRAD:
        c = tl.load(scale_ptr + row * stride_scale)
        c = tl.where(ignored, 0.0, c)  # where, not a product: c is inf for "mean" of 0 rows
        for start in range(0, n_vocab, BLOCK_V):
            offs = start + cols
            mask = offs < n_vocab
            z = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
            dz = (tl.exp(z - lse) - tl.where(offs == t, 1.0, 0.0)) * c
            tl.store(z_row + offs, dz.to(logits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(src_ptr, g_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    # dst = round(src * g), src and dst n contiguous elements, g one fp32 value: the product in
    # fp32 (a 16-bit tensor times an fp32 0-dim tensor in torch rounds g to 16 bits first).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr)
    x = tl.load(src_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst_ptr + offs, (x * g).to(dst_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------ settings

# Vocabulary block: 4096 logits over 8 warps = 16 values a thread (two 128-bit loads of a
# 16-bit type). The row is walked in blocks (twice with WRITE_GRAD), never held whole: a
# next_pow2 row (131072 at vocab 128256) would be 512 values a thread and spill. Each block
# costs two block reductions (max, sum), amortized over 4096 logits; one exp per logit per
# pass keeps the MUFU under the ~7.5 logits/clock/SM that HBM delivers on an H100. Registers
# stay low (AOT_CASES) so several programs share an SM and hide the load latency; num_stages=1:
# the loop has no dot to pipeline for, occupancy does the hiding.
MAX_BLOCK_V = 4096
VALUES_PER_THREAD = 16
MAX_WARPS = 8
# The scale kernel: the flat elementwise shape of swiglu's (2048 elements, 4 warps).
SCALE_BLOCK = 2048
SCALE_WARPS = 4

# Chunk rule (module docstring).
FREE_FRACTION = 8
MIN_CHUNK_ROWS = 1024
MAX_CHUNK_ROWS = 8192
ROW_MULTIPLE = 128
# Under the interpreter (CPU tensors) there is no device memory to ask: this stands for it.
CPU_FREE_BYTES = 1 << 30


class CrossEntropyLaunch(NamedTuple):
    block_v: int
    num_warps: int
    num_stages: int


def _block_settings(block_v: int) -> CrossEntropyLaunch:
    num_warps = min(MAX_WARPS, max(1, block_v // (32 * VALUES_PER_THREAD)))
    return CrossEntropyLaunch(block_v, num_warps, 1)


def cross_entropy_launch_settings(vocab: int) -> CrossEntropyLaunch:
    """Launch settings of _ce_chunk_kernel; used by the launchers and AOT_CASES."""
    return _block_settings(min(triton.next_power_of_2(vocab), MAX_BLOCK_V))


_FORCED: dict = {}


@contextlib.contextmanager
def forced(*, chunk_rows: int | None = None, block_v: int | None = None) -> Iterator[None]:
    """Inside the block every launcher call uses these (None: the rule): tests force several
    chunks and several vocabulary blocks on small shapes, and tuning tries other sizes."""
    saved = dict(_FORCED)
    _FORCED.update(chunk_rows=chunk_rows, block_v=block_v)
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)


def _free_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return CPU_FREE_BYTES
    free, _total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def chunk_rows(n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device, *,
               free_bytes: int | None = None) -> int:
    """Rows a chunk takes: its (rows, vocab) logits within 1/FREE_FRACTION of the free memory,
    clamped to [MIN_CHUNK_ROWS, MAX_CHUNK_ROWS], then evened out over the chunks that needs
    (a multiple of ROW_MULTIPLE), never more than n_rows."""
    free = _free_bytes(device) if free_bytes is None else free_bytes
    rows = free // (FREE_FRACTION * vocab * dtype.itemsize)
    rows = min(max(rows, MIN_CHUNK_ROWS), MAX_CHUNK_ROWS) // ROW_MULTIPLE * ROW_MULTIPLE
    n_chunks = triton.cdiv(n_rows, rows)  # then even chunks, still within rows
    rows = triton.cdiv(triton.cdiv(n_rows, n_chunks), ROW_MULTIPLE) * ROW_MULTIPLE
    return max(1, min(rows, n_rows))


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output and scratch buffer of the launchers (tests poison them through this)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ------------------------------------------------------------------------------ launchers


def cross_entropy_chunk(logits, target, loss, scale, *, ignore_index: int, write_grad: bool,
                        settings: CrossEntropyLaunch | None = None) -> None:
    """One launch over a (rows, vocab) logits view (unit stride along vocab, any row stride):
    loss[i] for each row and, with ``write_grad``, the logits replaced by dz. ``scale`` fp32:
    0-dim (every row) or (rows,) (any stride)."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError(f"logits: expected unit stride along vocab, got strides "
                         f"{logits.stride()}")
    if target.shape != (rows,) or target.dtype != torch.int64:
        raise ValueError(f"target: expected int64 ({rows},), got {target.dtype} "
                         f"{tuple(target.shape)}")
    if loss.shape != (rows,) or loss.dtype != torch.float32 or loss.stride(0) != 1:
        raise ValueError(f"loss: expected contiguous fp32 ({rows},), got {loss.dtype} "
                         f"{tuple(loss.shape)}")
    if scale.dtype != torch.float32 or scale.shape not in ((), (rows,)):
        raise ValueError(f"scale: expected fp32 () or ({rows},), got {scale.dtype} "
                         f"{tuple(scale.shape)}")
    if settings is None and _FORCED.get("block_v"):
        settings = _block_settings(_FORCED["block_v"])
    s = settings or cross_entropy_launch_settings(vocab)
    _ce_chunk_kernel[(rows,)](
        logits, target, loss, scale,
        vocab, logits.stride(0), scale.stride(0) if scale.dim() else 0, ignore_index,
        WRITE_GRAD=write_grad, BLOCK_V=s.block_v,
        num_warps=s.num_warps, num_stages=s.num_stages,
    )


# Which fp32-output GEMM this torch offers on CUDA (found at the first call): "addmm" (beta = 1
# straight into the fp32 accumulator, torch >= 2.8 with the fp32-self rule), "mm" (an fp32
# product, then added), "cast" (the product in the 16-bit dtype, then added in fp32).
_GPU_FP32_GEMM: list[str] = []


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with a, b in a 16-bit dtype, the product not rounded to 16 bits."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if not a.is_cuda:  # the interpreter: the exact fp32 product
        acc.addmm_(a.float(), b.float())
        return
    for path in _GPU_FP32_GEMM or ["addmm", "mm", "cast"]:
        try:
            if path == "addmm":
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            elif path == "mm":
                acc.add_(torch.mm(a, b, out_dtype=torch.float32))
            else:
                acc.add_(torch.mm(a, b))
        except (RuntimeError, TypeError) as e:  # argument checks, raised before any launch
            if isinstance(e, torch.OutOfMemoryError) or path == "cast":
                raise
            continue
        if not _GPU_FP32_GEMM:
            _GPU_FP32_GEMM.append(path)
        return


def _walk(x, weight, target, losses, scale, *, ignore_index, write_grad, dx, dw_acc,
          rows_per_chunk=None, settings=None) -> None:
    """The chunk loop: logits, one kernel, and (write_grad) the two gradient matmuls."""
    n, vocab = x.shape[0], weight.shape[0]
    rows = rows_per_chunk or _FORCED.get("chunk_rows") or chunk_rows(n, vocab, x.dtype, x.device)
    rows = min(rows, n)
    buf = _empty((rows, vocab), x.dtype, x.device)
    wt = weight.t()
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        xc, zc = x[start:stop], buf[: stop - start]
        torch.mm(xc, wt, out=zc)
        cross_entropy_chunk(zc, target[start:stop], losses[start:stop],
                            scale if scale.dim() == 0 else scale[start:stop],
                            ignore_index=ignore_index, write_grad=write_grad, settings=settings)
        if write_grad:
            if dx is not None:
                torch.mm(zc, weight, out=dx[start:stop])
            if dw_acc is not None:
                _accumulate_fp32(dw_acc, zc.t(), xc)


def _grads_out(x, weight, grad_x, grad_weight):
    dx = _empty(x.shape, x.dtype, x.device) if grad_x else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if grad_weight else None
    return dx, dw


def _finish(x, weight, dx, dw_acc):
    dx = x.new_empty(0) if dx is None else dx
    dw = weight.new_empty(0) if dw_acc is None else dw_acc.to(weight.dtype)
    return dx, dw


def linear_cross_entropy_fwd(x, weight, target, *, ignore_index: int, reduction: str,
                             grad_x: bool, grad_weight: bool, chunk_rows: int | None = None,
                             settings: CrossEntropyLaunch | None = None):
    """``(loss, dx, dweight)``: loss fp32 (a scalar, or (N,) for "none"); for "mean"/"sum" the
    gradients of that loss (grad_output 1) where asked for, else empty (0,) tensors."""
    n = x.shape[0]
    with_grad = reduction != "none" and (grad_x or grad_weight)
    if reduction == "mean":
        count = (target != ignore_index).sum().to(torch.float32)
        scale = 1.0 / count  # inf with every target ignored: the kernel gives those rows 0
    else:
        scale = torch.ones((), dtype=torch.float32, device=x.device)
    losses = _empty((n,), torch.float32, x.device)
    dx, dw_acc = _grads_out(x, weight, with_grad and grad_x, with_grad and grad_weight)
    _walk(x, weight, target, losses, scale, ignore_index=ignore_index, write_grad=with_grad,
          dx=dx, dw_acc=dw_acc, rows_per_chunk=chunk_rows, settings=settings)
    if reduction == "none":
        loss = losses
    else:
        loss = losses.sum() if reduction == "sum" else losses.sum() / count  # 0 / 0 = nan
    return (loss, *_finish(x, weight, dx, dw_acc))


def linear_cross_entropy_bwd(grad_loss, x, weight, target, *, ignore_index: int, grad_x: bool,
                             grad_weight: bool, chunk_rows: int | None = None,
                             settings: CrossEntropyLaunch | None = None):
    """``(dx, dweight)`` of reduction "none" for the per-row ``grad_loss`` (N,): the chunks
    recomputed with row scale grad_loss[i]; empty (0,) where not asked for."""
    losses = _empty((x.shape[0],), torch.float32, x.device)  # recomputed, unused
    dx, dw_acc = _grads_out(x, weight, grad_x, grad_weight)
    _walk(x, weight, target, losses, grad_loss.to(torch.float32), ignore_index=ignore_index,
          write_grad=True, dx=dx, dw_acc=dw_acc, rows_per_chunk=chunk_rows, settings=settings)
    return _finish(x, weight, dx, dw_acc)


def scale(grad: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``grad * g`` in fp32, rounded once to grad's dtype; g a one-element tensor."""
    src = grad.contiguous()
    out = _empty(grad.shape, grad.dtype, grad.device)
    g32 = g.to(torch.float32).reshape(1)
    n = src.numel()
    _scale_kernel[(triton.cdiv(n, SCALE_BLOCK),)](src, g32, out, n, BLOCK=SCALE_BLOCK,
                                                   num_warps=SCALE_WARPS, num_stages=1)
    return out


# ------------------------------------------------------------------------------ AOT cases

# LLaMA 1/2 and LLaMA 3 vocabularies: both take the same settings (one case per setting).
AOT_VOCABS = (32000, 128256)


def _aot_cases() -> list[_aot.AotCase]:
    groups: dict[CrossEntropyLaunch, list[int]] = {}
    for vocab in AOT_VOCABS:
        groups.setdefault(cross_entropy_launch_settings(vocab), []).append(vocab)
    cases = []
    for dtype in ("fp16", "bf16", "fp32"):
        for s, vocabs in groups.items():
            span = "vocab=" + ",".join(map(str, vocabs))
            for write_grad in (False, True):
                cases.append(_aot.case(
                    f"ce_chunk{'_grad' if write_grad else ''} {span} {dtype}", _ce_chunk_kernel,
                    types=dict(logits_ptr="*" + dtype, target_ptr="*i64", loss_ptr="*fp32",
                               scale_ptr="*fp32", n_vocab="i32", stride_row="i32",
                               stride_scale="i32", ignore_index="i32"),
                    constexprs=dict(WRITE_GRAD=write_grad, BLOCK_V=s.block_v),
                    not_divisible=("stride_scale", "ignore_index"),
                    num_warps=s.num_warps, num_stages=s.num_stages))
        cases.append(_aot.case(
            f"ce_scale {dtype}", _scale_kernel,
            types=dict(src_ptr="*" + dtype, g_ptr="*fp32", dst_ptr="*" + dtype, n="i32"),
            constexprs=dict(BLOCK=SCALE_BLOCK), num_warps=SCALE_WARPS, num_stages=1))
    return cases


AOT_CASES = _aot_cases()
