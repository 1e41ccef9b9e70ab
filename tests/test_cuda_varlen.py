"""The CUDA packed-sequence (varlen) attention: the VARLEN specializations of the dense flash
kernels (csrc/flash_fwd_kernels.cuh, csrc/flash_bwd_kernels.cuh, launched by run_forward /
run_backward in csrc/flash_attention_kernels.cuh) and csrc/flash_attention.cu's
flash_attention_varlen_fwd_cuda / flash_attention_varlen_bwd_cuda.

Without a GPU the very kernel source runs on the host emulator (tests/cuda_emulator, see
tests/test_cuda_attention.py): outputs, lse and gradients against reference.attention_varlen in
fp32 math, over ragged, empty, one-row and longer-than-a-block sequences, more queries than keys,
GQA, causal and not; outputs poisoned (NaN) until written, with guard bands around them; a value
planted in one sequence's keys and values must not move any other sequence's results; the
backward is deterministic. The GPU half runs the same checks through
lk.flash_attention_varlen(backend="cuda") and the registered ops, and their bad-input errors.

Emulated tiles: forward 128 queries x 64 keys, dK/dV 64 keys x 64 (d64) or 32 (d128) queries, dQ
64 queries x 64 keys, so 70 and 130 rows run past a block on every kernel and 1 and 5 rows are
shorter than one. Emulator runs cost about a second per kernel launch: a few shapes, no sweep.

Tolerance: llama_kernels.testing.check_fwd_bwd (twice eager's error in the dtype plus a floor)
with attention's terms computed per sequence (_varlen_terms), as tests/test_triton_varlen.py.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import cuda_emulator
import llama_kernels as lk
from helpers import GPU, poisoned
from llama_kernels import reference
from llama_kernels.ops import _backend
from llama_kernels.testing import ToleranceTerms, attention_tolerance_terms, check_fwd_bwd

ops_varlen = importlib.import_module("llama_kernels.ops.flash_attention_varlen")

EMULATOR, EMULATOR_WHY_NOT = cuda_emulator.available()
needs_emulator = pytest.mark.skipif(not EMULATOR, reason=f"no emulator: {EMULATOR_WHY_NOT}")
HAS_CUDA_KERNEL = "flash_attention_varlen_fwd_cuda" in _backend.CUDA_AVAILABLE_KERNELS
needs_gpu = pytest.mark.skipif(
    not (GPU and HAS_CUDA_KERNEL),
    reason="needs a GPU and the built CUDA extension"
    + ("" if GPU else " (no GPU here)")
    + ("" if HAS_CUDA_KERNEL else f" ({_backend._EXTENSION_WHY_NOT or 'kernel not built'})"))

# (lengths_q, lengths_k, Hq, Hkv, head_dim, dtype)
CASES = [
    # packed self-attention: an empty sequence, one row, 70 rows (past a block of every
    # kernel), 5 rows; GQA 2
    pytest.param([0, 1, 70, 5], [0, 1, 70, 5], 4, 2, 64, torch.float16, id="self-h4/2-d64-fp16"),
    # Sq != Sk per sequence: fewer queries than keys, more (9 > 4: five causal rows see no key),
    # queries over an empty key sequence, keys under an empty query sequence; MQA, d128
    pytest.param([3, 9, 2, 0, 40], [20, 4, 0, 6, 67], 2, 1, 128, torch.bfloat16,
                 id="ragged-h2/1-d128-bf16"),
]


def _cu(lengths, device="cpu"):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,
                        device=device)


def _rows(lengths):
    starts = [0] + torch.tensor(lengths).cumsum(0).tolist()
    return [slice(a, b) for a, b in zip(starts, starts[1:])]


def _packed(lengths_q, lengths_k, hq, hkv, d, dtype, device="cpu", poison=True):
    """q, k, v (inside NaN padding: a read past a mask shows), cu_seqlens_q, cu_seqlens_k."""
    tq, tk = sum(lengths_q), sum(lengths_k)
    make = (lambda s: poisoned(s, dtype, device=device)) if poison else (
        lambda s: torch.randn(s, device=device).to(dtype))
    return (make((tq, hq, d)), make((tk, hkv, d)), make((tk, hkv, d)), _cu(lengths_q, device),
            _cu(lengths_k, device))


def _varlen_terms(lengths_q, lengths_k, causal, scale):
    """check_fwd_bwd's terms for packed attention: attention_tolerance_terms of each sequence
    (one batch of one), the atol terms their largest, the saved-output baseline their rows
    (zero for the rows of an empty or blind sequence, whose exact gradient is 0)."""
    def terms(inputs, grad_outs, outs):
        q, k, v = inputs
        base = [torch.zeros(t.shape, device=t.device) for t in inputs]
        out_atol = grad_atol = 0.0
        for rq, rk in zip(_rows(lengths_q), _rows(lengths_k)):
            if rq.start == rq.stop or rk.start == rk.stop:
                continue
            t = attention_tolerance_terms(q[None, rq], k[None, rk], v[None, rk],
                                          grad_outs[0][None, rq], outs[0][None, rq],
                                          causal=causal, softmax_scale=scale)
            out_atol, grad_atol = max(out_atol, t.out_atol), max(grad_atol, t.grad_atol)
            for b, g, rows in zip(base, t.grad_baseline, (rq, rk, rk)):
                b[rows] = g[0].float()
        return ToleranceTerms(out_atol, grad_atol, tuple(base))
    return terms


class _Emulated(torch.autograd.Function):
    """The emulated packed forward, with the emulated backward as its gradient."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        out, lse = cuda_emulator.flash_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal,
                                                      scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, causal, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        grads = cuda_emulator.flash_varlen_backward(dout.contiguous(), q, k, v, out, lse, cu_q,
                                                    cu_k, *ctx.args)
        return (*grads, None, None, None, None, None, None)


