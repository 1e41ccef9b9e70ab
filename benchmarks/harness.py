"""Timing, hardware ceilings and the run record.

Two times per measurement, because a Python-level op can spend longer on the host than its
kernels take on the GPU:
- GPU time (``time_graph``): the callable captured N times into one CUDA graph and replayed;
  CUDA events around the replay, divided by N; median and 20/80 percentiles of 10 replays.
  Host overhead is gone, so bytes / time is the kernels' bandwidth. The L2 is not flushed
  between the N calls, so the suite uses inputs several times larger than the L2 (50 MB on
  H100) to keep the cache from flattering.
- host-bound time (``time_host``): triton.testing.do_bench of one eager call (events, L2
  flushed before each call, median after warm-up): what a caller sees when nothing hides the
  launch cost.
On a CPU machine a perf_counter timer stands in, only so the harness itself can be
smoke-tested.
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


def time_host(fn, *, warmup_ms: int = 25, rep_ms: int = 100) -> Timing:
    """One eager call at a time, CUDA events around it, L2 flushed before each call."""
    if not GPU:
        return _time_cpu(fn)
    import triton.testing

    q = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return Timing(*q, method="events")


def time_graph(make_fn, *, rep_ms: int = 100, max_calls: int = 500) -> Timing:
    """GPU time of ``make_fn()`` (which builds the callable): N calls in one CUDA graph.

    The callable is built on the capture stream, so that autograd's backward of a forward run
    while building runs on that stream too and can be captured.
    """
    if not GPU:
        return _time_cpu(make_fn())
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn = make_fn()
        for _ in range(3):  # warm-up: compiles, autotuning and allocator growth stay outside
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate = max(start.elapsed_time(end) / 5, 1e-3)
        n_calls = int(min(max_calls, max(5, rep_ms / estimate)))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(n_calls):
                fn()
        torch.cuda.synchronize()
        samples = []
        for _ in range(10):
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / n_calls)
    del graph
    samples.sort()
    return Timing(statistics.median(samples), samples[2], samples[7],
                  method=f"cudagraph x{n_calls}")


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
    copy_gbps: float  # device-to-device copy, bytes read + written: the best stream measured
    matmul_tflops: float  # bf16 matmul
    copy_bytes: int = 0  # the size at which copy_gbps was reached
    matmul_size: int = 0
    copy_streams: dict = field(default_factory=dict)  # "copy_ 256MiB" -> GB/s, every one tried
    notes: list[str] = field(default_factory=list)


# A plain streaming copy in Triton: 16-byte accesses, 8 warps and 4096 fp32 (16 KiB) a program,
# the shape in which inductor's pointwise kernels reach more than torch's copy_ on an H100
# (torch.compile's SwiGLU measured 102% of copy_'s bandwidth). The ceiling is the better of the
# two, so no kernel of ours is judged against a slow copy.
COPY_BLOCK = 4096


def _triton_copy():
    import triton
    import triton.language as tl

    @triton.jit
    def _copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)

    def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        n = src.numel()
        _copy_kernel[(triton.cdiv(n, COPY_BLOCK),)](src, dst, n, BLOCK=COPY_BLOCK, num_warps=8)

    return copy


def _copy_gbps(n_bytes: int, copy=None) -> float:
    """Device-to-device copy of n_bytes (``copy(dst, src)``, default ``dst.copy_(src)``),
    counting bytes read plus written."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    fn = (lambda: dst.copy_(src)) if copy is None else (lambda: copy(dst, src))
    t = time_host(fn)
    return 2 * n_bytes / (t.ms * 1e-3) / 1e9


def _matmul_tflops(size: int) -> float:
    """A (size x size) @ (size x size) bf16 product on random data (zeros run faster)."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    t = time_host(lambda: a @ b)
    return 2 * size**3 / (t.ms * 1e-3) / 1e12


def measure_ceilings(quick: bool = False) -> Ceilings:
    """The copy ceiling is the best of torch's copy_ and a vectorized Triton copy at several
    sizes (each well past the L2); the matmul ceiling a bf16 8192^3 product."""
    if not GPU:
        return Ceilings(float("nan"), float("nan"), notes=["no GPU: ceilings not measured"])
    sizes = [2**28, 2**30] if quick else [2**28, 2**30, 2**31]
    streams = {"copy_": None}
    try:
        streams["triton"] = _triton_copy()
    except Exception as e:  # noqa: BLE001 - copy_ alone still gives a ceiling
        notes = [f"triton copy not measured: {type(e).__name__}: {e}"]
    else:
        notes = []
    measured = {}
    for name, copy in streams.items():
        for n_bytes in sizes:
            measured[(name, n_bytes)] = _copy_gbps(n_bytes, copy)
    (best_name, best_bytes), best = max(measured.items(), key=lambda kv: kv[1])
    return Ceilings(best, _matmul_tflops(8192), copy_bytes=best_bytes, matmul_size=8192,
                    copy_streams={f"{name} {n >> 20}MiB": round(v, 1)
                                  for (name, n), v in measured.items()},
                    notes=notes + [f"copy ceiling from {best_name} at {best_bytes >> 20} MiB"])


def _git_commit() -> str:
    if os.environ.get("LLAMA_KERNELS_COMMIT"):  # set by callers on machines without git
        return os.environ["LLAMA_KERNELS_COMMIT"]
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
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            env["driver"] = smi.stdout.strip().splitlines()[0] if smi.stdout.strip() else None
        except (OSError, subprocess.SubprocessError, IndexError):
            env["driver"] = None
    return env
