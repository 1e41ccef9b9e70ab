"""SwiGLU, ``silu(gate) * up``, in Triton, forward and backward.

Launchers (called by llama_kernels.ops.swiglu with 2-D row views, unit stride along columns
and any row stride, so gate and up may be the two halves of one fused projection):
    swiglu_fwd(gate, up) -> out
    swiglu_bwd(dout, gate, up) -> (dgate, dup)
Outputs are contiguous, in the inputs' dtype; all math in fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from llama_kernels.triton import _aot


@triton.jit
def _silu_mul(g, u):
    return g * tl.sigmoid(g) * u


@triton.jit
def _silu_mul_grads(d, g, u):
    s = tl.sigmoid(g)
    return d * u * s * (1.0 + g * (1.0 - s)), d * g * s  # dgate, dup


@triton.jit
def _swiglu_fwd_kernel(
    gate_ptr, up_ptr, out_ptr,
    n_rows, n_cols,
    stride_gate_row, stride_up_row, stride_out_row,
    BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Forward:  out = silu(g) * u = g * sigmoid(g) * u          (fp32, one rounding)
    # Backward: _swiglu_bwd_kernel.
    # Preconditions: unit stride along columns; grid (row tiles, column blocks).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    g = tl.load(gate_ptr + rows[:, None] * stride_gate_row + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows[:, None] * stride_up_row + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    out = _silu_mul(g, u)
    tl.store(out_ptr + rows[:, None] * stride_out_row + cols[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dout_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr,
    n_rows, n_cols,
    stride_dout_row, stride_gate_row, stride_up_row, stride_dgate_row, stride_dup_row,
    BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Forward:  out = g * s * u,  s = sigmoid(g)
    # Backward: dup = dout * g * s,  dgate = dout * u * s * (1 + g * (1 - s))   (fp32)
    # Preconditions: unit stride along columns; grid (row tiles, column blocks).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    d = tl.load(dout_ptr + rows[:, None] * stride_dout_row + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + rows[:, None] * stride_gate_row + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows[:, None] * stride_up_row + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    dgate, dup = _silu_mul_grads(d, g, u)
    tl.store(dgate_ptr + rows[:, None] * stride_dgate_row + cols[None, :],
             dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + rows[:, None] * stride_dup_row + cols[None, :],
             dup.to(dup_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_fwd_flat_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # The forward over n contiguous elements (gate, up and out each one run of rows x cols):
    # no row strides, no 2-D masks, no partly idle column blocks; the shape of torch.compile's
    # pointwise kernel (103% / 101% of the copy bandwidth on an H100 vs 96% / 94% for the 2-D
    # kernels, benchmarks/NOTES.md). Grid (cdiv(n, BLOCK),).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, _silu_mul(g, u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_flat_kernel(dout_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n,
                            BLOCK: tl.constexpr):
    # The backward over n contiguous elements (see _swiglu_fwd_flat_kernel).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    d = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dgate, dup = _silu_mul_grads(d, g, u)
    tl.store(dgate_ptr + offs, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offs, dup.to(dup_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------ settings

# Column block: 1024 = 4 warps x 32 threads x 8 values, one 128-bit access of a 16-bit type
# per thread per row. Wider rows (the FFN widths 11008..22016) take several column blocks, so
# a non-power-of-two width wastes at most part of its last block, not up to half a
# next_pow2 block (a whole-row next_pow2 block, as in Liger's SwiGLU, runs 1.4-1.6x slower
# at 11008 columns).
MAX_BLOCK_N = 1024
# Elements per program: 2048 (two rows of 1024, or several narrow rows) over 4 warps = 16
# values per thread per tensor; the backward keeps 3 inputs and 2 outputs live, still well
# under the register limit (AOT_CASES).
TILE_ELEMS = 2048
NUM_WARPS = 4


# The flat kernels: 2048 elements a program over 4 warps, 16 values per thread per tensor (two
# 128-bit accesses of a 16-bit type), the per-thread work of the 2-D kernels.
FLAT_BLOCK = 2048
FLAT_WARPS = 4


class ElementwiseLaunch(NamedTuple):
    block_rows: int
    block_n: int
    num_warps: int
    num_stages: int


def swiglu_launch_settings(n_rows: int, n_cols: int) -> ElementwiseLaunch:
    """Launch settings of both SwiGLU kernels; used by the launchers and AOT_CASES."""
    block_n = min(triton.next_power_of_2(n_cols), MAX_BLOCK_N)
    block_rows = min(max(1, TILE_ELEMS // block_n), triton.next_power_of_2(n_rows))
    num_warps = min(NUM_WARPS, max(1, block_rows * block_n // 256))  # >= 8 values per thread
    return ElementwiseLaunch(block_rows, block_n, num_warps, 1)  # no loop: stages do not apply


def _grid(n_rows: int, n_cols: int, s: ElementwiseLaunch):
    # rows on axis 0 (up to 2**31 - 1 programs), column blocks on axis 1 (limit 65535)
    return (triton.cdiv(n_rows, s.block_rows), triton.cdiv(n_cols, s.block_n))


# ------------------------------------------------------------------------------ launchers


def _check_rows(shape, **tensors) -> None:
    for name, t in tensors.items():
        if t.dim() != 2 or tuple(t.shape) != tuple(shape) or t.stride(1) != 1:
            raise ValueError(f"{name}: expected a 2-D {tuple(shape)} tensor with unit stride "
                             f"along columns, got shape {tuple(t.shape)} strides {t.stride()}")


def _flat(*tensors) -> bool:
    """Every tensor is one contiguous run of rows x cols elements (two separate projections,
    not the halves of one): the 1-D kernels apply. ``settings`` forces the 2-D ones."""
    return all(t.is_contiguous() for t in tensors)


def _flat_grid(n: int):
    return (triton.cdiv(n, FLAT_BLOCK),)


def _launch_fwd(gate, up, out, settings=None):
    _check_rows(gate.shape, gate=gate, up=up, out=out)
    n_rows, n_cols = gate.shape
    if settings is None and _flat(gate, up, out):
        n = gate.numel()
        _swiglu_fwd_flat_kernel[_flat_grid(n)](gate, up, out, n, BLOCK=FLAT_BLOCK,
                                               num_warps=FLAT_WARPS, num_stages=1)
        return
    s = settings or swiglu_launch_settings(n_rows, n_cols)
    _swiglu_fwd_kernel[_grid(n_rows, n_cols, s)](
        gate, up, out,
        n_rows, n_cols,
        gate.stride(0), up.stride(0), out.stride(0),
        BLOCK_ROWS=s.block_rows, BLOCK_N=s.block_n,
        num_warps=s.num_warps, num_stages=s.num_stages,
    )


def _launch_bwd(dout, gate, up, dgate, dup, settings=None):
    _check_rows(gate.shape, dout=dout, gate=gate, up=up, dgate=dgate, dup=dup)
    n_rows, n_cols = gate.shape
    if settings is None and _flat(dout, gate, up, dgate, dup):
        n = gate.numel()
        _swiglu_bwd_flat_kernel[_flat_grid(n)](dout, gate, up, dgate, dup, n, BLOCK=FLAT_BLOCK,
                                               num_warps=FLAT_WARPS, num_stages=1)
        return
    s = settings or swiglu_launch_settings(n_rows, n_cols)
    _swiglu_bwd_kernel[_grid(n_rows, n_cols, s)](
        dout, gate, up, dgate, dup,
        n_rows, n_cols,
        dout.stride(0), gate.stride(0), up.stride(0), dgate.stride(0), dup.stride(0),
        BLOCK_ROWS=s.block_rows, BLOCK_N=s.block_n,
        num_warps=s.num_warps, num_stages=s.num_stages,
    )


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor, *, settings=None) -> torch.Tensor:
    """``silu(gate) * up``, contiguous, in gate's dtype."""
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    _launch_fwd(gate, up, out, settings)
    return out


