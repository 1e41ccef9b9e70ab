"""Documented numerical behaviour (see reference.py's docstring, "Non-finite values and
extremes"), on every backend that runs here.

- A NaN in one row of rms_norm / add_rms_norm / swiglu / apply_rotary reaches exactly the
  values that depend on it (the whole row for the norms, the element for swiglu, the rotated
  pair for rotary); every other value is bitwise what it is without the NaN. An inf in a row of
  rms_norm gives NaN at the inf (inf * 0) and 0 elsewhere in the row, as in PyTorch.
- Attention: a NaN in key j of k poisons exactly the queries that see j (the causal mask is
  respected: earlier queries are bitwise unchanged). A NaN in v reaches every query that sees
  it; a query that does not see it is unchanged or NaN (0 * NaN in P @ V: the reference itself
  gives NaN everywhere), never a wrong finite number.
- Fully masked rows cannot occur: causal attention with Sq > Sk is refused (ValueError).
- Large logits (scores ~1e4) stay finite and correct; fp16 inputs whose squares overflow fp16
  normalize correctly (fp32 accumulation); swiglu at |gate| 80 .. 1e4 gives no NaN.
- Offsets past 2**31 elements: GPU only (tests/test_triton_kernels.py has the rms_norm /
  swiglu forward).
- The tolerance rule itself (llama_kernels.testing, whose docstring states it) can fail: an
  output three times as wrong as eager fails, an all-zero gradient fails, an overflowing
  baseline never widens the bound, and attention's terms stay near eager's own error.
"""

from __future__ import annotations

import pytest
import torch

import llama_kernels as lk
from llama_kernels import reference
from llama_kernels.testing import (ToleranceTerms, assert_close, attention_terms,
                                   attention_tolerance_terms, check_fwd_bwd, compare,
                                   compare_fwd_bwd, max_err, rounding_floor)
from helpers import DEVICE, GPU, backend_params

BACKENDS = backend_params()
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
HALF = (torch.float16, torch.bfloat16)


def _grad(fn, inputs, dout):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    return out.detach(), torch.autograd.grad(out, leaves, dout)


def assert_same_except(a: torch.Tensor, b: torch.Tensor, poisoned: torch.Tensor, what: str) -> None:
    """``a`` is NaN exactly where ``poisoned`` is True and bitwise equal to ``b`` elsewhere."""
    assert torch.equal(a.isnan(), poisoned), f"{what}: NaN pattern differs from the expected one"
    assert torch.equal(a[~poisoned], b[~poisoned]), f"{what}: values without NaN changed"


