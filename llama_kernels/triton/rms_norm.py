"""RMSNorm and residual-add + RMSNorm in Triton, forward and backward.

Launchers (called by llama_kernels.ops.rms_norm with 2-D row views, unit stride along dim):
    rms_norm_fwd(x, weight, eps) -> (y, rstd)
    add_rms_norm_fwd(x, residual, weight, eps) -> (y, h, rstd)
    rms_norm_bwd(dy, x, weight, rstd, dh) -> (dx, dweight)

Two shapes of program, picked by ``rms_norm_launch_settings``: rows up to MAX_FUSED_* wide are
held in registers whole (several narrow rows per program); wider rows are walked in CHUNK-wide
pieces, twice (sum of squares, then output), so no width spills registers (a kernel that holds
a whole next_pow2 row, as Liger's RMSNorm does, spills between 32k and 65k columns).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from llama_kernels.triton import _aot


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, rstd_ptr,
    n_rows, n_cols, eps,
    stride_x_row, stride_res_row, stride_y_row, stride_h_row,
    HAS_RESIDUAL: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNKED: tl.constexpr,
):
    # Forward:  h = round(x + residual)      (HAS_RESIDUAL; fp32 add, rounded to h's dtype)
    #           rstd = 1 / sqrt(mean(h^2) + eps),  y = round(h * rstd * w)   (fp32, one rounding)
    # Backward: _rms_norm_bwd_kernel.
    # Preconditions: unit stride along columns; rstd fp32 (n_rows,); one program per
    # BLOCK_ROWS rows; CHUNKED=False needs BLOCK_N >= n_cols, CHUNKED=True loops over the row
    # in BLOCK_N pieces twice (the second pass re-reads x, or the h this program just stored).
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_N)
    x_row = x_ptr + rows[:, None] * stride_x_row
    y_row = y_ptr + rows[:, None] * stride_y_row
    if HAS_RESIDUAL:
        res_row = res_ptr + rows[:, None] * stride_res_row
        h_row = h_ptr + rows[:, None] * stride_h_row

    if CHUNKED:
        acc = tl.zeros((BLOCK_ROWS, BLOCK_N), dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c < n_cols)[None, :]
            x = tl.load(x_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                r = tl.load(res_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
                h = (x + r).to(h_ptr.dtype.element_ty)
                tl.store(h_row + c[None, :], h, mask=mask)
                x = h.to(tl.float32)
            acc += x * x
        rstd = tl.math.rsqrt(tl.sum(acc, axis=1) / n_cols + eps)
        tl.store(rstd_ptr + rows, rstd, mask=row_mask)
        if HAS_RESIDUAL:
            tl.debug_barrier()  # h stored above by other threads of this program is read below
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c < n_cols)[None, :]
            if HAS_RESIDUAL:
                x = tl.load(h_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(x_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + c, mask=c < n_cols, other=0.0).to(tl.float32)
            y = x * rstd[:, None] * w[None, :]
            tl.store(y_row + c[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        x = tl.load(x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(res_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            h = (x + r).to(h_ptr.dtype.element_ty)
            tl.store(h_row + cols[None, :], h, mask=mask)
            x = h.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        tl.store(rstd_ptr + rows, rstd, mask=row_mask)
        w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        y = x * rstd[:, None] * w[None, :]
        tl.store(y_row + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dh_ptr, dx_ptr, dw_partial_ptr,
    n_rows, n_cols,
    stride_dy_row, stride_x_row, stride_dh_row, stride_dx_row, stride_dw_partial_row,
    HAS_DH: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNKED: tl.constexpr,
):
    # Forward:  y = xhat * w,  xhat = x * rstd,  rstd = 1 / sqrt(mean(x^2) + eps)
    # Backward: g = dy * w,  dx = rstd * (g - xhat * mean(g * xhat)) (+ dh, the gradient that
    #           reaches h = x + residual directly),  dw = sum_rows(dy * xhat).
    # Deterministic dw: program p walks row tiles p, p + P, p + 2P, ... and writes its fp32
    # partial sum to row p of dw_partial (P, n_cols); the host sums the P rows afterwards.
    # Preconditions: unit stride along columns; rstd fp32 (n_rows,) contiguous; dw_partial
    # fp32 zero-filled when CHUNKED (its rows are read-modify-written per row tile), any
    # content otherwise (written once).
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    n_tiles = tl.cdiv(n_rows, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_N)
    dwp_row = dw_partial_ptr + pid.to(tl.int64) * stride_dw_partial_row

    if CHUNKED:
        for tile in range(pid, n_tiles, n_progs):
            rows = tl.arange(0, BLOCK_ROWS).to(tl.int64) + tile * BLOCK_ROWS
            row_mask = rows < n_rows
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
            acc = tl.zeros((BLOCK_ROWS, BLOCK_N), dtype=tl.float32)
            for start in range(0, n_cols, BLOCK_N):
                c = start + cols
                mask = row_mask[:, None] & (c < n_cols)[None, :]
                x = tl.load(x_ptr + rows[:, None] * stride_x_row + c[None, :], mask=mask,
                            other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + rows[:, None] * stride_dy_row + c[None, :], mask=mask,
                             other=0.0).to(tl.float32)
                w = tl.load(w_ptr + c, mask=c < n_cols, other=0.0).to(tl.float32)
                acc += dy * w[None, :] * x
            mean_gxhat = tl.sum(acc, axis=1) * rstd / n_cols
            for start in range(0, n_cols, BLOCK_N):
                c = start + cols
                mask = row_mask[:, None] & (c < n_cols)[None, :]
                x = tl.load(x_ptr + rows[:, None] * stride_x_row + c[None, :], mask=mask,
                            other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + rows[:, None] * stride_dy_row + c[None, :], mask=mask,
                             other=0.0).to(tl.float32)
                w = tl.load(w_ptr + c, mask=c < n_cols, other=0.0).to(tl.float32)
                xhat = x * rstd[:, None]
                dx = rstd[:, None] * (dy * w[None, :] - xhat * mean_gxhat[:, None])
                if HAS_DH:
                    dx += tl.load(dh_ptr + rows[:, None] * stride_dh_row + c[None, :],
                                  mask=mask, other=0.0).to(tl.float32)
                tl.store(dx_ptr + rows[:, None] * stride_dx_row + c[None, :],
                         dx.to(dx_ptr.dtype.element_ty), mask=mask)
                dw = tl.load(dwp_row + c, mask=c < n_cols, other=0.0)
                dw += tl.sum(dy * xhat, axis=0)
                tl.store(dwp_row + c, dw, mask=c < n_cols)
            tl.debug_barrier()  # the next tile reads the dw_partial row other threads stored
    else:
        col_mask = cols < n_cols
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros((BLOCK_ROWS, BLOCK_N), dtype=tl.float32)
        for tile in range(pid, n_tiles, n_progs):
            rows = tl.arange(0, BLOCK_ROWS).to(tl.int64) + tile * BLOCK_ROWS
            row_mask = rows < n_rows
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_x_row + cols[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + rows[:, None] * stride_dy_row + cols[None, :], mask=mask,
                         other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
            xhat = x * rstd[:, None]
            g = dy * w[None, :]
            mean_gxhat = tl.sum(g * xhat, axis=1) / n_cols
            dx = rstd[:, None] * (g - xhat * mean_gxhat[:, None])
            if HAS_DH:
                dx += tl.load(dh_ptr + rows[:, None] * stride_dh_row + cols[None, :],
                              mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + rows[:, None] * stride_dx_row + cols[None, :],
                     dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw_acc += dy * xhat
        tl.store(dwp_row + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


# ------------------------------------------------------------------------------ settings

# Widest row held in registers whole. Forward: 16384 fp32 values over 16 warps is 32 per
# thread (x, then y), far below the 255-register limit; wider rows go through the chunked loop.
# Backward holds x, dy, weight and the dw accumulator at once (about twice the forward's live
# values), so it switches to the chunked loop one power of two earlier.
MAX_FUSED_FWD = 16384
MAX_FUSED_BWD = 8192
# Chunk of the chunked loop: 4096 columns over 8 warps = 16 values per thread per tensor
# (two 128-bit loads of a 16-bit type), the same per-thread work as the fused path at 4096.
CHUNK = 4096
# Elements one program moves per tile: narrow rows are packed BLOCK_ROWS to a program until a
# tile holds this many, so that a 123-wide row does not leave 3/4 of a 4-warp program idle.
TILE_ELEMS = 4096
# Target values per thread: forward 16 = two 128-bit accesses of fp16/bf16 per tensor.
# The backward keeps four row-wide fp32 values live per element (x, dy, weight, dw
# accumulator): 16 per thread cost ~105 registers, i.e. two 8-warp programs per SM at 4096;
# 8 per thread (one 128-bit access per tensor) halves that and doubles the warps in flight.
ELEMS_PER_THREAD = 16
ELEMS_PER_THREAD_BWD = 8
MAX_WARPS = 16
MAX_WARPS_BWD = 32


class RowLaunch(NamedTuple):
    block_rows: int
    block_n: int
    chunked: bool
    num_warps: int
    num_stages: int


def rms_norm_launch_settings(n_rows: int, n_cols: int, *, backward: bool = False) -> RowLaunch:
    """Launch settings of the forward (or backward) row kernel; used by launchers and AOT_CASES."""
    max_fused = MAX_FUSED_BWD if backward else MAX_FUSED_FWD
    width = triton.next_power_of_2(n_cols)
    chunked = width > max_fused
    block_n = CHUNK if chunked else width
    block_rows = 1 if chunked else min(max(1, TILE_ELEMS // block_n),
                                       triton.next_power_of_2(n_rows))
    tile = block_rows * block_n
    per_thread = ELEMS_PER_THREAD_BWD if backward else ELEMS_PER_THREAD
    num_warps = min(max(1, tile // (32 * per_thread)), MAX_WARPS_BWD if backward else MAX_WARPS)
    # One stage (no software pipelining): only wide rows loop, and latency is hidden by
    # several programs per SM; more stages would spend shared memory on prefetch buffers.
    # Untimed on a GPU: the first knob to try for the chunked (>16k) path.
    return RowLaunch(block_rows, block_n, chunked, num_warps, 1)


def _num_sms(device: torch.device) -> int:
    """SM count on a GPU; under the interpreter a small number (programs run one at a time)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def bwd_programs(n_rows: int, s: RowLaunch, num_sms: int) -> int:
    """Persistent grid of the backward: as many programs as fit on the GPU at once, never more
    than there are row tiles. The backward uses about 64 registers per thread (AOT_CASES), so
    a 512-thread program (4096-element tile) fits twice per SM and a 1024-thread one once.
    It also fixes the rows of the fp32 dw partial buffer, (programs, n_cols), which stays
    small next to x: 2 x SMs rows."""
    per_sm = 2 if s.block_rows * s.block_n <= TILE_ELEMS else 1
    return max(1, min(triton.cdiv(n_rows, s.block_rows), num_sms * per_sm))


