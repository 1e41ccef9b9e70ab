"""Under ``torch.use_deterministic_algorithms(True)`` every backward of every op, on every
backend that runs here, is bitwise reproducible, and none raises.

No kernel of this project uses atomics: the RMSNorm weight gradient is summed from per-program
fp32 partials in a fixed order (Triton and CUDA), attention's dK/dV loop over the query heads
of a group inside one program, and rotary's backward is the forward conjugated. The torch
backend's only scatter (rotary table gradients with positions: ``index_add_``) has a
deterministic CUDA path that torch selects in this mode. So no path needs torch's
"does not have a deterministic implementation" error; ``test_no_op_raises_in_deterministic_mode``
would show one if it appeared.

Deterministic mode also fills fresh ``torch.empty`` memory with NaN
(``torch.utils.deterministic.fill_uninitialized_memory``), so the finiteness checks below also
catch any output element that a kernel forgot to write.
"""

from __future__ import annotations

import pytest
import torch

import llama_kernels as lk
from helpers import DEVICE, backend_params

BACKENDS = backend_params()
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.fixture
def deterministic():
    was, warn_only = (torch.are_deterministic_algorithms_enabled(),
                      torch.is_deterministic_algorithms_warn_only_enabled())
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def _cases(backend, dtype):
    """(name, fn, inputs): shapes that make every reduction span several programs (rows past
    the interpreter's 4 backward programs, GQA groups, repeated rotary positions)."""
    def r(*shape, scale=1.0):
        return (torch.randn(shape, device=DEVICE) * scale).to(dtype)

    cos, sin = lk.rotary_tables(40, 64, device=DEVICE)
    positions = torch.randint(0, 8, (3, 33), device=DEVICE)  # many repeats: index_add_
    cases = {
        "rms_norm": (lambda x, w: lk.rms_norm(x, w, backend=backend), [r(67, 123), r(123)]),
        "rms_norm_wide": (lambda x, w: lk.rms_norm(x, w, backend=backend), [r(5, 9000), r(9000)]),
        "add_rms_norm": (lambda x, res, w: lk.add_rms_norm(x, res, w, backend=backend),
                         [r(3, 29, 96), r(3, 29, 96), r(96)]),
        "swiglu": (lambda g, u: lk.swiglu(g, u, backend=backend),
                   [r(37, 300, scale=3), r(37, 300)]),
        "apply_rotary": (lambda x: lk.apply_rotary(x, cos, sin, interleaved=True,
                                                   backend=backend), [r(3, 33, 4, 64)]),
        "apply_rotary_positions": (
            lambda x, c, s: lk.apply_rotary(x, c, s, positions=positions, backend=backend),
            [r(3, 33, 4, 64), cos, sin]),
    }
    for causal in (True, False):
        for sq, sk in ((45, 45), (5, 130)):
            name = f"flash_attention {'causal' if causal else 'full'} {sq}x{sk}"
            cases[name] = (
                lambda q, k, v, c=causal: lk.flash_attention(q, k, v, causal=c, backend=backend),
                [r(2, sq, 6, 64), r(2, sk, 2, 64), r(2, sk, 2, 64)])
    return cases


CASE_NAMES = list(_cases("torch", torch.float32))


def _run(fn, inputs, douts=None):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if douts is None:
        gen = torch.Generator(device=DEVICE).manual_seed(1234)
        douts = [torch.randn(o.shape, device=DEVICE, generator=gen).to(o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, leaves, douts)
    return [o.detach() for o in outs], list(grads), douts


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_bitwise_reproducible(deterministic, backend, name, dtype):
    fn, inputs = _cases(backend, dtype)[name]
    try:
        outs1, grads1, douts = _run(fn, inputs)
    except (RuntimeError, ValueError) as e:
        if "does not support" in str(e) or "has no kernel" in str(e):
            pytest.skip(str(e))  # a backend rightly refusing a dtype or head_dim
        raise
    outs2, grads2, _ = _run(fn, inputs, douts)
    for i, (a, b) in enumerate(zip(outs1 + grads1, outs2 + grads2)):
        assert torch.isfinite(a).all(), f"result {i}: non-finite (an unwritten element?)"
        assert torch.equal(a, b), f"result {i} differs between two identical runs"


def test_no_op_raises_in_deterministic_mode(deterministic):
    """Every functional, forward and backward, on the torch backend (the one whose ops torch
    itself vets), runs with the mode on (warn_only=False): no "does not have a deterministic
    implementation" error anywhere."""
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    for name, (fn, inputs) in _cases("torch", torch.float32).items():
        _run(fn, inputs)
