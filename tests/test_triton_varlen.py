"""The Triton packed-sequence (varlen) attention: llama_kernels/triton/flash_attention_varlen.py's
launchers and the VARLEN twins of the forward and backward kernels (attention_fwd.py,
attention_bwd.py), directly and through lk.flash_attention_varlen(backend="triton"): outputs,
lse and gradients against the reference, ragged, empty and one-row sequences, sequences with
more queries than keys, GQA, guarded outputs, agreement with the dense kernel, determinism,
opcheck and torch.compile, and an ahead-of-time compile for sm_80 / sm_90.

Kernels run on CPU tensors under TRITON_INTERPRET=1 where there is no GPU (conftest.py), about
1 ms per program instance: small shapes, with the interpreter's 16/32-wide tiles
(attention_launch_settings(..., arch=None)), so the lengths below span several query and key
blocks, ragged ends and diagonal tiles.

Tolerance: llama_kernels.testing.check_fwd_bwd (twice eager's error in the dtype plus a floor)
with attention's terms of the rule computed per sequence (_varlen_terms): the terms bound
roundings of a flash kernel that eager's materialized softmax has not (P rounded before P V,
the backward's delta from the saved output, dP - delta cancelling), and they are functions of
one sequence's q, k, v, so the packed bound is the largest over the sequences.
"""

from __future__ import annotations

import importlib
import json
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
from llama_kernels.testing import (ToleranceTerms, attention_tolerance_terms,  # noqa: E402
                                   check_fwd_bwd)
from llama_kernels.triton import attention_launch as launch  # noqa: E402
from llama_kernels.triton import flash_attention as fa  # noqa: E402
from llama_kernels.triton import flash_attention_varlen as fv  # noqa: E402
from helpers import DEVICE, GPU, Guarded, poisoned, run_compiler_script  # noqa: E402

# The module (the package's attribute of this name is the function).
ops_varlen = importlib.import_module("llama_kernels.ops.flash_attention_varlen")

DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# (lengths_q, lengths_k, Hq, Hkv, head_dim). Interpreter tiles: forward and dQ 32 queries x 16
# keys, dK/dV 32 keys x 16 queries, so 37 and 70 rows run past a block on every kernel.
CASES = [
    # packed self-attention: an empty sequence, a one-row one, one past a block; GQA 4
    pytest.param([0, 1, 37, 5], [0, 1, 37, 5], 4, 1, 64, id="self-h4/1-d64"),
    # Sq != Sk per sequence: fewer queries than keys, more (9 > 4: five causal rows see nothing),
    # queries over an empty key sequence, keys under an empty query sequence; GQA 2, odd D
    pytest.param([3, 9, 1, 0, 33], [20, 4, 0, 6, 40], 2, 1, 40, id="ragged-h2/1-d40"),
    # 40 queries over 3 keys: a whole query block of causal rows that see nothing; no GQA
    pytest.param([40, 0, 2, 17], [3, 6, 2, 34], 2, 2, 16, id="blind-h2/2-d16"),
]

def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,
                        device=DEVICE)


def _packed(lengths_q, lengths_k, hq, hkv, d, dtype, poison=True):
    """q, k, v (inside NaN padding unless poison=False), cu_seqlens_q, cu_seqlens_k."""
    make = (lambda s: poisoned(s, dtype)) if poison else (
        lambda s: torch.randn(s, device=DEVICE).to(dtype))
    tq, tk = sum(lengths_q), sum(lengths_k)
    return (make((tq, hq, d)), make((tk, hkv, d)), make((tk, hkv, d)), _cu(lengths_q),
            _cu(lengths_k))


def _rows(lengths):
    starts = [0] + torch.tensor(lengths).cumsum(0).tolist()
    return [slice(a, b) for a, b in zip(starts, starts[1:])]


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


# ------------------------------------------------------------------------------ reference


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPES.get)
@pytest.mark.parametrize("lengths_q,lengths_k,hq,hkv,d", CASES)
def test_varlen_matches_reference(lengths_q, lengths_k, hq, hkv, d, dtype, causal):
    """out, dq, dk, dv through the op (autograd) against the reference, NaN-padded inputs."""
    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, hq, hkv, d, dtype)
    scale = 0.3 if d == 40 else None
    check_fwd_bwd(
        lambda a, b, c: lk.flash_attention_varlen(a, b, c, cu_q, cu_k, max(lengths_q),
                                                  max(lengths_k), causal=causal,
                                                  softmax_scale=scale, backend="triton"),
        lambda a, b, c, upcast: reference.attention_varlen(
            a, b, c, cu_q, cu_k, causal=causal, softmax_scale=scale, upcast=upcast),
        [q, k, v], terms=_varlen_terms(lengths_q, lengths_k, causal, scale or d ** -0.5))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("lengths_q,lengths_k,hq,hkv,d", CASES)
