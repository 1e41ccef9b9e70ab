"""Shared test helpers: which backends run here, guarded and poisoned tensors, attention inputs.

The tolerance rule (``assert_close``, ``check_fwd_bwd``, ``max_err``) lives in
llama_kernels.testing and is re-exported here for the test files that import it from helpers."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from llama_kernels import available_backends
from llama_kernels.testing import assert_close, check_fwd_bwd, max_err  # noqa: F401

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