# ------------------------------------------------------------------------------ emulated


@needs_emulator
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("lengths_q,lengths_k,hq,hkv,d,dtype", CASES)
def test_emulated_varlen_matches_reference(lengths_q, lengths_k, hq, hkv, d, dtype, causal):
    """out, dq, dk, dv of the emulated kernels on NaN-padded inputs against the fp32 reference;
    every element of every output written (NaN-poisoned until then), nothing around them."""
    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, hq, hkv, d, dtype)
    scale = d ** -0.5
    check_fwd_bwd(
        lambda a, b, c: _Emulated.apply(a, b, c, cu_q, cu_k, max(lengths_q), max(lengths_k),
                                        causal, scale),
        lambda a, b, c, upcast: reference.attention_varlen(a, b, c, cu_q, cu_k, causal=causal,
                                                           softmax_scale=scale, upcast=upcast),
        [q, k, v], terms=_varlen_terms(lengths_q, lengths_k, causal, scale))


@needs_emulator
def test_emulated_varlen_lse_and_blind_queries():
    """lse (Hq, total_q) is the reference's, -inf exactly where a query sees no key (causal rows
    of a sequence with more queries than keys, queries over an empty key sequence), and there
    out = 0 and dq = 0; keys under an empty query sequence get dk = dv = 0."""
    lengths_q, lengths_k = [9, 3, 0, 4], [4, 0, 6, 4]
    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, 2, 1, 64, torch.float16)
    out, lse = cuda_emulator.flash_varlen_forward(q, k, v, cu_q, cu_k, 9, 6, True, 0.125)
    ref_out, ref_lse = reference.attention_varlen_with_lse(q, k, v, cu_q, cu_k, causal=True,
                                                           softmax_scale=0.125)
    blind = torch.isneginf(ref_lse)
    assert int(blind.sum()) == 2 * (5 + 3), "the case must hold blind queries"
    assert torch.equal(torch.isneginf(lse), blind)
    torch.testing.assert_close(lse[~blind], ref_lse[~blind], rtol=0, atol=1e-4)
    assert torch.equal(out.transpose(0, 1)[blind], torch.zeros_like(out.transpose(0, 1)[blind]))
    dout = torch.randn(q.shape).half()
    dq, dk, dv = cuda_emulator.flash_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, 9, 6,
                                                     True, 0.125)
    assert not dq.transpose(0, 1)[blind].any()
    keys_alone = _rows(lengths_k)[2]
    assert not dk[keys_alone].any() and not dv[keys_alone].any()


