"""Kernel-level tests of the Triton backend: RMSNorm, add+RMSNorm, SwiGLU and rotary.

The launchers of llama_kernels.triton.* are called directly (strided inputs, outputs written
into NaN-poisoned buffers whose guard regions must stay NaN) and through the public API with
backend="triton" (forward and backward), then torch.library.opcheck and a fullgraph
torch.compile. On a machine without a GPU the kernels run under TRITON_INTERPRET=1 (set by
conftest.py before triton is imported), about 1 ms per program instance, so shapes are small.

Tolerance (helpers.assert_close): error against the fp32 reference at most twice that of
eager PyTorch in the test dtype (reference.py with upcast=False), plus a floor of one bf16/fp16
epsilon (1e-5 in fp32) relative to the largest value. The floor is needed because the kernel
must round its fp32 result to the output dtype (up to half an ulp), while eager on a small
tensor can be luckier than that; in fp32 eager *is* the reference, so the floor alone covers
the kernels' different summation order.

Interpreter trap (Triton 3.8): it converts fp32 to bf16 by truncation, not round-to-nearest
as the GPU does, so in bf16 under the interpreter results may be one ulp off towards zero.
The floor (one bf16 epsilon times the largest value, >= one ulp of any value) covers it;
checks of exact equality skip that one combination.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
    pytest.skip("Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 set before triton is "
                "imported (tests/conftest.py does so when no GPU is visible)",
                allow_module_level=True)

import llama_kernels as lk  # noqa: E402
from llama_kernels import reference  # noqa: E402
from llama_kernels.triton import rms_norm as tri_norm  # noqa: E402
from llama_kernels.triton import rotary as tri_rotary  # noqa: E402
from llama_kernels.triton import swiglu as tri_swiglu  # noqa: E402
from helpers import DEVICE, DTYPES, GPU, INTERPRET, Guarded, assert_close  # noqa: E402

DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
EPS = 1e-6


def _exact_rounding(dtype: torch.dtype) -> bool:
    """False where the interpreter's truncating fp32 -> bf16 conversion breaks exactness."""
    return not (INTERPRET and dtype == torch.bfloat16)


# ------------------------------------------------------------------------------ poison helpers


def rand_rows(rows: int, cols: int, dtype, pad: int = 5) -> torch.Tensor:
    """Random (rows, cols) view with row stride cols + 2 * pad inside a NaN buffer: a kernel
    that reads a masked-off column pulls NaN into its result."""
    buf = torch.full((rows, cols + 2 * pad), float("nan"), dtype=dtype, device=DEVICE)
    view = buf[:, pad:pad + cols]
    view.copy_(torch.randn(rows, cols, device=DEVICE))
    return view


def _grads(fn, inputs, douts):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return outs, torch.autograd.grad(outs, leaves, douts)


def _f32(ts):
    return [t.float() for t in ts]


# ------------------------------------------------------------------------------ RMSNorm kernels

# (rows, dim, settings): None = the launchers' own choice; the forced chunked settings run the
# wide-row loop (ragged last chunk, 1 and 2 rows per program) at a width the interpreter can
# afford.
CHUNKED_1 = tri_norm.RowLaunch(block_rows=1, block_n=32, chunked=True, num_warps=1,
                               num_stages=1)
CHUNKED_2 = tri_norm.RowLaunch(block_rows=2, block_n=64, chunked=True, num_warps=2,
                               num_stages=1)
