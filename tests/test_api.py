"""The API contract: backend selection, input validation, torch.library opcheck and a fullgraph
torch.compile of every op."""

from __future__ import annotations

import pytest
import torch

import llama_kernels as lk
from helpers import DEVICE, GPU, backend_params

BACKENDS = backend_params()


# ------------------------------------------------------------------------------ backend choice


def _x():
    return torch.randn(3, 16, device="cpu"), torch.ones(16)


def test_available_backends_reports_every_backend():
    report = lk.available_backends()
    assert set(report) == {"torch", "triton", "cuda"}
    assert report["torch"] is None
    for name, why in report.items():
        assert why is None or (isinstance(why, str) and why), name
    if not GPU:
        assert report["cuda"] is not None  # nothing can run CUDA kernels without a GPU


def test_auto_never_fails_where_torch_works():
    x, w = _x()
    expected = lk.rms_norm(x, w, backend="torch")
    torch.testing.assert_close(lk.rms_norm(x, w, backend="auto"), expected)
    torch.testing.assert_close(lk.rms_norm(x, w), lk.rms_norm(x, w, backend="torch"))


def test_cuda_backend_on_cpu_tensors_says_why():
    x, w = _x()
    with pytest.raises(RuntimeError, match="cuda"):
        lk.rms_norm(x, w, backend="cuda")


