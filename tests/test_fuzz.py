"""Property fuzzing of every op on every backend that runs here, against reference.py.

Hypothesis draws shapes (widths 1 and primes, batch, seqlen 1..300 for attention, head groups,
head dims including odd halves), dtypes, memory layouts (contiguous, rows of a wider buffer,
transposed views whose last dimension is not unit-stride), value scales (1e-3 .. 1e4, fp16
near its range limit where the reference itself is finite) and checks forward and backward
with the tolerance rule of llama_kernels.testing (its docstring states it): at most about twice
eager PyTorch's error in the test dtype, or, where eager overflows (fp16 squares past 65504) and
so has no finite error to double, about twice the error of rounding the exact answer once.
Attention adds the rule's attention terms (``attention_terms``).

Budget: the profile "ci" (default) keeps this file near a minute on two CPU cores, where the
Triton kernels run under the interpreter; "long" runs many more examples. Pick it with the
environment variable ``LLAMA_KERNELS_FUZZ=long``, or with ``--hypothesis-profile=long`` once
the profiles are registered before pytest configures hypothesis (that option is read when
pytest starts, before this module is imported: conftest.py has to ``import fuzz_profiles``).
On a GPU the examples are larger (LLaMA widths) and more numerous.

Every failure found becomes an ``@example`` (a fixed regression case) on its test.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

import cuda_emulator
import llama_kernels as lk
from llama_kernels import reference
from llama_kernels.testing import attention_terms, check_fwd_bwd
from fuzz_profiles import FUZZ, PROFILE
from helpers import DEVICE, GPU, backend_params

BACKENDS = backend_params()
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
# Widths that break kernels: 1, primes (ragged tails everywhere), powers of two and their
# neighbours; on a GPU the LLaMA widths and a chunked-path width too.
WIDTHS = [1, 2, 3, 7, 13, 31, 61, 64, 97, 127, 128, 129, 257, 1021]
if GPU:
    WIDTHS += [4096, 5120, 6656, 11008, 16411, 65537]
MAX_ROWS = 4096 if GPU else 40
SCALES = st.sampled_from([1e-3, 0.1, 1.0, 30.0, 1e3, 1e4])


def _seed(data) -> None:
    """Random tensors come from torch's generator, seeded by hypothesis (so that a failing
    example replays exactly)."""
    torch.manual_seed(data.draw(st.integers(0, 2**32 - 1), label="torch seed"))


def make(shape, dtype, scale: float = 1.0, layout: str = "contiguous") -> torch.Tensor:
    """A random tensor of ``shape`` in one of three layouts: ``contiguous``; ``sliced`` (a view
    into a wider buffer: row stride > width, unit stride along the last dimension); or
    ``transposed`` (the last two dimensions stored swapped: the last dimension is not
    unit-stride, which the kernels cannot take and must copy)."""
    shape = tuple(shape)
    values = torch.randn(shape, device=DEVICE) * scale
    if layout == "contiguous" or len(shape) == 0:
        return values.to(dtype)
    if layout == "sliced":
        buf = torch.full(shape[:-1] + (shape[-1] + 5,), float("nan"), device=DEVICE, dtype=dtype)
        view = buf[..., 2:2 + shape[-1]]
        view.copy_(values)
        return view
    if layout == "transposed":
        if len(shape) == 1:
            buf = torch.empty(shape[0] * 2, device=DEVICE, dtype=dtype)
            view = buf[::2]
        else:
            swapped = shape[:-2] + (shape[-1], shape[-2])
            view = torch.empty(swapped, device=DEVICE, dtype=dtype).transpose(-1, -2)
        view.copy_(values)
        return view
    raise ValueError(f"layout: unknown {layout!r}")


LAYOUTS = st.sampled_from(["contiguous", "sliced", "transposed"])


def _finite_in(dtype, *tensors) -> bool:
    """Whether every fp32 reference value fits ``dtype`` with room to spare (the contract only
    promises a correct answer where the true result is representable)."""
    limit = 0.5 * torch.finfo(dtype).max
    return all(bool((t.float().abs() < limit).all()) for t in tensors)


def _ref_fits(dtype, fn, inputs, grad_inputs=None) -> bool:
    """Run the fp32 reference forward and backward (gradients of ones) and check that it fits
    ``dtype``: examples whose true answer overflows the dtype are not the kernels' problem."""
    leaves = [t.detach().float().requires_grad_(True) if t.is_floating_point() else t
              for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if not _finite_in(dtype, *outs):
        return False
    idx = range(len(inputs)) if grad_inputs is None else grad_inputs
    grads = torch.autograd.grad(outs, [leaves[i] for i in idx], [torch.ones_like(o) for o in outs])
    return _finite_in(dtype, *grads)


def _supported(call) -> bool:
    """False where the backend, asked for by name, rightly refuses these inputs (a head_dim
    or dtype its kernels were not built for; test_hostile.py checks those errors)."""
    try:
        call()
    except ValueError as e:
        if "does not support" in str(e):
            return False
        raise
    except RuntimeError as e:
        if "has no kernel" in str(e):
            return False
        raise
    return True


def _require(condition: bool) -> None:
    """``assume`` inside a hypothesis test, a skip in a plain (regression) test."""
    if currently_in_test_context():
        assume(condition)
    elif not condition:
        pytest.skip("example outside the contract or this backend's support")


def _row_shape(data, *, max_rank: int = 3):
    width = data.draw(st.sampled_from(WIDTHS), label="width")
    rank = data.draw(st.integers(1, max_rank), label="rank")
    lead = []
    budget = MAX_ROWS
    for _ in range(rank - 1):
        n = data.draw(st.integers(1, max(1, min(budget, 7 if not GPU else 64))), label="lead")
        lead.append(n)
        budget = max(1, budget // n)
    return tuple(lead) + (width,)


# ------------------------------------------------------------------------------ RMSNorm


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
def test_fuzz_rms_norm(backend, data):
    _seed(data)
    dtype = data.draw(DTYPES, label="dtype")
    shape = _row_shape(data)
    scale = data.draw(SCALES, label="scale")
    if dtype == torch.float16:  # squares past fp16's range: fp32 accumulation is required
        scale = data.draw(st.sampled_from([scale, 300.0, 3e4]), label="fp16 scale")
    eps = data.draw(st.sampled_from([1e-6, 1e-5, 0.1]), label="eps")
    x = make(shape, dtype, scale, data.draw(LAYOUTS, label="x layout"))
    w = make(shape[-1:], dtype, 1.0, data.draw(LAYOUTS, label="w layout"))
    fwd = lambda a, b, upcast=True: reference.rms_norm(a, b, eps, upcast=upcast)  # noqa: E731
    assume(_ref_fits(dtype, fwd, [x, w]))
    check_fwd_bwd(lambda a, b: lk.rms_norm(a, b, eps, backend=backend), fwd, [x, w])


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
def test_fuzz_add_rms_norm(backend, data):
    _seed(data)
    dtype = data.draw(DTYPES, label="dtype")
    shape = _row_shape(data)
    scale = data.draw(SCALES, label="scale")
    eps = data.draw(st.sampled_from([1e-6, 1e-5]), label="eps")
    x = make(shape, dtype, scale, data.draw(LAYOUTS, label="x layout"))
    res = make(shape, dtype, data.draw(SCALES, label="residual scale"),
               data.draw(LAYOUTS, label="residual layout"))
    w = make(shape[-1:], dtype, 1.0, data.draw(LAYOUTS, label="w layout"))
    fwd = lambda a, r, b, upcast=True: reference.add_rms_norm(a, r, b, eps, upcast=upcast)  # noqa
    assume(_ref_fits(dtype, fwd, [x, res, w]))
    check_fwd_bwd(lambda a, r, b: lk.add_rms_norm(a, r, b, eps, backend=backend), fwd,
                  [x, res, w])


# ------------------------------------------------------------------------------ SwiGLU


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
def test_fuzz_swiglu(backend, data):
    _seed(data)
    dtype = data.draw(DTYPES, label="dtype")
    shape = _row_shape(data)
    gate = make(shape, dtype, data.draw(st.sampled_from([1e-3, 1.0, 10.0, 80.0, 1e3, 1e4]),
                                        label="gate scale"),
                data.draw(LAYOUTS, label="gate layout"))
    up = make(shape, dtype, data.draw(SCALES, label="up scale"),
              data.draw(LAYOUTS, label="up layout"))
    assume(_ref_fits(dtype, reference.swiglu, [gate, up]))
    check_fwd_bwd(lambda g, u: lk.swiglu(g, u, backend=backend), reference.swiglu, [gate, up])


# ------------------------------------------------------------------------------ rotary

HEAD_DIMS = [2, 4, 6, 10, 18, 34, 64, 96, 128, 256]
if GPU:
    HEAD_DIMS += [80, 160, 512]  # 512: past the kernels' limit, auto falls back to torch


@pytest.mark.parametrize("with_positions", [False, True], ids=["rows", "positions"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
def test_fuzz_apply_rotary(backend, interleaved, with_positions, data):
    _seed(data)
    dtype = data.draw(DTYPES, label="dtype")
    d = data.draw(st.sampled_from(HEAD_DIMS), label="head_dim")
    b = data.draw(st.integers(1, 3), label="batch")
    s = data.draw(st.integers(1, 300 if GPU else 40), label="seqlen")
    h = data.draw(st.integers(1, 5), label="heads")
    rows = s + data.draw(st.integers(0, 20), label="extra table rows")
    theta = data.draw(st.sampled_from([10000.0, 500000.0, 10.0]), label="theta")
    cos, sin = lk.rotary_tables(rows, d, theta, device=DEVICE)
    layout = data.draw(st.sampled_from(["contiguous", "sliced", "transposed", "heads-first"]),
                       label="layout")
    scale = data.draw(SCALES, label="scale")
    if layout == "heads-first":  # (B, H, S, D) storage seen as (B, S, H, D)
        x = make((b, h, s, d), dtype, scale).transpose(1, 2)
    else:
        x = make((b, s, h, d), dtype, scale, layout)
    positions = None
    if with_positions:
        positions = torch.randint(0, rows, (b, s), device=DEVICE,
                                  dtype=data.draw(st.sampled_from([torch.int64, torch.int32]),
                                                  label="positions dtype"))
    assume(_supported(lambda: lk.apply_rotary(x[:1, :1], cos, sin, backend=backend)))
    table_grads = dtype == torch.float32 and data.draw(st.booleans(), label="table grads")
    inputs = [x, cos, sin] if table_grads else [x]

    def kernel(a, c=cos, sn=sin):
        return lk.apply_rotary(a, c, sn, interleaved=interleaved, positions=positions,
                               backend=backend)

    def ref(a, c=cos, sn=sin, upcast=True):
        return reference.apply_rotary(a, c, sn, interleaved=interleaved, positions=positions,
                                      upcast=upcast)

    if table_grads:
        check_fwd_bwd(kernel, lambda a, c, sn, upcast: ref(a, c, sn, upcast=upcast), inputs)
    else:
        check_fwd_bwd(kernel, lambda a, upcast: ref(a, upcast=upcast), inputs)


# ------------------------------------------------------------------------------ attention

ATTN_HEAD_DIMS = [1, 3, 8, 16, 18, 32, 64, 80, 96, 128]
if GPU:
    ATTN_HEAD_DIMS += [160, 192, 256]
# Interpreter cost grows with B * Hq * Sq * Sk (about 1 s for one 300 x 300 head, forward and
# backward): cap it so one example stays around a second.
ATTN_WORK = 10**9 if GPU else 2 * 300 * 300


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
def test_fuzz_flash_attention(backend, causal, data):
    _seed(data)
    dtype = data.draw(DTYPES, label="dtype")
    d = data.draw(st.sampled_from(ATTN_HEAD_DIMS), label="head_dim")
    hkv = data.draw(st.integers(1, 3), label="kv heads")
    group = data.draw(st.sampled_from([1, 2, 4]), label="group")
    hq = hkv * group
    b = data.draw(st.integers(1, 2), label="batch")
    sk = data.draw(st.integers(1, 300), label="seqlen_k")
    if causal:
        sq = data.draw(st.integers(1, sk), label="seqlen_q")
    else:
        sq = data.draw(st.integers(1, 300), label="seqlen_q")
    assume(b * hq * sq * sk <= ATTN_WORK)
    layout = data.draw(st.sampled_from(["contiguous", "sliced", "transposed", "heads-first"]),
                       label="layout")
    # q.k scale: the size of the logits. In fp32 eager *is* the reference and the floor is
    # 1e-5 relative, while exp(s) carries a relative error of eps32 * |s| from the kernel's
    # different summation order: keep fp32 logits within ~30 (test_numerics covers 1e4).
    qk_magnitudes = [1e-3, 0.3, 1.0, 2.0] if dtype == torch.float32 else [1e-3, 0.3, 1.0, 3.0, 10.0]
    qk_magnitude = data.draw(st.sampled_from(qk_magnitudes), label="q, k scale")
    v_scale = data.draw(SCALES, label="v scale")
    softmax_scale = data.draw(st.sampled_from([None, 0.05, 1.0]), label="softmax_scale")
    if dtype == torch.float32:
        # The logits' standard deviation is qk_magnitude^2 sqrt(d) times the softmax scale, their
        # largest about 4x that: at most 8 keeps them within ~30 (at 32, fp32 dv reaches 1.1x
        # the bound: d 64, scale 1.0, q and k scaled by 2).
        assume(qk_magnitude ** 2 * d ** 0.5 * (softmax_scale or d ** -0.5) <= 8.0)
    _check_attention(backend, causal, dtype, b, sq, sk, hq, hkv, d, layout, qk_magnitude, v_scale,
                     softmax_scale)


def _host(t: torch.Tensor) -> torch.Tensor:
    """On the CPU (the emulator's side, GPU or not) with a unit last stride, as the cuda op
    copies a tensor whose last dimension is not unit-stride."""
    t = t.cpu()
    return t if t.stride(-1) == 1 else t.contiguous()


class _Emulated(torch.autograd.Function):
    """The CUDA attention kernels run on the host emulator (tests/cuda_emulator), as an
    autograd function: the cuda backend's path without a GPU. Results come back on the
    inputs' device."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        out, lse = cuda_emulator.flash_forward(_host(q), _host(k), _host(v), causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out.to(q.device)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        grads = cuda_emulator.flash_backward(_host(dout), _host(q), _host(k), _host(v), out, lse,
                                             ctx.causal, ctx.scale)
        return (*(g.to(q.device) for g in grads), None, None)


_EMULATOR, _EMULATOR_WHY_NOT = cuda_emulator.available()
# The emulator runs on the CPU whether or not there is a GPU: the CPU budget of the profile
# (not the GPU's 40 examples, minutes of emulation in one test worker).
_EMULATED_FUZZ = settings(FUZZ, max_examples=6 if PROFILE == "ci" else 200)


@pytest.mark.skipif(not _EMULATOR, reason=f"no CUDA emulator: {_EMULATOR_WHY_NOT}")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@_EMULATED_FUZZ
@given(data=st.data())
def test_fuzz_flash_attention_cuda_emulated(causal, data):
    """The CUDA kernels (head_dim 64/128, fp16/bf16) on the host emulator: about 0.1 s per
    64 x 64 tile step, so at most a few tiles per example."""
    _seed(data)
    dtype = data.draw(st.sampled_from([torch.float16, torch.bfloat16]), label="dtype")
    d = data.draw(st.sampled_from([64, 128]), label="head_dim")
    hkv = data.draw(st.integers(1, 2), label="kv heads")
    hq = hkv * data.draw(st.sampled_from([1, 2, 3]), label="group")
    b = data.draw(st.integers(1, 2), label="batch")
    sk = data.draw(st.integers(1, 160), label="seqlen_k")
    sq = data.draw(st.integers(1, sk if causal else 160), label="seqlen_q")
    assume(b * hq * sq * sk <= 2 * 130 * 130)
    layout = data.draw(st.sampled_from(["contiguous", "sliced", "transposed", "heads-first"]),
                       label="layout")
    qk_magnitude = data.draw(st.sampled_from([1e-3, 0.3, 1.0, 3.0, 10.0]), label="q, k scale")
    v_scale = data.draw(SCALES, label="v scale")
    softmax_scale = data.draw(st.sampled_from([None, 0.05, 1.0, -0.5]), label="softmax_scale")
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    _check_attention(None, causal, dtype, b, sq, sk, hq, hkv, d, layout, qk_magnitude, v_scale,
                     softmax_scale,
                     attention_fn=lambda q, k, v: _Emulated.apply(q, k, v, causal, scale))


def _check_attention(backend, causal, dtype, b, sq, sk, hq, hkv, d, layout, qk_magnitude, v_scale,
                     softmax_scale, attention_fn=None):
    def tensor(seqlen, heads, scale):
        if layout == "heads-first":  # (B, H, S, D) storage seen as (B, S, H, D)
            return make((b, heads, seqlen, d), dtype, scale).transpose(1, 2)
        return make((b, seqlen, heads, d), dtype, scale, layout)

    q, k, v = tensor(sq, hq, qk_magnitude), tensor(sk, hkv, qk_magnitude), tensor(sk, hkv, v_scale)
    ref = lambda q_, k_, v_, upcast=True: reference.attention(  # noqa: E731
        q_, k_, v_, causal=causal, softmax_scale=softmax_scale, upcast=upcast)
    if attention_fn is None:
        _require(_supported(lambda: lk.flash_attention(q[:1, :1], k[:1, :1], v[:1, :1],
                                                        causal=causal, backend=backend)))
        attention_fn = lambda q_, k_, v_: lk.flash_attention(  # noqa: E731
            q_, k_, v_, causal=causal, softmax_scale=softmax_scale, backend=backend)
    _require(_ref_fits(dtype, ref, [q, k, v]))
    check_fwd_bwd(attention_fn, ref, [q, k, v],
                  terms=attention_terms(causal=causal, softmax_scale=softmax_scale))


# ------------------------------------------------------------------------------ regressions
# Examples the fuzz tests draw that a kernel or the tolerance rule must handle, pinned as plain
# tests (st.data() tests take no @example).


@pytest.mark.parametrize("backend", BACKENDS)
def test_regression_width_1_with_stray_last_stride(backend):
    """From test_fuzz_rms_norm (width 1, transposed layout): a (rows, 1) view whose size-1 last
    dimension has stride != 1 is already "contiguous", so ``contiguous()`` keeps the stride,
    which the Triton launchers refuse ("expected ... unit stride along dim"). ops/rms_norm.py
    ``_rows`` (shared by swiglu) restates the stride of a size-1 dimension as 1, without a
    copy."""
    x = make((4, 1), torch.float32, 1.0, "transposed")
    assert x.stride(-1) != 1 and x.is_contiguous()
    w = make((1,), torch.float32)
    check_fwd_bwd(lambda a, b: lk.rms_norm(a, b, backend=backend),
                  lambda a, b, upcast=True: reference.rms_norm(a, b, upcast=upcast), [x, w])
    check_fwd_bwd(lambda a, r, b: lk.add_rms_norm(a, r, b, backend=backend),
                  lambda a, r, b, upcast=True: reference.add_rms_norm(a, r, b, upcast=upcast),
                  [x, x * 2, w])
    check_fwd_bwd(lambda g, u: lk.swiglu(g, u, backend=backend), reference.swiglu, [x, x])


@pytest.mark.parametrize("backend", BACKENDS)
def test_regression_attention_bf16_head_dim_1(backend):
    """From test_fuzz_flash_attention (triton, bf16, non-causal, B 2, Sq 228, Sk 69, one head,
    head_dim 1, q and k scaled by 10, v by 0.1): a correct kernel's dq can be off by 6.5e-2
    where twice eager's error plus the floor is 6.3e-2 (eager 2.8e-2). Its output is within
    twice its bf16 rounding (4.9e-4 vs 2.4e-4 on one seed; eager's 3.1e-2), but the backward
    reads delta = rowsum(dO * O) from it, and with one dimension and peaked scores the
    attention-weighted mean key it multiplies is as large as a key (about 25): the exact
    backward from the kernel's saved output is as far off as the kernel (3.7e-2 vs 3.7e-2).
    Pins the rule's second gradient baseline for attention (``grad_baseline`` of
    llama_kernels.testing.attention_tolerance_terms)."""
    torch.manual_seed(1)
    _check_attention(backend, False, torch.bfloat16, 2, 228, 69, 1, 1, 1, "contiguous", 10.0,
                     0.1, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_regression_attention_fp16_ds_overflow(backend):
    """From test_fuzz_flash_attention_cuda_emulated (fp16, causal, Sq = Sk = 86, head_dim 64,
    q and k scaled by 1e-3, v by 1e4): with v near fp16's range, dS = P * (dP - delta) reaches
    6.9e4 on the first rows (P = 1/2, 1/3, ...), past fp16's range, so rounding dS to fp16 for
    the dQ and dK products (where FlashAttention-2 rounds it) would give dq infinities. The
    kernels round scale * dS, as eager does (its rounded dS is the gradient of the scaled
    scores): 1 / scale (8x at head_dim 64) more headroom. Eager fp16 itself overflows here (in
    dP = dO V^T), so the baseline is the fp32 answer rounded to fp16."""
    torch.manual_seed(0)
    _check_attention(backend, True, torch.float16, 1, 86, 86, 1, 1, 64, "contiguous", 1e-3, 1e4,
                     None)


@pytest.mark.skipif(not _EMULATOR, reason=f"no CUDA emulator: {_EMULATOR_WHY_NOT}")
def test_regression_attention_fp16_ds_overflow_cuda_emulated():
    torch.manual_seed(0)
    _check_attention(None, True, torch.float16, 1, 86, 86, 1, 1, 64, "contiguous", 1e-3, 1e4,
                     None, attention_fn=lambda q, k, v: _Emulated.apply(q, k, v, True, 64 ** -0.5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_regression_attention_fp16_gradient_beyond_range(backend):
    """From test_fuzz_flash_attention (torch backend, fp16, non-causal, one query, 100 keys,
    6 / 3 heads, head_dim 16, q and k scaled by 3, v by 1e4, scale 1.0): the exact dq reaches
    9.0e4, past fp16's 65504, so inf is its right rounding. Pins the rule's overflow handling:
    it takes the inf there and bounds the error elsewhere."""
    torch.manual_seed(0)
    _check_attention(backend, False, torch.float16, 1, 1, 100, 6, 3, 16, "contiguous", 3.0, 1e4,
                     1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_regression_attention_one_key_cancellation(backend, dtype):
    """From test_fuzz_flash_attention (triton, causal, one query and one key, v scaled by 1e4):
    the exact dq and dk are 0 and eager's are exactly 0, while a correct kernel's dP - delta
    cancellation can leave 1.2e-4 (fp32, against a floor of 1e-5) and 1.6e-3 (fp16, against
    9.8e-4): every flash backward takes delta from the saved output. Pins the rule's
    cancellation term (``grad_atol`` of llama_kernels.testing.attention_tolerance_terms)."""
    torch.manual_seed(0)
    qk = 0.3 if dtype == torch.float32 else 10.0
    _check_attention(backend, True, dtype, 2, 1, 1, 2, 1, 3, "contiguous", qk, 1e4, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_regression_attention_forward_one_output_bf16(backend):
    """From test_fuzz_flash_attention (triton, bf16, causal, one query, 17 keys, head_dim 1,
    q and k x3, v x30, scale 0.05): a correct kernel's output can be off by 5.6e-2 where twice
    eager's error plus the floor is 4.7e-2 (eager 7.0e-3). One output value: eager's error is a
    single draw of its P rounding, not its size. Pins the rule's P rounding term, half an eps
    of sum_j P_j |v_j| (``out_atol`` of llama_kernels.testing.attention_tolerance_terms)."""
    torch.manual_seed(1_463_927_782)
    _check_attention(backend, True, torch.bfloat16, 1, 1, 17, 1, 1, 1, "contiguous", 3.0, 30.0,
                     0.05)


@pytest.mark.parametrize("backend", BACKENDS)
def test_regression_attention_backward_few_keys_fp16(backend):
    """From test_fuzz_flash_attention (fp16, Sq 1, Sk 9, head_dim 18, scale 1.0): a correct
    kernel's dK can be off by 2.3e-3 where twice eager's error plus the floor is 2.0e-3: every
    flash backward computes delta = rowsum(dO * O) from the output saved in fp16
    (FlashAttention-2 does), and at a few keys eager fp16 is more exact than that rounding.
    Pins the rule's second gradient baseline for attention: twice the error of the exact
    backward from the kernel's saved output."""
    torch.manual_seed(1)
    _check_attention(backend, True, torch.float16, 1, 1, 9, 2, 2, 18, "contiguous", 1.0, 1.0,
                     1.0)
