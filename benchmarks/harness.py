"""Timing, hardware ceilings and the run record.

GPU timing is triton.testing.do_bench (CUDA events, L2 flushed before each repetition, median
and 20/80 percentiles after warm-up); tiny decode kernels are timed by CUDA-graph replay
(do_bench_cudagraph) so launch gaps do not hide them. On a CPU machine a perf_counter timer
stands in, only so the harness itself can be smoke-tested.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field

import torch

GPU = torch.cuda.is_available()


@dataclass
class Timing:
    ms: float  # median
    p20: float
    p80: float
    method: str


def time_fn(fn, *, warmup_ms: int = 25, rep_ms: int = 100, cudagraph: bool = False) -> Timing:
    if not GPU:
        return _time_cpu(fn)
    import triton.testing

    if cudagraph:
        try:
            with torch.cuda.stream(torch.cuda.Stream()):
                q = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
            return Timing(*q, method="cudagraph")
        except Exception:  # noqa: BLE001 - some callables cannot be captured; fall back
            pass
    q = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return Timing(*q, method="events")


def _time_cpu(fn, reps: int = 5) -> Timing:
    fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return Timing(statistics.median(samples), samples[len(samples) // 5],
                  samples[(4 * len(samples)) // 5], method="cpu-perf_counter")


def peak_memory_mb(fn) -> float | None:
    """Extra device memory one call allocates at its peak, beyond what was live before."""
    if not GPU:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@dataclass
class Ceilings:
    copy_gbps: float  # device-to-device copy, bytes read + written
    matmul_tflops: float  # bf16 matmul
    copy_bytes: int = 0
    matmul_size: int = 0
    notes: list[str] = field(default_factory=list)


def measure_ceilings(quick: bool = False) -> Ceilings:
    if not GPU:
        return Ceilings(float("nan"), float("nan"), notes=["no GPU: ceilings not measured"])
    n_bytes = (1 if quick else 2) * 2**30
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src))
    copy_gbps = 2 * n_bytes / (t.ms * 1e-3) / 1e9
    del src, dst
    size = 8192
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    t = time_fn(lambda: a @ b)
    tflops = 2 * size**3 / (t.ms * 1e-3) / 1e12
    return Ceilings(copy_gbps, tflops, copy_bytes=n_bytes, matmul_size=size)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10,
                               cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "gpu": None,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if GPU:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   sms=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}")
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            env["driver"] = smi.stdout.strip().splitlines()[0] if smi.stdout.strip() else None
        except (OSError, subprocess.SubprocessError, IndexError):
            env["driver"] = None
    return env
