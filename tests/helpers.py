"""Shared test helpers: which backends run here, and the tolerance rule of STYLE.md (rule 8)."""

from __future__ import annotations

import os

import pytest
import torch

from llama_kernels import available_backends

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


def _floor(dtype: torch.dtype, scale: float) -> float:
    # Where eager happens to be exact (always in fp32, where it *is* the reference), allow a
    # few units of rounding: kernels sum in a different order than torch does.
    rel = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    return rel * max(1.0, scale)


def assert_close(out: torch.Tensor, ref32: torch.Tensor, eager: torch.Tensor, name: str = "out"):
    """|out - ref32| <= 2 |eager - ref32| + floor: a kernel in dtype T may be at most about twice
    as wrong as eager PyTorch in T, measured against the fp32 reference."""
    assert out.shape == ref32.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref32.shape)}"
    assert out.dtype == eager.dtype, f"{name}: dtype {out.dtype} != {eager.dtype}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten or NaN)"
    err = max_err(out, ref32)
    eager_err = max_err(eager, ref32)
    tol = 2 * eager_err + _floor(out.dtype, ref32.abs().max().item())
    assert err <= tol, f"{name}: max error {err:.3e} > {tol:.3e} (eager {eager_err:.3e})"