def test_varlen_launchers_write_exactly_their_outputs(lengths_q, lengths_k, hq, hkv, d, causal):
    """The launchers on NaN-padded inputs write every element of out, lse, dq, dk, dv and
    nothing around them (guarded buffers); lse is the reference's (-inf exactly where a query
    sees no key, and there out = 0, dq = 0); a second backward is bitwise the first."""
    dtype = torch.float16
    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, hq, hkv, d, dtype)
    lens = (cu_q, cu_k, max(lengths_q), max(lengths_k), causal, 0.25)
    out, lse = Guarded(q.shape, dtype), Guarded((hq, q.shape[0]), torch.float32, True)
    fv.flash_attention_varlen_fwd(q, k, v, *lens, out=out.view, lse=lse.view)
    lse.view.masked_fill_(torch.isneginf(lse.view), -1e30)  # Guarded.check wants finite
    out.check("out")
    lse.check("lse")
    ref_out, ref_lse = reference.attention_varlen_with_lse(q, k, v, cu_q, cu_k, causal=causal,
                                                           softmax_scale=0.25)
    blind = torch.isneginf(ref_lse)
    assert torch.equal(lse.view == -1e30, blind), "lse -inf exactly where a query sees no key"
    torch.testing.assert_close(lse.view[~blind], ref_lse[~blind], rtol=0, atol=2e-3)
    torch.testing.assert_close(out.view.float(), ref_out.float(), rtol=0, atol=1e-2)
    assert (out.view.transpose(0, 1)[blind] == 0).all()

    lse_t = lse.view.masked_fill(blind, float("-inf"))
    dout = poisoned(q.shape, dtype)
    grads = [Guarded(t.shape, dtype) for t in (q, k, v)]
    fv.flash_attention_varlen_bwd(dout, q, k, v, out.view, lse_t, *lens, dq=grads[0].view,
                                  dk=grads[1].view, dv=grads[2].view)
    ref = reference.attention_varlen_backward(dout.float(), q.float(), k.float(), v.float(),
                                              out.view.float(), lse_t, cu_q, cu_k,
                                              causal=causal, softmax_scale=0.25)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref):
        g.check(name)
        torch.testing.assert_close(g.view.float(), r, rtol=1e-2,
                                   atol=1e-2 * max(1.0, r.abs().max().item()), msg=name)
    assert (grads[0].view.transpose(0, 1)[blind] == 0).all(), "blind queries get dq = 0"
    again = fv.flash_attention_varlen_bwd(dout, q, k, v, out.view, lse_t, *lens)
    for name, g, a in zip(("dq", "dk", "dv"), grads, again):
        assert torch.equal(g.view, a), f"{name}: backward not deterministic"


