"""Proofs about the built CUDA extension that need no GPU.

- every C++ schema ``llama_kernels::*_cuda`` has a CUDA kernel registered, and the cuda backend
  refuses CPU tensors with the contract's message;
- the compiled kernels (read back from the .so with cuobjdump, the copy in Triton's wheel or
  one on PATH) use no local memory: no register spills, no stack, on each of sm_80 and sm_90
  that the build holds;
- the SASS of the vectorized kernels (RMSNorm, SwiGLU, rotary, the cross-entropy chunk pass)
  holds 128-bit global loads;
- the flash-attention kernels run their products on tensor cores (HMMA.16816 with fp32
  accumulators), read their operands with ldmatrix (LDSM) and stage tiles with cp.async
  (LDGSTS), on both architectures.
Correctness against the reference is tests/test_ops.py's job (it runs every backend on a GPU).
The launch-settings heuristics are proven at build time by static_asserts in the kernel headers
(csrc/*_settings.cuh, csrc/*_kernels.cuh), which the emulator builds compile too.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import llama_kernels
from llama_kernels.ops import _backend

pytestmark = pytest.mark.skipif(
    _backend._EXTENSION is None,
    reason=f"the CUDA extension is not built: {_backend._EXTENSION_WHY_NOT}",
)

ARCHS = ("sm_80", "sm_90")
# Kernel families of the row/elementwise ops; each must be in the build for every arch.
FAMILIES = ("rms_norm_fwd_kernel", "rms_norm_bwd_kernel", "rms_norm_dw_kernel",
            "swiglu_fwd_kernel", "swiglu_bwd_kernel", "rotary_kernel", "flash_fwd_kernel",
            "flash_bwd_delta_kernel", "flash_bwd_dkdv_kernel", "flash_bwd_dq_kernel",
            "flash_decode_kernel", "flash_decode_combine_kernel", "kvcache_append_kernel",
            "cross_entropy_chunk_kernel")
# Attention kernels with tensor-core products: each of its 2 dtypes x 2 head dims.
TENSOR_CORE = ("flash_fwd_kernel", "flash_bwd_dkdv_kernel", "flash_bwd_dq_kernel",
               "flash_decode_kernel")
# Families whose 16-byte-vector specializations must load with 128-bit instructions.
VECTORIZED = ("rms_norm_fwd_kernel", "rms_norm_bwd_kernel", "swiglu_fwd_kernel",
              "swiglu_bwd_kernel", "rotary_kernel", "cross_entropy_chunk_kernel")
# Itanium mangling of <T, kVec, ...>: T is f / 6__half / 13__nv_bfloat16, then Li<kVec>E.
_SPECIALIZATION = re.compile(r"(%s)I(?:f|6__half|13__nv_bfloat16)Li(\d+)E" % "|".join(VECTORIZED))
# LDG.E.128 on sm_80, also with .CONSTANT (read-only path) or other modifiers on sm_90.
_LDG128 = re.compile(r"\bLDG\.E(?:\.[A-Z0-9_]+)*\.128\b")


def _cuobjdump() -> str | None:
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin is not None:
        tool = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if tool.exists() and os.access(tool, os.X_OK):
            return str(tool)
    return shutil.which("cuobjdump")


@pytest.fixture(scope="module")
def library() -> str:
    path = _backend._EXTENSION.__file__
    assert path is not None and os.path.exists(path), path
    return path


def _dump(library: str, flag: str) -> str:
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (neither in triton's wheel nor on PATH)")
    proc = subprocess.run([tool, flag, library], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _by_arch(text: str, function_header: str) -> dict[str, dict[str, str]]:
    """{arch: {mangled function name: its section of the dump}}."""
    result: dict[str, dict[str, str]] = {}
    for block in re.split(r"^arch = ", text, flags=re.M)[1:]:
        arch = block.split(None, 1)[0]
        functions = result.setdefault(arch, {})
        parts = re.split(function_header, block, flags=re.M)
        for name, body in zip(parts[1::2], parts[2::2]):
            functions[name] = functions.get(name, "") + body
    return result


@pytest.fixture(scope="module")
def resource_usage(library) -> dict[str, dict[str, str]]:
    return _by_arch(_dump(library, "--dump-resource-usage"), r"^\s*Function (\S+?):\s*$")


@pytest.fixture(scope="module")
def sass(library) -> dict[str, dict[str, str]]:
    return _by_arch(_dump(library, "--dump-sass"), r"^\s*Function : (\S+)\s*$")


def _ours(functions: dict[str, str]) -> dict[str, str]:
    return {name: body for name, body in functions.items() if "llama_kernels" in name}


def _require_arch(table: dict, arch: str) -> dict[str, str]:
    if arch not in table:
        pytest.skip(f"the extension was built without {arch} (built: {sorted(table)}); "
                    "see LLAMA_KERNELS_CUDA_ARCH")
    return table[arch]


# ------------------------------------------------------------------------------ registration


def _cuda_schemas() -> list[str]:
    return sorted(name for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("llama_kernels::") and name.endswith("_cuda"))


def test_every_cuda_schema_has_a_cuda_kernel():
    names = _cuda_schemas()
    for expected in ("rms_norm_fwd_cuda", "add_rms_norm_fwd_cuda", "rms_norm_bwd_cuda",
                     "swiglu_fwd_cuda", "swiglu_bwd_cuda", "rotary_cuda",
                     "flash_attention_fwd_cuda", "flash_attention_bwd_cuda",
                     "flash_attention_varlen_fwd_cuda", "flash_attention_varlen_bwd_cuda",
                     "flash_attention_kvcache_cuda", "cross_entropy_chunk_cuda"):
        assert f"llama_kernels::{expected}" in names
    missing = [name for name in names
               if not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")]
    assert not missing, f"schemas without a CUDA kernel: {missing}"


def _cpu_calls():
    x = torch.randn(2, 3, 4, 8)
    w = torch.ones(8)
    cos, sin = llama_kernels.rotary_tables(3, 8)
    q = torch.randn(2, 3, 4, 64, dtype=torch.float16)
    return {
        "rms_norm": lambda: llama_kernels.rms_norm(x, w, backend="cuda"),
        "add_rms_norm": lambda: llama_kernels.add_rms_norm(x, x, w, backend="cuda"),
        "swiglu": lambda: llama_kernels.swiglu(x, x, backend="cuda"),
        "apply_rotary": lambda: llama_kernels.apply_rotary(x, cos, sin, backend="cuda"),
        "flash_attention": lambda: llama_kernels.flash_attention(
            q, q, q, backend="cuda"),
    }


@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm", "swiglu", "apply_rotary",
                                "flash_attention"])
def test_cuda_backend_refuses_cpu_tensors(op):
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        _cpu_calls()[op]()


def test_raw_kernel_has_no_cpu_implementation():
    # The raw op must not silently run on CPU: only a CUDA kernel is registered.
    with pytest.raises(NotImplementedError):
        torch.ops.llama_kernels.rms_norm_fwd_cuda(torch.randn(2, 8), torch.ones(8), 1e-6)


# ------------------------------------------------------------------------------ resources


@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_use_no_local_memory(resource_usage, arch):
    functions = _ours(_require_arch(resource_usage, arch))
    for family in FAMILIES:
        assert any(family in name for name in functions), f"{family} missing on {arch}"
    bad = {}
    for name, usage in functions.items():
        fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", usage))
        assert "REG" in fields and "STACK" in fields, f"{name}: unparsed usage {usage!r}"
        if int(fields["STACK"]) or int(fields.get("LOCAL", 0)):
            bad[name] = usage.strip()
    assert not bad, f"kernels with spills / local memory on {arch}:\n" + "\n".join(
        f"{name}: {usage}" for name, usage in bad.items())


@pytest.mark.parametrize("arch", ARCHS)
def test_vector_paths_use_128_bit_loads(sass, arch):
    functions = _ours(_require_arch(sass, arch))
    seen = set()
    for name, body in functions.items():
        match = _SPECIALIZATION.search(name)
        if match is None or int(match.group(2)) == 1:  # kVec == 1: the scalar fallback
            continue
        seen.add(match.group(1))
        assert _LDG128.search(body), f"{name} on {arch} has no 128-bit global load"
    assert seen == set(VECTORIZED), f"vector specializations missing: {set(VECTORIZED) - seen}"


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_uses_tensor_cores(sass, arch):
    functions = _ours(_require_arch(sass, arch))
    for family in TENSOR_CORE:
        bodies = {name: body for name, body in functions.items() if family in name}
        # (__half, __nv_bfloat16) x (head_dim 64, 128), for the prefill and backward kernels
        # dense and packed (VARLEN), and for the decode kernel per row tile count (1, 2 or 4 m16
        # tiles of packed grouped-query rows), dense and against a KV cache (KVCACHE)
        expected = 24 if family == "flash_decode_kernel" else 8
        assert len(bodies) == expected, f"{family} on {arch}: {sorted(bodies)}"
        for name, body in bodies.items():
            dtype = "BF16" if "nv_bfloat16" in name else "F16"
            assert re.search(rf"\bHMMA\.16816\.F32(\.{dtype})?\b", body), \
                f"{name} on {arch}: no HMMA.16816 with fp32 accumulators"
            assert "LDSM" in body, f"{name} on {arch}: no ldmatrix (LDSM)"
            assert "LDGSTS" in body, f"{name} on {arch}: no cp.async (LDGSTS)"


_CUDA_KEYSET = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)


@pytest.mark.parametrize("name,args,first", [
    ("rms_norm_fwd_cuda", lambda: (torch.randn(2, 8), torch.ones(8), 1e-6), "x"),
    ("add_rms_norm_fwd_cuda", lambda: (torch.randn(2, 8), torch.randn(2, 8), torch.ones(8), 1e-6),
     "x"),
    ("rms_norm_bwd_cuda",
     lambda: (torch.randn(2, 8), torch.randn(2, 8), torch.ones(8), torch.ones(2), None), "x"),
    ("swiglu_fwd_cuda", lambda: (torch.randn(2, 8), torch.randn(2, 8)), "gate"),
    ("swiglu_bwd_cuda", lambda: (torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8)),
     "gate"),
    ("rotary_cuda",
     lambda: (torch.randn(1, 2, 3, 8), torch.ones(2, 4), torch.ones(2, 4), None, False, False),
     "x"),
    ("flash_attention_fwd_cuda",
     lambda: (torch.randn(1, 3, 2, 64), torch.randn(1, 3, 2, 64), torch.randn(1, 3, 2, 64), True,
              0.125), "q"),
    ("flash_attention_bwd_cuda",
     lambda: (*[torch.randn(1, 3, 2, 64)] * 5, torch.randn(1, 2, 3), True, 0.125), "q"),
    ("flash_attention_varlen_fwd_cuda",
     lambda: (*[torch.randn(3, 2, 64)] * 3, *[torch.tensor([0, 3], dtype=torch.int32)] * 2, 3, 3,
              True, 0.125), "q"),
    ("flash_attention_varlen_bwd_cuda",
     lambda: (*[torch.randn(3, 2, 64)] * 5, torch.randn(2, 3),
              *[torch.tensor([0, 3], dtype=torch.int32)] * 2, 3, 3, True, 0.125), "q"),
    ("flash_attention_kvcache_cuda",
     lambda: (torch.randn(1, 1, 2, 64, dtype=torch.float16),
              *[torch.zeros(1, 16, 2, 64, dtype=torch.float16)] * 2,
              torch.zeros(1, dtype=torch.int32), None, None, None, None, None, False, True,
              0.125), "q"),
    ("cross_entropy_chunk_cuda",
     lambda: (torch.randn(2, 8), torch.zeros(2, dtype=torch.int64), torch.empty(2),
              torch.ones(()), -100, True), "logits"),
])
def test_cuda_kernel_checks_its_inputs_first(name, args, first):
    # Reaching the CUDA kernel itself with CPU tensors (redispatch skips the CPU dispatch key)
    # must end in its own input check, which names the argument, never in a launch or a crash.
    op = getattr(torch.ops.llama_kernels, name).default
    with pytest.raises(RuntimeError, match=f"^{first}: expected a CUDA tensor, got one on cpu"):
        op.redispatch(_CUDA_KEYSET, *args())
