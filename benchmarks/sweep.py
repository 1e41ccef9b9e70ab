"""Correctness sweep: every op on every backend that runs here, against reference.py in fp32.

The error bound is the project's rule: at most twice eager PyTorch's own error in the same dtype
(plus a small floor). Prints one line per op x backend x dtype; returns the number of failures.
Runs anywhere: on a CPU machine the Triton kernels run under the interpreter when
TRITON_INTERPRET=1 was set before triton was imported (python -m benchmarks sets it).
"""

from __future__ import annotations

import torch

import llama_kernels as lk
from llama_kernels import reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cases(device):
    d = dict(device=device)
    cos, sin = lk.rotary_tables(40, 64, **d)
    pos = torch.randint(0, 40, (2, 13), **d)
    return {
        "rms_norm": (lambda dt: [torch.randn(5, 123, dtype=dt, **d),
                                 (1 + 0.1 * torch.randn(123, **d)).to(dt)],
                     lambda x, w, backend: lk.rms_norm(x, w, backend=backend),
                     lambda x, w, upcast: reference.rms_norm(x, w, upcast=upcast)),
        "add_rms_norm": (lambda dt: [torch.randn(5, 123, dtype=dt, **d),
                                     torch.randn(5, 123, dtype=dt, **d),
                                     (1 + 0.1 * torch.randn(123, **d)).to(dt)],
                         lambda x, r, w, backend: lk.add_rms_norm(x, r, w, backend=backend),
                         lambda x, r, w, upcast: reference.add_rms_norm(x, r, w, upcast=upcast)),
        "swiglu": (lambda dt: [2 * torch.randn(3, 7, 99, dtype=dt, **d),
                               torch.randn(3, 7, 99, dtype=dt, **d)],
                   lambda g, u, backend: lk.swiglu(g, u, backend=backend),
                   lambda g, u, upcast: reference.swiglu(g, u, upcast=upcast)),
        "apply_rotary": (lambda dt: [torch.randn(2, 13, 3, 64, dtype=dt, **d)],
                         lambda x, backend: lk.apply_rotary(x, cos, sin, positions=pos,
                                                            interleaved=True, backend=backend),
                         lambda x, upcast: reference.apply_rotary(x, cos, sin, positions=pos,
                                                                  interleaved=True,
                                                                  upcast=upcast)),
        "flash_attention": (lambda dt: [torch.randn(1, 5, 4, 64, dtype=dt, **d),
                                        torch.randn(1, 37, 2, 64, dtype=dt, **d),
                                        torch.randn(1, 37, 2, 64, dtype=dt, **d)],
                            lambda q, k, v, backend: lk.flash_attention(q, k, v,
                                                                        backend=backend),
                            lambda q, k, v, upcast: reference.attention(q, k, v, upcast=upcast)),
    }


def _err(a, b):
    return (a.float() - b.float()).abs().max().item()


def tolerance(eager_err: float, dtype: torch.dtype, scale: float) -> float:
    """The project's rule: twice eager-in-dtype's error against fp32, plus a floor of a few
    units of rounding (1e-5 in fp32, one epsilon otherwise) times the reference's scale."""
    rel = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    return 2 * eager_err + rel * max(1.0, scale)


def _grads(outs, leaves, cotangents):
    outs = outs if isinstance(outs, tuple) else (outs,)
    return torch.autograd.grad(outs, leaves, [c.to(o.dtype) for c, o in zip(cotangents, outs)])


def check(op_fn, ref_fn, inputs, backend):
    """(worst error / tolerance over outputs and gradients, error message or None)."""
    k = [t.clone().requires_grad_() for t in inputs]
    r = [t.float().requires_grad_() for t in inputs]
    e = [t.clone().requires_grad_() for t in inputs]
    try:
        k_out = op_fn(*k, backend=backend)
    except (RuntimeError, ValueError) as err:
        return None, str(err).splitlines()[0]
    r_out, e_out = ref_fn(*r, upcast=True), ref_fn(*e, upcast=False)
    as_tuple = (lambda o: o if isinstance(o, tuple) else (o,))
    cot = [torch.randn_like(o.float()) for o in as_tuple(e_out)]
    worst = 0.0
    for kk, rr, ee in zip(as_tuple(k_out) + _grads(k_out, k, cot),
                          as_tuple(r_out) + _grads(r_out, r, cot),
                          as_tuple(e_out) + _grads(e_out, e, cot)):
        if not torch.isfinite(kk).all():
            return float("inf"), "non-finite output"
        worst = max(worst, _err(kk, rr) / tolerance(_err(ee, rr), kk.dtype, rr.abs().max().item()))
    return worst, None


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    avail = lk.available_backends()
    runnable = [b for b, why in avail.items() if why is None]
    for b, why in avail.items():
        if why is not None:
            print(f"  backend {b}: not run here ({why})")
    failures = 0
    print(f"{'op':<16}{'backend':<9}{'dtype':<10}{'error/tolerance':>16}  result")
    for op, (make, op_fn, ref_fn) in _cases(device).items():
        for backend in runnable:
            for dtype in DTYPES:
                ratio, msg = check(op_fn, ref_fn, make(dtype), backend)
                if ratio is None:
                    status, shown = f"skipped: {msg}", "-"
                elif ratio <= 1.0:
                    status, shown = "ok", f"{ratio:.3f}"
                else:
                    failures += 1
                    status, shown = f"FAIL {msg or ''}", f"{ratio:.3f}"
                print(f"{op:<16}{backend:<9}{str(dtype)[6:]:<10}{shown:>16}  {status}")
    print(f"correctness sweep: {failures} failure(s)")
    return failures