@pytest.mark.parametrize("block_m,block_n", [(16, 64), (64, 16)])
def test_varlen_tile_shapes(block_m, block_n):
    """Other tiles than the interpreter default, with blind causal rows and ragged ends: the
    varlen loop bounds (negative diagonals included) do not assume the default tiles."""
    cfg = launch.AttentionLaunch(block_m, block_n, 4, 2)
    settings = {"fwd": cfg, "bwd_dkdv": cfg, "bwd_dq": cfg}
    lengths_q, lengths_k = [70, 3, 20], [5, 30, 91]
    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, 2, 1, 32, torch.float32)
    lens = (cu_q, cu_k, 70, 91, True, 0.2)
    out, lse = fv.flash_attention_varlen_fwd(q, k, v, *lens, settings=settings)
    ref_out, ref_lse = reference.attention_varlen_with_lse(q, k, v, cu_q, cu_k,
                                                           softmax_scale=0.2)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    dout = torch.randn(q.shape, device=DEVICE)
    got = fv.flash_attention_varlen_bwd(dout, q, k, v, out, lse, *lens, settings=settings)
    ref = reference.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k,
                                              softmax_scale=0.2)
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("sq,sk,causal", [(33, 33, True), (20, 45, True), (33, 18, False)])
def test_equal_lengths_are_the_dense_kernel(sq, sk, causal):
    """B sequences of equal lengths packed are a dense batch: the same programs (VARLEN only
    changes where a sequence starts), so out, lse and the gradients are the dense kernels'
    (bitwise under the interpreter; on a GPU the stride specialization may change tile layouts
    and so the order inside a dot)."""
    b, hq, hkv, d = 2, 2, 1, 32
    q = torch.randn(b, sq, hq, d, device=DEVICE, dtype=torch.float16)
    k, v = (torch.randn(b, sk, hkv, d, device=DEVICE, dtype=torch.float16) for _ in range(2))
    dout = torch.randn(q.shape, device=DEVICE, dtype=torch.float16)
    dense = fa.flash_attention_fwd(q, k, v, causal, 0.2, decode=False)
    dense_grads = fa.flash_attention_bwd(dout, q, k, v, *dense, causal, 0.2)
    flat = [t.flatten(0, 1) for t in (q, k, v)]
    lens = (_cu([sq] * b), _cu([sk] * b), sq, sk, causal, 0.2)
    out, lse = fv.flash_attention_varlen_fwd(*flat, *lens)
    grads = fv.flash_attention_varlen_bwd(dout.flatten(0, 1), *flat, out, lse, *lens)
    tol = 1e-3 if GPU else 0.0
    torch.testing.assert_close(out, dense[0].flatten(0, 1), rtol=tol, atol=tol)
    torch.testing.assert_close(lse, dense[1].transpose(0, 1).flatten(1), rtol=tol, atol=tol)
    for name, g, want in zip(("dq", "dk", "dv"), grads, dense_grads):
        torch.testing.assert_close(g, want.flatten(0, 1), rtol=tol, atol=tol, msg=name)


# ------------------------------------------------------------------------------ edges, op


def test_nothing_to_attend():
    """No sequence at all, or every sequence empty on one side: no launch fails, outputs have
    their shapes, queries without keys get out 0, lse -inf and dq 0, keys without queries dk,
    dv 0. The op (which refuses empty tensors) likewise, through autograd."""
    for lengths_q, lengths_k in (([], []), ([0, 0], [0, 0]), ([3, 2], [0, 0]), ([0], [4]),
                                 ([3, 0], [0, 4])):
        q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, 2, 1, 16, torch.float32)
        lens = (cu_q, cu_k, max(lengths_q, default=0), max(lengths_k, default=0), True, 0.3)
        out, lse = fv.flash_attention_varlen_fwd(q, k, v, *lens)
        assert out.shape == q.shape and (out == 0).all() and torch.isneginf(lse).all()
        grads = fv.flash_attention_varlen_bwd(torch.randn_like(out), q, k, v, out, lse, *lens)
        for g, t in zip(grads, (q, k, v)):
            assert g.shape == t.shape and (g == 0).all()
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = lk.flash_attention_varlen(*leaves, cu_q, cu_k, 3, 4, backend="triton")
    grads = torch.autograd.grad(out, leaves, torch.randn_like(out))
    assert (out == 0).all() and all((g == 0).all() for g in grads)


def test_auto_and_dispatch():
    """triton is a kernel backend of the op: auto runs it on a GPU (torch on a CPU), and a
    head_dim past the kernels' limit is refused by name and passed over by auto."""
    assert "triton" in ops_varlen.KERNEL_BACKENDS
    q, k, v, cu_q, cu_k = _packed([3, 5], [4, 5], 4, 2, 8, torch.float32, poison=False)
    with pytest.raises(ValueError, match="head_dim 264"):
        big = torch.randn(8, 1, 264, device=DEVICE)
        lk.flash_attention_varlen(big, big, big, _cu([8]), _cu([8]), 8, 8, backend="triton")
    got = lk.flash_attention_varlen(q, k, v, cu_q, cu_k, 5, 5, backend="triton")
    torch.testing.assert_close(got, lk.flash_attention_varlen(q, k, v, cu_q, cu_k, 5, 5,
                                                              backend="torch"))


