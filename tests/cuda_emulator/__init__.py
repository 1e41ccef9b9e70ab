"""Run the CUDA attention kernels on the CPU: csrc/flash_attention_kernels.cuh compiled by g++
against tests/cuda_emulator/emulator.h, an emulation of csrc/tensor_core.cuh.

    build(name, sources)    -> ctypes.CDLL, cached by a hash of the sources and the headers
    available()             -> (ok, reason): whether this machine can build the emulator
    call(fn, *args, lib=, schedule_seed=)   run an entry point, raise its error
    flash_forward(q, k, v, causal, softmax_scale, schedule_seed=None)              -> (out, lse)
    flash_backward(dout, q, k, v, out, lse, causal, softmax_scale, schedule_seed=None)
                                                                               -> (dq, dk, dv)
    flash_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         causal, softmax_scale, schedule_seed=None)            -> (out, lse)
    flash_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, causal, softmax_scale, schedule_seed=None)
                                                                               -> (dq, dk, dv)
      packed sequences (flash-attn's varlen layout): q (total_q, Hq, D), k and v (total_k,
      Hkv, D), cu_seqlens int32 (B + 1,), lse (Hq, total_q)
    flash_kvcache(q, k_cache, v_cache, cache_seqlens, k=None, v=None, *, block_table=None,
                  rotary_cos=None, rotary_sin=None, rotary_interleaved=False, causal=True,
                  softmax_scale=None, schedule_seed=None)                      -> out
      attention against a KV cache, contiguous or paged, the new k, v appended in place

Both take compute_capability=(major, minor) (default DEFAULT_CC, 9.0): the emulated device,
whose opt-in shared-memory limit per block every launch must fit (99 KiB for 8.6 / 8.9, 163 KiB
for 8.0, 227 KiB for 9.0); as in flash_attention.cu, a kernel over it is refused with its name,
its bytes and the limit before any kernel runs.

The row ops (csrc/swiglu_kernels.cuh, rms_norm_kernels.cuh, rotary_kernels.cuh), each through
its header's launch path (the run_* functions that the .cu files call too; the entry points are
swiglu_emu.cpp, rms_norm_emu.cpp, rotary_emu.cpp), on CPU fp32 / fp16 / bf16 tensors:

    swiglu_fwd(gate, up)                         -> out
    swiglu_bwd(dout, gate, up)                   -> (dgate, dup)
    rms_norm_fwd(x, weight, eps, residual=None)  -> (y, rstd), or (y, h, rstd) with a residual
    rms_norm_bwd(dy, x, weight, rstd, dh=None)   -> (dx, dweight)
    rotary(x, cos, sin, positions=None, interleaved=False, conjugate=False) -> out

Each takes schedule_seed= as the attention wrappers do, and launch=: a dict that receives the
launch settings the launch path used (vec, blocks, ...; all 0 where it launched nothing), so
that a test can assert which path (scalar or 16-byte vectors, register items or wide rows) ran.
SwiGLU and the RMSNorm backward size their grids by the SM count and occupancy: num_sms
(default 8, a small GPU) and blocks_per_sm (None: full occupancy by threads) stand in for the
driver's answers.
Outputs sit between NaN guard bands; every load_vec / store_vec is checked against the spans of
the tensors passed (emulator.h, check_global_access).

The wrappers take CPU fp16/bf16 tensors q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D) with any
strides whose last is 1 (rows not 16-byte aligned are copied first, as flash_attention.cu
does), and return contiguous outputs that were allocated between NaN guard bands: a kernel
writing past an output's ends fails the call. Every input and output span is
registered with the emulator, so a cp.async reading outside them fails too. Emulator errors
(bounds, deadlocks, cp.async misuse) raise EmulatorError with the emulator's message.

Schedules: each CUDA thread is a fiber. With schedule_seed 0 they run round-robin, so the warps
of a block advance in lockstep; any other seed (up to 2**64 - 1) runs a reproducible
pseudo-random schedule that interleaves warps at random and lets one warp run far ahead of the
others (tests/cuda_emulator/emulator.h), so that a missing barrier between warps shows as
poison under some seeds. flash_forward / flash_backward take schedule_seed=None to mean the
environment variable

    LLAMA_KERNELS_EMULATOR_SEED   the schedule seed (decimal, or 0x hex; unset or empty: 0)

so that a whole test run can be repeated under other schedules, e.g.
LLAMA_KERNELS_EMULATOR_SEED=3 pytest -k emulated tests/test_cuda_attention.py. Errors raised
under a seed end with "[schedule seed N]".
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(REPO, "csrc")
# -fno-strict-aliasing: CUDA code reinterprets registers freely (device_common.cuh packs a
# Vec<__nv_bfloat16, 8> through __nv_bfloat162 pointers), which nvcc honours; g++ -O2 under
# strict aliasing drops those stores (SwiGLU's bf16 vector path then returns zeros).
FLAGS = ["-std=c++17", "-O2", "-fno-strict-aliasing", "-shared", "-fPIC", "-Wno-unknown-pragmas"]
HEAD_DIMS = (64, 128)
_DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1}
_ERR_BYTES = 4096
SEED_ENV = "LLAMA_KERNELS_EMULATOR_SEED"
# The emulated device's compute capability unless a call names another: it selects the
# per-block shared-memory limit of launches (emulator.h, max_smem_optin).
DEFAULT_CC = (9, 0)
# The emulator's state (launch coordinates, registered ranges, schedule seed) is process-global
# C++ state.
_LOCK = threading.Lock()


class EmulatorError(RuntimeError):
    """An error reported by the emulator: a bad address, a deadlock, a cp.async misuse."""


def available() -> tuple[bool, str]:
    if not sys.platform.startswith("linux"):
        return False, f"the emulator needs Linux (ucontext fibers, mmap), not {sys.platform}"
    if shutil.which("g++") is None:
        return False, "g++ not found on PATH"
    return True, ""


@functools.lru_cache(maxsize=None)
def _compiler_id() -> str:
    return subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout


def _headers(include_dirs) -> list[str]:
    found = []
    for d in include_dirs:
        for ext in ("h", "hpp", "cuh"):
            found += glob.glob(os.path.join(d, f"*.{ext}"))
    return sorted(found)


def schedule_seed_from_env() -> int:
    """The seed in LLAMA_KERNELS_EMULATOR_SEED, or 0 (round-robin) where it is unset or empty."""
    text = os.environ.get(SEED_ENV, "").strip()
    if not text:
        return 0
    try:
        seed = int(text, 0)
    except ValueError:
        raise ValueError(f"{SEED_ENV}={text!r}: expected an integer seed") from None
    return _check_seed(seed, SEED_ENV)


def _check_seed(seed: int, name: str = "schedule_seed") -> int:
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"{name}: a schedule seed is in [0, 2**64), got {seed}")
    return seed


def build(name: str, sources, include_dirs=()) -> ctypes.CDLL:
    """Compile `sources` (paths relative to tests/cuda_emulator/, or absolute) into one library.

    `include_dirs` come before csrc/ and tests/cuda_emulator/ on the include path. The result is
    cached under the temp dir, keyed by the compiler, the flags and the text of the sources and
    of every header in the include directories, so an unchanged rebuild is a dlopen.
    """
    ok, why = available()
    if not ok:
        raise EmulatorError(f"cannot build the emulator: {why}")
    sources = [os.path.join(HERE, s) for s in sources]  # an absolute s stays as it is
    dirs = [os.path.abspath(d) for d in include_dirs] + [CSRC, HERE]
    cmd = ["g++", *FLAGS, *(f"-I{d}" for d in dirs)]
    key = hashlib.sha256("\0".join(cmd + [_compiler_id()]).encode())
    for path in sources + _headers(dirs):
        key.update(path.encode() + b"\0" + pathlib.Path(path).read_bytes())
    cache = os.path.join(tempfile.gettempdir(), "llama_kernels_emulator")
    os.makedirs(cache, exist_ok=True)
    lib = os.path.join(cache, f"{name}-{key.hexdigest()[:16]}.so")
    if not os.path.exists(lib):
        tmp = f"{lib}.{os.getpid()}.{threading.get_ident()}.tmp"
        proc = subprocess.run(cmd + sources + ["-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise EmulatorError(f"g++ failed building {name}:\n{proc.stderr[-6000:]}")
        os.replace(tmp, lib)  # atomic: parallel test workers never load a half-written file
    dll = ctypes.CDLL(lib)
    dll.emu_set_schedule_seed.argtypes = [ctypes.c_uint64]  # defined in emulator.h
    dll.emu_set_schedule_seed.restype = None
    dll.emu_set_compute_capability.argtypes = [ctypes.c_int, ctypes.c_int]  # emulator.h too
    dll.emu_set_compute_capability.restype = ctypes.c_int
    return dll


def call(fn, *args, lib: ctypes.CDLL | None = None, schedule_seed: int = 0) -> None:
    """Call an entry point taking (..., char* err, size_t err_len); raise its error, if any.

    Its launches run under `schedule_seed` (0: round-robin), which needs `lib`, the library
    that fn is from (build's result).
    """
    if lib is None and schedule_seed:
        raise ValueError("call: a schedule_seed needs lib, the library fn is from")
    _invoke(lib, fn, args, schedule_seed)


def _invoke(lib, fn, args, schedule_seed: int, tensors=(),
            compute_capability: tuple[int, int] = DEFAULT_CC) -> None:
    """fn(*args, err, err_len) under the lock, with `lib`'s schedule seed and emulated compute
    capability set for the call only and the spans of `tensors` registered as the global memory
    cp.async may read."""
    _check_seed(schedule_seed)
    err = ctypes.create_string_buffer(_ERR_BYTES)
    with _LOCK:
        if tensors:
            lib.emu_clear_globals()
            for t in tensors:
                lib.emu_register_global(t.data_ptr(), _span_bytes(t))
        if lib is not None:
            lib.emu_set_schedule_seed(schedule_seed)
            if lib.emu_set_compute_capability(*compute_capability):
                raise ValueError(f"compute_capability {compute_capability}: the emulator knows "
                                 "no shared-memory limit for it")
        try:
            rc = fn(*args, err, ctypes.c_size_t(_ERR_BYTES))
        finally:
            if lib is not None:
                lib.emu_set_schedule_seed(0)
                lib.emu_set_compute_capability(*DEFAULT_CC)
    if rc != 0:
        raise EmulatorError(err.value.decode(errors="replace"))


# ------------------------------------------------------------------------- attention wrappers

_P = ctypes.c_void_p
_ATTN_SIG = {
    # dtype, head_dim, q, k, v, o, lse, strides (q, k, v, o) x (batch, row, head), sizes,
    # softmax_scale, causal
    "flash_forward_emu": [ctypes.c_int, ctypes.c_int, _P, _P, _P, _P, _P, _P, _P,
                          ctypes.c_float, ctypes.c_int],
    # dtype, head_dim, q, k, v, out, dout, lse, dq, dk, dv,
    # strides (q, k, v, out, dout, dq, dk, dv) x (batch, row, head), sizes, softmax_scale, causal
    "flash_backward_emu": [ctypes.c_int, ctypes.c_int, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P,
                           _P, ctypes.c_float, ctypes.c_int],
    # dtype, head_dim, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, strides, sizes (batch,
    # heads_q, heads_kv, max_seqlen_q, max_seqlen_k, total_q), softmax_scale, causal
    "flash_varlen_forward_emu": [ctypes.c_int, ctypes.c_int, _P, _P, _P, _P, _P, _P, _P, _P, _P,
                                 ctypes.c_float, ctypes.c_int],
    # dtype, head_dim, q, k, v, out, dout, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, strides,
    # sizes, softmax_scale, causal
    "flash_varlen_backward_emu": [ctypes.c_int, ctypes.c_int, _P, _P, _P, _P, _P, _P, _P, _P, _P,
                                  _P, _P, _P, _P, ctypes.c_float, ctypes.c_int],
    # dtype, head_dim, q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table,
    # block_table_stride, cos, sin, o, strides (q, k_cache, v_cache, o, k_new, v_new), sizes
    # (batch, heads_q, heads_kv, seqlen_q, capacity, seqlen_new, page_size), softmax_scale,
    # causal, interleaved
    "flash_kvcache_emu": [ctypes.c_int, ctypes.c_int, _P, _P, _P, _P, _P, _P, _P, ctypes.c_int64,
                          _P, _P, _P, _P, _P, ctypes.c_float, ctypes.c_int, ctypes.c_int],
}


def _attention_lib() -> ctypes.CDLL:
    lib = build("flash_attention_emu", ["flash_attention_emu.cpp"])
    for fn, sig in _ATTN_SIG.items():
        getattr(lib, fn).argtypes = sig + [ctypes.c_char_p, ctypes.c_size_t]
        getattr(lib, fn).restype = ctypes.c_int
    lib.emu_register_global.argtypes = [_P, ctypes.c_size_t]
    lib.emu_check_smem_before_launch.argtypes = [ctypes.c_int]
    return lib


class _Guarded:
    """A contiguous tensor inside a NaN-filled buffer; check() fails if the bands changed."""

    def __init__(self, shape, dtype, band: int):
        n = math.prod(shape)
        self.band = -(-band // 64) * 64  # keeps the view 128-byte aligned
        self.buf = torch.full((n + 2 * self.band,), float("nan"), dtype=dtype)
        self.view = self.buf[self.band:self.band + n].view(shape)
        self.pattern = self.buf[:self.band].clone()

    def check(self, name: str) -> None:
        ints = {2: torch.int16, 4: torch.int32}[self.buf.element_size()]
        for side, band in (("before", self.buf[:self.band]), ("after", self.buf[-self.band:])):
            changed = (band.view(ints) != self.pattern.view(ints)).nonzero()
            if len(changed):
                where = changed[0].item() - (self.band if side == "before" else 0)
                raise EmulatorError(f"{name}: the kernel wrote {len(changed)} element(s) {side} "
                                    f"the tensor (first at offset {where} from that end)")


def _span_bytes(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    return (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size()


def _check_bshd(t: torch.Tensor, name: str, dtype) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"{name}: the emulator runs on CPU tensors, got one on {t.device}")
    if t.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if t.dim() != 4:
        raise ValueError(f"{name}: expected 4 dimensions (B, S, H, D), got shape {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name}: expected unit stride along D, got strides {t.stride()}")


def _rows_16b(t: torch.Tensor) -> torch.Tensor:
    """t if its rows are 16-byte aligned (the kernels read them with 16-byte cp.async), else a
    copy with aligned rows, as flash_attention.cu makes; the copy keeps NaN after every row and
    around the whole, so a read past a mask still shows as it would in the caller's padding."""
    es = t.element_size()
    if t.data_ptr() % 16 == 0 and all(n == 1 or s * es % 16 == 0
                                      for n, s in zip(t.shape[:3], t.stride()[:3])):
        return t
    b, s, h, d = t.shape
    row = -(-d // 8) * 8 + 8  # elements per padded row: 16-byte multiple, NaN tail
    buf = torch.full((b * s * h * row + 128,), float("nan"), dtype=t.dtype)
    view = buf[64:64 + b * s * h * row].view(b, s, h, row)[..., :d]
    view.copy_(t)
    return view


def _check_qkv(q, k, v) -> None:
    if q.dtype not in _DTYPE_CODE:
        raise ValueError(f"q: expected float16 or bfloat16, got {q.dtype}")
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _check_bshd(t, name, q.dtype)
    if k.shape != v.shape:
        raise ValueError(f"k and v: shapes differ, {tuple(k.shape)} and {tuple(v.shape)}")
    (b, _, hq, d), (bk, _, hkv, dk) = q.shape, k.shape
    if (bk, dk) != (b, d) or hkv == 0 or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: batch and head_dim must "
                         "match and Hq be a multiple of Hkv")
    if d not in HEAD_DIMS:
        raise ValueError(f"head_dim {d}: the kernels support {HEAD_DIMS}")


def _strides(*tensors) -> ctypes.Array:
    flat = [s for t in tensors for s in t.stride()[:3]]
    return (ctypes.c_int64 * len(flat))(*flat)


def _sizes(q, k) -> ctypes.Array:
    return (ctypes.c_int * 5)(q.shape[0], q.shape[2], k.shape[2], q.shape[1], k.shape[1])


def _band(shape) -> int:
    # 128 rows of every head: a tile written past the last row lands in the band.
    return max(1024, 128 * math.prod(shape[2:]))


def _seed(schedule_seed: int | None) -> int:
    return schedule_seed_from_env() if schedule_seed is None else _check_seed(schedule_seed)


def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                  softmax_scale: float, *, schedule_seed: int | None = None,
                  compute_capability: tuple[int, int] = DEFAULT_CC
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Sq, Hq, D) in q's dtype and lse (B, Hq, Sq) fp32, natural log. schedule_seed:
    0 round-robin, else a random schedule; None: LLAMA_KERNELS_EMULATOR_SEED, else 0.
    compute_capability: the emulated device, whose per-block shared-memory limit a launch must
    fit (a launch that does not raises EmulatorError before any kernel runs)."""
    seed = _seed(schedule_seed)
    _check_qkv(q, k, v)
    q, k, v = (_rows_16b(t) for t in (q, k, v))
    b, sq, hq, d = q.shape
    out = _Guarded(q.shape, q.dtype, _band(q.shape))
    lse = _Guarded((b, hq, sq), torch.float32, 1024)
    lib = _attention_lib()
    _invoke(lib, lib.flash_forward_emu,
            (_DTYPE_CODE[q.dtype], d, q.data_ptr(), k.data_ptr(), v.data_ptr(),
             out.view.data_ptr(), lse.view.data_ptr(), _strides(q, k, v, out.view), _sizes(q, k),
             softmax_scale, int(causal)),
            seed, tensors=(q, k, v, out.view, lse.view), compute_capability=compute_capability)
    out.check("out")
    lse.check("lse")
    return out.view, lse.view


def flash_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, causal: bool, softmax_scale: float, *,
                   schedule_seed: int | None = None,
                   compute_capability: tuple[int, int] = DEFAULT_CC
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (contiguous, shapes and dtype of q, k, v) from the forward's out and lse.
    schedule_seed and compute_capability as for flash_forward."""
    seed = _seed(schedule_seed)
    _check_qkv(q, k, v)
    for t, name in ((out, "out"), (dout, "dout")):
        _check_bshd(t, name, q.dtype)
        if t.shape != q.shape:
            raise ValueError(f"{name}: expected q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
    b, sq, hq, d = q.shape
    if (lse.dtype, tuple(lse.shape)) != (torch.float32, (b, hq, sq)):
        raise ValueError(f"lse: expected float32 {(b, hq, sq)}, got {lse.dtype} "
                         f"{tuple(lse.shape)}")
    q, k, v, out, dout = (_rows_16b(t) for t in (q, k, v, out, dout))
    lse = lse.contiguous()
    grads = [_Guarded(t.shape, t.dtype, _band(t.shape)) for t in (q, k, v)]
    dq, dk, dv = (g.view for g in grads)
    lib = _attention_lib()
    _invoke(lib, lib.flash_backward_emu,
            (_DTYPE_CODE[q.dtype], d, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
             dout.data_ptr(), lse.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
             _strides(q, k, v, out, dout, dq, dk, dv), _sizes(q, k), softmax_scale,
             int(causal)),
            seed, tensors=(q, k, v, out, dout, lse, dq, dk, dv),
            compute_capability=compute_capability)
    for g, name in zip(grads, ("dq", "dk", "dv")):
        g.check(name)
    return dq, dk, dv


# ------------------------------------------------------------------------- packed attention


def _check_packed(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> None:
    """Shapes and dtypes of a packed call; the cu_seqlens values are checked too (the CUDA op
    leaves that to its Python caller): a wrong one would send the kernels out of bounds, which
    the emulator would report less clearly."""
    if q.dtype not in _DTYPE_CODE:
        raise ValueError(f"q: expected float16 or bfloat16, got {q.dtype}")
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if t.device.type != "cpu" or t.dtype != q.dtype or t.dim() != 3 or t.stride(-1) != 1:
            raise ValueError(f"{name}: expected a CPU {q.dtype} (rows, heads, head_dim) tensor "
                             f"with unit stride along head_dim, got {t.dtype} {tuple(t.shape)} "
                             f"strides {t.stride()} on {t.device}")
    if k.shape != v.shape or k.shape[2] != q.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: head_dim "
                         "must match, k and v agree, Hq be a multiple of Hkv")
    if q.shape[2] not in HEAD_DIMS:
        raise ValueError(f"head_dim {q.shape[2]}: the kernels support {HEAD_DIMS}")
    for cu, name, total, longest in ((cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q),
                                     (cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape != cu_seqlens_q.shape:
            raise ValueError(f"{name}: expected int32 (batch + 1,), got {cu.dtype} "
                             f"{tuple(cu.shape)}")
        lengths = cu.diff()
        if cu[0] != 0 or cu[-1] != total or (lengths < 0).any() or (
                len(lengths) and lengths.max() > longest):
            raise ValueError(f"{name}: expected lengths from 0 to {total}, none over "
                             f"{longest}, got {cu.tolist()}")


def _packed_rows_16b(t: torch.Tensor) -> torch.Tensor:
    return _rows_16b(t[None])[0]


def _packed_strides(*tensors) -> ctypes.Array:
    flat = [s for t in tensors for s in (0, t.stride(0), t.stride(1))]
    return (ctypes.c_int64 * len(flat))(*flat)


def _packed_sizes(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k) -> ctypes.Array:
    return (ctypes.c_int * 6)(cu_seqlens_q.shape[0] - 1, q.shape[1], k.shape[1], max_seqlen_q,
                              max_seqlen_k, q.shape[0])


def flash_varlen_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                         max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                         softmax_scale: float, *, schedule_seed: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed forward (the kernels' VARLEN specializations, as flash_attention.cu's
    flash_attention_varlen_fwd_cuda launches them): q (total_q, Hq, D), k and v (total_k, Hkv,
    D), cu_seqlens int32 (B + 1,). out (total_q, Hq, D) and lse (Hq, total_q) fp32, allocated
    between NaN guard bands. Grids are sized by max_seqlen_*, as on a GPU; launch it only with
    rows in q and k (flash_attention.cu returns before any launch otherwise)."""
    seed = _seed(schedule_seed)
    _check_packed(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    q, k, v = (_packed_rows_16b(t) for t in (q, k, v))
    cu_q, cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    total_q, hq, d = q.shape
    out = _Guarded(q.shape, q.dtype, _band((1,) + tuple(q.shape)))
    lse = _Guarded((hq, total_q), torch.float32, 1024)
    lib = _attention_lib()
    _invoke(lib, lib.flash_varlen_forward_emu,
            (_DTYPE_CODE[q.dtype], d, q.data_ptr(), k.data_ptr(), v.data_ptr(),
             out.view.data_ptr(), lse.view.data_ptr(), cu_q.data_ptr(), cu_k.data_ptr(),
             _packed_strides(q, k, v, out.view),
             _packed_sizes(q, k, cu_q, max_seqlen_q, max_seqlen_k), softmax_scale, int(causal)),
            seed, tensors=(q, k, v, out.view, lse.view, cu_q, cu_k))
    out.check("out")
    lse.check("lse")
    return out.view, lse.view


def flash_varlen_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                          cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                          max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                          softmax_scale: float, *, schedule_seed: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of the packed attention (contiguous, shapes and dtype of q, k, v) from
    flash_varlen_forward's out and lse (Hq, total_q); arguments as there."""
    seed = _seed(schedule_seed)
    _check_packed(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    for t, name in ((out, "out"), (dout, "dout")):
        if t.shape != q.shape or t.dtype != q.dtype or t.stride(-1) != 1:
            raise ValueError(f"{name}: expected q's shape {tuple(q.shape)} and dtype, unit "
                             f"stride along head_dim; got {t.dtype} {tuple(t.shape)}")
    total_q, hq, d = q.shape
    if (lse.dtype, tuple(lse.shape)) != (torch.float32, (hq, total_q)):
        raise ValueError(f"lse: expected float32 {(hq, total_q)}, got {lse.dtype} "
                         f"{tuple(lse.shape)}")
    q, k, v, out, dout = (_packed_rows_16b(t) for t in (q, k, v, out, dout))
    lse = lse.contiguous()
    cu_q, cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    grads = [_Guarded(t.shape, t.dtype, _band((1,) + tuple(t.shape))) for t in (q, k, v)]
    dq, dk, dv = (g.view for g in grads)
    lib = _attention_lib()
    _invoke(lib, lib.flash_varlen_backward_emu,
            (_DTYPE_CODE[q.dtype], d, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
             dout.data_ptr(), lse.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
             cu_q.data_ptr(), cu_k.data_ptr(), _packed_strides(q, k, v, out, dout, dq, dk, dv),
             _packed_sizes(q, k, cu_q, max_seqlen_q, max_seqlen_k), softmax_scale, int(causal)),
            seed, tensors=(q, k, v, out, dout, lse, dq, dk, dv, cu_q, cu_k))
    for g, name in zip(grads, ("dq", "dk", "dv")):
        g.check(name)
    return dq, dk, dv


# ------------------------------------------------------------------------- KV cache


def flash_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  cache_seqlens: torch.Tensor, k: torch.Tensor | None = None,
                  v: torch.Tensor | None = None, *, block_table: torch.Tensor | None = None,
                  rotary_cos: torch.Tensor | None = None, rotary_sin: torch.Tensor | None = None,
                  rotary_interleaved: bool = False, causal: bool = True,
                  softmax_scale: float | None = None,
                  schedule_seed: int | None = None) -> torch.Tensor:
    """Attention against a KV cache as flash_attention.cu's flash_attention_kvcache_cuda runs
    it (run_kvcache: append, decode, combine), with the semantics of
    reference.attention_with_kvcache: the new k, v are written into k_cache, v_cache in place
    (rotated k when tables are given). CPU tensors: q (B, Sq, Hq, D); caches (B, S_cache, Hkv,
    D) or paged pools (num_blocks, page_size, Hkv, D) with block_table int32 (B, max_blocks),
    16-byte aligned rows (they are written in place, so never copied); tables fp32. Returns out
    (B, Sq, Hq, D), allocated between NaN guard bands. The values (lengths within the caches,
    table entries within the pool) are the caller's to get right, as on a GPU."""
    seed = _seed(schedule_seed)
    if q.dtype not in _DTYPE_CODE:
        raise ValueError(f"q: expected float16 or bfloat16, got {q.dtype}")
    for t, name in ((q, "q"), (k_cache, "k_cache"), (v_cache, "v_cache")):
        _check_bshd(t, name, q.dtype)
    for t, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        if _rows_16b(t) is not t:
            raise ValueError(f"{name}: rows must be 16-byte aligned (written in place)")
    b, sq, hq, d = q.shape
    if d not in HEAD_DIMS:
        raise ValueError(f"head_dim {d}: the kernels support {HEAD_DIMS}")
    page = k_cache.shape[1] if block_table is not None else 0
    capacity = page * block_table.shape[1] if page else k_cache.shape[1]
    s_new = 0 if k is None else k.shape[1]
    out = _Guarded(q.shape, q.dtype, _band(q.shape))
    if capacity == 0:  # no key anywhere: flash_attention.cu returns zeros without a launch
        out.view.zero_()
        return out.view
    q = _rows_16b(q)
    seqlens = cache_seqlens.to(torch.int32).contiguous()
    table = block_table.contiguous() if page else None
    cos = sin = None
    if rotary_cos is not None:
        cos = rotary_cos.float().contiguous()
        sin = rotary_sin.float().contiguous()
    if s_new:
        _check_bshd(k, "k", q.dtype)
        _check_bshd(v, "v", q.dtype)
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    zero = torch.zeros(1, 1, 1, 1, dtype=q.dtype)
    k_new, v_new = (k, v) if s_new else (zero, zero)
    strides = _strides(q, k_cache, v_cache, out.view, k_new, v_new)
    sizes = (ctypes.c_int * 7)(b, hq, k_cache.shape[2], sq, capacity, s_new, page)
    tensors = [q, k_cache, v_cache, seqlens, out.view] + ([k, v] if s_new else []) + [
        t for t in (table, cos, sin) if t is not None]
    lib = _attention_lib()
    _invoke(lib, lib.flash_kvcache_emu,
            (_DTYPE_CODE[q.dtype], d, q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
             seqlens.data_ptr(), _ptr(k if s_new else None), _ptr(v if s_new else None),
             _ptr(table), table.stride(0) if page else 0, _ptr(cos), _ptr(sin),
             out.view.data_ptr(), strides, sizes, scale, int(causal), int(rotary_interleaved)),
            seed, tensors=tensors)
    out.check("out")
    return out.view


# ------------------------------------------------------------------------- row-op wrappers

_ROW_DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
_I, _L = ctypes.c_int, ctypes.c_int64
_ROW_SIG = {
    # dtype, out, gate, up, rows, cols, stride_gate_row, stride_up_row, num_sms,
    # blocks_per_sm, info
    "swiglu_fwd_emu": [_I, _P, _P, _P, _L, _L, _L, _L, _I, _I, _P],
    # dtype, dgate, dup, dout, gate, up, rows, cols, stride (dout, gate, up), num_sms,
    # blocks_per_sm, info
    "swiglu_bwd_emu": [_I, _P, _P, _P, _P, _P, _L, _L, _L, _L, _L, _I, _I, _P],
    # dtype, y, h, rstd, x, residual, weight, rows, dim, stride_x_row, stride_residual_row,
    # eps, info
    "rms_norm_fwd_emu": [_I, _P, _P, _P, _P, _P, _P, _L, _L, _L, _L, ctypes.c_float, _P],
    # dtype, dx, dweight, dy, x, weight, rstd, dh, rows, dim, stride (dy, x, dh), num_sms,
    # blocks_per_sm, info
    "rms_norm_bwd_emu": [_I, _P, _P, _P, _P, _P, _P, _P, _L, _L, _L, _L, _L, _I, _I, _P],
    # dtype, out, x, cos, sin, positions, batch, seqlen, heads, head_dim, table_rows,
    # stride_x (batch, seq, head), interleaved, conjugate, info
    "rotary_emu": [_I, _P, _P, _P, _P, _P, _L, _L, _L, _L, _L, _L, _L, _L, _I, _I, _P],
}
_ROW_SOURCES = ["rows_emu.cpp", "swiglu_emu.cpp", "rms_norm_emu.cpp", "rotary_emu.cpp"]
_ROW_BAND = 1024  # elements of NaN before and after each output


def _rows_lib() -> ctypes.CDLL:
    lib = build("rows_emu", _ROW_SOURCES)
    for fn, sig in _ROW_SIG.items():
        getattr(lib, fn).argtypes = sig + [ctypes.c_char_p, ctypes.c_size_t]
        getattr(lib, fn).restype = ctypes.c_int
    lib.emu_register_global.argtypes = [_P, ctypes.c_size_t]
    return lib


def _check_rows(t: torch.Tensor, name: str, dtype, shape=None, dims: int = 2) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"{name}: the emulator runs on CPU tensors, got one on {t.device}")
    if t.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if t.dim() != dims or (shape is not None and tuple(t.shape) != tuple(shape)):
        want = f"{dims} dimensions" if shape is None else f"shape {tuple(shape)}"
        raise ValueError(f"{name}: expected {want}, got shape {tuple(t.shape)}")
    if t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected unit stride in the last dimension, got {t.stride()}")


def _row_dtype(t: torch.Tensor) -> int:
    if t.dtype not in _ROW_DTYPE_CODE:
        raise ValueError(f"expected float32, float16 or bfloat16, got {t.dtype}")
    return _ROW_DTYPE_CODE[t.dtype]


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _occupancy(blocks_per_sm: int | None) -> int:
    return 0 if blocks_per_sm is None else blocks_per_sm


def _fill(launch: dict | None, keys, info) -> None:
    if launch is not None:
        launch.update({k: int(v) for k, v in zip(keys, info)})


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor, *, num_sms: int = 8,
               blocks_per_sm: int | None = None, launch: dict | None = None,
               schedule_seed: int | None = None) -> torch.Tensor:
    """silu(gate) * up for (rows, cols) views with unit column stride, as swiglu.cu."""
    seed = _seed(schedule_seed)
    code = _row_dtype(gate)
    _check_rows(gate, "gate", gate.dtype)
    _check_rows(up, "up", gate.dtype, gate.shape)
    rows, cols = gate.shape
    out = _Guarded(gate.shape, gate.dtype, _ROW_BAND)
    info = (_L * 2)()
    lib = _rows_lib()
    _invoke(lib, lib.swiglu_fwd_emu,
            (code, out.view.data_ptr(), gate.data_ptr(), up.data_ptr(), rows, cols,
             gate.stride(0), up.stride(0), num_sms, _occupancy(blocks_per_sm), info),
            seed, tensors=(gate, up, out.view))
    out.check("out")
    _fill(launch, ("vec", "blocks"), info)
    return out.view


def swiglu_bwd(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, *, num_sms: int = 8,
               blocks_per_sm: int | None = None, launch: dict | None = None,
               schedule_seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup), contiguous, as swiglu.cu."""
    seed = _seed(schedule_seed)
    code = _row_dtype(gate)
    _check_rows(gate, "gate", gate.dtype)
    _check_rows(up, "up", gate.dtype, gate.shape)
    _check_rows(dout, "dout", gate.dtype, gate.shape)
    rows, cols = gate.shape
    dgate, dup = (_Guarded(gate.shape, gate.dtype, _ROW_BAND) for _ in range(2))
    info = (_L * 2)()
    lib = _rows_lib()
    _invoke(lib, lib.swiglu_bwd_emu,
            (code, dgate.view.data_ptr(), dup.view.data_ptr(), dout.data_ptr(), gate.data_ptr(),
             up.data_ptr(), rows, cols, dout.stride(0), gate.stride(0), up.stride(0), num_sms,
             _occupancy(blocks_per_sm), info),
            seed, tensors=(dout, gate, up, dgate.view, dup.view))
    dgate.check("dgate")
    dup.check("dup")
    _fill(launch, ("vec", "blocks"), info)
    return dgate.view, dup.view


_ROW_LAUNCH_KEYS = ("vec", "items", "threads_per_row", "rows_per_block", "blocks")


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None, *, launch: dict | None = None,
                 schedule_seed: int | None = None):
    """(y, rstd), or (y, h, rstd) with h = round(x + residual), as rms_norm.cu."""
    seed = _seed(schedule_seed)
    code = _row_dtype(x)
    _check_rows(x, "x", x.dtype)
    rows, dim = x.shape
    _check_rows(weight, "weight", x.dtype, (dim,), dims=1)
    weight = weight.contiguous()
    if residual is not None:
        _check_rows(residual, "residual", x.dtype, x.shape)
    y = _Guarded(x.shape, x.dtype, _ROW_BAND)
    h = _Guarded(x.shape, x.dtype, _ROW_BAND) if residual is not None else None
    rstd = _Guarded((rows,), torch.float32, _ROW_BAND)
    info = (_L * 5)()
    lib = _rows_lib()
    inputs = (x, weight) if residual is None else (x, residual, weight)
    outputs = (y.view, rstd.view) if h is None else (y.view, h.view, rstd.view)
    _invoke(lib, lib.rms_norm_fwd_emu,
            (code, y.view.data_ptr(), None if h is None else h.view.data_ptr(),
             rstd.view.data_ptr(), x.data_ptr(), _ptr(residual), weight.data_ptr(), rows, dim,
             x.stride(0), 0 if residual is None else residual.stride(0), eps, info),
            seed, tensors=inputs + outputs)
    for g, name in ((y, "y"), (h, "h"), (rstd, "rstd")):
        if g is not None:
            g.check(name)
    _fill(launch, _ROW_LAUNCH_KEYS, info)
    return outputs


def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                 dh: torch.Tensor | None = None, *, num_sms: int = 8,
                 blocks_per_sm: int | None = None, launch: dict | None = None,
                 schedule_seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight): the backward kernel's fp32 partials summed by rms_norm_dw_kernel (no rows:
    dweight = 0, written by that sum)."""
    seed = _seed(schedule_seed)
    code = _row_dtype(x)
    _check_rows(x, "x", x.dtype)
    rows, dim = x.shape
    _check_rows(dy, "dy", x.dtype, x.shape)
    _check_rows(weight, "weight", x.dtype, (dim,), dims=1)
    _check_rows(rstd, "rstd", torch.float32, (rows,), dims=1)
    weight, rstd = weight.contiguous(), rstd.contiguous()
    if dh is not None:
        _check_rows(dh, "dh", x.dtype, x.shape)
    dx = _Guarded(x.shape, x.dtype, _ROW_BAND)
    dweight = _Guarded((dim,), x.dtype, _ROW_BAND)
    info = (_L * 5)()
    lib = _rows_lib()
    inputs = (dy, x, weight, rstd) + (() if dh is None else (dh,))
    _invoke(lib, lib.rms_norm_bwd_emu,
            (code, dx.view.data_ptr(), dweight.view.data_ptr(), dy.data_ptr(), x.data_ptr(),
             weight.data_ptr(), rstd.data_ptr(), _ptr(dh), rows, dim, dy.stride(0), x.stride(0),
             0 if dh is None else dh.stride(0), num_sms, _occupancy(blocks_per_sm), info),
            seed, tensors=inputs + (dx.view, dweight.view))
    dx.check("dx")
    dweight.check("dweight")
    _fill(launch, _ROW_LAUNCH_KEYS, info)
    return dx.view, dweight.view


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           positions: torch.Tensor | None = None, interleaved: bool = False,
           conjugate: bool = False, *, launch: dict | None = None,
           schedule_seed: int | None = None) -> torch.Tensor:
    """x (B, S, H, D) rotated by the (rows, D/2) fp32 tables at positions (B, S) int64, or at
    row s without; contiguous out, as rotary.cu (conjugate: the backward, rotation by -t)."""
    seed = _seed(schedule_seed)
    code = _row_dtype(x)
    _check_rows(x, "x", x.dtype, dims=4)
    b, s, h, d = x.shape
    if d % 2 or d > 256:
        raise ValueError(f"x: head_dim {d}: the kernel takes even head_dim up to 256")
    _check_rows(cos, "cos", torch.float32, dims=2)
    _check_rows(sin, "sin", torch.float32, cos.shape)
    if cos.shape[1] != d // 2:
        raise ValueError(f"cos: expected {d // 2} columns, got {tuple(cos.shape)}")
    cos, sin = cos.contiguous(), sin.contiguous()
    if positions is not None:
        _check_rows(positions, "positions", torch.int64, (b, s))
        positions = positions.contiguous()
    elif cos.shape[0] < s:
        raise ValueError(f"cos: expected at least {s} rows without positions")
    out = _Guarded(x.shape, x.dtype, _ROW_BAND)
    info = (_L * 4)()
    lib = _rows_lib()
    tensors = (x, cos, sin, out.view) + (() if positions is None else (positions,))
    _invoke(lib, lib.rotary_emu,
            (code, out.view.data_ptr(), x.data_ptr(), cos.data_ptr(), sin.data_ptr(),
             _ptr(positions), b, s, h, d, cos.shape[0], x.stride(0), x.stride(1), x.stride(2),
             int(interleaved), int(conjugate), info),
            seed, tensors=tensors)
    out.check("out")
    _fill(launch, ("vec", "threads_per_token", "tokens_per_block", "blocks"), info)
    return out.view