NORM_SHAPES = [
    pytest.param(1, 123, None, id="1x123"),
    pytest.param(3, 123, None, id="3x123"),
    pytest.param(1000, 123, None, id="1000x123"),
    pytest.param(3, 4096, None, id="3x4096"),
    pytest.param(3, 6656, None, id="3x6656"),
    pytest.param(5, 123, CHUNKED_1, id="5x123-chunked1"),
    pytest.param(5, 123, CHUNKED_2, id="5x123-chunked2"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("rows,dim,settings", NORM_SHAPES)
@pytest.mark.parametrize("add", [False, True], ids=["norm", "add_norm"])
def test_rms_norm_fwd_kernel(add, rows, dim, settings, dtype):
    x, w = rand_rows(rows, dim, dtype), torch.randn(dim, dtype=dtype, device=DEVICE)
    res = rand_rows(rows, dim, dtype, pad=2) if add else None
    y, rstd = Guarded((rows, dim), dtype), Guarded((rows,), torch.float32)
    h = Guarded((rows, dim), dtype) if add else None
    tri_norm._launch_fwd(x, res, w, EPS, y.view, h.view if add else None, rstd.view, settings)
    y.check("y")
    rstd.check("rstd")
    if add:
        h.check("h")
        h32 = x.float() + res.float()
        h_eager = (x.float() + res.float()).to(dtype)  # the contract: h rounded to x's dtype
        assert_close(h.view, h32, h_eager, "h")
        if _exact_rounding(dtype):
            assert torch.equal(h.view, h_eager), "h: not the fp32 sum rounded once"
        xin = h.view  # y normalizes the rounded h
    else:
        xin = x
    assert_close(y.view, reference.rms_norm(xin.float(), w.float(), EPS),
                 reference.rms_norm(xin, w, EPS, upcast=False), "y")
    rstd_ref = reference.rms_norm_rstd(xin, EPS)
    torch.testing.assert_close(rstd.view, rstd_ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("rows,dim,settings", NORM_SHAPES)
@pytest.mark.parametrize("with_dh", [False, True], ids=["no_dh", "dh"])
def test_rms_norm_bwd_kernel(with_dh, rows, dim, settings, dtype):
    x, w = rand_rows(rows, dim, dtype), torch.randn(dim, dtype=dtype, device=DEVICE)
    dy = rand_rows(rows, dim, dtype, pad=1)
    dh = rand_rows(rows, dim, dtype, pad=3) if with_dh else None
    rstd = reference.rms_norm_rstd(x, EPS)
    dx = Guarded((rows, dim), dtype)
    s = settings or tri_norm.rms_norm_launch_settings(rows, dim, backward=True)
    # 2 programs: each walks several row tiles (the persistent loop and the accumulation of
    # its dw partial), and with one row tile the second program has none (zero partial).
    dw_partial = tri_norm._launch_bwd(dy, x, w, rstd, dh, dx.view, s, n_programs=2)
    assert dw_partial.shape == (2, dim)
    dx.check("dx")
    dw = dw_partial.sum(0).to(dtype)

    _, (dx32, dw32) = _grads(lambda a, b: reference.rms_norm(a, b, EPS), _f32((x, w)),
                             dy.float())
    _, (dx_eager, dw_eager) = _grads(lambda a, b: reference.rms_norm(a, b, EPS, upcast=False),
                                     (x, w), dy)
    if with_dh:
        dx32 = dx32 + dh.float()
        dx_eager = dx_eager + dh
    assert_close(dx.view, dx32, dx_eager, "dx")
    assert_close(dw, dw32, dw_eager, "dweight")


@pytest.mark.parametrize("chunked", [False, True], ids=["fused", "chunked"])
def test_rms_norm_bwd_deterministic_dweight(chunked):
    """dweight comes from per-program fp32 partials summed in a fixed order: two runs agree
    bit for bit; another program count agrees to fp32 rounding."""
    rows, dim, dtype = 13, 123, torch.bfloat16
    x, w = rand_rows(rows, dim, dtype), torch.randn(dim, dtype=dtype, device=DEVICE)
    dy, rstd = rand_rows(rows, dim, dtype), reference.rms_norm_rstd(x, EPS)
    s = CHUNKED_1 if chunked else None
    runs = [tri_norm.rms_norm_bwd(dy, x, w, rstd, None, settings=s, n_programs=3)
            for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    p1 = tri_norm._launch_bwd(dy, x, w, rstd, None, torch.empty_like(x), s, n_programs=1)
    p5 = tri_norm._launch_bwd(dy, x, w, rstd, None, torch.empty_like(x), s, n_programs=5)
    assert p1.shape == (1, dim) and p5.shape == (5, dim)
    torch.testing.assert_close(p1.sum(0), p5.sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim", [20000, 65536])
def test_rms_norm_wide_rows(dim):
    """Rows wider than MAX_FUSED_* take the chunked loop with the real settings."""
    rows, dtype = 2, torch.bfloat16
    assert tri_norm.rms_norm_launch_settings(rows, dim).chunked
    assert tri_norm.rms_norm_launch_settings(rows, dim, backward=True).chunked
    x, w = rand_rows(rows, dim, dtype), torch.randn(dim, dtype=dtype, device=DEVICE)
    res, dy = rand_rows(rows, dim, dtype), torch.randn(rows, dim, dtype=dtype, device=DEVICE)
    y, h, rstd = tri_norm.add_rms_norm_fwd(x, res, w, EPS)
    y_ref, h_ref = reference.add_rms_norm(x.float(), res.float(), w.float(), EPS)
    y_eager, h_eager = reference.add_rms_norm(x, res, w, EPS, upcast=False)
    assert_close(h, h_ref, h_eager, "h")
    assert_close(y, reference.rms_norm(h.float(), w.float(), EPS),
                 reference.rms_norm(h, w, EPS, upcast=False), "y")
    dx, dw = tri_norm.rms_norm_bwd(dy, h, w, rstd, None)
    _, (dx32, dw32) = _grads(lambda a, b: reference.rms_norm(a, b, EPS), _f32((h, w)),
                             dy.float())
    _, (dx_e, dw_e) = _grads(lambda a, b: reference.rms_norm(a, b, EPS, upcast=False), (h, w),
                             dy)
    assert_close(dx, dx32, dx_e, "dx")
    assert_close(dw, dw32, dw_e, "dweight")


def test_rms_norm_launch_settings():
    """One settings function per op: no row is held in registers past MAX_FUSED, narrow rows
    are packed, the grid of the backward never exceeds the row tiles."""
    for dim in (123, 4096, 5120, 6656, 8192, 11008, 16384, 16385, 65536, 1 << 20):
        for bwd in (False, True):
            s = tri_norm.rms_norm_launch_settings(4096, dim, backward=bwd)
            limit = tri_norm.MAX_FUSED_BWD if bwd else tri_norm.MAX_FUSED_FWD
            assert s.block_n <= limit and (s.chunked or s.block_n >= dim), (dim, bwd, s)
            assert 1 <= s.num_warps <= 32 and s.block_rows >= 1
    assert tri_norm.rms_norm_launch_settings(4096, 123).block_rows > 1
    assert tri_norm.rms_norm_launch_settings(1, 123).block_rows == 1
    s = tri_norm.rms_norm_launch_settings(3, 123, backward=True)
    assert tri_norm.bwd_programs(3, s, 132) == 1


# ------------------------------------------------------------------------------ SwiGLU kernels

SWIGLU_SHAPES = [(1, 123), (3, 123), (1000, 123), (3, 4096), (3, 6656)]


def _check_swiglu_launchers(gate, up, dout, contiguous_outputs: bool) -> torch.Tensor:
    """Both launchers into NaN-guarded outputs, against the reference; returns the output."""
    rows, cols = gate.shape
    guarded = lambda: Guarded((rows, cols), gate.dtype, contiguous=contiguous_outputs)  # noqa: E731
    out = guarded()
    tri_swiglu._launch_fwd(gate, up, out.view)
    out.check("out")
    assert_close(out.view, reference.swiglu(gate.float(), up.float()),
                 reference.swiglu(gate, up, upcast=False), "out")
    dgate, dup = guarded(), guarded()
    tri_swiglu._launch_bwd(dout, gate, up, dgate.view, dup.view)
    dgate.check("dgate")
    dup.check("dup")
    _, (dg32, du32) = _grads(reference.swiglu, _f32((gate, up)), dout.float())
    _, (dg_e, du_e) = _grads(lambda g, u: reference.swiglu(g, u, upcast=False), (gate, up),
                             dout)
    assert_close(dgate.view, dg32, dg_e, "dgate")
    assert_close(dup.view, du32, du_e, "dup")
    return out.view


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("rows,cols", SWIGLU_SHAPES, ids=lambda v: str(v))
def test_swiglu_kernels(rows, cols, dtype):
    fused = rand_rows(rows, 2 * cols, dtype)  # one projection: gate and up are its halves
    gate, up = fused[:, :cols], fused[:, cols:]
    dout = rand_rows(rows, cols, dtype, pad=7)  # not contiguous either
    out = _check_swiglu_launchers(gate, up, dout, contiguous_outputs=False)
    # the public launchers return contiguous tensors
    o = tri_swiglu.swiglu_fwd(gate, up)
    assert o.is_contiguous() and torch.equal(o, out)


class _Refuse:
    def __getitem__(self, grid):
        raise AssertionError("the 2-D kernel ran where the flat one should have")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("rows,cols", [(1, 123), (3, 1001), (5, 4096)], ids=lambda v: str(v))
def test_swiglu_flat_kernels(rows, cols, dtype, monkeypatch):
    """Contiguous gate, up and outputs (two projections, not halves of one) take the 1-D
    kernels: rows x cols elements in blocks of FLAT_BLOCK, the last one partial."""
    monkeypatch.setattr(tri_swiglu, "_swiglu_fwd_kernel", _Refuse())
    monkeypatch.setattr(tri_swiglu, "_swiglu_bwd_kernel", _Refuse())
    gate, up, dout = (torch.randn(rows, cols, device=DEVICE).to(dtype) for _ in range(3))
    _check_swiglu_launchers(gate, up, dout, contiguous_outputs=True)


# ------------------------------------------------------------------------------ rotary kernel


def _qkv(batch, seqlen, heads, head_dim, dtype):
    """q and k sliced out of a fused (B, S, 3H, D) projection: strides over S and H are not
    those of a contiguous (B, S, H, D) tensor."""
    qkv = torch.randn(batch, seqlen, 3 * heads, head_dim, dtype=dtype, device=DEVICE)
    return qkv, qkv[:, :, :heads], qkv[:, :, heads:2 * heads]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("head_dim", [64, 128, 96])
@pytest.mark.parametrize("seqlen", [1, 97])
@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
@pytest.mark.parametrize("mode", ["plain", "positions", "conjugate"])
def test_rotary_kernel(mode, interleaved, seqlen, head_dim, dtype):
    batch, heads, table_rows = 2, 3, 160
    _, q, k = _qkv(batch, seqlen, heads, head_dim, dtype)
    cos, sin = reference.rotary_tables(table_rows, head_dim, device=DEVICE)
    positions = None
    if mode == "positions":  # out of order, repeated, and past seqlen
        positions = torch.randint(0, table_rows, (batch, seqlen), device=DEVICE)
    conjugate = mode == "conjugate"
    name, x = ("k", k) if interleaved else ("q", q)  # both strided views; one per case
    out = Guarded(x.shape, dtype)
    tri_rotary._launch(x, cos, sin, positions, interleaved, conjugate, out.view)
    out.check(name)
    kw = dict(interleaved=interleaved, positions=positions, conjugate=conjugate)
    ref32 = reference.apply_rotary(x.float(), cos, sin, **kw)
    eager = reference.apply_rotary(x, cos, sin, upcast=False, **kw)
    assert_close(out.view, ref32, eager, name)
    if conjugate and dtype == torch.float32:  # rotating by -t undoes rotating by t
        back = tri_rotary.rotary(out.view, cos, sin, positions, interleaved, False)
        torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)


def test_rotary_settings_read_tables_once_per_token():
    """A program covers several heads of its tokens (tables loaded once per token)."""
    for tokens, heads, d in ((16384, 32, 128), (8, 32, 128), (1, 32, 64), (1, 1, 256)):
        s = tri_rotary.rotary_launch_settings(tokens, heads, d)
        assert 2 * s.block_half >= d and s.block_t >= 1 and s.block_h >= 1
        assert s.block_t <= tokens or tokens == 1
    assert tri_rotary.rotary_launch_settings(1, 32, 128).block_h > 1


# ------------------------------------------------------------------------------ public API


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_api_rms_norm(dtype):
    shape = (2, 3, 123)
    x = torch.randn(123, 2, 3, dtype=dtype, device=DEVICE).permute(1, 2, 0)  # dim stride != 1
    assert x.shape == shape and x.stride(-1) != 1
    w, dy = torch.randn(123, dtype=dtype, device=DEVICE), torch.randn(shape, dtype=dtype,
                                                                      device=DEVICE)
    (y,), (dx, dw) = _grads(lambda a, b: lk.rms_norm(a, b, EPS, backend="triton"), (x, w), dy)
    (y32,), (dx32, dw32) = _grads(lambda a, b: reference.rms_norm(a, b, EPS), _f32((x, w)),
                                  dy.float())
    (ye,), (dxe, dwe) = _grads(lambda a, b: reference.rms_norm(a, b, EPS, upcast=False),
                               (x, w), dy)
    assert y.shape == shape and y.dtype == dtype
    assert_close(y, y32, ye, "y")
    assert_close(dx, dx32, dxe, "dx")
    assert_close(dw, dw32, dwe, "dweight")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_api_add_rms_norm(dtype):
    rows, dim = 5, 123
    x, res = torch.randn(rows, dim, dtype=dtype, device=DEVICE), rand_rows(rows, dim, dtype)
    w = torch.randn(dim, dtype=dtype, device=DEVICE)
    dy, dh = (torch.randn(rows, dim, dtype=dtype, device=DEVICE) for _ in range(2))

    def run(fn, inputs, douts):
        return _grads(fn, inputs, douts)

    (y, h), grads = run(lambda a, r, b: lk.add_rms_norm(a, r, b, EPS, backend="triton"),
                        (x, res, w), (dy, dh))
    (y32, h32), grads32 = run(lambda a, r, b: reference.add_rms_norm(a, r, b, EPS),
                              _f32((x, res, w)), (dy.float(), dh.float()))
    (ye, he), grads_e = run(lambda a, r, b: reference.add_rms_norm(a, r, b, EPS, upcast=False),
                            (x, res, w), (dy, dh))
    assert_close(h, h32, he, "h")
    assert_close(y, y32, ye, "y")
    for name, g, g32, ge in zip(("dx", "dresidual", "dweight"), grads, grads32, grads_e):
        assert_close(g, g32, ge, name)
    assert torch.equal(grads[0], grads[1]), "dx and dresidual are the same gradient"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_api_swiglu(dtype):
    rows, cols = 4, 123
    fused = torch.randn(2, rows, 2 * cols, dtype=dtype, device=DEVICE)
    dout = torch.randn(2, rows, cols, dtype=dtype, device=DEVICE)

    def split(fn):
        return lambda f: fn(f[..., :cols], f[..., cols:])

    (out,), (df,) = _grads(split(lambda g, u: lk.swiglu(g, u, backend="triton")), (fused,),
                           dout)
    (o32,), (df32,) = _grads(split(reference.swiglu), (fused.float(),), dout.float())
    (oe,), (dfe,) = _grads(split(lambda g, u: reference.swiglu(g, u, upcast=False)), (fused,),
                           dout)
    assert_close(out, o32, oe, "out")
    assert_close(df, df32, dfe, "dgate|dup")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
def test_api_apply_rotary(interleaved, dtype):
    batch, seqlen, heads, head_dim = 2, 7, 2, 64
    qkv, _, _ = _qkv(batch, seqlen, heads, head_dim, dtype)
    cos, sin = lk.rotary_tables(32, head_dim, device=DEVICE)
    positions = torch.randperm(32, device=DEVICE)[:batch * seqlen].view(batch, seqlen)
    dy = torch.randn(batch, seqlen, 2 * heads, head_dim, dtype=dtype, device=DEVICE)

    def qk(fn):
        def f(t):
            q, k = t[:, :, :heads], t[:, :, heads:2 * heads]
            return torch.cat((fn(q), fn(k)), dim=2)
        return f

    kw = dict(interleaved=interleaved, positions=positions)
    (out,), (dqkv,) = _grads(qk(lambda t: lk.apply_rotary(t, cos, sin, backend="triton", **kw)),
                             (qkv,), dy)
    (o32,), (d32,) = _grads(qk(lambda t: reference.apply_rotary(t, cos, sin, **kw)),
                            (qkv.float(),), dy.float())
    (oe,), (de,) = _grads(qk(lambda t: reference.apply_rotary(t, cos, sin, upcast=False, **kw)),
                          (qkv,), dy)
    assert_close(out, o32, oe, "out")
    assert_close(dqkv, d32, de, "dqkv")
    assert (dqkv[:, :, 2 * heads:] == 0).all(), "v received a gradient"


# ------------------------------------------------------------------------------ opcheck/compile


def _opcheck_cases():
    dtype, rows, dim = torch.float32, 3, 40
    ops = torch.ops.llama_kernels

    def t(*shape, grad=False):
        return torch.randn(*shape, dtype=dtype, device=DEVICE).requires_grad_(grad)

    cos, sin = reference.rotary_tables(8, 16, device=DEVICE)
    pos = torch.tensor([[3, 0, 5], [1, 1, 7]], device=DEVICE)
    x_rows = t(rows, dim)
    return {
        "rms_norm_fwd": (ops.rms_norm_fwd, (t(rows, dim, grad=True), t(dim, grad=True), EPS,
                                            "triton")),
        "add_rms_norm_fwd": (ops.add_rms_norm_fwd, (t(rows, dim, grad=True),
                                                    t(rows, dim, grad=True), t(dim, grad=True),
                                                    EPS, "triton")),
        "rms_norm_bwd": (ops.rms_norm_bwd, (t(rows, dim), x_rows, t(dim),
                                            reference.rms_norm_rstd(x_rows, EPS),
                                            t(rows, dim), "triton")),
        "swiglu_fwd": (ops.swiglu_fwd, (t(rows, dim, grad=True), t(rows, dim, grad=True),
                                        "triton")),
        "swiglu_bwd": (ops.swiglu_bwd, (t(rows, dim), t(rows, dim), t(rows, dim), "triton")),
        "rotary_apply": (ops.rotary_apply, (t(2, 3, 2, 16, grad=True), cos, sin, pos, True,
                                            False, "triton")),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_opcheck_triton(name):
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args)


def test_compile_fullgraph_triton():
    """A block calling every op with backend="triton" traces without a graph break and gives
    the eager results (same kernels), gradients included."""
    torch._dynamo.reset()
    dim, hidden, heads, head_dim = 32, 48, 2, 16
    cos, sin = lk.rotary_tables(8, head_dim, device=DEVICE)

    def block(x, res, w, w13, qk):
        y, h = lk.add_rms_norm(x, res, w, backend="triton")
        z = lk.rms_norm(h, w, backend="triton")
        gu = (z + y) @ w13
        f = lk.swiglu(gu[..., :hidden], gu[..., hidden:], backend="triton")
        r = lk.apply_rotary(qk, cos, sin, backend="triton")
        return f, r

    inputs = [torch.randn(2, 8, dim, device=DEVICE), torch.randn(2, 8, dim, device=DEVICE),
              torch.randn(dim, device=DEVICE), torch.randn(dim, 2 * hidden, device=DEVICE),
              torch.randn(2, 8, heads, head_dim, device=DEVICE)]
    compiled = torch.compile(block, backend="aot_eager" if not GPU else "inductor",
                             fullgraph=True)
    douts = (torch.randn(2, 8, hidden, device=DEVICE),
             torch.randn(2, 8, heads, head_dim, device=DEVICE))
    outs_c, grads_c = _grads(compiled, inputs, douts)
    outs_e, grads_e = _grads(block, inputs, douts)
    for a, b in zip(outs_c + grads_c, outs_e + grads_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not GPU or torch.cuda.get_device_properties(0).total_memory < 40 << 30,
                    reason="needs a CUDA GPU with >= 40 GiB (tensors past 2**31 elements)")
def test_offsets_past_2_pow_31():
    """Rows whose element offset passes 2**31: the kernels' offsets must be 64-bit (32-bit
    offset arithmetic overflows there)."""
    dim, dtype = 4096, torch.bfloat16
    rows = (1 << 31) // dim + 3
    x = torch.randn(rows, dim, dtype=dtype, device=DEVICE)
    w = torch.randn(dim, dtype=dtype, device=DEVICE)
    y, rstd = tri_norm.rms_norm_fwd(x, w, EPS)
    tail = slice(rows - 8, rows)
    assert_close(y[tail], reference.rms_norm(x[tail].float(), w.float(), EPS),
                 reference.rms_norm(x[tail], w, EPS, upcast=False), "y tail")
    del y, rstd
    out = tri_swiglu.swiglu_fwd(x, x)
    assert_close(out[tail], reference.swiglu(x[tail].float(), x[tail].float()),
                 reference.swiglu(x[tail], x[tail], upcast=False), "swiglu tail")
