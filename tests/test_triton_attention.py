"""The Triton flash attention (llama_kernels/triton/: the launchers of flash_attention.py, the
kernels of attention_fwd.py, attention_decode.py and attention_bwd.py, the settings of
attention_launch.py; the backward's blocked structure, attention_bwd_blocked.py, in
test_triton_attention_bwd_blocked.py, its AOT cases here): forward, lse, backward,
grouped-query heads, bottom-right causal masks, the split-KV decode path and its combine,
strided inputs, opcheck, torch.compile, and an ahead-of-time compile for sm_80 / sm_90.

Kernels run on CPU tensors under TRITON_INTERPRET=1 where there is no GPU (conftest.py sets
it before triton is imported), about 1 ms per program instance, so shapes are small; the
interpreter's launch settings (attention_launch_settings(..., arch=None)) use 16/32-wide
tiles, so short sequences still cover multi-block loops, ragged edges and diagonal tiles. On
a GPU the same tests run with the real tiles, plus the GPU-only shapes at the end.

Tolerance (helpers.assert_close): error against the fp32 reference
(reference.py, upcast=True) at most twice that of eager PyTorch in the test dtype (upcast=False)
plus a floor of one epsilon of the dtype (1e-5 in fp32) times the largest value. Why 2x: the
kernel rounds P to the input dtype before P V (as eager rounds its softmax) and sums in another
order, so its error is of the same kind as eager's; the floor covers the final rounding to
the output dtype, and in fp32 (where eager *is* the reference) the kernel's different
summation order.

Interpreter traps (Triton 3.8): tl.dot on bf16 multiplies raw bits, so the kernels widen bf16
operands to fp32 under the interpreter (UPCAST_DOT, exact); fp32 -> bf16 conversion truncates
instead of rounding to nearest (one ulp towards zero, inside the floor); an out-of-bounds store
is not caught, so outputs are written into NaN-filled buffers whose guards must stay NaN, and
inputs sit inside NaN padding so that a missing load mask reads NaN.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
    pytest.skip("Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 set before triton is "
                "imported (tests/conftest.py does so when no GPU is visible)",
                allow_module_level=True)

import llama_kernels as lk  # noqa: E402
from llama_kernels import reference  # noqa: E402
from llama_kernels.triton import attention_launch as launch  # noqa: E402
from llama_kernels.triton import flash_attention as fa  # noqa: E402
from helpers import (DEVICE, DTYPES, GPU, Guarded, assert_close,  # noqa: E402
                     attention_grads, poisoned, qkv_inputs, run_compiler_script)

DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# ------------------------------------------------------------------------------ helpers


def check_forward(q, k, v, causal, scale, out, lse, name=""):
    ref_out, ref_lse = reference.attention_with_lse(q, k, v, causal=causal,
                                                    softmax_scale=scale)
    eager_out, eager_lse = reference.attention_with_lse(q, k, v, causal=causal,
                                                        softmax_scale=scale, upcast=False)
    assert_close(out, ref_out.float(), eager_out, f"{name}out")
    assert_close(lse, ref_lse, eager_lse, f"{name}lse")


def check_backward(q, k, v, causal, scale, backend="triton"):
    dout = torch.randn(q.shape, device=DEVICE).to(q.dtype)
    got = attention_grads(
        lambda *t: lk.flash_attention(*t, causal=causal, softmax_scale=scale, backend=backend),
        q, k, v, dout)
    ref = attention_grads(
        lambda *t: reference.attention(*t, causal=causal, softmax_scale=scale),
        q.float(), k.float(), v.float(), dout.float())
    eager = attention_grads(
        lambda *t: reference.attention(*t, causal=causal, softmax_scale=scale, upcast=False),
        q, k, v, dout)
    for name, g, r, e in zip(("out", "dq", "dk", "dv"), got, ref, eager):
        assert g.is_contiguous(), f"{name}: not contiguous"
        assert_close(g, r, e, name)
    return got


# ------------------------------------------------------------------------------ prefill

# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal). Sq <= 16 takes the decode
# path (flash_attention_fwd's default), the rest the prefill kernel; both backward kernels run
# for every case.
CASES = [
    pytest.param(2, 1, 1, 2, 1, 64, True, id="s1-h2/1"),
    pytest.param(1, 17, 17, 4, 1, 64, True, id="s17-h4/1"),
    pytest.param(1, 97, 97, 8, 2, 80, True, id="s97-h8/2-d80"),
    pytest.param(1, 97, 97, 2, 2, 128, False, id="s97-d128-full"),
    pytest.param(1, 257, 257, 1, 1, 64, True, id="s257"),
    pytest.param(2, 64, 97, 4, 4, 96, True, id="q64-k97-d96"),
    pytest.param(1, 64, 300, 4, 1, 64, False, id="q64-k300-h4/1-full"),
    pytest.param(1, 7, 300, 8, 1, 64, True, id="q7-k300-h8/1"),
    pytest.param(1, 1, 300, 4, 4, 128, True, id="q1-k300-d128"),
    pytest.param(1, 7, 7, 4, 2, 40, False, id="s7-h4/2-d40-full"),
    pytest.param(1, 1, 123, 8, 8, 64, False, id="q1-k123-full"),
]
GPU_CASES = [
    pytest.param(2, 1025, 1025, 16, 4, 128, True, id="s1025-h16/4-d128",
                 marks=pytest.mark.gpu),
    pytest.param(1, 1025, 1025, 8, 8, 64, False, id="s1025-d64-full", marks=pytest.mark.gpu),
    pytest.param(2, 512, 2049, 8, 1, 128, True, id="q512-k2049-h8/1", marks=pytest.mark.gpu),
    pytest.param(4, 1, 4096, 32, 8, 128, True, id="decode-k4096-h32/8",
                 marks=pytest.mark.gpu),
    pytest.param(2, 16, 4099, 32, 4, 64, True, id="decode16-k4099-h32/4",
                 marks=pytest.mark.gpu),
]
if GPU:
    CASES += GPU_CASES


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("b,sq,sk,hq,hkv,d,causal", CASES)
def test_forward(b, sq, sk, hq, hkv, d, causal, dtype):
    """out and lse of the launcher against the reference; inputs in NaN padding, outputs into
    guarded buffers (no stray read or store)."""
    q, k, v = qkv_inputs(b, sq, sk, hq, hkv, d, dtype)
    out, lse = Guarded((b, sq, hq, d), dtype), Guarded((b, hq, sq), torch.float32, True)
    scale = d ** -0.5
    fa.flash_attention_fwd(q, k, v, causal, scale, out=out.view, lse=lse.view)
    out.check("out")
    lse.check("lse")
    check_forward(q, k, v, causal, scale, out.view, lse.view)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("b,sq,sk,hq,hkv,d,causal", CASES)
def test_backward(b, sq, sk, hq, hkv, d, causal, dtype):
    """out, dq, dk, dv by autograd through lk.flash_attention(backend="triton")."""
    q, k, v = qkv_inputs(b, sq, sk, hq, hkv, d, dtype, poison=False)
    check_backward(q, k, v, causal, 0.3 if d == 80 else None)


@pytest.mark.parametrize("dtype", (torch.float16, torch.float32), ids=DTYPE_IDS.get)
def test_backward_kernels_guarded(dtype):
    """The backward launcher on NaN-padded inputs writes exactly dq, dk, dv (guarded)."""
    b, sq, sk, hq, hkv, d, causal = 2, 33, 50, 4, 2, 80, True
    q, k, v = qkv_inputs(b, sq, sk, hq, hkv, d, dtype)
    out, lse = fa.flash_attention_fwd(q, k, v, causal, d ** -0.5)
    dout = poisoned(q.shape, dtype)
    grads = [Guarded(t.shape, dtype) for t in (q, k, v)]
    fa.flash_attention_bwd(dout, q, k, v, out, lse, causal, d ** -0.5,
                           dq=grads[0].view, dk=grads[1].view, dv=grads[2].view)
    ref = reference.attention_backward(dout.float(), q.float(), k.float(), v.float(),
                                       out.float(), lse, causal=causal, softmax_scale=d ** -0.5)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref):
        g.check(name)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(g.view.float(), r, rtol=tol, atol=tol * r.abs().max().item())


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (16, 64), (64, 16)])
def test_tile_shapes(block_m, block_n):
    """Other tile shapes than the interpreter default (M < N, M > N by 4x) for forward and both
    backward kernels: the causal loop bounds and diagonal masks do not assume M == N."""
    cfg = launch.AttentionLaunch(block_m, block_n, 4, 2)
    settings = {"fwd": cfg, "bwd_dkdv": cfg, "bwd_dq": cfg}
    q, k, v = qkv_inputs(1, 70, 91, 2, 1, 32, torch.float32)
    scale = 0.2
    out, lse = fa.flash_attention_fwd(q, k, v, True, scale, settings=settings)
    check_forward(q, k, v, True, scale, out, lse)
    dout = torch.randn(q.shape, device=DEVICE)
    got = fa.flash_attention_bwd(dout, q, k, v, out, lse, True, scale, settings=settings)
    ref = reference.attention_backward(dout, q, k, v, out, lse, causal=True, softmax_scale=scale)
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=name)


def test_backward_deterministic():
    """No atomics: two backward passes give bitwise-equal gradients (GQA group loop included)."""
    q, k, v = qkv_inputs(1, 97, 97, 4, 1, 64, torch.float16, poison=False)
    out, lse = fa.flash_attention_fwd(q, k, v, True, 0.125)
    dout = torch.randn(q.shape, device=DEVICE, dtype=torch.float16)
    first = fa.flash_attention_bwd(dout, q, k, v, out, lse, True, 0.125)
    second = fa.flash_attention_bwd(dout, q, k, v, out, lse, True, 0.125)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_large_logits_finite():
    """Scaled scores in the hundreds (fp16): the running max keeps exp2 finite, no NaN or inf
    anywhere, and the hidden scores of diagonal tiles do not overflow before they are masked.
    (fp16, not fp32: in fp32 eager *is* the reference, and scores this large amplify the
    kernel's summation-order differences past the 1e-5 floor: exp(s) has relative error
    eps * |s|.)"""
    q, k, v = qkv_inputs(1, 40, 40, 2, 1, 64, torch.float16, poison=False)
    q = q * 40
    got = check_backward(q, k, v, True, None)
    assert all(torch.isfinite(t).all() for t in got)


# ------------------------------------------------------------------------------ strided inputs


@pytest.mark.parametrize("dtype", (torch.float16, torch.float32), ids=DTYPE_IDS.get)
def test_fused_qkv_views(dtype):
    """q, k, v as head slices of one fused projection (B, S, Hq + 2 Hkv, D): strides over seq
    and head are not those of a contiguous tensor; gradients flow back into the fused tensor."""
    b, s, hq, hkv, d = 2, 37, 4, 2, 64
    qkv = torch.randn(b, s, hq + 2 * hkv, d, device=DEVICE).to(dtype)
    dout = torch.randn(b, s, hq, d, device=DEVICE).to(dtype)

    def run(fn, t):
        t = t.detach().clone().requires_grad_(True)
        out = fn(t[:, :, :hq], t[:, :, hq:hq + hkv], t[:, :, hq + hkv:])
        return out, torch.autograd.grad(out, t, dout)[0]

    got = run(lambda q, k, v: lk.flash_attention(q, k, v, backend="triton"), qkv)
    ref = run(lambda q, k, v: reference.attention(q, k, v), qkv.float())
    eager = run(lambda q, k, v: reference.attention(q, k, v, upcast=False), qkv)
    assert_close(got[0], ref[0], eager[0], "out")
    assert_close(got[1], ref[1], eager[1], "dqkv")


def test_transposed_and_non_unit_last_stride():
    """(B, H, S, D).transpose(1, 2) views (seq stride D), and a last dimension that is not
    unit-stride (the launcher copies it): same results as contiguous inputs."""
    b, s, hq, hkv, d = 1, 29, 4, 2, 32
    q = torch.randn(b, hq, s, d, device=DEVICE).transpose(1, 2)
    k = torch.randn(b, hkv, s, d, device=DEVICE).transpose(1, 2)
    v = torch.randn(b, s, d, hkv, device=DEVICE).transpose(2, 3)
    assert v.stride(-1) != 1 and q.stride(1) == d
    out, lse = fa.flash_attention_fwd(q, k, v, True, 0.2)
    ref_out, ref_lse = fa.flash_attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(),
                                              True, 0.2)
    # same kernel and summation order; on a GPU the stride specialization may change tile
    # layouts (and so the order inside an fp32 dot), hence not bitwise there
    tol = 0.0 if not GPU else 1e-6
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, ref_lse, rtol=tol, atol=tol)
    check_backward(q, k, v, True, 0.2)


# ------------------------------------------------------------------------------ decode (split-KV)


def _decode_block_n(d: int) -> int:
    arch = torch.cuda.get_device_capability() if GPU else None
    return launch.attention_launch_settings("decode", d, arch, rows=1).block_n


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("b,sq,sk,hq,hkv,d,causal", [
    pytest.param(2, 1, 300, 8, 2, 64, True, id="q1-k300-h8/2"),
    pytest.param(1, 16, 70, 8, 1, 64, True, id="q16-k70-h8/1"),  # 128 packed rows
    pytest.param(1, 5, 97, 2, 2, 80, False, id="q5-k97-d80-full"),
])
def test_decode_splits(b, sq, sk, hq, hkv, d, causal, num_splits, dtype):
    """The split-KV path with forced split counts, guarded outputs; 8 splits of 300 keys
    leave the last split empty (asserted), which must merge as weight 0, not NaN."""
    q, k, v = qkv_inputs(b, sq, sk, hq, hkv, d, dtype)
    out, lse = Guarded((b, sq, hq, d), dtype), Guarded((b, hq, sq), torch.float32, True)
    fa.flash_attention_fwd(q, k, v, causal, d ** -0.5, decode=True, num_splits=num_splits,
                           out=out.view, lse=lse.view)
    out.check("out")
    lse.check("lse")
    check_forward(q, k, v, causal, d ** -0.5, out.view, lse.view)
    if sk == 300 and num_splits == 8:
        block_n = _decode_block_n(d)
        keys_per_split = math.ceil(math.ceil(sk / block_n) / num_splits) * block_n
        assert (num_splits - 1) * keys_per_split >= sk, "expected an empty last split"


def test_decode_rows_with_empty_splits():
    """Causal decode with 40 queries over 64 keys in 4 splits of 16: the first queries see no
    key of the later splits (per-row empty partials, lse = -inf) and must still be exact."""
    b, sq, sk, hq, hkv, d = 1, 40, 64, 2, 1, 32
    q, k, v = qkv_inputs(b, sq, sk, hq, hkv, d, torch.float32)
    cfg = launch.AttentionLaunch(16, 16, 4, 2)
    out, lse = fa.flash_attention_fwd(q, k, v, True, 0.2, decode=True, num_splits=4,
                                      settings={"decode": cfg})
    check_forward(q, k, v, True, 0.2, out, lse)


def test_decode_is_default_for_few_queries(monkeypatch):
    """Sq <= DECODE_MAX_SEQLEN_Q never launches the prefill kernel; more queries do."""

    class Forbidden:
        def __getitem__(self, grid):
            raise AssertionError("prefill kernel launched for a decode step")

    q, k, v = qkv_inputs(1, launch.DECODE_MAX_SEQLEN_Q, 40, 4, 2, 32, torch.float16,
                         poison=False)
    with monkeypatch.context() as m:
        m.setattr(fa, "_attn_fwd_kernel", Forbidden())
        out, lse = fa.flash_attention_fwd(q, k, v, True, 0.2)
    check_forward(q, k, v, True, 0.2, out, lse)
    q = torch.randn(1, launch.DECODE_MAX_SEQLEN_Q + 1, 4, 32, device=DEVICE)
    with monkeypatch.context() as m:
        m.setattr(fa, "_attn_fwd_kernel", Forbidden())
        with pytest.raises(AssertionError, match="prefill"):
            fa.flash_attention_fwd(q, k.float(), v.float(), True, 0.2)


def test_num_splits_heuristic():
    # a grid that already fills the GPU: no split
    assert launch.num_splits_heuristic(n_programs=1000, n_key_blocks=64, num_sms=132) == 1
    # one program per (batch, kv head): splits until the SMs are busy, never past the blocks
    s = launch.num_splits_heuristic(n_programs=32, n_key_blocks=64, num_sms=132)
    assert 2 <= s <= 64
    assert 32 * s >= 0.8 * 132, "the split grid should cover most of the SMs"
    assert launch.num_splits_heuristic(n_programs=1, n_key_blocks=3, num_sms=132) <= 3
    assert launch.num_splits_heuristic(n_programs=1, n_key_blocks=1, num_sms=132) == 1
    for n_programs in (1, 4, 32, 100):
        for blocks in (1, 7, 64, 1000):
            s = launch.num_splits_heuristic(n_programs, blocks, 132)
            assert 1 <= s <= min(launch.MAX_SPLITS, blocks)


# ------------------------------------------------------------------------------ settings


@pytest.mark.parametrize("arch", [None, (8, 0), (8, 6), (9, 0)], ids=str)
def test_attention_launch_settings(arch):
    for d in (16, 40, 64, 80, 96, 128, 256):
        for kernel in launch.KERNELS:
            cfg = launch.attention_launch_settings(kernel, d, arch, rows=4)
            if kernel in ("fwd", "decode", "bwd_dkdv", "bwd_dq"):
                for block in (cfg.block_m, cfg.block_n):
                    assert block >= 16 and block & (block - 1) == 0, (kernel, d, cfg)
            assert cfg.num_warps in (1, 2, 4, 8) and cfg.num_stages >= 1
            fp32 = launch.attention_launch_settings(kernel, d, arch, rows=4, elem_bytes=4)
            assert fp32.block_m <= cfg.block_m and fp32.block_n <= cfg.block_n
            assert fp32.num_stages <= cfg.num_stages
    if arch == (8, 0):  # FlashAttention-2's forward tile at d128 on an A100: 128 x 64
        assert launch.attention_launch_settings("fwd", 128, arch)[:2] == (128, 64)
    with pytest.raises(ValueError, match="kernel"):
        launch.attention_launch_settings("nope", 64, arch)


def test_launch_settings_module_is_self_contained():
    """attention_launch.py imports nothing of this package (the standard library, torch and triton
    only): its rules and the tuned table it reads can change without touching the kernels or the
    launchers."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(launch))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    allowed = {"__future__", "functools", "json", "math", "os", "typing", "torch", "triton"}
    assert imported <= allowed, imported


