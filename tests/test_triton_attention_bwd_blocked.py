"""The backward's blocked structure (llama_kernels/triton/attention_bwd_blocked.py: one kernel,
each program dK/dV of a key block then dQ of a query block, the causal diagonal in masked
sub-blocks), selected with flash_attention_bwd(structure="blocked") or a bwd_blocked entry of
the launch settings or tuned table.

Under the interpreter its tiles are attention_launch_settings("bwd_blocked", arch=None)'s 16
streamed x 32 resident (diagonal sub-blocks of 16), or the overrides below (32 x 64: sub-blocks
of 16 inside 32-row steps), so short sequences cover several key and query blocks, ragged ends
(Sq, Sk not multiples of the blocks), the diagonal sub-blocks and GQA groups. Tolerance as in
tests/test_triton_attention.py (helpers.assert_close: twice eager's error in the test dtype
against the fp32 reference). The no-spill check of its AOT cases is
tests/test_triton_attention.py's test_aot_no_spills_and_tensor_cores (they are in
flash_attention.AOT_CASES).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1 (tests/conftest.py)",
                allow_module_level=True)

from llama_kernels import reference  # noqa: E402
from llama_kernels.triton import attention_launch as launch  # noqa: E402
from llama_kernels.triton import flash_attention as fa  # noqa: E402
from helpers import (DEVICE, DTYPES, Guarded, assert_close, attention_grads,  # noqa: E402
                     qkv_inputs)

DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def blocked_grads(dout, q, k, v, causal, scale, settings=None, **kwargs):
    out, lse = fa.flash_attention_fwd(q, k, v, causal, scale)
    return fa.flash_attention_bwd(dout, q, k, v, out, lse, causal, scale, settings=settings,
                                  structure="blocked", **kwargs)


# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal)
CASES = [
    pytest.param(1, 45, 45, 4, 2, 32, True, id="s45-h4/2"),
    pytest.param(1, 37, 70, 4, 1, 64, True, id="q37-k70-h4/1"),
    pytest.param(2, 33, 50, 2, 2, 40, False, id="q33-k50-d40-full"),
    pytest.param(1, 70, 33, 8, 1, 32, False, id="q70-k33-h8/1-full"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("b,sq,sk,hq,hkv,d,causal", CASES)
def test_blocked_backward_matches_reference(b, sq, sk, hq, hkv, d, causal, dtype):
    """dq, dk, dv of the blocked structure against the fp32 reference, within twice eager's
    error in the test dtype."""
    q, k, v = qkv_inputs(b, sq, sk, hq, hkv, d, dtype, poison=False)
    scale = d ** -0.5
    dout = torch.randn(q.shape, device=DEVICE).to(dtype)
    got = blocked_grads(dout, q, k, v, causal, scale)
    ref = attention_grads(lambda *t: reference.attention(*t, causal=causal, softmax_scale=scale),
                          q.float(), k.float(), v.float(), dout.float())[1:]
    eager = attention_grads(
        lambda *t: reference.attention(*t, causal=causal, softmax_scale=scale, upcast=False),
        q, k, v, dout)[1:]
    for name, g, r, e in zip(("dq", "dk", "dv"), got, ref, eager):
        assert g.is_contiguous() and g.dtype == dtype, name
        assert_close(g, r, e, name)


@pytest.mark.parametrize("block_m,block_n", [(32, 64), (16, 64), (64, 16)])
def test_blocked_tile_shapes(block_m, block_n):
    """Other tiles than the interpreter default: 32-row streamed steps with 16-row diagonal
    sub-blocks, a resident side 4x the streamed one and the reverse; fp32 against the reference
    at 1e-5, and equal to the split structure within the same."""
    settings = {"bwd_blocked": launch.AttentionLaunch(block_m, block_n, 4, 2)}
    q, k, v = qkv_inputs(1, 70, 91, 4, 2, 32, torch.float32, poison=False)
    scale = 0.2
    dout = torch.randn(q.shape, device=DEVICE)
    out, lse = fa.flash_attention_fwd(q, k, v, True, scale)
    got = fa.flash_attention_bwd(dout, q, k, v, out, lse, True, scale, settings=settings)
    split = fa.flash_attention_bwd(dout, q, k, v, out, lse, True, scale, structure="split")
    ref = reference.attention_backward(dout, q, k, v, out, lse, causal=True, softmax_scale=scale)
    for name, g, s, r in zip(("dq", "dk", "dv"), got, split, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(g, s, rtol=1e-5, atol=1e-5, msg=name)


def test_blocked_writes_only_its_outputs():
    """NaN-padded inputs (a missing load mask reads NaN) and guarded output buffers (a stray
    store shows): exactly dq, dk, dv, and finite."""
    b, sq, sk, hq, hkv, d, causal = 2, 33, 50, 4, 2, 40, True
    dtype = torch.float16
    q, k, v = qkv_inputs(b, sq, sk, hq, hkv, d, dtype)
    dout = torch.randn(q.shape, device=DEVICE).to(dtype)
    grads = [Guarded(t.shape, dtype) for t in (q, k, v)]
    blocked_grads(dout, q, k, v, causal, d ** -0.5, dq=grads[0].view, dk=grads[1].view,
                  dv=grads[2].view)
    out, lse = fa.flash_attention_fwd(q, k, v, causal, d ** -0.5)
    ref = reference.attention_backward(dout.float(), q.float(), k.float(), v.float(),
                                       out.float(), lse, causal=causal, softmax_scale=d ** -0.5)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref):
        g.check(name)
        assert torch.isfinite(g.view).all(), name
        torch.testing.assert_close(g.view.float(), r, rtol=1e-2, atol=1e-2 * r.abs().max().item())


def test_blocked_deterministic():
    """No atomics: two blocked backward passes are bitwise equal (GQA group of 4)."""
    q, k, v = qkv_inputs(1, 61, 61, 4, 1, 32, torch.float16, poison=False)
    dout = torch.randn(q.shape, device=DEVICE, dtype=torch.float16)
    first = blocked_grads(dout, q, k, v, True, 0.125)
    second = blocked_grads(dout, q, k, v, True, 0.125)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


class _Recorder:
    """Stands in for a kernel: records that it was launched, then launches the real one."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_structure_selection(monkeypatch):
    """The split kernels by default (no tuned bwd_blocked entry; the interpreter never has
    one); the blocked kernel for structure="blocked", for a bwd_blocked settings override, and
    where attention_bwd_structure says so unless a split kernel's settings are given; a bad
    name is refused."""
    q, k, v = qkv_inputs(1, 20, 20, 2, 1, 16, torch.float32, poison=False)
    out, lse = fa.flash_attention_fwd(q, k, v, True, 0.25)
    dout = torch.randn_like(out)
    assert launch.attention_bwd_structure(16, None) == "split"

    def launched(**kwargs):
        with monkeypatch.context() as m:
            blocked = _Recorder(fa._attn_bwd_blocked_kernel)
            dkdv = _Recorder(fa._attn_bwd_dkdv_kernel)
            m.setattr(fa, "_attn_bwd_blocked_kernel", blocked)
            m.setattr(fa, "_attn_bwd_dkdv_kernel", dkdv)
            for name, value in kwargs.pop("patch", {}).items():
                m.setattr(fa, name, value)
            fa.flash_attention_bwd(dout, q, k, v, out, lse, True, 0.25, **kwargs)
        assert bool(blocked.grids) != bool(dkdv.grids)
        return "blocked" if blocked.grids else "split"

    assert launched() == "split"
    assert launched(structure="blocked") == "blocked"
    assert launched(settings={"bwd_blocked": launch.AttentionLaunch(16, 32, 1, 1)}) == "blocked"
    blocked_rule = {"attention_bwd_structure": lambda *a, **kw: "blocked"}
    assert launched(patch=blocked_rule) == "blocked"
    # a split kernel's settings override times the split structure even where blocked rules
    assert launched(patch=blocked_rule,
                    settings={"bwd_dq": launch.AttentionLaunch(32, 16, 1, 1)}) == "split"
    with pytest.raises(ValueError, match="structure"):
        fa.flash_attention_bwd(dout, q, k, v, out, lse, True, 0.25, structure="fused")


def test_tuned_blocked_entry_selects_the_structure(tmp_path, monkeypatch):
    """A bwd_blocked winner in the tuned table makes that capability and head_dim blocked, for
    16-bit inputs only; other capabilities and head dims stay split."""
    path = tmp_path / "attention_tuned.json"
    path.write_text('{"9.0": {"128": {"bwd_blocked": [16, 128, 8, 3]}}}')
    monkeypatch.setattr(launch, "TUNED_PATH", str(path))
    launch.tuned_table.cache_clear()
    try:
        assert launch.attention_bwd_structure(128, (9, 0)) == "blocked"
        assert launch.attention_bwd_structure(128, (9, 0), elem_bytes=4) == "split"
        assert launch.attention_bwd_structure(64, (9, 0)) == "split"
        assert launch.attention_bwd_structure(128, (8, 0)) == "split"
        assert launch.attention_launch_settings("bwd_blocked", 128, (9, 0)) == \
            launch.AttentionLaunch(16, 128, 8, 3)
    finally:
        launch.tuned_table.cache_clear()
    assert launch.attention_bwd_structure(128, (9, 0)) in launch.BWD_STRUCTURES
