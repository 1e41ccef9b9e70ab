"""Shared test helpers: which backends run here, and the tolerance rule of STYLE.md (rule 8)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from llama_kernels import available_backends

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def backend_params(*, kernels_only: bool = False):
    """pytest params for each backend, skipped (with the reason) where it cannot run here."""
    report = available_backends()
    params = []
    for name in ("torch", "triton", "cuda"):
        if kernels_only and name == "torch":
            continue
        why = report[name]
        marks = [pytest.mark.skip(reason=f"{name}: {why}")] if why else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _in_range_err(a: torch.Tensor, ref32: torch.Tensor) -> float:
    """max_err over the places where the exact answer is inside a's range (see assert_close)."""
    keep = torch.isfinite(ref32.to(a.dtype))
    return max_err(a[keep], ref32[keep]) if keep.any() else 0.0


def _floor(dtype: torch.dtype, scale: float) -> float:
    # Where eager happens to be exact (always in fp32, where it *is* the reference), allow a
    # few units of rounding: kernels sum in a different order than torch does.
    rel = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    return rel * max(1.0, scale)


def assert_close(out: torch.Tensor, ref32: torch.Tensor, eager: torch.Tensor, name: str = "out",
                 atol: float = 0.0):
    """|out - ref32| <= 2 |eager - ref32| + floor (+ atol): a kernel in dtype T may be at most
    about twice as wrong as eager PyTorch in T, measured against the fp32 reference. ``atol``:
    a caller's bound on rounding its algorithm cannot avoid where eager's is exact."""
    assert out.shape == ref32.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref32.shape)}"
    assert out.dtype == eager.dtype, f"{name}: dtype {out.dtype} != {eager.dtype}"
    # Where the exact answer lies beyond the dtype's range it rounds to +-inf: there the output
    # may be that inf (or a finite value of the same sign in the top half of the range, a
    # kernel's rounding error away from it), and those places leave the error bound out.
    # Everywhere else the output must be finite.
    rounded = ref32.to(out.dtype)
    beyond = torch.isinf(rounded) & torch.isfinite(ref32)
    assert (torch.isfinite(out) | (beyond & (out == rounded))).all(), \
        f"{name}: non-finite values (unwritten, NaN, or an overflow the exact answer has not)"
    if beyond.any():
        top = out[beyond].float() * rounded[beyond].sign() >= torch.finfo(out.dtype).max / 2
        assert top.all(), f"{name}: far from the overflow of the exact answer"
        keep = ~beyond
        out, ref32, eager = out[keep], ref32[keep], eager[keep]
        if out.numel() == 0:
            return
    err = max_err(out, ref32)
    eager_err = max_err(eager, ref32)
    assert math.isfinite(eager_err), f"{name}: the baseline is not finite where the answer is"
    tol = 2 * eager_err + _floor(out.dtype, ref32.abs().max().item()) + atol
    assert err <= tol, f"{name}: max error {err:.3e} > {tol:.3e} (eager {eager_err:.3e})"


class Guarded:
    """An output view inside a NaN-filled buffer: one guard slot before and after it along each
    leading dimension, 3 before and 5 after along the last (``contiguous=True``: a contiguous
    view in the middle of a flat buffer). ``check`` asserts the view was fully written (finite)
    and nothing outside it was (the guards are still NaN)."""

    def __init__(self, shape, dtype, contiguous: bool = False, device=DEVICE):
        shape = tuple(shape)
        if contiguous:
            n = math.prod(shape)
            self.buf = torch.full((n + 16,), float("nan"), dtype=dtype, device=device)
            self.index = (slice(8, 8 + n),)
            self.view = self.buf[self.index].view(shape)
        else:
            lead = tuple(n + 2 for n in shape[:-1])
            self.buf = torch.full(lead + (shape[-1] + 8,), float("nan"), dtype=dtype,
                                  device=device)
            self.index = tuple(slice(1, 1 + n) for n in shape[:-1]) + (slice(3, 3 + shape[-1]),)
            self.view = self.buf[self.index]

    def check(self, name: str) -> None:
        assert torch.isfinite(self.view).all(), f"{name}: part of the output was not written"
        outside = torch.ones(self.buf.shape, dtype=torch.bool, device=self.buf.device)
        outside[self.index] = False
        assert self.buf[outside].isnan().all(), f"{name}: a store landed outside the output"


