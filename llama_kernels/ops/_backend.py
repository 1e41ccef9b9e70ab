"""Which implementation runs an op: "cuda" (llama_kernels._C), "triton" or "torch" (reference.py).

Choice, most specific first: the ``backend=`` keyword, ``use_backend(...)``, the environment
variable ``LLAMA_KERNELS_BACKEND``, then ``"auto"``: cuda if the extension has a kernel for the
op and the tensors are on a GPU, else triton if it has one and the tensors are on a GPU, else
torch. Asking for a backend that cannot run raises a RuntimeError that says why.

What each backend offers is found once, at import, so that resolving a backend inside a
``torch.compile``-d function is plain dictionary lookups that Dynamo traces without a break.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Iterator

import torch

BACKENDS = ("cuda", "triton", "torch")
ENV_VAR = "LLAMA_KERNELS_BACKEND"

# Kernel names each backend may provide; an op asks for its kernel by these names.
#   cuda:   torch.ops.llama_kernels.<name> with a CUDA kernel registered
#   triton: the module llama_kernels.triton.<name>
CUDA_KERNELS = (
    "rms_norm_fwd_cuda", "add_rms_norm_fwd_cuda", "rms_norm_bwd_cuda", "swiglu_fwd_cuda",
    "swiglu_bwd_cuda", "rotary_cuda", "flash_attention_fwd_cuda", "flash_attention_bwd_cuda",
    "flash_attention_varlen_fwd_cuda", "flash_attention_varlen_bwd_cuda",
    "flash_attention_kvcache_cuda",
    "cross_entropy_chunk_cuda",
)
TRITON_MODULES = ("rms_norm", "swiglu", "rotary", "flash_attention", "cross_entropy",
                  "flash_attention_varlen", "flash_attention_kvcache")

# True when Triton runs kernels on CPU tensors (read by Triton at import, so read it once here).
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load_extension() -> tuple[object | None, str | None]:
    try:
        return importlib.import_module("llama_kernels._C"), None
    except ImportError as e:
        return None, (
            "the CUDA extension llama_kernels._C is not built "
            f"({e}); reinstall with a CUDA toolkit present: pip install -e . --no-build-isolation"
        )


def _load_triton() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not importable ({e}); pip install triton"
    return None


_EXTENSION, _EXTENSION_WHY_NOT = _load_extension()
_TRITON_WHY_NOT = _load_triton()


def _cuda_kernels() -> frozenset[str]:
    if _EXTENSION is None:
        return frozenset()
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    return frozenset(
        name for name in CUDA_KERNELS
        if torch._C._dispatch_has_kernel(f"llama_kernels::{name}")
        and has_kernel(f"llama_kernels::{name}", "CUDA")
    )


def _triton_modules() -> dict[str, object]:
    if _TRITON_WHY_NOT is not None:
        return {}
    return {name: importlib.import_module(f"llama_kernels.triton.{name}")
            for name in TRITON_MODULES}


CUDA_AVAILABLE_KERNELS = _cuda_kernels()
TRITON_AVAILABLE_MODULES = _triton_modules()

_override: list[str] = []


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS and name != "auto":
        raise ValueError(
            f"{where}: unknown backend {name!r}; expected one of {BACKENDS + ('auto',)}"
        )
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with use_backend("triton"): ...`` picks the backend of every call inside the block."""
    _override.append(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _override.pop()


def requested_backend(backend: str | None) -> str:
    if backend is not None:
        return _check_name(backend, "backend")
    if _override:
        return _override[-1]
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_name(env, ENV_VAR)
    return "auto"


def resolve(backend: str | None, *, op: str, device: torch.device, cuda_kernel: str | None,
            triton_module: str | None, unsupported: dict[str, str] | None = None,
            auto_order: tuple[str, ...] = ("cuda", "triton")) -> str:
    """The backend that will run ``op`` on tensors of ``device``, or an error saying why not.

    ``unsupported`` maps a kernel backend to the reason it cannot take these particular inputs
    (a head_dim it was not built for, say): auto passes over it, asking for it explicitly
    raises a ValueError quoting the reason. ``auto_order``: the kernel backends auto tries on a
    GPU, first choice first (then "torch").
    """
    name = requested_backend(backend)
    unsupported = unsupported or {}
    on_gpu = device.type == "cuda"
    has_cuda = cuda_kernel is not None and cuda_kernel in CUDA_AVAILABLE_KERNELS
    has_triton = triton_module is not None and triton_module in TRITON_AVAILABLE_MODULES
    if name == "auto":
        runnable = {"cuda": has_cuda, "triton": has_triton}
        for candidate in auto_order:
            if on_gpu and runnable[candidate] and candidate not in unsupported:
                return candidate
        return "torch"
    if name == "cuda":
        if _EXTENSION is None:
            raise RuntimeError(f"{op}: backend 'cuda' unavailable: {_EXTENSION_WHY_NOT}")
        if not has_cuda:
            raise RuntimeError(
                f"{op}: backend 'cuda' has no kernel for this op in this build; "
                "use backend='triton' or 'torch'"
            )
        if not on_gpu:
            raise RuntimeError(
                f"{op}: backend 'cuda' needs CUDA tensors, got tensors on {device}; move them "
                "with .cuda() or use backend='torch'"
            )
    elif name == "triton":
        if _TRITON_WHY_NOT is not None:
            raise RuntimeError(f"{op}: backend 'triton' unavailable: {_TRITON_WHY_NOT}")
        if not has_triton:
            raise RuntimeError(
                f"{op}: backend 'triton' has no kernel for this op yet; use backend='torch'"
            )
        if not on_gpu and not TRITON_INTERPRET:
            raise RuntimeError(
                f"{op}: backend 'triton' needs CUDA tensors, got tensors on {device}; set "
                "TRITON_INTERPRET=1 before importing triton to run its kernels on the CPU"
            )
    if name in unsupported:
        raise ValueError(f"{op}: backend {name!r} does not support {unsupported[name]}; "
                         "use backend='torch' or 'auto'")
    return name


def cuda_op(name: str):
    """The extension's op ``torch.ops.llama_kernels.<name>``."""
    return getattr(torch.ops.llama_kernels, name)


def triton_module(name: str):
    return TRITON_AVAILABLE_MODULES[name]


def available_backends() -> dict[str, str | None]:
    """Each backend mapped to None when it can run here, else to the reason it cannot."""
    gpu = torch.cuda.is_available()
    report: dict[str, str | None] = {"torch": None}
    if _EXTENSION is None:
        report["cuda"] = _EXTENSION_WHY_NOT
    elif not gpu:
        report["cuda"] = "extension built, but no CUDA GPU is visible to torch"
    elif not CUDA_AVAILABLE_KERNELS:
        report["cuda"] = "extension built, but it registers no kernels yet"
    else:
        report["cuda"] = None
    if _TRITON_WHY_NOT is not None:
        report["triton"] = _TRITON_WHY_NOT
    elif not TRITON_AVAILABLE_MODULES:
        report["triton"] = "no Triton kernels in this version"
    elif not gpu and not TRITON_INTERPRET:
        report["triton"] = "no CUDA GPU; set TRITON_INTERPRET=1 to run Triton kernels on CPU"
    else:
        report["triton"] = None
    return report