# ------------------------------------------------------------------------------ launchers


def _check_rows(name: str, t: torch.Tensor, n_cols: int) -> None:
    if t.dim() != 2 or t.shape[1] != n_cols or t.stride(1) != 1:
        raise ValueError(f"{name}: expected a 2-D (rows, {n_cols}) tensor with unit stride "
                         f"along dim, got shape {tuple(t.shape)} strides {t.stride()}")


def _check_vectors(weight: torch.Tensor, rstd: torch.Tensor, n_rows: int, n_cols: int) -> None:
    if weight.shape != (n_cols,):
        raise ValueError(f"weight: expected shape ({n_cols},), got {tuple(weight.shape)}")
    if rstd.shape != (n_rows,) or rstd.dtype != torch.float32 or not rstd.is_contiguous():
        raise ValueError(f"rstd: expected a contiguous fp32 ({n_rows},) tensor, got "
                         f"{rstd.dtype} {tuple(rstd.shape)} strides {rstd.stride()}")


def _launch_fwd(x, residual, weight, eps, y, h, rstd, settings=None):
    """Writes y (and h) and rstd, each through its own strides (tests pass guarded views)."""
    n_rows, n_cols = x.shape
    for name, t in (("x", x), ("residual", residual), ("y", y), ("h", h)):
        if t is not None:
            _check_rows(name, t, n_cols)
    _check_vectors(weight, rstd, n_rows, n_cols)
    s = settings or rms_norm_launch_settings(n_rows, n_cols)
    has_res = residual is not None
    grid = (triton.cdiv(n_rows, s.block_rows),)
    _rms_norm_fwd_kernel[grid](
        x, residual, weight.contiguous(), y, h, rstd,
        n_rows, n_cols, eps,
        x.stride(0), residual.stride(0) if has_res else 0, y.stride(0),
        h.stride(0) if has_res else 0,
        HAS_RESIDUAL=has_res, BLOCK_ROWS=s.block_rows, BLOCK_N=s.block_n, CHUNKED=s.chunked,
        num_warps=s.num_warps, num_stages=s.num_stages,
    )


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, *, settings=None):
    """``(y, rstd)``: y contiguous (rows, dim) in x's dtype, rstd fp32 (rows,)."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    _launch_fwd(x, None, weight, eps, y, None, rstd, settings)
    return y, rstd


def add_rms_norm_fwd(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     *, settings=None):
    """``(y, h, rstd)`` with h = x + residual (rounded to x's dtype) and y = rms_norm(h)."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    _launch_fwd(x, residual, weight, eps, y, h, rstd, settings)
    return y, h, rstd


def _launch_bwd(dy, x, weight, rstd, dh, dx, settings=None, n_programs=None):
    """Writes dx through its strides; returns the fp32 dw partial buffer (programs, dim)."""
    n_rows, n_cols = x.shape
    for name, t in (("dy", dy), ("x", x), ("dh", dh), ("dx", dx)):
        if t is not None:
            _check_rows(name, t, n_cols)
    _check_vectors(weight, rstd, n_rows, n_cols)
    s = settings or rms_norm_launch_settings(n_rows, n_cols, backward=True)
    n_progs = n_programs or bwd_programs(n_rows, s, _num_sms(x.device))
    # zero-filled only where the kernel accumulates into it (chunked rows)
    alloc = torch.zeros if s.chunked else torch.empty
    dw_partial = alloc((n_progs, n_cols), dtype=torch.float32, device=x.device)
    has_dh = dh is not None
    _rms_norm_bwd_kernel[(n_progs,)](
        dy, x, weight.contiguous(), rstd, dh, dx, dw_partial,
        n_rows, n_cols,
        dy.stride(0), x.stride(0), dh.stride(0) if has_dh else 0, dx.stride(0),
        dw_partial.stride(0),
        HAS_DH=has_dh, BLOCK_ROWS=s.block_rows, BLOCK_N=s.block_n, CHUNKED=s.chunked,
        num_warps=s.num_warps, num_stages=s.num_stages,
    )
    return dw_partial


def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                 dh: torch.Tensor | None, *, settings=None, n_programs=None):
    """``(dx, dweight)``: dx contiguous in x's dtype (dh added when given), dweight in weight's
    dtype, reduced in fp32 in a fixed order (deterministic)."""
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw_partial = _launch_bwd(dy, x, weight, rstd, dh, dx, settings, n_programs)
    return dx, dw_partial.sum(0).to(weight.dtype)


