"""The CUDA row kernels (csrc/swiglu_kernels.cuh, rms_norm_kernels.cuh, rotary_kernels.cuh) run
on the host emulator (tests/cuda_emulator), through the headers' launch paths (their run_*
functions: alignment tests, launch settings, specializations, grids), the code that the .cu
files call too, on an 8-SM GPU by default.

What this proves without a GPU: the index arithmetic (SwiGLU's grid-stride walk, the RMSNorm
row/block layout and its wide-row path, rotary's units and table staging), the scalar and the
16-byte vector paths (each test asserts which one ran), the warp/block reductions and their
barriers (shuffles and __syncthreads are emulated collectives; a few random schedules must give
bitwise-equal results), the dw partials (NaN until written) and their fixed-order sum, bounds
(every vector load/store is checked against the tensors' spans; outputs sit between NaN guard
bands), all against reference.py with helpers.assert_close (within twice eager's error), and the
alignment rule itself: which operands, offsets and row strides take the 16-byte path (the
emulator faults on a misaligned vector access) and that every other layout takes the scalar path
and still gives the right answer; grids too large for one launch are refused. What it cannot
prove: timing, occupancy, the real intrinsics' last-ulp behaviour (rsqrtf and expf are exact
here), and wasted work: an elementwise walk that visits some vectors twice but skips none writes
the right values (SwiGLU's walk without its `++row` on a wrap passes); tests/test_ops.py runs
the built kernels on a GPU.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

import cuda_emulator as emu
from fuzz_profiles import FUZZ, PROFILE
from helpers import assert_close
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from llama_kernels import reference as ref

OK, WHY = emu.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"CUDA emulator: {WHY}")

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]
EPS = 1e-6


def _vec16(dtype) -> int:
    return 16 // torch.empty((), dtype=dtype).element_size()


def _rows(rows, cols, dtype, layout, seed, scale=1.0):
    """Two (rows, cols) operands: "contig"; "fused" (the two halves of one (rows, 2 cols)
    tensor, as gate/up of a fused projection: row stride 2 cols); "misaligned" (starting one
    element into a buffer: never 16-byte aligned, so the scalar path)."""
    gen = torch.Generator().manual_seed(seed)

    def draw(n):
        return (torch.randn(n, generator=gen) * scale).to(dtype)

    if layout == "contig":
        return draw(rows * cols).view(rows, cols), draw(rows * cols).view(rows, cols)
    if layout == "fused":
        both = draw(rows * 2 * cols).view(rows, 2 * cols)
        return both[:, :cols], both[:, cols:]
    assert layout == "misaligned"
    return (draw(rows * cols + 1)[1:].view(rows, cols),
            draw(rows * cols + 1)[1:].view(rows, cols))


def _expect_vec(dtype, cols, layout, stride_cols=None) -> int:
    stride = cols if stride_cols is None else stride_cols
    v = _vec16(dtype)
    aligned = layout != "misaligned" and (stride * 16 // v) % 16 == 0
    return v if aligned and cols % v == 0 else 1


def _eager_grads(fn, inputs, grad_out, n_out=1):
    """Gradients of fn(*inputs) in the inputs' dtype (eager PyTorch, for the tolerance)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    return torch.autograd.grad(outs[:n_out], leaves, [grad_out.to(outs[0].dtype)])


def _finite_or(eager: torch.Tensor, ref32: torch.Tensor) -> torch.Tensor:
    # Where eager in 16 bits overflows, the rounded fp32 answer sets the bound (as check_fwd_bwd).
    return eager if torch.isfinite(eager).all() else ref32.to(eager.dtype)


# ------------------------------------------------------------------------------------- SwiGLU

SWIGLU_SHAPES = [(1, 1), (3, 123), (37, 256), (1, 4096), (37, 4096), (3, 6656)]