def test_aot_cases_follow_attention_launch_settings():
    names = {c.name for c in fa.AOT_CASES}
    assert len(names) == len(fa.AOT_CASES) == len(fa.AOT_CASE_ARCH)
    for c in fa.AOT_CASES:
        arch = fa.AOT_CASE_ARCH[c.name]
        kernel = {"_attn_fwd_kernel": "fwd", "_attn_bwd_dkdv_kernel": "bwd_dkdv",
                  "_attn_bwd_dq_kernel": "bwd_dq",
                  "_attn_bwd_blocked_kernel": "bwd_blocked"}.get(c.fn.__name__)
        if kernel:
            cfg = launch.attention_launch_settings(kernel, c.constexprs["HEAD_DIM"],
                                                   (arch // 10, arch % 10))
            assert (c.constexprs["BLOCK_M"], c.constexprs["BLOCK_N"], c.num_warps,
                    c.num_stages) == tuple(cfg), c.name
    for word in ("attn_fwd_causal", "attn_decode", "attn_combine", "attn_bwd_dkdv",
                 "attn_bwd_dq", "attn_bwd_preprocess", "attn_bwd_blocked_causal",
                 "attn_bwd_blocked "):
        for tag in ("d64 fp16 sm_80", "d128 bf16 sm_90"):
            assert any(n.startswith(word) and n.endswith(tag) for n in names), (word, tag)


def test_bad_inputs():
    q = torch.randn(1, 8, 4, 32, device=DEVICE)
    k = torch.randn(1, 8, 3, 32, device=DEVICE)
    with pytest.raises(ValueError, match="kv heads"):
        fa.flash_attention_fwd(q, k, k, True, 0.1)
    with pytest.raises(ValueError, match="seqlen"):
        fa.flash_attention_fwd(q, q[:, :4], q[:, :4], True, 0.1)
    with pytest.raises(ValueError, match="head_dim"):
        big = torch.randn(1, 2, 1, 264, device=DEVICE)
        fa.flash_attention_fwd(big, big, big, False, 0.1)
    with pytest.raises(ValueError, match="out"):
        fa.flash_attention_fwd(q, q, q, True, 0.1, out=torch.empty(1, 8, 4, 31))
    with pytest.raises(ValueError, match="settings"):
        fa.flash_attention_fwd(q, q, q, True, 0.1,
                               settings={"forward": launch.AttentionLaunch(16, 16, 1, 1)})
    with pytest.raises(ValueError, match="settings"):
        fa.flash_attention_bwd(q, q, q, q, q, torch.zeros(1, 4, 8), True, 0.1,
                               settings={"bwd_dq": (16, 16, 1, 1)})
    with pytest.raises(ValueError, match="num_splits"):
        fa.flash_attention_fwd(q[:, :1], q, q, True, 0.1, decode=True, num_splits=0)


# ------------------------------------------------------------------------------ opcheck/compile


def _op_inputs(dtype=torch.float32):
    b, s, hq, hkv, d = 1, 5, 4, 2, 16
    q = torch.randn(b, s, hq, d, device=DEVICE, dtype=dtype)
    k = torch.randn(b, s + 2, hkv, d, device=DEVICE, dtype=dtype)
    v = torch.randn(b, s + 2, hkv, d, device=DEVICE, dtype=dtype)
    return q, k, v


def test_opcheck_fwd():
    q, k, v = (t.requires_grad_(True) for t in _op_inputs())
    torch.library.opcheck(torch.ops.llama_kernels.flash_attention_fwd,
                          (q, k, v, True, 0.25, "triton"))


def test_opcheck_bwd():
    q, k, v = _op_inputs()
    out, lse = fa.flash_attention_fwd(q, k, v, True, 0.25)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.llama_kernels.flash_attention_bwd,
                          (dout, q, k, v, out, lse, True, 0.25, "triton"))


def test_compile_fullgraph():
    """An attention block (qkv projection, GQA flash attention, output projection) compiled
    with fullgraph=True: no graph break, and the eager results and gradients."""
    torch._dynamo.reset()
    dim, hq, hkv, d = 64, 4, 2, 16

    def block(x, wqkv, wo):
        b, s, _ = x.shape
        qkv = (x @ wqkv).view(b, s, hq + 2 * hkv, d)  # (B, S, Hq + 2 Hkv, D)
        q, k, v = qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]
        o = lk.flash_attention(q, k, v, causal=True, backend="triton")  # (B, S, Hq, D)
        return o.reshape(b, s, hq * d) @ wo

    inputs = [torch.randn(2, 19, dim, device=DEVICE),
              torch.randn(dim, (hq + 2 * hkv) * d, device=DEVICE) * dim ** -0.5,
              torch.randn(hq * d, dim, device=DEVICE) * dim ** -0.5]
    dout = torch.randn(2, 19, dim, device=DEVICE)

    def run(fn):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        out = fn(*leaves)
        return (out, *torch.autograd.grad(out, leaves, dout))

    compiled = torch.compile(block, backend="aot_eager" if not GPU else "inductor",
                             fullgraph=True)
    for a, b in zip(run(compiled), run(block)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ ahead of time

# Run in a fresh process WITHOUT TRITON_INTERPRET (this one interprets: its @triton.jit
# functions cannot be compiled). Each case of AOT_CASES is compiled for its own arch; the PTX is
# searched for tensor-core instructions (recompiling hits Triton's cache).
_AOT_SCRIPT = r"""
import concurrent.futures, json, os, sys
import triton
from triton.backends.compiler import GPUTarget
from llama_kernels.triton import _aot
from llama_kernels.triton import flash_attention as fa

def one(i):
    c = fa.AOT_CASES[i]
    arch = fa.AOT_CASE_ARCH[c.name]
    r = _aot.compile_case(c, arch)
    ptx = triton.compile(_aot._source(c), target=GPUTarget("cuda", arch, 32),
                         options={"num_warps": c.num_warps, "num_stages": c.num_stages}).asm["ptx"]
    r["wgmma"] = "wgmma.mma_async" in ptx
    r["mma_sync"] = "mma.sync" in ptx
    return r

with concurrent.futures.ProcessPoolExecutor(os.cpu_count()) as pool:
    print(json.dumps(list(pool.map(one, range(len(fa.AOT_CASES))))))
"""

# Dynamic shared memory a block may use: 163 KB on A100 (sm_80), 227 KB on H100 (sm_90).
SHARED_LIMIT = {"sm_80": 166912, "sm_90": 232448}
DOT_KERNELS = ("_attn_fwd_kernel", "_attn_fwd_splitkv_kernel", "_attn_bwd_dkdv_kernel",
               "_attn_bwd_dq_kernel", "_attn_bwd_blocked_kernel")


@pytest.fixture(scope="module")
def aot_results():
    from llama_kernels.triton import _aot

    why = _aot.tools_missing()
    if why:
        pytest.skip(f"cannot compile ahead of time: {why}")
    proc = run_compiler_script(_AOT_SCRIPT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_aot_no_spills_and_tensor_cores(aot_results):
    """Every kernel at the settings it runs with on sm_80 / sm_90 (d64, d128, fp16, bf16):
    zero register spills, shared memory within the arch's limit, and every kernel with a
    tl.dot on tensor cores (sm_90 prefill forward: wgmma; sm_80: mma.sync)."""
    assert len(aot_results) == len(fa.AOT_CASES)
    lines = [f"{'case':40} {'warps':>5} {'stages':>6} {'regs':>4} {'spill':>5} {'shared':>7} "
             "mma"]
    for r in aot_results:
        mma = "wgmma" if r["wgmma"] else "mma.sync" if r["mma_sync"] else "-"
        lines.append(f"{r['name']:40} {r['num_warps']:5d} {r['num_stages']:6d} "
                     f"{r['registers']:4d} {r['spill_stores'] + r['spill_loads']:5d} "
                     f"{r['shared']:7d} {mma}")
    table = "\n".join(lines)
    print(table)
    for r in aot_results:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{r['name']} spills\n{table}"
        assert 0 < r["shared"] <= SHARED_LIMIT[r["arch"]], f"{r['name']} shared\n{table}"
        if r["kernel"] in DOT_KERNELS:
            assert r["wgmma"] or r["mma_sync"], f"{r['name']}: no tensor cores\n{table}"
        if r["kernel"] == "_attn_fwd_kernel" and r["arch"] == "sm_90":
            assert r["wgmma"], f"{r['name']}: sm_90 forward without wgmma\n{table}"
