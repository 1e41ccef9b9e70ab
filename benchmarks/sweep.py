"""Correctness sweep: every op on every backend that runs here, against reference.py in fp32.

The error bound is the tolerance rule of llama_kernels.testing, as in the tests: at most about
twice eager PyTorch's own error in the same dtype plus a floor, the rounded fp32 answer as the
baseline where eager overflows, and attention's terms for the flash algorithm's own roundings.
Prints one line per op x backend x dtype (the worst error / bound over outputs and gradients);
returns the number of failures.

Runs anywhere: on a CPU machine the Triton kernels run under the interpreter when
TRITON_INTERPRET=1 was set before triton was imported (python -m benchmarks sets it).
"""

from __future__ import annotations

import functools

import torch

import llama_kernels as lk
from llama_kernels import reference
from llama_kernels.testing import attention_terms, compare_fwd_bwd

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cases(device):
    """op -> (inputs for a dtype, op(*inputs, backend=), reference(*inputs, upcast=), the
    rule's extra terms or None)."""
    d = dict(device=device)
    cos, sin = lk.rotary_tables(40, 64, **d)
    pos = torch.randint(0, 40, (2, 13), **d)
    return {
        "rms_norm": (lambda dt: [torch.randn(5, 123, dtype=dt, **d),
                                 (1 + 0.1 * torch.randn(123, **d)).to(dt)],
                     lambda x, w, backend: lk.rms_norm(x, w, backend=backend),
                     lambda x, w, upcast: reference.rms_norm(x, w, upcast=upcast),
                     None),
        "add_rms_norm": (lambda dt: [torch.randn(5, 123, dtype=dt, **d),
                                     torch.randn(5, 123, dtype=dt, **d),
                                     (1 + 0.1 * torch.randn(123, **d)).to(dt)],
                         lambda x, r, w, backend: lk.add_rms_norm(x, r, w, backend=backend),
                         lambda x, r, w, upcast: reference.add_rms_norm(x, r, w, upcast=upcast),
                         None),
        "swiglu": (lambda dt: [2 * torch.randn(3, 7, 99, dtype=dt, **d),
                               torch.randn(3, 7, 99, dtype=dt, **d)],
                   lambda g, u, backend: lk.swiglu(g, u, backend=backend),
                   lambda g, u, upcast: reference.swiglu(g, u, upcast=upcast),
                   None),
        "apply_rotary": (lambda dt: [torch.randn(2, 13, 3, 64, dtype=dt, **d)],
                         lambda x, backend: lk.apply_rotary(x, cos, sin, positions=pos,
                                                            interleaved=True, backend=backend),
                         lambda x, upcast: reference.apply_rotary(x, cos, sin, positions=pos,
                                                                  interleaved=True,
                                                                  upcast=upcast),
                         None),
        "flash_attention": (lambda dt: [torch.randn(1, 5, 4, 64, dtype=dt, **d),
                                        torch.randn(1, 37, 2, 64, dtype=dt, **d),
                                        torch.randn(1, 37, 2, 64, dtype=dt, **d)],
                            lambda q, k, v, backend: lk.flash_attention(q, k, v, causal=True,
                                                                        backend=backend),
                            lambda q, k, v, upcast: reference.attention(q, k, v, causal=True,
                                                                        upcast=upcast),
                            attention_terms(causal=True)),
    }


def check(op_fn, ref_fn, inputs, backend, terms=None):
    """(worst error / bound over outputs and gradients, the first problem or None); (None, why)
    where the backend refuses these inputs."""
    kernel = functools.partial(op_fn, backend=backend)
    try:
        with torch.no_grad():
            kernel(*inputs)
    except (RuntimeError, ValueError) as err:
        return None, str(err).splitlines()[0]
    results = compare_fwd_bwd(kernel, ref_fn, inputs, terms=terms)
    problems = [str(r) for r in results if not r.ok]
    return max(r.ratio for r in results), problems[0] if problems else None


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    avail = lk.available_backends()
    runnable = [b for b, why in avail.items() if why is None]
    for b, why in avail.items():
        if why is not None:
            print(f"  backend {b}: not run here ({why})")
    failures = 0
    print(f"{'op':<16}{'backend':<9}{'dtype':<10}{'error/tolerance':>16}  result")
    for op, (make, op_fn, ref_fn, terms) in _cases(device).items():
        for backend in runnable:
            for dtype in DTYPES:
                ratio, msg = check(op_fn, ref_fn, make(dtype), backend, terms)
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