@pytest.mark.parametrize("layout", ["contig", "fused", "misaligned"])
@pytest.mark.parametrize("rows,cols", SWIGLU_SHAPES, ids=[f"{r}x{c}" for r, c in SWIGLU_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(dtype, rows, cols, layout):
    gate, up = _rows(rows, cols, dtype, layout, seed=rows * 7919 + cols)
    launch = {}
    out = emu.swiglu_fwd(gate, up, launch=launch)
    stride = 2 * cols if layout == "fused" else cols
    assert launch["vec"] == _expect_vec(dtype, cols, layout, stride)
    assert_close(out, ref.swiglu(gate.float(), up.float()), ref.swiglu(gate, up, upcast=False))

    dout = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1)).to(dtype)
    dgate, dup = emu.swiglu_bwd(dout, gate, up, launch=launch)
    r_dgate, r_dup = ref.swiglu_backward(dout.float(), gate.float(), up.float())
    e_dgate, e_dup = _eager_grads(lambda g, u: ref.swiglu(g, u, upcast=False), (gate, up), dout)
    assert_close(dgate, r_dgate, _finite_or(e_dgate, r_dgate), "dgate")
    assert_close(dup, r_dup, _finite_or(e_dup, r_dup), "dup")


# One resident block of 256 threads on one SM: the grid-stride walk takes many steps and wraps
# rows by more than one per step (step 256 vectors over rows of 7, 123 or 1 vectors).
@pytest.mark.parametrize("rows,cols,layout", [(37, 56, "contig"), (37, 123, "contig"),
                                              (300, 1, "contig"), (19, 56, "fused")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_one_block_grid_stride(dtype, rows, cols, layout):
    gate, up = _rows(rows, cols, dtype, layout, seed=cols)
    launch = {}
    out = emu.swiglu_fwd(gate, up, num_sms=1, blocks_per_sm=1, launch=launch)
    assert launch["blocks"] == 1
    assert_close(out, ref.swiglu(gate.float(), up.float()), ref.swiglu(gate, up, upcast=False))
    dgate, dup = emu.swiglu_bwd(up, gate, up, num_sms=1, blocks_per_sm=1)
    r_dgate, r_dup = ref.swiglu_backward(up.float(), gate.float(), up.float())
    e_dgate, e_dup = _eager_grads(lambda g, u: ref.swiglu(g, u, upcast=False), (gate, up), up)
    assert_close(dgate, r_dgate, e_dgate, "dgate")
    assert_close(dup, r_dup, e_dup, "dup")


# ------------------------------------------------------------------------------------ RMSNorm

# Rows from 1 to 37, widths 1, 123 (one warp, scalar), 256, 4096, 6656 (vectors when
# aligned), 8193 (the scalar wide-row path); test_rms_norm_paths covers every specialization.
RMS_SHAPES = [(1, 1), (3, 123), (37, 256), (37, 4096), (3, 6656), (1, 8193)]


def _rms_inputs(rows, dim, dtype, layout, seed):
    x, res = _rows(rows, dim, dtype, layout, seed)
    w = (1 + 0.1 * torch.randn(dim, generator=torch.Generator().manual_seed(seed + 1))).to(dtype)
    return x, res, w


def _expect_rms_vec(dtype, dim, layout):
    v = _vec16(dtype)
    return v if layout != "misaligned" and dim % v == 0 else 1


def _check_rms_norm(x, res, w, layout) -> tuple[dict, dict]:
    """Forward, add + forward, backward with and without dh against the reference; returns the
    forward's and the backward's launch settings."""
    rows, dim = x.shape
    dtype = x.dtype
    fwd, bwd = {}, {}
    y, rstd = emu.rms_norm_fwd(x, w, EPS, launch=fwd)
    assert fwd["vec"] == _expect_rms_vec(dtype, dim, layout)
    assert_close(y, ref.rms_norm(x.float(), w.float(), EPS), ref.rms_norm(x, w, EPS, upcast=False))
    r_rstd = ref.rms_norm_rstd(x, EPS)
    assert_close(rstd, r_rstd, r_rstd, "rstd")

    # Residual add: h is round(x + residual) exactly, y the norm of the rounded h.
    y2, h, rstd2 = emu.rms_norm_fwd(x, w, EPS, residual=res)
    assert torch.equal(h, (x.float() + res.float()).to(dtype)), "h"
    assert_close(y2, ref.rms_norm(h.float(), w.float(), EPS), ref.rms_norm(h, w, EPS, upcast=False))
    assert_close(rstd2, ref.rms_norm_rstd(h, EPS), ref.rms_norm_rstd(h, EPS), "rstd (add)")

    gen = torch.Generator().manual_seed(dim)
    dy = torch.randn(rows, dim, generator=gen).to(dtype)
    dh = torch.randn(rows, dim, generator=gen).to(dtype)
    e_dx, e_dw = _eager_grads(lambda a, b: ref.rms_norm(a, b, EPS, upcast=False), (x, w), dy)
    for with_dh in (False, True):
        dx, dw = emu.rms_norm_bwd(dy, x, w, rstd, dh if with_dh else None, launch=bwd)
        assert bwd["vec"] == _expect_rms_vec(dtype, dim, layout)
        r_dx, r_dw = ref.rms_norm_backward(dy.float(), x.float(), w.float(), rstd,
                                           dh.float() if with_dh else None)
        eager_dx = e_dx + dh if with_dh else e_dx
        assert_close(dx, r_dx, _finite_or(eager_dx, r_dx), f"dx (dh={with_dh})")
        assert_close(dw, r_dw, _finite_or(e_dw, r_dw), f"dweight (dh={with_dh})")
    return fwd, bwd


@pytest.mark.parametrize("layout", ["contig", "misaligned"])
@pytest.mark.parametrize("rows,dim", RMS_SHAPES, ids=[f"{r}x{d}" for r, d in RMS_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype, rows, dim, layout):
    x, res, w = _rms_inputs(rows, dim, dtype, layout, seed=rows + dim)
    _check_rms_norm(x, res, w, layout)


# One row each, chosen so that together they reach every specialization family the launch paths
# can pick: (vectors?, items) with items in registers, 0 = wide rows. Forward: 4 / 8 / 16
# (scalar only); backward: one vector per thread (rows of up to 1024 vectors), 8 vectors, and
# the scalar 4 / 8 / 16.
PATH_CASES = [(torch.bfloat16, 4096, "contig"), (torch.float32, 6656, "contig"),
              (torch.bfloat16, 32768, "contig"), (torch.bfloat16, 65536, "contig"),
              (torch.float32, 123, "contig"), (torch.float32, 2048, "misaligned"),
              (torch.float32, 4095, "contig"), (torch.float32, 6656, "misaligned"),
              (torch.float32, 8193, "contig")]


def test_rms_norm_paths():
    seen = set()
    for dtype, dim, layout in PATH_CASES:
        x, res, w = _rms_inputs(1, dim, dtype, layout, seed=dim)
        fwd, bwd = _check_rms_norm(x, res, w, layout)
        seen |= {("fwd", fwd["vec"] > 1, fwd["items"]), ("bwd", bwd["vec"] > 1, bwd["items"])}
    families = {("fwd", v, i) for v in (True, False) for i in (0, 4, 8, 16) if not (v and i == 16)}
    families |= {("bwd", True, i) for i in (0, 1, 8)} | {("bwd", False, i) for i in (0, 4, 8, 16)}
    assert seen == families, sorted(families - seen)


# Few slots (1 SM, 1 resident block): each block row of the backward walks many rows and sums
# dw over them in registers; 4 rows per block for one-warp rows.
@pytest.mark.parametrize("rows,dim", [(37, 123), (37, 256), (11, 4096)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_bwd_persistent(dtype, rows, dim):
    x, dy, w = _rms_inputs(rows, dim, dtype, "contig", seed=dim)
    rstd = ref.rms_norm_rstd(x, EPS)
    launch = {}
    dx, dw = emu.rms_norm_bwd(dy, x, w, rstd, num_sms=1, blocks_per_sm=1, launch=launch)
    assert launch["blocks"] == 1
    r_dx, r_dw = ref.rms_norm_backward(dy.float(), x.float(), w.float(), rstd)
    e_dx, e_dw = _eager_grads(lambda a, b: ref.rms_norm(a, b, EPS, upcast=False), (x, w), dy)
    assert_close(dx, r_dx, e_dx, "dx")
    assert_close(dw, r_dw, e_dw, "dweight")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rms_norm_schedules_bitwise(seed):
    """Random schedules (warps far ahead of each other) give the round-robin result bit for bit:
    the reductions' barriers are where they must be."""
    x, dy, w = _rms_inputs(5, 1000, torch.bfloat16, "contig", seed=5)
    base = emu.rms_norm_fwd(x, w, EPS, schedule_seed=0) + emu.rms_norm_bwd(
        dy, x, w, ref.rms_norm_rstd(x, EPS), num_sms=1, blocks_per_sm=1, schedule_seed=0)
    other = emu.rms_norm_fwd(x, w, EPS, schedule_seed=seed) + emu.rms_norm_bwd(
        dy, x, w, ref.rms_norm_rstd(x, EPS), num_sms=1, blocks_per_sm=1, schedule_seed=seed)
    for a, b in zip(base, other):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------- rotary

# (batch, seqlen, heads, head_dim, layout): head_dim 6 (half 3: scalar), 64 and 128 (16-byte
# vectors when aligned), 256 (the largest); layouts "contig", "bhsd" (x a transposed view:
# strides (H S D, D, S D)), "misaligned" (one element in: scalar path).
ROTARY_CASES = [(1, 1, 1, 6, "contig"), (2, 5, 3, 64, "contig"), (2, 7, 4, 128, "bhsd"),
                (1, 9, 2, 128, "misaligned"), (3, 3, 1, 256, "contig"), (1, 37, 2, 6, "bhsd")]


def _rotary_x(b, s, h, d, dtype, layout, gen):
    if layout == "bhsd":
        return torch.randn(b, h, s, d, generator=gen).to(dtype).transpose(1, 2)
    if layout == "misaligned":
        return torch.randn(b * s * h * d + 1, generator=gen).to(dtype)[1:].view(b, s, h, d)
    return torch.randn(b, s, h, d, generator=gen).to(dtype)


@pytest.mark.parametrize("with_positions", [False, True], ids=["rows", "positions"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
@pytest.mark.parametrize("b,s,h,d,layout", ROTARY_CASES,
                         ids=[f"{b}x{s}x{h}x{d}-{lay}" for b, s, h, d, lay in ROTARY_CASES])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary(dtype, b, s, h, d, layout, interleaved, with_positions):
    gen = torch.Generator().manual_seed(b * 1000 + s * 10 + d)
    x = _rotary_x(b, s, h, d, dtype, layout, gen)
    table_rows = 2 * s + 3
    cos, sin = ref.rotary_tables(table_rows, d)
    positions = torch.randint(0, table_rows, (b, s), generator=gen) if with_positions else None
    launch = {}
    for conjugate in (False, True):  # the forward, and the backward (rotation by -t)
        out = emu.rotary(x, cos, sin, positions, interleaved, conjugate, launch=launch)
        v = _vec16(dtype)
        assert launch["vec"] == (v if layout != "misaligned" and (d // 2) % v == 0 else 1)
        kw = dict(interleaved=interleaved, positions=positions, conjugate=conjugate)
        assert_close(out, ref.apply_rotary(x.float(), cos, sin, **kw),
                     ref.apply_rotary(x, cos, sin, upcast=False, **kw), f"conjugate={conjugate}")


def test_rotary_position_out_of_table():
    """A position outside the table is the kernel's CUDA_KERNEL_ASSERT, which the emulator
    raises."""
    x = torch.randn(1, 2, 1, 8)
    cos, sin = ref.rotary_tables(4, 8)
    with pytest.raises(emu.EmulatorError, match="CUDA_KERNEL_ASSERT"):
        emu.rotary(x, cos, sin, torch.tensor([[0, 4]]))


# ------------------------------------------------------------------------ the alignment rule
# Each case moves one operand off 16-byte alignment (an element offset) or gives it a row stride
# that is not a multiple of 16 bytes, and names the launches that must still take the 16-byte
# path: only those whose operands are all aligned. The emulator faults on a misaligned vector
# access, so a rule that missed an operand fails the call; padding reads as NaN, so a scalar
# path that read it fails the comparison.

_PAD16 = 8  # a row padding of 8 elements keeps rows 16-byte aligned in every dtype


def _placed(t: torch.Tensor, offset: int = 0, pad: int = 0) -> torch.Tensor:
    """A copy of the 2-D t starting `offset` elements into a 16-byte-aligned NaN buffer, with row
    stride t.shape[1] + pad (NaN padding between the rows)."""
    rows, cols = t.shape
    stride = cols + pad
    buf = torch.full((offset + rows * stride + 16,), float("nan"), dtype=t.dtype)
    assert buf.data_ptr() % 16 == 0
    view = buf[offset:offset + rows * stride].view(rows, stride)[:, :cols]
    view.copy_(t)
    return view


def _layout(tensors: dict, where: dict) -> dict:
    """tensors with each one named in `where` ({name: (offset, pad)}) re-placed; 1-D ones as
    one row."""
    out = dict(tensors)
    for name, (offset, pad) in where.items():
        t = tensors[name]
        out[name] = _placed(t, offset, pad) if t.dim() == 2 else _placed(t[None], offset, pad)[0]
    return out


# (id, rows, {operand: (offset, pad)}, 16-byte path expected for (forward, add + forward,
# backward, backward with dh)).
RMS_ALIGN_CASES = [
    ("aligned", 5, {}, (True, True, True, True)),
    ("rows-padded-16B", 5, {n: (0, _PAD16) for n in ("x", "residual", "dy", "dh")},
     (True, True, True, True)),
    ("x-offset", 5, {"x": (1, 0)}, (False, False, False, False)),
    ("x-odd-stride", 5, {"x": (0, 1)}, (False, False, False, False)),
    ("one-row-odd-strides", 1, {n: (0, 1) for n in ("x", "residual", "dy", "dh")},
     (True, True, True, True)),
    ("residual-odd-stride", 5, {"residual": (0, 1)}, (True, False, True, True)),
    ("weight-offset", 5, {"weight": (1, 0)}, (False, False, False, False)),
    ("dy-offset", 5, {"dy": (1, 0)}, (True, True, False, False)),
    ("dh-odd-stride", 5, {"dh": (0, 1)}, (True, True, True, False)),
]


@pytest.mark.parametrize("case", RMS_ALIGN_CASES, ids=[c[0] for c in RMS_ALIGN_CASES])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.bfloat16, id="bf16")])
def test_rms_norm_alignment_rule(dtype, case):
    _, rows, where, want = case
    dim = 256
    gen = torch.Generator().manual_seed(rows)
    base = {n: torch.randn(rows, dim, generator=gen).to(dtype) for n in ("x", "residual", "dy",
                                                                         "dh")}
    base["weight"] = (1 + 0.1 * torch.randn(dim, generator=gen)).to(dtype)
    t = _layout(base, where)
    x, res, w, dy, dh = t["x"], t["residual"], t["weight"], t["dy"], t["dh"]
    launches = [{} for _ in range(4)]

    y, rstd = emu.rms_norm_fwd(x, w, EPS, launch=launches[0])
    assert_close(y, ref.rms_norm(x.float(), w.float(), EPS), ref.rms_norm(x, w, EPS, upcast=False))
    y2, h, _ = emu.rms_norm_fwd(x, w, EPS, residual=res, launch=launches[1])
    assert torch.equal(h, (x.float() + res.float()).to(dtype)), "h"
    assert_close(y2, ref.rms_norm(h.float(), w.float(), EPS), ref.rms_norm(h, w, EPS, upcast=False),
                 "y (add)")
    e_dx, e_dw = _eager_grads(lambda a, b: ref.rms_norm(a, b, EPS, upcast=False), (x, w), dy)
    for i, grad_h in ((2, None), (3, dh)):
        dx, dw = emu.rms_norm_bwd(dy, x, w, rstd, grad_h, launch=launches[i])
        r_dx, r_dw = ref.rms_norm_backward(dy.float(), x.float(), w.float(), rstd,
                                           None if grad_h is None else grad_h.float())
        assert_close(dx, r_dx, e_dx if grad_h is None else e_dx + grad_h, f"dx ({i})")
        assert_close(dw, r_dw, e_dw, f"dweight ({i})")
    got = tuple(launch["vec"] == _vec16(dtype) for launch in launches)
    assert got == want, f"16-byte path (fwd, add, bwd, bwd+dh): {got}, expected {want}"
    assert all(launch["vec"] in (1, _vec16(dtype)) for launch in launches)


# (id, rows, {operand: (offset, pad)}, 16-byte path expected for (forward, backward)).
SWIGLU_ALIGN_CASES = [
    ("aligned", 6, {}, (True, True)),
    ("rows-padded-16B", 6, {n: (0, _PAD16) for n in ("gate", "up", "dout")}, (True, True)),
    ("gate-odd-stride", 6, {"gate": (0, 1)}, (False, False)),
    ("up-offset", 6, {"up": (1, 0)}, (False, False)),
    ("dout-odd-stride", 6, {"dout": (0, 1)}, (True, False)),
    ("one-row-odd-strides", 1, {n: (0, 1) for n in ("gate", "up", "dout")}, (True, True)),
]


@pytest.mark.parametrize("case", SWIGLU_ALIGN_CASES, ids=[c[0] for c in SWIGLU_ALIGN_CASES])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.float16, id="fp16")])
def test_swiglu_alignment_rule(dtype, case):
    _, rows, where, want = case
    gen = torch.Generator().manual_seed(rows)
    base = {n: torch.randn(rows, 96, generator=gen).to(dtype) for n in ("gate", "up", "dout")}
    t = _layout(base, where)
    gate, up, dout = t["gate"], t["up"], t["dout"]
    fwd, bwd = {}, {}
    out = emu.swiglu_fwd(gate, up, launch=fwd)
    assert_close(out, ref.swiglu(gate.float(), up.float()), ref.swiglu(gate, up, upcast=False))
    dgate, dup = emu.swiglu_bwd(dout, gate, up, launch=bwd)
    r_dgate, r_dup = ref.swiglu_backward(dout.float(), gate.float(), up.float())
    e_dgate, e_dup = _eager_grads(lambda g, u: ref.swiglu(g, u, upcast=False), (gate, up), dout)
    assert_close(dgate, r_dgate, e_dgate, "dgate")
    assert_close(dup, r_dup, e_dup, "dup")
    got = (fwd["vec"] == _vec16(dtype), bwd["vec"] == _vec16(dtype))
    assert got == want, f"16-byte path (fwd, bwd): {got}, expected {want}"


# x (B, S, H, D) as a view of a larger buffer: (id, element offset, (batch, seq, head) strides,
# shape, 16-byte path expected). Strides 504, 160, 72 are multiples of 16 bytes in every dtype
# (the layout of rows padded by 8 elements); a stride is only stepped where its dimension has
# more than one entry.
ROTARY_ALIGN_CASES = [
    ("padded-aligned", 0, (504, 160, 72), (2, 3, 2, 64), True),
    ("contiguous", 0, (384, 128, 64), (2, 3, 2, 64), True),
    ("offset", 1, (504, 160, 72), (2, 3, 2, 64), False),
    ("odd-head-stride", 0, (504, 160, 73), (2, 3, 2, 64), False),
    ("odd-seq-stride", 0, (504, 161, 72), (2, 3, 2, 64), False),
    ("odd-batch-stride", 0, (505, 160, 72), (2, 3, 2, 64), False),
    ("one-head-odd-head-stride", 0, (504, 160, 73), (2, 3, 1, 64), True),
    ("one-position-odd-seq-stride", 0, (504, 161, 72), (2, 1, 2, 64), True),
    ("one-sequence-odd-batch-stride", 0, (505, 160, 72), (1, 3, 2, 64), True),
]


@pytest.mark.parametrize("case", ROTARY_ALIGN_CASES, ids=[c[0] for c in ROTARY_ALIGN_CASES])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.bfloat16, id="bf16")])
def test_rotary_alignment_rule(dtype, case):
    _, offset, strides, (b, s, h, d), want = case
    buf = torch.full((offset + b * strides[0] + 16,), float("nan"), dtype=dtype)
    x = buf.as_strided((b, s, h, d), (*strides, 1), offset)
    x.copy_(torch.randn(b, s, h, d, generator=torch.Generator().manual_seed(d)))
    cos, sin = ref.rotary_tables(s + 2, d)
    launch = {}
    for interleaved in (False, True):
        out = emu.rotary(x, cos, sin, None, interleaved, launch=launch)
        kw = dict(interleaved=interleaved)
        assert_close(out, ref.apply_rotary(x.float(), cos, sin, **kw),
                     ref.apply_rotary(x, cos, sin, upcast=False, **kw), f"{kw}")
        assert (launch["vec"] == _vec16(dtype)) == want, launch