# ------------------------------------------------------------------------- cross entropy

# dtype, logits, target, loss, scale, rows, vocab, stride_row, stride_scale, ignore_index,
# write_grad, info
_CE_SIG = [_I, _P, _P, _P, _P, _L, _L, _L, _L, _L, _I, _P]


def _cross_entropy_lib() -> ctypes.CDLL:
    lib = build("cross_entropy_emu", ["rows_emu.cpp", "cross_entropy_emu.cpp"])
    lib.cross_entropy_chunk_emu.argtypes = _CE_SIG + [ctypes.c_char_p, ctypes.c_size_t]
    lib.cross_entropy_chunk_emu.restype = ctypes.c_int
    lib.emu_register_global.argtypes = [_P, ctypes.c_size_t]
    return lib


def cross_entropy_chunk(logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor,
                        ignore_index: int, write_grad: bool, *, launch: dict | None = None,
                        schedule_seed: int | None = None) -> torch.Tensor:
    """The chunk pass of csrc/cross_entropy_kernels.cuh through its launch path, as
    cross_entropy.cu runs it: logits (rows, vocab) fp32 / fp16 / bf16 with unit stride along vocab
    and any row stride, overwritten in place by dz when write_grad; target int64 (rows,); scale
    fp32, 0-dim or (rows,). Returns the fp32 loss (rows,), allocated between NaN guard bands.
    The logits' span (first to last element), target, scale and loss are the registered global
    memory: a load_vec / store_vec outside them fails the call. launch receives (vec, threads,
    blocks)."""
    seed = _seed(schedule_seed)
    code = _row_dtype(logits)
    _check_rows(logits, "logits", logits.dtype)
    rows, vocab = logits.shape
    _check_rows(target, "target", torch.int64, (rows,), dims=1)
    if scale.dtype != torch.float32 or scale.shape not in ((), (rows,)):
        raise ValueError(f"scale: expected fp32 () or ({rows},), got {scale.dtype} "
                         f"{tuple(scale.shape)}")
    target = target.contiguous()
    loss = _Guarded((rows,), torch.float32, _ROW_BAND)
    info = (_L * 3)()
    lib = _cross_entropy_lib()
    _invoke(lib, lib.cross_entropy_chunk_emu,
            (code, logits.data_ptr(), target.data_ptr(), loss.view.data_ptr(), scale.data_ptr(),
             rows, vocab, logits.stride(0), scale.stride(0) if scale.dim() else 0, ignore_index,
             int(write_grad), info),
            seed, tensors=(logits, target, scale, loss.view))
    loss.check("loss")
    _fill(launch, ("vec", "threads", "blocks"), info)
    return loss.view