# ------------------------------------------------------------------------------ NaN in one row


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_nan_stays_in_its_row(backend, dtype):
    rows, dim, bad = 9, 37, 4
    x = torch.randn(rows, dim, device=DEVICE, dtype=dtype)
    w = torch.randn(dim, device=DEVICE, dtype=dtype)
    dy = torch.randn(rows, dim, device=DEVICE, dtype=dtype)
    x_nan = x.clone()
    x_nan[bad, 5] = float("nan")
    fn = lambda a, b: lk.rms_norm(a, b, backend=backend)  # noqa: E731
    y, (dx, dw) = _grad(fn, [x, w], dy)
    y_n, (dx_n, dw_n) = _grad(fn, [x_nan, w], dy)
    row = torch.zeros(rows, dim, dtype=torch.bool, device=DEVICE)
    row[bad] = True
    assert_same_except(y_n, y, row, "y")
    assert_same_except(dx_n, dx, row, "dx")
    assert dw_n.isnan().all(), "dweight sums over rows: the NaN row reaches all of it"


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_rms_norm_nan_stays_in_its_row(backend):
    rows, dim, bad = 6, 50, 2
    x, res = torch.randn(2, rows, dim, device=DEVICE).unbind(0)
    w = torch.randn(dim, device=DEVICE)
    res_nan = res.clone()
    res_nan[bad, 7] = float("nan")
    y, h = lk.add_rms_norm(x, res, w, backend=backend)
    y_n, h_n = lk.add_rms_norm(x, res_nan, w, backend=backend)
    row = torch.zeros(rows, dim, dtype=torch.bool, device=DEVICE)
    row[bad] = True
    assert_same_except(y_n, y, row, "y")
    assert_same_except(h_n, h, res_nan.isnan(), "h")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_inf_matches_torch(backend):
    """An inf in a row: rstd = 0, so the inf becomes NaN (inf * 0) and the rest of the row 0,
    exactly what eager PyTorch gives; other rows untouched."""
    x = torch.randn(4, 16, device=DEVICE)
    x[1, 3] = float("inf")
    w = torch.rand(16, device=DEVICE) + 0.5
    y = lk.rms_norm(x, w, backend=backend)
    ref = reference.rms_norm(x, w)
    torch.testing.assert_close(y, ref, equal_nan=True)
    assert y[1, 3].isnan() and (y[1, :3] == 0).all() and (y[1, 4:] == 0).all()
    assert torch.isfinite(y[[0, 2, 3]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_nan_stays_in_its_element(backend):
    gate, up = torch.randn(2, 5, 33, device=DEVICE).unbind(0)
    dout = torch.randn(5, 33, device=DEVICE)
    fn = lambda g, u: lk.swiglu(g, u, backend=backend)  # noqa: E731
    out, (dg, du) = _grad(fn, [gate, up], dout)
    gate_n = gate.clone()
    gate_n[3, 10] = float("nan")
    out_n, (dg_n, du_n) = _grad(fn, [gate_n, up], dout)
    poisoned = gate_n.isnan()
    assert_same_except(out_n, out, poisoned, "out")
    assert_same_except(dg_n, dg, poisoned, "dgate")
    assert_same_except(du_n, du, poisoned, "dup")


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rotary_nan_stays_in_its_pair(backend, interleaved):
    b, s, h, d = 2, 7, 3, 16
    x = torch.randn(b, s, h, d, device=DEVICE)
    dy = torch.randn(b, s, h, d, device=DEVICE)
    cos, sin = lk.rotary_tables(s, d, device=DEVICE)
    fn = lambda a: lk.apply_rotary(a, cos, sin, interleaved=interleaved,  # noqa: E731
                                   backend=backend)
    y, (dx,) = _grad(fn, [x], dy)
    x_n = x.clone()
    x_n[1, 4, 2, 5] = float("nan")
    y_n, (dx_n,) = _grad(fn, [x_n], dy)
    poisoned = torch.zeros_like(x, dtype=torch.bool)
    partner = 4 if interleaved else 5 + d // 2  # pairs (4, 5) / (5, 13)
    poisoned[1, 4, 2, [5, partner]] = True
    assert_same_except(y_n, y, poisoned, "out")
    assert torch.equal(dx_n, dx), "dx does not depend on x (a rotation is linear)"


# ------------------------------------------------------------------------------ attention NaN


def _attention_nan(backend, where, causal, sq, sk):
    b, hq, hkv, d = 2, 4, 2, 16
    q = torch.randn(b, sq, hq, d, device=DEVICE)
    k = torch.randn(b, sk, hkv, d, device=DEVICE)
    v = torch.randn(b, sk, hkv, d, device=DEVICE)
    j = sk - sq + sq // 2  # causal: seen by queries sq // 2 .. sq - 1 only
    if where == "k":  # one element of a key: the whole score is NaN
        k[1, j, 0, 3] = float("nan")
    else:  # a whole value row (one NaN element would reach only that column of out)
        v[1, j, 0, :] = float("nan")
    clean = {"k": k, "v": v}
    clean[where] = clean[where].nan_to_num(0.0)
    out = lk.flash_attention(q, k, v, causal=causal, backend=backend)
    ref = lk.flash_attention(q, clean["k"], clean["v"], causal=causal, backend=backend)
    # who sees key j: batch 1, query heads of kv head 0 (0 and 1), queries i >= j - (Sk - Sq)
    sees = torch.zeros(b, sq, hq, d, dtype=torch.bool, device=DEVICE)
    first = max(0, j - (sk - sq)) if causal else 0
    sees[1, first:, :2] = True
    return out, ref, sees, first


@pytest.mark.parametrize("sq,sk", [(70, 70), (5, 40), (40, 90)], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_nan_key_poisons_only_queries_that_see_it(backend, causal, sq, sk):
    out, ref, sees, first = _attention_nan(backend, "k", causal, sq, sk)
    if causal:
        assert first > 0, "the test needs queries that do not see the key"
    assert_same_except(out, ref, sees, "out")


@pytest.mark.parametrize("sq,sk", [(70, 70), (5, 40)], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_nan_value_is_loud(backend, sq, sk):
    out, ref, sees, _ = _attention_nan(backend, "v", True, sq, sk)
    assert out[sees].isnan().all(), "a query that sees a NaN value must be NaN"
    rows_nan = out.isnan().any(-1)
    assert torch.equal(rows_nan, out.isnan().all(-1)), "a row is either all NaN or finite"
    ok = ~rows_nan
    assert torch.equal(out[ok], ref[ok]), "a finite row differs from the run without NaN"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_are_refused(backend):
    """Causal attention with Sq > Sk would leave the first queries with no key: refused on
    every backend (and by the Triton launcher itself), never a NaN or zero row."""
    q = torch.randn(1, 9, 2, 16, device=DEVICE)
    k = torch.randn(1, 8, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="seqlen_q"):
        lk.flash_attention(q, k, k, causal=True, backend=backend)
    out = lk.flash_attention(q, k, k, causal=False, backend=backend)  # full attention is fine
    assert torch.isfinite(out).all()


def test_fully_masked_rows_refused_by_triton_launcher():
    fa = pytest.importorskip("llama_kernels.triton.flash_attention")
    q = torch.randn(1, 9, 2, 16, device=DEVICE)
    k = torch.randn(1, 8, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="seqlen_q"):
        fa.flash_attention_fwd(q, k, k, True, 0.25)


# ------------------------------------------------------------------------------ extremes


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16),
                         ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_large_logits(backend, dtype):
    """Scores up to ~1e4 (a large softmax_scale): the online softmax's running max keeps every
    exponent <= 0, so output, lse and gradients stay finite. The answer is then almost one-hot
    (the top key per query), and a relative error eps32 * 1e4 ~ 1e-3 in a score moves weights
    by ~0.1%: compared with the fp32 reference at that explicit tolerance."""
    b, sq, sk, hq, hkv, d = 1, 33, 40, 2, 1, 32
    q = torch.randn(b, sq, hq, d, device=DEVICE).to(dtype)
    k = torch.randn(b, sk, hkv, d, device=DEVICE).to(dtype)
    v = torch.randn(b, sk, hkv, d, device=DEVICE).to(dtype)
    scale = 1e4 / d  # |q.k| ~ sqrt(d) .. 3 d: scores ~ 1e3 .. 1e4
    fn = lambda q_, k_, v_: lk.flash_attention(q_, k_, v_, softmax_scale=scale,  # noqa: E731
                                               backend=backend)
    dout = torch.randn(b, sq, hq, d, device=DEVICE).to(dtype)
    out, grads = _grad(fn, [q, k, v], dout)
    assert torch.isfinite(out).all()
    for g in grads:
        assert torch.isfinite(g).all()
    ref = reference.attention(q.float(), k.float(), v.float(), softmax_scale=scale)
    tol = 2e-2 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps * 4
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("magnitude", [300.0, 4000.0, 60000.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_fp16_squares_overflow(backend, magnitude):
    """|x| up to 60000 in fp16: x**2 overflows fp16 (eager fp16 gives 0 or NaN), the kernels
    square in fp32 and must match the fp32 reference to within rounding to fp16."""
    rows, dim = 5, 96
    x32 = (torch.rand(rows, dim, device=DEVICE) * 2 - 1) * magnitude
    x = x32.half()
    w = (torch.rand(dim, device=DEVICE) + 0.5).half()
    dy = torch.randn(rows, dim, device=DEVICE).half()
    y, (dx, dw) = _grad(lambda a, b: lk.rms_norm(a, b, backend=backend), [x, w], dy)
    (y_r, (dx_r, dw_r)) = _grad(lambda a, b: reference.rms_norm(a, b), [x.float(), w.float()],
                                dy.float())
    rounded = _grad(lambda a, b: reference.rms_norm(a, b), [x, w], dy)  # fp32 math, fp16 out
    if magnitude >= 4000:
        eager = reference.rms_norm(x, w, upcast=False)
        assert not torch.isfinite(eager).all() or (eager == 0).any(), "eager fp16 overflow"
    assert_close(y, y_r, rounded[0], "y")
    assert_close(dx, dx_r, rounded[1][0], "dx")
    assert_close(dw, dw_r, rounded[1][1], "dweight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_rms_norm_fp16_large(backend):
    x = ((torch.rand(4, 64, device=DEVICE) * 2 - 1) * 20000).half()
    res = ((torch.rand(4, 64, device=DEVICE) * 2 - 1) * 20000).half()
    w = torch.ones(64, device=DEVICE).half()
    y, h = lk.add_rms_norm(x, res, w, backend=backend)
    y_r, h_r = reference.add_rms_norm(x.float(), res.float(), w.float())
    y_rounded, h_rounded = reference.add_rms_norm(x, res, w)
    assert_close(h, h_r, h_rounded, "h")
    assert_close(y, reference.rms_norm(h.float(), w.float()), y_rounded, "y")


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16),
                         ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_large_gate(backend, dtype):
    """|gate| from 80 to 1e4: sigmoid saturates (exp overflows to inf for large negative
    gates: 1 / (1 + inf) = 0); silu(g) is g or -0, the gradients finite, never NaN."""
    mags = torch.tensor([80.0, 100.0, 500.0, 1e3, 5e3, 1e4], device=DEVICE)
    gate = torch.cat([mags, -mags]).to(dtype)[None].repeat(3, 1)
    up = torch.randn(gate.shape, device=DEVICE).to(dtype)
    dout = torch.randn(gate.shape, device=DEVICE).to(dtype)
    out, (dg, du) = _grad(lambda g, u: lk.swiglu(g, u, backend=backend), [gate, up], dout)
    for name, t in (("out", out), ("dgate", dg), ("dup", du)):
        assert torch.isfinite(t).all(), f"{name}: non-finite at large |gate|"
    pos = gate > 0
    torch.testing.assert_close(out[pos].float(), (gate * up)[pos].float(), rtol=1e-2, atol=0)
    assert (out[~pos].float().abs() <= 1e-30).all(), "silu(-large) must be 0"
    torch.testing.assert_close(dg[pos].float(), (dout * up)[pos].float(), rtol=1e-2, atol=0)
    assert (dg[~pos].float().abs() <= 1e-30).all()


# ------------------------------------------------------------------------------ 2**31


def _gpu_bytes() -> int:
    return torch.cuda.get_device_properties(0).total_memory if GPU else 0


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(_gpu_bytes() < 60 << 30,
                    reason="needs a CUDA GPU with >= 60 GiB: tensors past 2**31 elements "
                           "(rms_norm/swiglu forwards: tests/test_triton_kernels.py)")
@pytest.mark.parametrize("backend", [b for b in ("triton", "cuda")])
def test_offsets_past_2_pow_31_backward_and_rotary(backend):
    """Element offsets past 2**31 in the backward kernels and in rotary (64-bit offsets)."""
    if lk.available_backends()[backend] is not None:
        pytest.skip(lk.available_backends()[backend])
    dim, dtype = 4096, torch.bfloat16
    rows = (1 << 31) // dim + 3
    tail = slice(rows - 4, rows)
    x = torch.randn(rows, dim, dtype=dtype, device=DEVICE)
    w = torch.randn(dim, dtype=dtype, device=DEVICE, requires_grad=True)
    xl = x.requires_grad_(True)
    y = lk.rms_norm(xl, w, backend=backend)
    dx, _ = torch.autograd.grad(y, (xl, w), torch.ones_like(y))
    del y
    ref = _grad(lambda a, b: reference.rms_norm(a, b), [x[tail].float(), w.float()],
                torch.ones(4, dim, device=DEVICE))[1][0]
    eager = _grad(lambda a, b: reference.rms_norm(a, b, upcast=False), [x[tail], w.detach()],
                  torch.ones(4, dim, device=DEVICE, dtype=dtype))[1][0]
    assert_close(dx[tail], ref, eager, "rms_norm dx tail")
    del dx
    xr = x.detach().view(1, rows, 32, dim // 32)
    cos, sin = lk.rotary_tables(rows, dim // 32, device=DEVICE)
    out = lk.apply_rotary(xr, cos, sin, backend=backend)
    xt = xr[:, tail]
    assert_close(out[:, tail], reference.apply_rotary(xt.float(), cos[tail.start:],
                                                      sin[tail.start:]),
                 reference.apply_rotary(xt, cos[tail.start:], sin[tail.start:], upcast=False),
                 "rotary tail")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(_gpu_bytes() < 60 << 30,
                    reason="needs a CUDA GPU with >= 60 GiB (q, k, v past 2**31 elements)")
def test_attention_past_2_pow_31_and_65535_heads():
    """q, k, v past 2**31 elements with B * Hq > 65535 programs along a head axis (the grid
    limit of axes 1 and 2): decode and prefill, forward and backward, checked on the last
    batch entry."""
    if lk.available_backends()["triton"] is not None:
        pytest.skip(lk.available_backends()["triton"])
    d, hq, hkv, dtype = 128, 32, 8, torch.bfloat16
    for sq, sk in ((1, 64), (17, 17)):
        b = (1 << 31) // (max(sq * hq, sk * hkv) * d) + 1  # the largest tensor passes 2**31
        assert b * hq > 65535
        q = torch.randn(b, sq, hq, d, dtype=dtype, device=DEVICE, requires_grad=True)
        k = torch.randn(b, sk, hkv, d, dtype=dtype, device=DEVICE, requires_grad=True)
        v = torch.randn(b, sk, hkv, d, dtype=dtype, device=DEVICE, requires_grad=True)
        out = lk.flash_attention(q, k, v, backend="triton")
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        last = [t[-1:].detach() for t in (q, k, v)]
        ref = reference.attention(*(t.float() for t in last))
        eager = reference.attention(*last, upcast=False)
        assert_close(out[-1:], ref, eager, f"out Sq={sq}")
        for g in grads:
            assert torch.isfinite(g[-1:]).all()
        del q, k, v, out, grads
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ the rule itself


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=DTYPE_IDS.get)
def test_rule_allows_twice_eager_error_not_three_times(dtype):
    """Where eager's error dominates the floor: an output 1.9x as far from the answer as eager
    passes, 3x fails. Every value below is exact in the dtype (bf16: steps of 2**-7 at 1)."""
    step = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-2
    wrong = 8 if dtype == torch.bfloat16 else 1  # eager's error, in steps
    ref32 = torch.tensor([1.0, 1.5, 0.25])
    eager = (ref32 + torch.tensor([wrong * step, 0.0, 0.0])).to(dtype)
    near = (ref32 + torch.tensor([0.0, 1.9 * wrong * step, 0.0])).to(dtype)
    far = (ref32 + torch.tensor([0.0, 0.0, -3 * wrong * step])).to(dtype)
    assert max_err(near, ref32) <= 2 * max_err(eager, ref32)
    assert_close(near, ref32, eager)
    result = compare(far, ref32, eager)
    assert not result.ok and result.ratio > 1 and "max error" in result.problem
    with pytest.raises(AssertionError, match="far: max error"):
        assert_close(far, ref32, eager, name="far")


def test_rule_floor_where_eager_is_exact():
    """In fp32 eager is the reference (error 0): the floor, 1e-5 times max(1, max |ref|), is
    what a kernel may be off by; an absolute term adds to it."""
    ref32 = torch.tensor([3.0, -1.0, 0.5])
    floor = rounding_floor(torch.float32, 3.0)
    assert floor == pytest.approx(3e-5)
    assert_close(ref32 + torch.tensor([0.0, 0.9 * floor, 0.0]), ref32, ref32)
    off = ref32 + torch.tensor([0.0, 1.5 * floor, 0.0])
    with pytest.raises(AssertionError):
        assert_close(off, ref32, ref32)
    assert_close(off, ref32, ref32, atol=floor)
    assert rounding_floor(torch.float16, 0.25) == torch.finfo(torch.float16).eps


def test_assert_close_overflow_rule():
    """Where the exact answer overflows the dtype, its inf passes and nothing else far from it
    does; an inf where the answer is finite never passes."""
    ref32 = torch.tensor([1.0, 7e4, -7e4])
    good = ref32.to(torch.float16)  # [1, inf, -inf]
    assert_close(good, ref32, good)
    assert_close(torch.tensor([1.0, 65504.0, -40000.0], dtype=torch.float16), ref32, good)
    for bad in ([float("inf"), float("inf"), float("-inf")],  # inf where the answer is 1
                [1.0, 1.0, float("-inf")],  # finite and far where it overflows
                [1.0, float("-inf"), float("-inf")]):  # the wrong inf
        with pytest.raises(AssertionError):
            assert_close(torch.tensor(bad, dtype=torch.float16), ref32, good)


def test_non_finite_baseline_fails_instead_of_widening_the_bound():
    ref32 = torch.tensor([1.0, 2.0])
    eager = torch.tensor([1.0, float("inf")], dtype=torch.float16)
    result = compare(ref32.half(), ref32, eager)
    assert not result.ok and result.ratio == float("inf") and "baseline" in result.problem


def _scaled_up_and_down(x, upcast=True):
    """x * 300 / 300: eager fp16 overflows in x * 300 where |x| > 218, the answer is x."""
    return (x.float() * 300 / 300).to(x.dtype) if upcast else x * 300 / 300


def test_eager_overflow_falls_back_to_the_rounded_answer():
    """Eager fp16 is inf where the exact answer is not: the baseline of the whole call becomes
    the answer rounded to fp16 once, which a correct kernel passes and a kernel 1% off fails
    (the bound stays finite)."""
    x = (torch.randn(64) * 1000).half()
    assert not torch.isfinite(_scaled_up_and_down(x, upcast=False)).all()
    check_fwd_bwd(lambda t: _scaled_up_and_down(t), _scaled_up_and_down, [x])
    results = compare_fwd_bwd(lambda t: t * 1.01, _scaled_up_and_down, [x])
    assert [r.name for r in results if not r.ok] == ["output 0", "grad of input 0"]


class _ZeroGrad(torch.autograd.Function):
    """x * c forward, an all-zero gradient backward."""

    @staticmethod
    def forward(ctx, x, c):
        return x * c

    @staticmethod
    def backward(ctx, g):
        return torch.zeros_like(g), None


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16),
                         ids=DTYPE_IDS.get)
def test_all_zero_gradient_fails(dtype):
    x = torch.randn(100).to(dtype)
    ref = lambda t, upcast=True: (t.float() * 2).to(t.dtype) if upcast else t * 2  # noqa: E731
    with pytest.raises(AssertionError, match="grad of input 0"):
        check_fwd_bwd(lambda t: _ZeroGrad.apply(t, 2.0), ref, [x])


def test_overflowing_baseline_does_not_widen_the_bound():
    """A second gradient baseline that overflows fp16 where the exact gradient does not would
    make the bound infinite: it is set aside, and an all-zero gradient still fails. With c =
    30000 the baseline (2 c dy, twice the exact gradient c dy) overflows wherever |dy| > 1.1:
    somewhere among 256 draws, surely (a baseline that stays finite may widen the bound: that
    is its job)."""
    torch.manual_seed(0)
    c = 30000.0
    x = torch.randn(256).to(torch.float16)
    ref = lambda t, upcast=True: (t.float() * c).to(t.dtype) if upcast else t * c  # noqa: E731
    with pytest.raises(AssertionError, match="grad of input 0"):
        check_fwd_bwd(lambda t: _ZeroGrad.apply(t, c), ref, [x],
                      terms=lambda inputs, grad_outs, outs: ToleranceTerms(
                          grad_baseline=(grad_outs[0] * c * 2.0,)))


def _attention_inputs(dtype, b=1, sq=17, sk=33, hq=4, hkv=2, d=64):
    return (torch.randn(b, sq, hq, d).to(dtype), torch.randn(b, sk, hkv, d).to(dtype),
            torch.randn(b, sk, hkv, d).to(dtype))


def _grads(fn, inputs, dout):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    return (out.detach(), *torch.autograd.grad(out, leaves, dout.to(out.dtype)))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_attention_saved_output_baseline_is_the_exact_backward(causal):
    """Given the exact output, the second gradient baseline is the exact backward (autograd
    through reference.attention in fp64); given an output off by E in one row, dv keeps and
    that row's dq moves (delta = rowsum(dO * O) reads the output)."""
    torch.manual_seed(0)
    q, k, v = _attention_inputs(torch.float32)
    dout = torch.randn(q.shape)
    f64 = [t.double() for t in (q, k, v)]
    exact = _grads(lambda *a: reference.attention(*a, causal=causal), f64, dout.double())
    terms = attention_tolerance_terms(q, k, v, dout, exact[0].float(), causal=causal)
    for got, want in zip(terms.grad_baseline, exact[1:]):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    moved = exact[0].float().clone()
    moved[0, 5] += 0.1
    shifted = attention_tolerance_terms(q, k, v, dout, moved, causal=causal).grad_baseline
    assert torch.equal(shifted[2], terms.grad_baseline[2])
    changed = (shifted[0] != terms.grad_baseline[0]).any(-1).any(-1)[0]
    assert changed.tolist() == [i == 5 for i in range(q.shape[1])]


@pytest.mark.parametrize("dtype", HALF, ids=DTYPE_IDS.get)
def test_attention_terms_stay_near_eager_error(dtype):
    """On ordinary inputs the attention terms are of eager's own error or below, never a blanket
    tolerance: P's rounding term is at most half an eps of max |v| (P's rows sum to 1) and
    below twice eager's output error; the cancellation term is far below eager's gradient
    errors; the saved-output baseline (from eager's own output) is no farther from the answer
    than eager."""
    torch.manual_seed(0)
    q, k, v = _attention_inputs(dtype)
    dout = torch.randn(q.shape)
    exact = _grads(reference.attention, [t.float() for t in (q, k, v)], dout)
    eager = _grads(lambda *a: reference.attention(*a, upcast=False), [q, k, v], dout)
    terms = attention_tolerance_terms(q, k, v, dout, eager[0])
    eager_err = [max_err(e, r) for e, r in zip(eager, exact)]
    eps = torch.finfo(dtype).eps
    assert terms.out_atol <= 0.5 * eps * v.float().abs().max().item()
    assert terms.out_atol <= 2 * eager_err[0]
    assert terms.grad_atol <= 0.1 * min(eager_err[1:])
    for alt, r, e in zip(terms.grad_baseline, exact[1:], eager_err[1:]):
        assert max_err(alt.to(dtype), r) <= e


def _attention_faults():
    def zero_dq(q, k, v):
        return reference.attention(q.detach() + 0 * q, k, v)

    def no_mask(q, k, v):
        return reference.attention(q, k, v, causal=False)

    def wrong_kv_head(q, k, v):  # query head h reads kv head (h // 2 + 1) % 2
        return reference.attention(q, k.flip(2), v.flip(2))

    return {"zero_dq": (zero_dq, "grad of input 0"), "no_mask": (no_mask, "output 0"),
            "wrong_kv_head": (wrong_kv_head, "output 0")}


@pytest.mark.parametrize("fault", list(_attention_faults()))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16),
                         ids=DTYPE_IDS.get)
def test_attention_terms_reject_wrong_kernels(dtype, fault):
    """With attention's terms the rule still fails a kernel with no query gradient, without
    the causal mask, or reading the wrong kv head; a correct one passes."""
    fn, first = _attention_faults()[fault]
    inputs = _attention_inputs(dtype)
    check_fwd_bwd(reference.attention, reference.attention, inputs, terms=attention_terms())
    results = compare_fwd_bwd(fn, reference.attention, inputs, terms=attention_terms())
    assert [r.name for r in results if not r.ok][0] == first