@needs_emulator
def test_emulated_varlen_does_not_leak_across_sequences():
    """Large keys and values planted in sequence 1 (the middle one) change its own results but
    leave every other sequence's out, lse, dq, dk and dv bitwise as they were: a kernel reading a
    neighbour's rows (bounds off by a block, or a wrong sequence's offsets) moves them."""
    lengths = [70, 33, 5]
    q, k, v, cu_q, cu_k = _packed(lengths, lengths, 2, 1, 64, torch.float16, poison=False)
    dout = torch.randn(q.shape).half()

    def run(k, v):
        out, lse = cuda_emulator.flash_varlen_forward(q, k, v, cu_q, cu_k, 70, 70, False, 0.125)
        grads = cuda_emulator.flash_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, 70, 70,
                                                    False, 0.125)
        return out, lse, *grads

    clean = run(k, v)
    planted_rows = _rows(lengths)[1]
    k2, v2 = k.clone(), v.clone()
    k2[planted_rows] += 2.0  # shifted keys change sequence 1's weights, shifted values its out
    v2[planted_rows] += 30.0
    dirty = run(k2, v2)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), clean, dirty):
        on_q = name in ("out", "dq", "lse")
        rows = _rows(lengths)
        for s, r in enumerate(rows):
            part = (lambda t: t[:, r]) if name == "lse" else (lambda t: t[r])
            if s == 1:
                continue
            assert torch.equal(part(a), part(b)), f"{name} of sequence {s} moved"
        mid = (lambda t: t[:, planted_rows]) if name == "lse" else (lambda t: t[planted_rows])
        if on_q or name == "dv":
            assert not torch.equal(mid(a), mid(b)), f"the plant must move sequence 1's {name}"


@needs_emulator
def test_emulated_varlen_backward_is_deterministic():
    lengths_q, lengths_k = [37, 0, 70], [50, 3, 70]
    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, 4, 1, 64, torch.bfloat16, poison=False)
    dout = torch.randn(q.shape).bfloat16()
    out, lse = cuda_emulator.flash_varlen_forward(q, k, v, cu_q, cu_k, 70, 70, True, 0.125)
    first = cuda_emulator.flash_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, 70, 70,
                                                True, 0.125)
    second = cuda_emulator.flash_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, 70, 70,
                                                 True, 0.125, schedule_seed=7)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_emulator
def test_emulated_varlen_of_one_sequence_is_the_dense_kernel():
    """One packed sequence runs the same arithmetic as the dense kernel on a batch of one:
    bitwise equal outputs, lse and gradients."""
    q, k, v, cu_q, cu_k = _packed([77], [77], 2, 1, 128, torch.float16, poison=False)
    dout = torch.randn(q.shape).half()
    out, lse = cuda_emulator.flash_varlen_forward(q, k, v, cu_q, cu_k, 77, 77, True, 0.1)
    grads = cuda_emulator.flash_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, 77, 77,
                                                True, 0.1)
    dense_out, dense_lse = cuda_emulator.flash_forward(q[None], k[None], v[None], True, 0.1)
    dense = cuda_emulator.flash_backward(dout[None], q[None], k[None], v[None], dense_out,
                                         dense_lse, True, 0.1)
    assert torch.equal(out, dense_out[0]) and torch.equal(lse, dense_lse[0])
    for a, b in zip(grads, dense):
        assert torch.equal(a, b[0])


# ------------------------------------------------------------------------------ dispatch


def test_cuda_reasons_for_what_the_kernel_cannot_take():
    """Named, the cuda backend refuses head dims other than 64 / 128 and fp32 with the reason;
    auto passes over it (to triton or torch)."""
    q64 = torch.zeros(4, 2, 64, dtype=torch.float16)
    assert "cuda" not in ops_varlen.unsupported_reasons(q64)
    for q, why in ((torch.zeros(4, 2, 96, dtype=torch.float16), "head_dim 96"),
                   (torch.zeros(4, 2, 64), "torch.float32")):
        assert why in ops_varlen.unsupported_reasons(q)["cuda"]
    assert "cuda" in ops_varlen.KERNEL_BACKENDS


@pytest.mark.skipif(not HAS_CUDA_KERNEL, reason="the CUDA extension's varlen kernel is not built")
def test_cuda_backend_refuses_cpu_tensors():
    q, k, v, cu_q, cu_k = _packed([3, 5], [3, 5], 2, 1, 64, torch.float16, poison=False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        lk.flash_attention_varlen(q, k, v, cu_q, cu_k, 5, 5, backend="cuda")


# ------------------------------------------------------------------------------ on a GPU

GPU_CASES = CASES + [
    pytest.param([1000, 0, 1, 1025, 300], [1000, 7, 1, 1025, 2000], 16, 4, 128, torch.bfloat16,
                 id="long-h16/4-d128-bf16"),
    pytest.param([513, 64, 128], [513, 64, 128], 8, 8, 64, torch.float16, id="blocks-d64-fp16"),
]


@needs_gpu
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("lengths_q,lengths_k,hq,hkv,d,dtype", GPU_CASES)
def test_gpu_varlen_matches_reference(lengths_q, lengths_k, hq, hkv, d, dtype, causal):
    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, hq, hkv, d, dtype, device="cuda")
    scale = d ** -0.5
    check_fwd_bwd(
        lambda a, b, c: lk.flash_attention_varlen(a, b, c, cu_q, cu_k, max(lengths_q),
                                                  max(lengths_k), causal=causal, backend="cuda"),
        lambda a, b, c, upcast: reference.attention_varlen(a, b, c, cu_q, cu_k, causal=causal,
                                                           softmax_scale=scale, upcast=upcast),
        [q, k, v], terms=_varlen_terms(lengths_q, lengths_k, causal, scale))