def test_opcheck_and_compile():
    q, k, v, cu_q, cu_k = _packed([3, 5], [4, 7], 4, 2, 16, torch.float32, poison=False)
    torch.library.opcheck(ops_varlen.flash_attention_varlen_fwd,
                          (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu_q,
                           cu_k, 5, 7, True, 0.3, "triton"))
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = fv.flash_attention_varlen_fwd(q, k, v, cu_q, cu_k, 5, 7, True, 0.3)
    torch.library.opcheck(ops_varlen.flash_attention_varlen_bwd,
                          (torch.randn_like(out), q, k, v, out, lse, cu_q, cu_k, 5, 7, True,
                           0.3, "triton"))
    torch._dynamo.reset()

    def packed(q, k, v):
        return lk.flash_attention_varlen(q, k, v, cu_q, cu_k, 5, 7, backend="triton") * 2

    compiled = torch.compile(packed, fullgraph=True, backend="inductor" if GPU else "aot_eager")
    torch.testing.assert_close(compiled(q, k, v), packed(q, k, v))


def test_bad_launcher_inputs():
    q, k, v, cu_q, cu_k = _packed([3, 5], [4, 5], 4, 2, 8, torch.float32, poison=False)
    for args, text in [((q, k, v, cu_q.long(), cu_k), "cu_seqlens_q"),
                       ((q, k, v, cu_q, cu_k[:2]), "cu_seqlens_k"),
                       ((q, k[:, :1].expand(9, 3, 8), v[:, :1].expand(9, 3, 8), cu_q, cu_k),
                        "kv heads"),
                       ((q[None], k, v, cu_q, cu_k), "q: expected")]:
        with pytest.raises(ValueError, match=text):
            fv.flash_attention_varlen_fwd(*args, 5, 5, True, 0.1)
    with pytest.raises(ValueError, match="settings"):
        fv.flash_attention_varlen_fwd(q, k, v, cu_q, cu_k, 5, 5, True, 0.1,
                                      settings={"decode": launch.AttentionLaunch(16, 16, 1, 1)})


# ------------------------------------------------------------------------------ ahead of time

# Compiled in a fresh process WITHOUT TRITON_INTERPRET (this one interprets, and interpreted
# kernels cannot be compiled): each of fv.VARLEN_AOT_CASES for its own arch, two at a time;
# "mma" says whether its PTX has a tensor-core instruction.
_AOT_SCRIPT = r"""
import json
from concurrent.futures import ProcessPoolExecutor
import triton
from triton.backends.compiler import GPUTarget
from llama_kernels.triton import _aot
from llama_kernels.triton import flash_attention_varlen as fv

def compiled(index):  # an index: the kernels themselves do not pickle
    case = fv.VARLEN_AOT_CASES[index]
    arch = fv.VARLEN_AOT_CASE_ARCH[case.name]
    options = {"num_warps": case.num_warps, "num_stages": case.num_stages}
    ptx = triton.compile(_aot._source(case), target=GPUTarget("cuda", arch, 32),
                         options=options).asm["ptx"]
    return dict(_aot.compile_case(case, arch), mma="mma.sync" in ptx or "wgmma" in ptx)

if __name__ == "__main__":
    with ProcessPoolExecutor(2) as workers:
        print(json.dumps(list(workers.map(compiled, range(len(fv.VARLEN_AOT_CASES))))))
"""
# A block's dynamic shared memory: 163 KB on sm_80 (A100), 227 KB on sm_90 (H100).
SHARED_BYTES = {"sm_80": 166912, "sm_90": 232448}


def test_aot_varlen_no_spills():
    """The varlen kernels at the settings they run with on sm_80 / sm_90 (d64, d128, fp16,
    bf16): no register spills, shared memory within the arch's limit, tensor cores wherever
    there is a dot. Prints registers per case (-s)."""
    from llama_kernels.triton import _aot

    why = _aot.tools_missing()
    if why:
        pytest.skip(f"cannot compile ahead of time: {why}")
    proc = run_compiler_script(_AOT_SCRIPT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["name"] for r in results] == [c.name for c in fv.VARLEN_AOT_CASES]
    report = "\n".join(
        f"{r['name']:46} warps {r['num_warps']} stages {r['num_stages']} regs "
        f"{r['registers']:3d} spill {r['spill_stores'] + r['spill_loads']} smem {r['shared']}"
        for r in results)
    print(report)
    spilled = [r["name"] for r in results if r["spill_stores"] or r["spill_loads"]]
    too_big = [r["name"] for r in results if not 0 < r["shared"] <= SHARED_BYTES[r["arch"]]]
    scalar = [r["name"] for r in results if "preprocess" not in r["name"] and not r["mma"]]
    assert not spilled, f"register spills: {spilled}\n{report}"
    assert not too_big, f"shared memory past the limit: {too_big}\n{report}"
    assert not scalar, f"no tensor-core instruction: {scalar}\n{report}"
