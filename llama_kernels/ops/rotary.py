"""Rotary position embedding as a torch.library op with autograd, one impl per backend.

Registered op (``backend`` already resolved):
    rotary_apply(x, cos, sin, positions, interleaved, conjugate, backend) -> out
The backward of a rotation by t is the rotation by -t, i.e. the same op with ``conjugate``
flipped. Kernels see x (B, S, H, D) with unit stride along D and any other strides (q and k
sliced from a fused qkv projection), fp32 contiguous tables (T, D/2), int64 positions (B, S).
Table gradients (rarely wanted: the tables are usually constants) are plain torch ops.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from llama_kernels import reference
from llama_kernels.ops import _backend, _checks

MAX_KERNEL_HEAD_DIM = 256


@torch.library.custom_op("llama_kernels::rotary_apply", mutates_args=())
def rotary_apply(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor | None,
                 interleaved: bool, conjugate: bool, backend: str) -> Tensor:
    if positions is not None and not conjugate:  # the backward reuses checked positions
        _check_positions_range(positions, cos.shape[0])
    if backend == "torch":
        return reference.apply_rotary(x, cos, sin, interleaved=interleaved,
                                      positions=positions, conjugate=conjugate).contiguous()
    if x.stride(-1) != 1:
        x = x.contiguous()
    args = (x, cos.contiguous(), sin.contiguous(),
            None if positions is None else positions.to(torch.int64).contiguous(),
            interleaved, conjugate)
    if backend == "cuda":
        return _backend.cuda_op("rotary_cuda")(*args)
    return _backend.triton_module("rotary").rotary(*args)


@rotary_apply.register_fake
def _(x, cos, sin, positions, interleaved, conjugate, backend):
    return x.new_empty(x.shape)


def _setup(ctx, inputs, output):
    x, cos, sin, positions, interleaved, conjugate, backend = inputs
    ctx.save_for_backward(x, cos, sin, positions)
    ctx.interleaved, ctx.conjugate, ctx.backend = interleaved, conjugate, backend


def _backward(ctx, dy):
    x, cos, sin, positions = ctx.saved_tensors
    dx = dcos = dsin = None
    if ctx.needs_input_grad[0]:
        dx = rotary_apply(dy, cos, sin, positions, ctx.interleaved, not ctx.conjugate,
                          ctx.backend)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        dcos, dsin = reference.rotary_table_grads(dy, x, cos, sin, interleaved=ctx.interleaved,
                                                  positions=positions)
        if ctx.conjugate:
            dsin = -dsin
    return dx, dcos, dsin, None, None, None, None


rotary_apply.register_autograd(_backward, setup_context=_setup)


def rotary_tables(seq_len: int, head_dim: int, theta: float = 10000.0, *, device=None):
    """``(cos, sin)``, each fp32 ``(seq_len, head_dim // 2)``, angle ``t * theta**(-2i/D)``."""
    if not _is_int(seq_len) or seq_len < 1:
        raise ValueError(f"seq_len: expected a positive int, got {seq_len!r}")
    if not _is_int(head_dim) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim: expected a positive even int, got {head_dim!r}")
    # theta = inf would give angle 0 for every pair but the first: a silent identity rotation
    if not _checks.is_real(theta) or not math.isfinite(theta) or not theta > 0:
        raise ValueError(f"theta: expected a positive finite float, got {theta!r}")
    return reference.rotary_tables(int(seq_len), int(head_dim), float(theta), device=device)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check(x, cos, sin, positions):
    _checks.check_tensor("x", x, ndim=4)
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"x: expected an even head_dim (last dimension), got {head_dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        _checks.check_tensor(name, t, dtypes=(torch.float32,), ndim=2)
        if t.shape[1] != head_dim // 2:
            raise ValueError(f"{name}: expected shape (rows, {head_dim // 2}) for head_dim "
                             f"{head_dim}, got {tuple(t.shape)}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin: expected shape {tuple(cos.shape)} (that of cos), "
                         f"got {tuple(sin.shape)}")
    _checks.check_same_device(x=x, cos=cos, sin=sin)
    batch, seqlen = x.shape[:2]
    if positions is None:
        if cos.shape[0] < seqlen:
            raise ValueError(f"cos: expected at least {seqlen} rows (the seqlen of x) when "
                             f"positions is None, got {cos.shape[0]}; slice the tables at the "
                             "decoding offset (cos[p:p+S]) or pass positions")
        return
    _checks.check_tensor("positions", positions, dtypes=(torch.int32, torch.int64), ndim=2)
    if tuple(positions.shape) != (batch, seqlen):
        raise ValueError(f"positions: expected shape {(batch, seqlen)} (batch, seqlen of x), "
                         f"got {tuple(positions.shape)}")
    _checks.check_same_device(x=x, positions=positions)
    # The range of the values is checked inside the registered op (_check_positions_range), so
    # that it also runs in a torch.compile-d graph, where the op's body stays opaque.


def _check_positions_range(positions: Tensor, rows: int) -> None:
    """Values in [0, rows): one small reduction and one device sync, because an out-of-range
    position would make the kernels read outside the tables. Skipped while a CUDA graph is
    being captured (a sync is illegal there): the cuda kernel still traps such a position with
    a device assert; the triton kernel does not check."""
    if positions.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    lo, hi = (int(v) for v in torch.aminmax(positions))
    if lo < 0 or hi >= rows:
        raise ValueError(f"positions: expected values in [0, {rows}) (rows of the tables), got "
                         f"values in [{lo}, {hi}]")


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False,
                 positions: Tensor | None = None, backend: str | None = None) -> Tensor:
    """Rotate x ``(B, S, H, D)`` by the tables; ``interleaved`` pairs ``(2i, 2i+1)`` (Meta),
    else ``(i, i + D/2)`` (Hugging Face / GPT-NeoX). Token s uses row ``positions[b, s]``,
    or row s without positions."""
    _check(x, cos, sin, positions)
    unsupported = None
    if x.shape[-1] > MAX_KERNEL_HEAD_DIM:
        reason = f"head_dim {x.shape[-1]} (kernels take head_dim <= {MAX_KERNEL_HEAD_DIM})"
        unsupported = {"cuda": reason, "triton": reason}
    name = _backend.resolve(backend, op="apply_rotary", device=x.device,
                            cuda_kernel="rotary_cuda", triton_module="rotary",
                            unsupported=unsupported)
    return rotary_apply(x, cos, sin, positions, bool(interleaved), False, name)