def test_selection_order_keyword_then_context_then_env(monkeypatch):
    x, w = _x()
    monkeypatch.setenv("LLAMA_KERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        lk.rms_norm(x, w)  # environment
    lk.rms_norm(x, w, backend="torch")  # the keyword beats the environment
    with lk.use_backend("torch"):
        lk.rms_norm(x, w)  # the context beats the environment
        with lk.use_backend("cuda"):
            with pytest.raises(RuntimeError, match="cuda"):
                lk.rms_norm(x, w)  # innermost context wins
            lk.rms_norm(x, w, backend="torch")  # the keyword beats the context
    monkeypatch.setenv("LLAMA_KERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="LLAMA_KERNELS_BACKEND"):
        lk.rms_norm(x, w)


def test_unknown_backend_names_the_argument():
    x, w = _x()
    with pytest.raises(ValueError, match="backend"):
        lk.rms_norm(x, w, backend="cudnn")
    with pytest.raises(ValueError, match="use_backend"):
        with lk.use_backend("fast"):
            pass


# ------------------------------------------------------------------------------ bad input

def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


COS, SIN = lk.rotary_tables(8, 16)
Q = _t(1, 4, 4, 16)
KV = _t(1, 8, 2, 16)

# (call, exception type, text the message must contain)
BAD_CALLS = {
    "rms_norm x int": (lambda: lk.rms_norm(torch.ones(2, 4, dtype=torch.int32), torch.ones(4)),
                       ValueError, "x"),
    "rms_norm x not tensor": (lambda: lk.rms_norm([1.0, 2.0], torch.ones(2)), TypeError, "x"),
    "rms_norm weight shape": (lambda: lk.rms_norm(_t(2, 4), torch.ones(5)), ValueError, "weight"),
    "rms_norm weight 2-D": (lambda: lk.rms_norm(_t(2, 4), torch.ones(1, 4)), ValueError, "weight"),
    "rms_norm weight dtype": (lambda: lk.rms_norm(_t(2, 4), torch.ones(4, dtype=torch.float16)),
                              ValueError, "weight"),
    "rms_norm empty x": (lambda: lk.rms_norm(_t(0, 4), torch.ones(4)), ValueError, "x"),
    "rms_norm eps nan": (lambda: lk.rms_norm(_t(2, 4), torch.ones(4), float("nan")),
                         ValueError, "eps"),
    "rms_norm eps negative": (lambda: lk.rms_norm(_t(2, 4), torch.ones(4), -1.0),
                              ValueError, "eps"),
    "add_rms_norm residual shape": (lambda: lk.add_rms_norm(_t(2, 4), _t(3, 4), torch.ones(4)),
                                    ValueError, "residual"),
    "add_rms_norm residual dtype": (
        lambda: lk.add_rms_norm(_t(2, 4), _t(2, 4, dtype=torch.bfloat16), torch.ones(4)),
        ValueError, "residual"),
    "swiglu shapes": (lambda: lk.swiglu(_t(2, 4), _t(2, 5)), ValueError, "up"),
    "swiglu dtypes": (lambda: lk.swiglu(_t(2, 4), _t(2, 4, dtype=torch.float16)), ValueError, "up"),
    "swiglu int gate": (lambda: lk.swiglu(torch.ones(2, dtype=torch.int64), _t(2)),
                        ValueError, "gate"),
    "rotary_tables odd head_dim": (lambda: lk.rotary_tables(8, 15), ValueError, "head_dim"),
    "rotary_tables seq_len 0": (lambda: lk.rotary_tables(0, 16), ValueError, "seq_len"),
    "rotary x 3-D": (lambda: lk.apply_rotary(_t(4, 4, 16), COS, SIN), ValueError, "x"),
    "rotary odd head_dim": (lambda: lk.apply_rotary(_t(1, 4, 2, 15), COS, SIN), ValueError, "x"),
    "rotary cos width": (lambda: lk.apply_rotary(_t(1, 4, 2, 32), COS, SIN), ValueError, "cos"),
    "rotary cos dtype": (lambda: lk.apply_rotary(_t(1, 4, 2, 16), COS.half(), SIN),
                         ValueError, "cos"),
    "rotary sin shape": (lambda: lk.apply_rotary(_t(1, 4, 2, 16), COS, SIN[:4]), ValueError, "sin"),
    "rotary tables too short": (lambda: lk.apply_rotary(_t(1, 9, 2, 16), COS, SIN),
                                ValueError, "cos"),
    "rotary positions shape": (
        lambda: lk.apply_rotary(_t(2, 4, 2, 16), COS, SIN,
                                positions=torch.zeros(4, dtype=torch.long)),
        ValueError, "positions"),
    "rotary positions dtype": (
        lambda: lk.apply_rotary(_t(1, 4, 2, 16), COS, SIN, positions=torch.zeros(1, 4)),
        ValueError, "positions"),
    "rotary positions out of range": (
        lambda: lk.apply_rotary(_t(1, 4, 2, 16), COS, SIN,
                                positions=torch.tensor([[0, 1, 2, 8]])),
        ValueError, "positions"),
    "rotary positions negative": (
        lambda: lk.apply_rotary(_t(1, 4, 2, 16), COS, SIN,
                                positions=torch.tensor([[0, -1, 2, 3]])),
        ValueError, "positions"),
    "attention q 3-D": (lambda: lk.flash_attention(_t(4, 4, 16), KV, KV), ValueError, "q"),
    "attention heads": (lambda: lk.flash_attention(_t(1, 4, 3, 16), KV, KV), ValueError, "heads"),
    "attention head_dim": (lambda: lk.flash_attention(Q, _t(1, 8, 2, 8), _t(1, 8, 2, 8)),
                           ValueError, "head_dim"),
    "attention v shape": (lambda: lk.flash_attention(Q, KV, _t(1, 7, 2, 16)), ValueError, "v"),
    "attention batch": (lambda: lk.flash_attention(Q, _t(2, 8, 2, 16), _t(2, 8, 2, 16)),
                        ValueError, "batch"),
    "attention dtype": (lambda: lk.flash_attention(Q, KV.half(), KV.half()), ValueError, "k"),
    "attention causal Sq > Sk": (lambda: lk.flash_attention(_t(1, 9, 4, 16), KV, KV),
                                 ValueError, "seqlen_q"),
    "attention scale inf": (lambda: lk.flash_attention(Q, KV, KV, softmax_scale=float("inf")),
                            ValueError, "softmax_scale"),
    "attention cuda head_dim": (
        lambda: lk.flash_attention(Q, KV, KV, backend="cuda"), (RuntimeError, ValueError), "cuda"),
}
if GPU:
    BAD_CALLS["mixed devices"] = (
        lambda: lk.rms_norm(_t(2, 4, device="cuda"), torch.ones(4)), ValueError, "weight")


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_naming_the_argument(name):
    call, exc, text = BAD_CALLS[name]
    with pytest.raises(exc, match=text):
        call()


# ------------------------------------------------------------------------------ torch.library


def _opcheck_cases(backend):
    x = torch.randn(3, 33, device=DEVICE)
    w = torch.randn(33, device=DEVICE)
    rstd = torch.rand(3, device=DEVICE) + 0.5
    g, u = torch.randn(2, 3, 20, device=DEVICE), torch.randn(2, 3, 20, device=DEVICE)
    xr = torch.randn(2, 5, 3, 16, device=DEVICE)
    cos, sin = lk.rotary_tables(7, 16, device=DEVICE)
    pos = torch.randint(0, 7, (2, 5), device=DEVICE)
    q = torch.randn(1, 5, 4, 16, device=DEVICE)
    k = torch.randn(1, 9, 2, 16, device=DEVICE)
    ops = torch.ops.llama_kernels
    out, lse = ops.flash_attention_fwd(q, k, k, True, 0.25, "torch")
    return {
        "rms_norm_fwd": (ops.rms_norm_fwd, (x, w, 1e-6, backend)),
        "add_rms_norm_fwd": (ops.add_rms_norm_fwd, (x, x.flip(0), w, 1e-6, backend)),
        "rms_norm_bwd": (ops.rms_norm_bwd, (x.flip(1), x, w, rstd, x.flip(0), backend)),
        "swiglu_fwd": (ops.swiglu_fwd, (g, u, backend)),
        "swiglu_bwd": (ops.swiglu_bwd, (u, g, u, backend)),
        "rotary_apply": (ops.rotary_apply, (xr, cos, sin, pos, True, False, backend)),
        "flash_attention_fwd": (ops.flash_attention_fwd, (q, k, k, True, 0.25, backend)),
        "flash_attention_bwd": (ops.flash_attention_bwd,
                                (torch.randn_like(out), q, k, k, out, lse, True, 0.25, backend)),
    }


OPS = list(_opcheck_cases("torch"))
KERNEL_OF = {"rms_norm_fwd": "rms_norm", "add_rms_norm_fwd": "add_rms_norm",
             "rms_norm_bwd": "rms_norm", "swiglu_fwd": "swiglu", "swiglu_bwd": "swiglu",
             "rotary_apply": "apply_rotary", "flash_attention_fwd": "flash_attention",
             "flash_attention_bwd": "flash_attention"}


def _skip_if_no_kernel(backend, name):
    """A backend without a kernel for this op yet is skipped (it would raise a clear error)."""
    if backend == "torch":
        return
    probe = {"rms_norm": lambda: lk.rms_norm(torch.ones(1, 2, device=DEVICE),
                                             torch.ones(2, device=DEVICE), backend=backend),
             "add_rms_norm": lambda: lk.add_rms_norm(torch.ones(1, 2, device=DEVICE),
                                                     torch.ones(1, 2, device=DEVICE),
                                                     torch.ones(2, device=DEVICE),
                                                     backend=backend),
             "swiglu": lambda: lk.swiglu(torch.ones(2, device=DEVICE),
                                         torch.ones(2, device=DEVICE), backend=backend),
             "apply_rotary": lambda: lk.apply_rotary(torch.ones(1, 1, 1, 16, device=DEVICE),
                                                     *lk.rotary_tables(1, 16, device=DEVICE),
                                                     backend=backend),
             "flash_attention": lambda: lk.flash_attention(
                 torch.ones(1, 1, 1, 64, device=DEVICE, dtype=torch.float16),
                 torch.ones(1, 1, 1, 64, device=DEVICE, dtype=torch.float16),
                 torch.ones(1, 1, 1, 64, device=DEVICE, dtype=torch.float16), backend=backend)}
    try:
        probe[KERNEL_OF.get(name, name)]()
    except (RuntimeError, ValueError) as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, name):
    _skip_if_no_kernel(backend, name)
    if backend == "cuda" and name.startswith("flash_attention"):
        pytest.skip("cuda attention takes fp16/bf16 only; covered by test_ops")
    op, args = _opcheck_cases(backend)[name]
    torch.library.opcheck(op, args)


COMPILE_BACKEND = "inductor" if GPU else "aot_eager"


def _compile_cases(backend):
    x = torch.randn(4, 5, 32, device=DEVICE, requires_grad=True)
    w = torch.randn(32, device=DEVICE, requires_grad=True)
    cos, sin = lk.rotary_tables(5, 8, device=DEVICE)
    q = torch.randn(4, 5, 4, 8, device=DEVICE, requires_grad=True)
    return {
        "rms_norm": (lambda x, w: lk.rms_norm(x, w, backend=backend), (x, w)),
        "add_rms_norm": (lambda x, w: sum(lk.add_rms_norm(x, x * 2, w, backend=backend)), (x, w)),
        "swiglu": (lambda x: lk.swiglu(x, x.sin(), backend=backend), (x,)),
        "apply_rotary": (lambda q: lk.apply_rotary(q, cos, sin, interleaved=True,
                                                   backend=backend), (q,)),
        "flash_attention": (lambda q: lk.flash_attention(q, q[:, :, :2], q[:, :, 2:],
                                                         backend=backend), (q,)),
    }


@pytest.mark.parametrize("name", list(_compile_cases("torch")))
@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend, name):
    _skip_if_no_kernel(backend, name)
    if backend == "cuda" and name == "flash_attention":
        pytest.skip("cuda attention takes fp16/bf16 only")
    torch._dynamo.reset()
    fn, args = _compile_cases(backend)[name]
    compiled = torch.compile(fn, fullgraph=True, backend=COMPILE_BACKEND)
    expected = fn(*args)
    got = compiled(*args)
    torch.testing.assert_close(got, expected)
    g_expected = torch.autograd.grad(expected.sum(), args)
    g_got = torch.autograd.grad(compiled(*args).sum(), args)
    for a, b in zip(g_got, g_expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_positions_range_checked_inside_compiled_graph(backend):
    """Out-of-range positions raise even in a fullgraph torch.compile (the check lives in the
    registered op, whose body runs at call time), instead of reading outside the tables."""
    _skip_if_no_kernel(backend, "apply_rotary")
    cos, sin = lk.rotary_tables(8, 16, device=DEVICE)
    x = torch.randn(1, 4, 2, 16, device=DEVICE)

    def fn(x, positions):
        return lk.apply_rotary(x, cos, sin, positions=positions, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=COMPILE_BACKEND)
    good = torch.tensor([[0, 7, 3, 3]], device=DEVICE)
    torch.testing.assert_close(compiled(x, good), fn(x, good))
    with pytest.raises(ValueError, match="positions"):
        compiled(x, torch.tensor([[0, 8, 3, 3]], device=DEVICE))