def run_compiler_script(code: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -c code args`` in a process without TRITON_INTERPRET (Triton reads it at import,
    and ahead-of-time compiles need the real compiler), with the repository importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout)


def _leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_(True) if t.is_floating_point()
            else t for t in tensors]


def _run(fn, tensors, grad_outs=None, grad_inputs=()):
    outs = fn(*tensors)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if grad_outs is None:
        return outs, None
    wanted = [tensors[i] for i in grad_inputs]
    grads = torch.autograd.grad(outs, wanted, [g.to(o.dtype) for g, o in zip(grad_outs, outs)])
    return outs, grads


def check_fwd_bwd(kernel_fn, ref_fn, inputs, *, grad_inputs=None, grad_baseline=None,
                  grad_atol=None, out_atol=None):
    """``kernel_fn(*inputs)`` against ``ref_fn(*inputs, upcast=True)`` in fp32, forward and
    backward with the same random output gradients, tolerance from eager in the dtype
    (``upcast=False``), or from the rounded fp32 answer where eager overflows.
    ``grad_baseline(grad_outs, kernel_outs)``: other gradients a correct kernel may be as far
    from as eager is (the larger of the two errors sets the bound); it sees the output
    gradients (fp32) and the kernel's own outputs. ``grad_atol(grad_outs)`` and ``out_atol()``:
    absolute terms added to the gradients' and the outputs' bounds (assert_close's ``atol``)."""
    grad_inputs = list(range(len(inputs))) if grad_inputs is None else grad_inputs
    snapshot = [t.clone() for t in inputs]
    r_out, _ = _run(lambda *a: ref_fn(*a, upcast=True), _leaves(inputs, torch.float32))
    grad_outs = [torch.randn_like(o) for o in r_out]
    k_out, k_grads = _run(kernel_fn, _leaves(inputs), grad_outs, grad_inputs)
    for before, after in zip(snapshot, inputs):
        assert torch.equal(before.nan_to_num(), after.nan_to_num()), "an op wrote into its input"
    r_out, r_grads = _run(lambda *a: ref_fn(*a, upcast=True), _leaves(inputs, torch.float32),
                          grad_outs, grad_inputs)
    e_out, e_grads = _run(lambda *a: ref_fn(*a, upcast=False), _leaves(inputs), grad_outs,
                          grad_inputs)
    if not all(torch.isfinite(t).all() for t in e_out + e_grads):
        e_out, e_grads = _run(lambda *a: ref_fn(*a, upcast=True), _leaves(inputs), grad_outs,
                              grad_inputs)
    for i, (k, r, e) in enumerate(zip(k_out, r_out, e_out)):
        assert_close(k, r, e, name=f"output {i}", atol=0.0 if out_atol is None else out_atol())
    if grad_baseline is not None:
        worse = []
        for r, e, alt in zip(r_grads, e_grads, grad_baseline(grad_outs, k_out)):
            alt = alt.to(e.dtype)
            # a baseline that overflows where the answer does not would make the bound infinite
            usable = bool(torch.isfinite(alt)[torch.isfinite(r.to(e.dtype))].all())
            worse.append(alt if usable and _in_range_err(alt, r) > _in_range_err(e, r) else e)
        e_grads = worse
    atol = 0.0 if grad_atol is None else grad_atol(grad_outs)
    for i, (k, r, e) in enumerate(zip(k_grads, r_grads, e_grads)):
        assert_close(k, r, e, name=f"grad of input {grad_inputs[i]}", atol=atol)


def poisoned(shape, dtype, scale=1.0, device=DEVICE):
    """Random values in a view padded with NaN on every side: a read past a mask shows."""
    g = Guarded(shape, dtype, device=device)
    g.view.copy_(torch.randn(shape, device=device) * scale)
    return g.view


def qkv_inputs(b, sq, sk, hq, hkv, d, dtype, *, poison=True, device=DEVICE):
    """q (b, sq, hq, d), k and v (b, sk, hkv, d), random; inside NaN padding unless
    poison=False."""
    if poison:
        make = lambda s: poisoned(s, dtype, device=device)  # noqa: E731
    else:
        make = lambda s: torch.randn(s, device=device).to(dtype)  # noqa: E731
    return make((b, sq, hq, d)), make((b, sk, hkv, d)), make((b, sk, hkv, d))


def attention_grads(fn, q, k, v, dout):
    """(out, dq, dk, dv) of fn(q, k, v) for the output gradient dout, on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    return (out, *torch.autograd.grad(out, leaves, dout))