@needs_gpu
def test_gpu_varlen_matches_emulated_and_is_deterministic():
    lengths_q, lengths_k = [9, 3, 0, 70], [4, 0, 6, 70]
    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, 4, 2, 64, torch.float16, device="cuda",
                                  poison=False)
    dout = torch.randn_like(q)
    fwd = torch.ops.llama_kernels.flash_attention_varlen_fwd_cuda
    bwd = torch.ops.llama_kernels.flash_attention_varlen_bwd_cuda
    out, lse = fwd(q, k, v, cu_q, cu_k, 70, 70, True, 0.125)
    first = bwd(dout, q, k, v, out, lse, cu_q, cu_k, 70, 70, True, 0.125)
    second = bwd(dout, q, k, v, out, lse, cu_q, cu_k, 70, 70, True, 0.125)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    if EMULATOR:  # the emulation is the same arithmetic: it must agree to rounding
        cpu = [t.cpu() for t in (q, k, v, cu_q, cu_k)]
        emu_out, emu_lse = cuda_emulator.flash_varlen_forward(*cpu, 70, 70, True, 0.125)
        torch.testing.assert_close(out.cpu(), emu_out, atol=2e-2, rtol=0)
        torch.testing.assert_close(lse.cpu(), emu_lse, atol=1e-4, rtol=0)


@needs_gpu
def test_gpu_varlen_bad_inputs_are_refused_before_launch():
    q, k, v, cu_q, cu_k = _packed([3, 5], [3, 5], 2, 1, 64, torch.float16, device="cuda",
                                  poison=False)
    fwd = torch.ops.llama_kernels.flash_attention_varlen_fwd_cuda
    with pytest.raises(ValueError, match="head_dim 96"):
        x = torch.zeros(8, 2, 96, device="cuda", dtype=torch.float16)
        lk.flash_attention_varlen(x, x, x, cu_q, cu_k, 5, 5, backend="cuda")
    with pytest.raises(RuntimeError, match="^cu_seqlens_q: expected dtype int32"):
        fwd(q, k, v, cu_q.long(), cu_k, 5, 5, True, 0.1)
    with pytest.raises(RuntimeError, match="^cu_seqlens_k: expected shape"):
        fwd(q, k, v, cu_q, cu_k[:2], 5, 5, True, 0.1)
    with pytest.raises(RuntimeError, match="^k: expected dtype"):
        fwd(q, k.bfloat16(), v, cu_q, cu_k, 5, 5, True, 0.1)
    with pytest.raises(RuntimeError, match="^max_seqlen_q: expected at least"):
        fwd(q, k, v, cu_q, cu_k, 0, 5, True, 0.1)
    with pytest.raises(RuntimeError, match="^lse: expected shape"):
        torch.ops.llama_kernels.flash_attention_varlen_bwd_cuda(
            q, q, k, v, q, torch.zeros(8, 2, device="cuda"), cu_q, cu_k, 5, 5, True, 0.1)
    with pytest.raises(ValueError, match="cu_seqlens_q"):  # values: the op's eager check
        lk.flash_attention_varlen(q, k, v, _cu([5, 3], "cuda") - 1, cu_k, 5, 5, backend="cuda")


@needs_gpu
def test_gpu_varlen_opcheck():
    q, k, v, cu_q, cu_k = _packed([3, 0, 70], [5, 2, 70], 4, 2, 64, torch.float16,
                                  device="cuda", poison=False)
    for t in (q, k, v):
        t.requires_grad_(True)
    torch.library.opcheck(ops_varlen.flash_attention_varlen_fwd,
                          (q, k, v, cu_q, cu_k, 70, 70, True, 0.125, "cuda"))