def swiglu_bwd(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, *, settings=None):
    """``(dgate, dup)``, contiguous, in the dtypes of gate and up."""
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    _launch_bwd(dout, gate, up, dgate, dup, settings)
    return dgate, dup


# ------------------------------------------------------------------------------ AOT cases

# FFN hidden widths of the paper's models (2/3 * 4 * dim rounded up to 256) and the row widths.
AOT_COLS = (4096, 5120, 6656, 8192, 11008, 13824, 17920, 22016, 65536)
AOT_ROWS = 4096


def _aot_cases() -> list[_aot.AotCase]:
    # Widths that share launch settings compile to one kernel (every width >= 1024 does):
    # one case per distinct setting, named by the widths it stands for.
    groups: dict[ElementwiseLaunch, list[int]] = {}
    for cols in AOT_COLS:
        groups.setdefault(swiglu_launch_settings(AOT_ROWS, cols), []).append(cols)
    cases = []
    for dtype in ("fp16", "bf16"):
        t = "*" + dtype
        for s, widths in groups.items():
            span = f"cols={widths[0]}" + (f"..{widths[-1]}" if len(widths) > 1 else "")
            consts = dict(BLOCK_ROWS=s.block_rows, BLOCK_N=s.block_n)
            cases.append(_aot.case(
                f"swiglu_fwd {span} {dtype}", _swiglu_fwd_kernel,
                types=dict(gate_ptr=t, up_ptr=t, out_ptr=t, n_rows="i32", n_cols="i32",
                           stride_gate_row="i32", stride_up_row="i32", stride_out_row="i32"),
                constexprs=consts, num_warps=s.num_warps, num_stages=s.num_stages))
            cases.append(_aot.case(
                f"swiglu_bwd {span} {dtype}", _swiglu_bwd_kernel,
                types=dict(dout_ptr=t, gate_ptr=t, up_ptr=t, dgate_ptr=t, dup_ptr=t,
                           n_rows="i32", n_cols="i32", stride_dout_row="i32",
                           stride_gate_row="i32", stride_up_row="i32", stride_dgate_row="i32",
                           stride_dup_row="i32"),
                constexprs=consts, num_warps=s.num_warps, num_stages=s.num_stages))
        # n as i32: Triton's launcher passes an int below 2**31 so (180 M elements at 16384 x
        # 11008); larger tensors get their own i64 compile of the same code.
        cases.append(_aot.case(
            f"swiglu_fwd_flat {dtype}", _swiglu_fwd_flat_kernel,
            types=dict(gate_ptr=t, up_ptr=t, out_ptr=t, n="i32"),
            constexprs=dict(BLOCK=FLAT_BLOCK), num_warps=FLAT_WARPS, num_stages=1))
        cases.append(_aot.case(
            f"swiglu_bwd_flat {dtype}", _swiglu_bwd_flat_kernel,
            types=dict(dout_ptr=t, gate_ptr=t, up_ptr=t, dgate_ptr=t, dup_ptr=t, n="i32"),
            constexprs=dict(BLOCK=FLAT_BLOCK), num_warps=FLAT_WARPS, num_stages=1))
    return cases


AOT_CASES = _aot_cases()