# Outputs: the wrappers allocate them aligned, so these call the entry points with an output one
# element off alignment; the launch must take the scalar path for it (else the emulator faults).

def _misaligned_output(shape, dtype) -> torch.Tensor:
    n = 1
    for size in shape:
        n *= size
    buf = torch.full((n + 64,), float("nan"), dtype=dtype)
    return buf[1:1 + n].view(shape)


def _info(n):
    return (ctypes.c_int64 * n)()


def test_misaligned_outputs_take_the_scalar_path():
    lib = emu._rows_lib()
    dtype = torch.bfloat16
    code = emu._ROW_DTYPE_CODE[dtype]
    x, res, w = _rms_inputs(3, 64, dtype, "contig", seed=3)

    y = _misaligned_output(x.shape, dtype)
    rstd = torch.empty(3)
    info = _info(5)
    emu._invoke(lib, lib.rms_norm_fwd_emu,
                (code, y.data_ptr(), None, rstd.data_ptr(), x.data_ptr(), None, w.data_ptr(), 3,
                 64, x.stride(0), 0, EPS, info), 0, tensors=(x, w, y, rstd))
    assert info[0] == 1, "rms_norm forward: misaligned y"
    assert_close(y, ref.rms_norm(x.float(), w.float(), EPS), ref.rms_norm(x, w, EPS, upcast=False))

    h = _misaligned_output(x.shape, dtype)
    y2 = torch.empty_like(x)
    emu._invoke(lib, lib.rms_norm_fwd_emu,
                (code, y2.data_ptr(), h.data_ptr(), rstd.data_ptr(), x.data_ptr(), res.data_ptr(),
                 w.data_ptr(), 3, 64, x.stride(0), res.stride(0), EPS, info), 0,
                tensors=(x, res, w, y2, h, rstd))
    assert info[0] == 1, "add_rms_norm forward: misaligned h"
    assert torch.equal(h, (x.float() + res.float()).to(dtype))

    dx = _misaligned_output(x.shape, dtype)
    dw = torch.empty_like(w)
    emu._invoke(lib, lib.rms_norm_bwd_emu,
                (code, dx.data_ptr(), dw.data_ptr(), res.data_ptr(), x.data_ptr(), w.data_ptr(),
                 rstd.data_ptr(), None, 3, 64, res.stride(0), x.stride(0), 0, 8, 0, info), 0,
                tensors=(dx, dw, res, x, w, rstd))
    assert info[0] == 1, "rms_norm backward: misaligned dx"
    r_dx, r_dw = ref.rms_norm_backward(res.float(), x.float(), w.float(), rstd)
    e_dx, e_dw = _eager_grads(lambda a, b: ref.rms_norm(a, b, EPS, upcast=False), (x, w), res)
    assert_close(dx, r_dx, e_dx, "dx")
    assert_close(dw, r_dw, e_dw, "dweight")

    out = _misaligned_output(x.shape, dtype)
    emu._invoke(lib, lib.swiglu_fwd_emu,
                (code, out.data_ptr(), x.data_ptr(), res.data_ptr(), 3, 64, x.stride(0),
                 res.stride(0), 8, 0, info), 0, tensors=(out, x, res))
    assert info[0] == 1, "swiglu forward: misaligned out"
    assert_close(out, ref.swiglu(x.float(), res.float()), ref.swiglu(x, res, upcast=False))

    xr = x.view(1, 3, 1, 64)
    cos, sin = ref.rotary_tables(3, 64)
    out = _misaligned_output(xr.shape, dtype)
    emu._invoke(lib, lib.rotary_emu,
                (code, out.data_ptr(), xr.data_ptr(), cos.data_ptr(), sin.data_ptr(), None, 1, 3,
                 1, 64, 3, *xr.stride()[:3], 0, 0, info), 0, tensors=(out, xr, cos, sin))
    assert info[0] == 1, "rotary: misaligned out"
    assert_close(out, ref.apply_rotary(xr.float(), cos, sin),
                 ref.apply_rotary(xr, cos, sin, upcast=False))


