"""Attention never stores the (Sq x Sk) score matrix, and the sm_90 build is on Hopper's matrix
instructions: HGMMA in the SASS of the Triton forward compiled ahead of time."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import llama_kernels as lk
from helpers import DEVICE, GPU, backend_params, run_compiler_script


class AllocationRecorder(TorchDispatchMode):
    """Sums the elements of every new tensor an aten op returns: outputs that alias an input
    (views, in-place ops, ``set_``: an ``(a)`` annotation in the op's schema) are not new."""

    def __init__(self):
        super().__init__()
        self.elements = 0
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for t, ret in zip(outs, func._schema.returns):
            if isinstance(t, torch.Tensor) and ret.alias_info is None:
                self.elements += t.numel()
                self.largest = max(self.largest, t.numel())
        return out


KERNEL_BACKENDS = backend_params(kernels_only=True)


def _recorded_forward(fn, seqlen):
    b, h, d = 1, 2, 16
    q, k, v = (torch.randn(b, seqlen, h, d, device=DEVICE, dtype=torch.float16)
               for _ in range(3))
    rec = AllocationRecorder()
    with rec:
        out = fn(q, k, v)
    return rec, q, out


def _triton_forward(q, k, v):
    """The Triton launcher itself (a registered op would hide its allocations from the mode)."""
    from llama_kernels.triton import flash_attention as fa

    return fa.flash_attention_fwd(q, k, v, True, q.shape[-1] ** -0.5)[0]


@pytest.mark.parametrize("seqlen", [256, 512])
def test_triton_forward_allocates_linear_memory(seqlen):
    """What the Triton forward allocates (output, log-sum-exp, split-KV partials) grows with S,
    not S^2: at head_dim 16 and S = 256 the score matrix alone is 16x the output."""
    if lk.available_backends()["triton"] is not None:
        pytest.skip(f"triton: {lk.available_backends()['triton']}")
    rec, q, out = _recorded_forward(_triton_forward, seqlen)
    b, s, h, _ = q.shape
    scores, linear = b * h * s * s, q.numel() + b * h * s  # out and lse
    assert rec.largest < scores / 4, (rec.largest, scores)
    assert rec.elements <= 4 * linear, (rec.elements, linear)
    assert torch.isfinite(out).all()


def test_recorder_sees_a_materialized_score_matrix():
    """The check above can fail: the reference, which materializes the scores, trips it."""
    from llama_kernels import reference

    rec, q, _ = _recorded_forward(lambda q, k, v: reference.attention(q, k, v), 256)
    b, s, h, _ = q.shape
    assert rec.largest >= b * h * s * s


@pytest.mark.skipif(not GPU, reason="peak device memory needs a CUDA GPU")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_forward_peak_memory_on_gpu(backend):
    b, s, h, d = 1, 8192, 8, 128
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    try:
        lk.flash_attention(q[:, :1], k[:, :1], v[:, :1], backend=backend)
    except (RuntimeError, ValueError) as e:
        pytest.skip(str(e))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = lk.flash_attention(q, k, v, backend=backend)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    scores_bytes = b * h * s * s * 2
    assert extra <= 4 * out.numel() * out.element_size(), extra  # out + lse + slack
    assert extra < scores_bytes / 32


_SASS_SCRIPT = r"""
import os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from llama_kernels.triton import _aot
from llama_kernels.triton import flash_attention as fa

for c in fa.AOT_CASES:
    if c.name.startswith("attn_fwd_causal d128 bf16") and fa.AOT_CASE_ARCH[c.name] == 90:
        break
else:
    sys.exit("no sm_90 d128 bf16 causal forward in AOT_CASES")
k = triton.compile(_aot._source(c), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": c.num_warps, "num_stages": c.num_stages})
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "k.cubin")
    open(path, "wb").write(k.asm["cubin"])
    sass = subprocess.run([_aot._nvidia_bin("cuobjdump"), "--dump-sass", path],
                          capture_output=True, text=True, check=True).stdout
print(sum(line.count("HGMMA") for line in sass.splitlines()), len(sass))
"""


def test_sm90_forward_uses_hgmma():
    from llama_kernels.triton import _aot

    why = _aot.tools_missing()
    if why:
        pytest.skip(f"cannot compile ahead of time: {why}")
    proc = run_compiler_script(_SASS_SCRIPT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hgmma, sass_chars = map(int, proc.stdout.split()[-2:])
    assert sass_chars > 1000, "empty SASS"
    assert hgmma > 0, "the sm_90 attention forward has no HGMMA instructions"
