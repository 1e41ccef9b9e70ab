"""On a GPU: no op leaks device memory over 10,000 calls, and every op runs on the caller's
current stream (so work on a side stream is ordered with what precedes it there)."""

from __future__ import annotations

import pytest
import torch

import llama_kernels as lk
from llama_kernels import reference
from helpers import GPU, backend_params

pytestmark = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (device memory and streams)")

KERNEL_BACKENDS = backend_params(kernels_only=True)


def _ops(backend):
    """(name, inputs, fn, reference) for every op, small shapes, bf16."""
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(8, 4096, device=dev, dtype=dt)
    w = torch.randn(4096, device=dev, dtype=dt)
    g, u = torch.randn(8, 11008, device=dev, dtype=dt), torch.randn(8, 11008, device=dev, dtype=dt)
    q = torch.randn(2, 64, 8, 128, device=dev, dtype=dt)
    kv = torch.randn(2, 64, 2, 128, device=dev, dtype=dt)
    cos, sin = lk.rotary_tables(64, 128, device=dev)
    return [
        ("rms_norm", [x, w], lambda a, b: lk.rms_norm(a, b, backend=backend),
         lambda a, b: reference.rms_norm(a, b)),
        ("add_rms_norm", [x, x.flip(0), w],
         lambda a, r, b: lk.add_rms_norm(a, r, b, backend=backend)[0],
         lambda a, r, b: reference.add_rms_norm(a, r, b)[0]),
        ("swiglu", [g, u], lambda a, b: lk.swiglu(a, b, backend=backend), reference.swiglu),
        ("apply_rotary", [q], lambda a: lk.apply_rotary(a, cos, sin, backend=backend),
         lambda a: reference.apply_rotary(a, cos, sin)),
        ("flash_attention", [q, kv, kv.flip(1)],
         lambda a, b, c: lk.flash_attention(a, b, c, backend=backend),
         lambda a, b, c: reference.attention(a, b, c)),
    ]


def _runs(fn, inputs):
    try:
        fn(*inputs)
    except (RuntimeError, ValueError) as e:  # no kernel for this op on this backend
        pytest.skip(str(e))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_ten_thousand_calls_leak_nothing(backend):
    for name, inputs, fn, _ref in _ops(backend):
        _runs(fn, inputs)
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = fn(*leaves)
        dout = torch.randn_like(out)

        def step():
            torch.autograd.grad(fn(*leaves), leaves, dout)

        for _ in range(10):  # warm-up: compiles, allocator growth
            step()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        for _ in range(10_000):
            step()
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == before, f"{name}: device memory grew"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_ops_run_on_the_current_stream(backend):
    """On a side stream, an op must wait for the slow producer of its input queued before it
    on that stream; an op launched on another stream would read the stale buffer."""
    side = torch.cuda.Stream()
    for name, inputs, fn, ref in _ops(backend):
        _runs(fn, inputs)
        stale = [torch.full_like(t, float("nan")) for t in inputs]
        a = torch.randn(4096, 4096, device="cuda")
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(20):  # a few ms of work ahead of the copies on this stream
                a = torch.tanh(a @ a * 1e-2)
            for buf, t in zip(stale, inputs):
                buf.copy_(t + (a[0, 0] * 0).to(t.dtype))  # depends on the slow chain
            out = fn(*stale)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        expected = ref(*[t.float() for t in inputs])
        assert torch.isfinite(out).all(), f"{name}: read the buffer before it was written"
        torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2,
                                   msg=f"{name}: wrong result on a side stream")