def test_too_many_blocks_is_refused_before_any_launch():
    """A grid over 2**31 - 1 blocks is refused with the .cu files' message before anything runs
    (the pointers are never read)."""
    lib = emu._rows_lib()
    t = torch.zeros(16)
    p = t.data_ptr()
    rows = 2**33  # 4 one-warp rows per block: 2**31 blocks
    with pytest.raises(emu.EmulatorError, match=rf"^x: too many rows \({rows}\)$"):
        emu._invoke(lib, lib.rms_norm_fwd_emu,
                    (2, p, None, p, p, None, p, rows, 1, 1, 0, EPS, _info(5)), 0)
    with pytest.raises(emu.EmulatorError, match=rf"^x: too many tokens \({rows}\)$"):
        emu._invoke(lib, lib.rotary_emu,
                    (2, p, p, p, p, None, rows, 1, 1, 2, 1, 2, 2, 2, 0, 0, _info(4)), 0)


def test_empty_inputs_launch_nothing_but_the_dw_sum():
    """No rows: no launch (settings all 0), and the RMSNorm backward's dweight is the sum over no
    partials, 0."""
    x = torch.empty(0, 40)
    w = torch.ones(40)
    launch = {}
    y, rstd = emu.rms_norm_fwd(x, w, EPS, launch=launch)
    assert y.shape == (0, 40) and rstd.shape == (0,) and launch["blocks"] == 0
    dx, dw = emu.rms_norm_bwd(x, x, w, rstd, launch=launch)
    assert dx.shape == (0, 40) and launch["blocks"] == 0
    assert torch.equal(dw, torch.zeros(40))
    assert emu.swiglu_fwd(x, x, launch=launch).shape == (0, 40) and launch["blocks"] == 0
    assert emu.rotary(x.view(0, 1, 1, 40), *ref.rotary_tables(1, 40), launch=launch).numel() == 0
    assert launch["blocks"] == 0


