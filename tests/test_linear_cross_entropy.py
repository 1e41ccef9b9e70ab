"""linear_cross_entropy, every backend that runs here, against reference.py in fp32.

The rule of llama_kernels.testing (at most about twice eager's error in the dtype, eager being
the reference with upcast=False: F.linear + F.cross_entropy in the dtype). The triton backend
runs under the interpreter on a CPU machine, so the shapes are small and the chunk size and the
vocabulary block are forced small (cross_entropy.forced) so that several chunks, a partial last
chunk and a partial last vocabulary block are all taken.
"""

from __future__ import annotations

import contextlib
import importlib
import math

import pytest
import torch

import llama_kernels as lk
from llama_kernels import reference
from llama_kernels.testing import check_fwd_bwd
from helpers import DEVICE, DTYPES, Guarded, backend_params

BACKENDS = backend_params()
ops_lce = importlib.import_module("llama_kernels.ops.linear_cross_entropy")
VOCAB = 300  # not a multiple of the forced block (128) nor of the default one (512)
REDUCTIONS = ("mean", "sum", "none")


def _ce():
    from llama_kernels.triton import cross_entropy
    return cross_entropy


def _inputs(shape, dtype, vocab=VOCAB, ignore_index=-100, ignored=0.2, exact=False):
    """x (shape), weight (vocab, dim), targets with a fraction ignored. Random normal (logits of
    std ~3), or with ``exact`` on a grid (x in halves, weight in quarters, |logit| far below
    32) where every logit x @ weight.T is exact in fp16 and bf16.

    ``exact`` is for the scalar reductions in 16 bits: a scalar loss is one number, and eager's
    error on it is one draw of its roundings, which can cancel the rounding of the logits that
    eager and the kernel share (random inputs put a correct kernel's bf16 "sum" / fp16 "mean"
    over the bound in ~3% of seeds). With exact logits the kernel's loss is fp32-accurate, so
    the check is deterministic and still fails on any wrong row, block or scale; the per-row
    "none" check and the gradients keep the random inputs' rounding."""
    dim = shape[-1]
    if exact:
        x = torch.randint(-2, 3, shape, device=DEVICE) / 2
        w = torch.randint(-3, 4, (vocab, dim), device=DEVICE) / 4
        z = x.double() @ w.double().T
        assert torch.equal(z, z.to(dtype).double()), "grid logits not exact in the dtype"
        x, w = x.to(dtype), w.to(dtype)
    else:
        x = torch.randn(shape, device=DEVICE).to(dtype)
        w = (3 * dim ** -0.5 * torch.randn(vocab, dim, device=DEVICE)).to(dtype)
    t = torch.randint(0, vocab, shape[:-1], device=DEVICE)
    t[torch.rand(t.shape, device=DEVICE) < ignored] = ignore_index
    t.view(-1)[0] = vocab - 1  # the last class, in the partial last block
    return x, w, t


def _check(backend, x, w, t, reduction, ignore_index=-100):
    check_fwd_bwd(
        lambda a, b, c: lk.linear_cross_entropy(a, b, c, ignore_index=ignore_index,
                                                reduction=reduction, backend=backend),
        lambda a, b, c, upcast: reference.linear_cross_entropy(
            a, b, c, ignore_index=ignore_index, reduction=reduction, upcast=upcast),
        [x, w, t], grad_inputs=[0, 1])


def _forced(backend, chunk_rows=7, block_v=128):
    return _ce().forced(chunk_rows=chunk_rows, block_v=block_v) if backend == "triton" \
        else contextlib.nullcontext()