# ------------------------------------------------------------------------------ AOT cases

AOT_DIMS = (4096, 5120, 6656, 8192, 11008, 65536)
AOT_ROWS = 4096  # rows only pick BLOCK_ROWS for narrow widths; every AOT width is >= 4096


def _aot_cases() -> list[_aot.AotCase]:
    cases = []
    for dtype in ("fp16", "bf16"):
        t = "*" + dtype
        for dim in AOT_DIMS:
            s = rms_norm_launch_settings(AOT_ROWS, dim)
            for has_res in (False, True):
                name = f"rms_norm_fwd{'_add' if has_res else ''} dim={dim} {dtype}"
                cases.append(_aot.case(
                    name, _rms_norm_fwd_kernel,
                    types=dict(x_ptr=t, res_ptr=t, w_ptr=t, y_ptr=t, h_ptr=t, rstd_ptr="*fp32",
                               n_rows="i32", n_cols="i32", eps="fp32", stride_x_row="i32",
                               stride_res_row="i32", stride_y_row="i32", stride_h_row="i32"),
                    none=() if has_res else ("res_ptr", "h_ptr"),
                    constexprs=dict(HAS_RESIDUAL=has_res, BLOCK_ROWS=s.block_rows,
                                    BLOCK_N=s.block_n, CHUNKED=s.chunked),
                    num_warps=s.num_warps, num_stages=s.num_stages))
            s = rms_norm_launch_settings(AOT_ROWS, dim, backward=True)
            for has_dh in (False, True):
                name = f"rms_norm_bwd{'_dh' if has_dh else ''} dim={dim} {dtype}"
                cases.append(_aot.case(
                    name, _rms_norm_bwd_kernel,
                    types=dict(dy_ptr=t, x_ptr=t, w_ptr=t, rstd_ptr="*fp32", dh_ptr=t, dx_ptr=t,
                               dw_partial_ptr="*fp32", n_rows="i32", n_cols="i32",
                               stride_dy_row="i32", stride_x_row="i32", stride_dh_row="i32",
                               stride_dx_row="i32", stride_dw_partial_row="i32"),
                    none=() if has_dh else ("dh_ptr",),
                    constexprs=dict(HAS_DH=has_dh, BLOCK_ROWS=s.block_rows, BLOCK_N=s.block_n,
                                    CHUNKED=s.chunked),
                    num_warps=s.num_warps, num_stages=s.num_stages))
    return cases


AOT_CASES = _aot_cases()