# ------------------------------------------------------------------------------------- fuzzing

# The emulator runs a thread per fiber: keep an example to tens of thousands of elements.
_ROW_FUZZ = settings(FUZZ, max_examples=8 if PROFILE == "ci" else 300)
_ELEMENTS = 40_000


def _widths(vec_edges=(32, 128, 1024)):
    """Widths 1..9000: any (mostly the scalar path), multiples of 8 (16-byte vectors of every
    dtype), and next to where the launch shapes change (vector width x a bucket edge, +-1)."""
    near = st.builds(lambda v, edge, off: max(1, v * edge + off), st.sampled_from([4, 8]),
                     st.sampled_from(vec_edges), st.integers(-1, 1))
    return st.one_of(st.integers(1, 9000), st.integers(1, 1125).map(lambda k: 8 * k), near)


@pytest.mark.parametrize("op", ["rms_norm", "swiglu"])
@_ROW_FUZZ
@given(data=st.data())
def test_fuzz_rows(op, data):
    """Random widths, rows, dtypes, layouts and (for the persistent / one-wave grids) SM counts
    and occupancies: forward and backward against the reference."""
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
                      label="dtype")
    cols = data.draw(_widths(), label="cols")
    rows = data.draw(st.integers(1, 40), label="rows")
    assume(rows * cols <= _ELEMENTS)
    layouts = ["contig", "misaligned"] + (["fused"] if op == "swiglu" else [])
    layout = data.draw(st.sampled_from(layouts), label="layout")
    num_sms = data.draw(st.integers(1, 8), label="SMs")
    blocks_per_sm = data.draw(st.integers(1, 4), label="blocks per SM")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    if op == "rms_norm":
        x, res, w = _rms_inputs(rows, cols, dtype, layout, seed)
        _check_rms_norm(x, res, w, layout)
        dy = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)
        rstd = ref.rms_norm_rstd(x, EPS)
        dx, dw = emu.rms_norm_bwd(dy, x, w, rstd, num_sms=num_sms, blocks_per_sm=blocks_per_sm)
        r_dx, r_dw = ref.rms_norm_backward(dy.float(), x.float(), w.float(), rstd)
        e_dx, e_dw = _eager_grads(lambda a, b: ref.rms_norm(a, b, EPS, upcast=False), (x, w), dy)
        assert_close(dx, r_dx, _finite_or(e_dx, r_dx), "dx (few slots)")
        assert_close(dw, r_dw, _finite_or(e_dw, r_dw), "dweight (few slots)")
    else:
        gate, up = _rows(rows, cols, dtype, layout, seed)
        kw = dict(num_sms=num_sms, blocks_per_sm=blocks_per_sm)
        out = emu.swiglu_fwd(gate, up, **kw)
        assert_close(out, ref.swiglu(gate.float(), up.float()), ref.swiglu(gate, up, upcast=False))
        dout = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)
        dgate, dup = emu.swiglu_bwd(dout, gate, up, **kw)
        r_dgate, r_dup = ref.swiglu_backward(dout.float(), gate.float(), up.float())
        e_dgate, e_dup = _eager_grads(lambda g, u: ref.swiglu(g, u, upcast=False), (gate, up),
                                      dout)
        assert_close(dgate, r_dgate, _finite_or(e_dgate, r_dgate), "dgate")
        assert_close(dup, r_dup, _finite_or(e_dup, r_dup), "dup")