# ------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("shape", [(2, 11, 32), (23, 48)], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, dtype, reduction, shape):
    """3-D and 2-D x, 4 chunks (the last partial), 3 vocabulary blocks (the last partial)."""
    x, w, t = _inputs(shape, dtype, exact=reduction != "none")
    with _forced(backend):
        _check(backend, x, w, t, reduction)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_many_chunks(backend, reduction):
    """128 chunks of 2 rows: dweight sums 128 partial products, each exact in the fp32
    accumulator (a 16-bit accumulator rounds every partial sum and leaves the bound)."""
    x, w, t = _inputs((256, 32), torch.bfloat16, vocab=24, ignored=0.0, exact=reduction != "none")
    with _forced(backend, chunk_rows=2, block_v=32):
        _check(backend, x, w, t, reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_default_settings(backend, dtype):
    """The launch settings and chunk rule as shipped (one chunk, one block here)."""
    x, w, t = _inputs((3, 5, 16), dtype, vocab=1000, exact=True)
    _check(backend, x, w, t, "mean")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_inside_vocab(backend, reduction):
    """An ignore_index that is also a class: those rows count for nothing."""
    x, w, t = _inputs((19, 24), torch.bfloat16, ignore_index=5, ignored=0.3,
                      exact=reduction != "none")
    with _forced(backend):
        _check(backend, x, w, t, reduction, ignore_index=5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_target_ignored(backend, reduction):
    """sum / none: 0 and zero gradients. mean: nan (0 / 0) and zero gradients, as torch."""
    x, w, t = _inputs((9, 16), torch.float16, ignored=1.0)
    t.fill_(-100)
    if reduction != "mean":
        with _forced(backend):
            _check(backend, x, w, t, reduction)
        return
    x.requires_grad_(True)
    w.requires_grad_(True)
    with _forced(backend):
        loss = lk.linear_cross_entropy(x, w, t, backend=backend)
        dx, dw = torch.autograd.grad(loss, (x, w), torch.tensor(1.5, device=DEVICE))
    expected = torch.nn.functional.cross_entropy(x.float() @ w.float().T, t)
    assert torch.isnan(expected) and torch.isnan(loss) and loss.dtype == torch.float32
    assert torch.equal(dx, torch.zeros_like(x)) and torch.equal(dw, torch.zeros_like(w))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_input_requires_grad(backend, reduction):
    """A frozen LM head (only x requires grad), a frozen trunk (only weight), and no_grad."""
    x, w, t = _inputs((13, 16), torch.float32)
    g = torch.randn((13,) if reduction == "none" else (), device=DEVICE)
    ref = [a.clone().requires_grad_(True) for a in (x, w)]
    ref_grads = torch.autograd.grad(
        reference.linear_cross_entropy(*ref, t, reduction=reduction), ref, g)
    for i in range(2):
        leaves = [x.clone(), w.clone()]
        leaves[i].requires_grad_(True)
        with _forced(backend):
            loss = lk.linear_cross_entropy(*leaves, t, reduction=reduction, backend=backend)
            (grad,) = torch.autograd.grad(loss, leaves[i], g)
        torch.testing.assert_close(grad, ref_grads[i], rtol=1e-5, atol=1e-5)
    with torch.no_grad(), _forced(backend):
        loss = lk.linear_cross_entropy(x.requires_grad_(True), w, t, reduction=reduction,
                                       backend=backend)
    assert not loss.requires_grad


# ------------------------------------------------------------------------------ triton only


@pytest.fixture
def triton_backend():
    if "triton" not in [p.values[0] for p in BACKENDS if not p.marks]:
        pytest.skip("triton backend unavailable here")
    return _ce()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_poisoned_buffers(triton_backend, monkeypatch, reduction):
    """Every output and scratch buffer of the launchers starts as NaN: a row, chunk or block
    left unwritten shows in the loss or a gradient."""
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(triton_backend, "_empty", nan_empty)
    x, w, t = _inputs((2, 10, 24), torch.bfloat16, exact=reduction != "none")
    with triton_backend.forced(chunk_rows=6, block_v=64):
        _check("triton", x, w, t, reduction)


@pytest.mark.parametrize("write_grad", [False, True])
def test_chunk_kernel_guarded(triton_backend, write_grad):
    """One launch on a row-strided logits view and a loss vector inside NaN guards: every loss
    and every gradient is written, nothing outside; values against fp32 torch."""
    rows, vocab = 5, 200
    z = Guarded((rows, vocab), torch.float16)
    z.view.copy_(3 * torch.randn(rows, vocab, device=DEVICE))
    z32 = z.view.float()
    loss = Guarded((rows,), torch.float32, contiguous=True)
    t = torch.randint(0, vocab, (rows,), device=DEVICE)
    t[1], t[2] = -100, vocab - 1
    c = torch.rand(rows, device=DEVICE) + 0.5
    triton_backend.cross_entropy_chunk(z.view, t, loss.view, c, ignore_index=-100,
                                       write_grad=write_grad,
                                       settings=triton_backend._block_settings(64))
    loss.check("loss")
    valid = t != -100
    expected = torch.nn.functional.cross_entropy(z32, t, reduction="none")
    torch.testing.assert_close(loss.view, expected, rtol=1e-5, atol=1e-5)
    z.check("logits")
    if write_grad:
        dz = torch.softmax(z32, -1)
        dz[valid, t[valid]] -= 1
        dz = dz * torch.where(valid, c, 0.0)[:, None]
        torch.testing.assert_close(z.view.float(), dz, rtol=0, atol=1e-3)
    else:
        assert torch.equal(z.view.float(), z32)


def test_out_of_range_target_gives_nan_row(triton_backend):
    """Where the host check is skipped (compiled, captured), a bad target poisons its own row's
    loss only, and nothing is read out of bounds."""
    z = 2 * torch.randn(3, 50, device=DEVICE)
    t = torch.tensor([1, 50, 49], device=DEVICE)
    loss = torch.empty(3, device=DEVICE)
    triton_backend.cross_entropy_chunk(z, t, loss, torch.ones((), device=DEVICE),
                                       ignore_index=-100, write_grad=False)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


def test_chunk_rule(triton_backend):
    ce, bf16, cuda = triton_backend, torch.bfloat16, torch.device("cuda")
    gib = 1 << 30
    # Plenty of memory: as many rows as help the GEMMs, all the rows when fewer.
    assert ce.chunk_rows(100_000, 32000, bf16, cuda, free_bytes=64 * gib) <= ce.MAX_CHUNK_ROWS
    assert ce.chunk_rows(3000, 32000, bf16, cuda, free_bytes=64 * gib) == 3000
    # Tight memory: the vocabulary sets the rows (128k gets ~1/4 of 32k's), within the budget.
    small, big = (ce.chunk_rows(100_000, v, bf16, cuda, free_bytes=2 * gib)
                  for v in (32000, 128256))
    assert big < small and abs(small / big - 4) < 0.5
    assert big * 128256 * 2 <= 2 * gib / ce.FREE_FRACTION
    # Never below the floor that keeps W re-reads amortized; chunks even, multiples of 128.
    assert ce.chunk_rows(100_000, 128256, bf16, cuda, free_bytes=gib) == ce.MIN_CHUNK_ROWS
    rows = ce.chunk_rows(10_000, 128256, bf16, cuda, free_bytes=8 * gib)
    assert rows % 128 == 0 and math.ceil(10_000 / rows) * rows - 10_000 < 128 * 4


def test_scale_kernel(triton_backend):
    """grad * g in fp32, one rounding (torch's bf16 * fp32 0-dim rounds g to bf16 first)."""
    grad = torch.randn(3, 1000, device=DEVICE).to(torch.bfloat16)
    g = torch.tensor(1.0 + 2 ** -12, device=DEVICE)
    out = triton_backend.scale(grad, g)
    assert torch.equal(out, (grad.float() * g).to(torch.bfloat16))


# ------------------------------------------------------------------------------ registration


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, w, t = _inputs((6, 8), torch.float32, vocab=40)
    x.requires_grad_(True)
    w.requires_grad_(True)
    ops = torch.ops.llama_kernels
    with _forced(backend, chunk_rows=4, block_v=16):
        for reduction in ("mean", "none"):
            torch.library.opcheck(ops.linear_cross_entropy_fwd.default,
                                  (x, w, t, -100, reduction, True, True, backend))
        g = torch.randn(6, device=DEVICE)
        torch.library.opcheck(ops.linear_cross_entropy_bwd.default,
                              (g, x.detach(), w.detach(), t, -100, True, False, backend))
        torch.library.opcheck(ops.linear_cross_entropy_scale.default,
                              (w.detach(), g[0], backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    x, w, t = _inputs((2, 7, 16), torch.float32, vocab=50)

    def f(a, b, c):
        h = torch.tanh(a)
        return (lk.linear_cross_entropy(h, b, c, backend=backend)
                + 0.5 * lk.linear_cross_entropy(h, b, c, reduction="none", backend=backend)
                .sum())

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (f, compiled):
        leaves = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]
        with _forced(backend, chunk_rows=5, block_v=16):
            loss = fn(*leaves, t)
            results.append((loss, *torch.autograd.grad(loss, leaves)))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager)


# ------------------------------------------------------------------------------ bad inputs


def _bad_cases():
    x, w, t = _inputs((4, 6, 8), torch.float32, vocab=20)
    meta = torch.device("meta")
    return [
        ("x", dict(x=x.to(torch.int32))),
        ("x", dict(x=torch.empty(0, 8))),
        ("weight", dict(w=w.half())),
        ("weight", dict(w=w[:, :7])),
        ("weight", dict(w=w[0])),
        ("weight", dict(w=w.to(meta))),
        ("target", dict(t=t.int())),
        ("target", dict(t=t.float())),
        ("target", dict(t=t[:, :5])),
        ("target", dict(t=t.to(meta))),
        ("target", dict(t=torch.where(t == t[0, 0], 20, t))),
        ("target", dict(t=torch.where(t == t[0, 0], -1, t))),
        ("target", dict(t=torch.where(t == t[0, 0], -100, t), ignore_index=-1)),
        ("reduction", dict(reduction="avg")),
        ("ignore_index", dict(ignore_index=1.5)),
        ("ignore_index", dict(ignore_index=True)),
    ], (x, w, t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_name_the_argument(backend, monkeypatch):
    """Each bad argument raises a ValueError naming it, before any op runs."""
    def no_run(*args, **kwargs):
        raise AssertionError("the op ran on bad input")

    monkeypatch.setattr(ops_lce, "linear_cross_entropy_fwd", no_run)
    cases, (x, w, t) = _bad_cases()
    for name, change in cases:
        args = dict(x=x, w=w, t=t, ignore_index=-100, reduction="mean") | change
        with pytest.raises(ValueError, match=f"^{name}:"):
            lk.linear_cross_entropy(args["x"], args["w"], args["t"], backend=backend,
                                    ignore_index=args["ignore_index"],
                                    reduction=args["reduction"])
    # ignore_index itself is always allowed, even outside [0, vocab)
    monkeypatch.undo()
    t2 = t.clamp(min=0)
    t2[0, 0] = -7
    lk.linear_cross_entropy(x, w, t2, ignore_index=-7, backend=backend)
