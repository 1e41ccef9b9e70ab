"""pytest-benchmark view of the same cases: `pytest benchmarks/` for regression tracking.

Each case x implementation x direction is one benchmark; on a GPU the callable synchronizes so
pytest-benchmark's wall-clock timer sees the kernel time. Without a GPU the cases shrink to the
smoke size (torch backend, 8 rows) so the integration itself is exercised.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import cases as C
from benchmarks.__main__ import _direction_fn

pytest.importorskip("pytest_benchmark")

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
BACKENDS = ["cuda", "triton"] if GPU else ["torch"]


def _all_cases():
    import llama_kernels as lk

    avail = lk.available_backends()
    backends = [b for b in BACKENDS if avail[b] is None] or ["torch"]
    cases = C.row_cases(backends, ["7B"], 4096 if GPU else 8, torch.bfloat16, DEVICE)
    if GPU:
        cases += C.attention_cases(backends, ["7B"], torch.bfloat16, DEVICE, quick=True)
        notes = []  # peers that are not importable are left out; the main run reports why
        cases += C.varlen_cases(backends, torch.bfloat16, DEVICE, notes)
        cases += C.kvcache_cases(backends, torch.bfloat16, DEVICE, notes)
        cases += C.cross_entropy_cases(backends, torch.bfloat16, DEVICE, notes, tokens=2048)
    params = []
    for case in cases:
        for impl in case.impls:
            if not GPU and impl == "torch.compile":
                continue
            for direction in case.directions:
                params.append(pytest.param(case, impl, direction,
                                           id=f"{case.op}-{case.shape}-{impl}-{direction}"))
    return params


@pytest.mark.parametrize("case,impl,direction", _all_cases())
def test_benchmark(benchmark, case, impl, direction):
    fn = _direction_fn(case.impls[impl], case.make_inputs(), direction)

    def run():
        fn()
        if GPU:
            torch.cuda.synchronize()

    benchmark.group = f"{case.op} {case.shape} {direction}"
    benchmark(run)
