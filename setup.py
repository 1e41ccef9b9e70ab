"""Builds llama_kernels._C with nvcc when a CUDA toolkit and a CUDA build of torch are present.

A GPU is not needed to build. Without a toolkit the Triton and torch backends install alone and
one line says why the CUDA backend was skipped.

Environment:
    LLAMA_KERNELS_CUDA_ARCH   e.g. "8.0;9.0" (default), "9.0"; else TORCH_CUDA_ARCH_LIST
    LLAMA_KERNELS_SKIP_CUDA   "1" to install without the extension
    LLAMA_KERNELS_DEBUG       "1" for -G -O0 device code (compute-sanitizer line numbers)
    CUDA_HOME                 the toolkit root, when nvcc on PATH is a wrapper script
    MAX_JOBS                  parallel compile jobs (torch's ninja build honours it)
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

DEFAULT_ARCHS = "8.0;9.0"
ROOT = os.path.dirname(os.path.abspath(__file__))


def say(msg: str) -> None:
    print(f"llama-kernels: {msg}", file=sys.stderr, flush=True)


def find_cuda_home() -> str | None:
    """The toolkit root: $CUDA_HOME/$CUDA_PATH, else the TOP that nvcc itself reports (which
    also sees through wrapper scripts on PATH), else the parent of nvcc's real path."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-c", "probe.cu"], capture_output=True, text=True,
                             timeout=60)
        match = re.search(r"TOP=(\S+)", dry.stdout + dry.stderr)
        if match:
            top = os.path.normpath(match.group(1))
            if os.path.exists(os.path.join(top, "include", "cuda_runtime.h")):
                return top
    except (OSError, subprocess.SubprocessError):
        pass
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return home if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) else None


def cuda_extensions():
    if os.environ.get("LLAMA_KERNELS_SKIP_CUDA") == "1":
        say("CUDA backend skipped: LLAMA_KERNELS_SKIP_CUDA=1")
        return [], {}
    import torch

    if torch.version.cuda is None:
        say(f"CUDA backend skipped: torch {torch.__version__} is a CPU-only build")
        return [], {}
    cuda_home = find_cuda_home()
    if cuda_home is None:
        say("CUDA backend skipped: no CUDA toolkit (nvcc) found; set CUDA_HOME to build it")
        return [], {}
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    archs = (os.environ.get("LLAMA_KERNELS_CUDA_ARCH") or os.environ.get("TORCH_CUDA_ARCH_LIST")
             or DEFAULT_ARCHS)
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    debug = os.environ.get("LLAMA_KERNELS_DEBUG") == "1"
    nvcc_flags = ["-O0", "-G"] if debug else ["-O3", "-lineinfo"]
    nvcc_flags += ["--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__",
                   "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/*.cu"))
    say(f"building the CUDA backend with {cuda_home} for sm {archs} ({len(sources)} sources)")
    ext = CUDAExtension(
        name="llama_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O0" if debug else "-O3"], "nvcc": nvcc_flags},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
