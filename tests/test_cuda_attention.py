"""The CUDA flash attention (csrc/flash_attention_kernels.cuh and the kernel headers it includes,
csrc/flash_attention.cu).

Without a GPU the very kernel source runs on the host: tests/cuda_emulator compiles it with g++
against an emulation of the tensor-core primitives it is written in (csrc/tensor_core.cuh:
mma.m16n8k16 fragment layouts, ldmatrix, asynchronous cp.async that lands only at its wait,
shuffles, barriers with deadlock detection), one fiber per CUDA thread. That proves the
fragment, swizzle, mask and pipeline arithmetic against reference.py. Races between warps show
under the emulator's random schedules (LLAMA_KERNELS_EMULATOR_SEED=<n>; test_cuda_emulator runs
the attention kernels under a few seeds and demands bitwise-equal results). What it cannot prove
(timing, the memory model of the real hardware) is the GPU half's job: the same cases through
lk.flash_attention(backend="cuda") and the GPU-only shapes, against the reference and the Triton
backend, and compute-sanitizer in scripts/gpu_check.sh.

Tolerance: helpers.assert_close (llama_kernels.testing's rule: at most twice eager PyTorch's
error in the same dtype, plus a floor), as for the Triton attention: the kernels round P (and dS)
to the input dtype before the second product, as eager rounds its softmax.
"""

from __future__ import annotations

import ctypes
import itertools

import pytest
import torch

import cuda_emulator
import llama_kernels as lk
from helpers import GPU, assert_close, attention_grads, qkv_inputs
from llama_kernels import reference
from llama_kernels.ops import _backend

EMULATOR, EMULATOR_WHY_NOT = cuda_emulator.available()
needs_emulator = pytest.mark.skipif(not EMULATOR, reason=f"no emulator: {EMULATOR_WHY_NOT}")
HAS_CUDA_KERNEL = "flash_attention_fwd_cuda" in _backend.CUDA_AVAILABLE_KERNELS
needs_gpu = pytest.mark.skipif(
    not (GPU and HAS_CUDA_KERNEL),
    reason="needs a GPU and the built CUDA extension"
    + ("" if GPU else " (no GPU here)")
    + ("" if HAS_CUDA_KERNEL else f" ({_backend._EXTENSION_WHY_NOT or 'kernel not built'})"))

DTYPES = (torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16"}

# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal). The forward tiles are
# 128 x 64 (d64: 4 warps x 2 m16 tiles, d128: 8 warps), the backward 64-row blocks with
# 32/64-row steps, so these cover several query and key blocks, ragged ends of both, diagonal
# tiles, Sq < Sk (bottom-right alignment), a decode row, and grouped / multi-query heads.
CASES = [
    pytest.param(1, 1, 1, 1, 1, 64, True, id="s1"),
    pytest.param(1, 130, 130, 2, 1, 64, True, id="s130-h2/1-d64"),
    pytest.param(1, 77, 77, 2, 2, 128, True, id="s77-d128"),
    pytest.param(1, 40, 150, 2, 1, 128, True, id="q40-k150-h2/1-d128"),
    pytest.param(2, 1, 77, 4, 1, 64, True, id="decode-k77-h4/1"),
    pytest.param(1, 150, 40, 2, 2, 64, False, id="q150-k40-full"),
    pytest.param(1, 33, 97, 4, 2, 128, False, id="q33-k97-h4/2-d128-full"),
    # The decode kernel (query heads of a group x queries <= 16 rows), split over keys (the
    # emulator plans splits for an 8-SM GPU): 5, 3 and 3 splits merged by the combine kernel.
    pytest.param(1, 1, 1100, 8, 2, 64, True, id="decode-k1100-h8/2-5splits"),
    pytest.param(2, 3, 704, 4, 1, 128, True, id="decode3-k704-h4/1-d128-3splits"),
    pytest.param(1, 2, 515, 8, 1, 64, False, id="decode2-k515-h8/1-full-3splits"),
    # Decode blocks of 2 and 4 m16 tiles (17..64 packed rows: heads of a group x queries).
    pytest.param(1, 1, 300, 17, 1, 64, False, id="decode-k300-h17/1-17rows-2splits"),
    pytest.param(1, 3, 700, 16, 2, 64, True, id="decode3-k700-h16/2-24rows-3splits"),
    pytest.param(2, 5, 520, 8, 1, 64, True, id="decode5-k520-h8/1-40rows-3splits"),
    pytest.param(1, 4, 600, 16, 1, 128, True, id="decode4-k600-h16/1-d128-64rows-3splits"),
    pytest.param(1, 2, 100, 16, 1, 128, True, id="decode2-k100-h16/1-d128-32rows-1split"),
]
GPU_CASES = [
    pytest.param(2, 1025, 1025, 16, 4, 128, True, id="s1025-h16/4-d128"),
    pytest.param(1, 1025, 1025, 8, 8, 64, False, id="s1025-d64-full"),
    pytest.param(2, 512, 2049, 8, 1, 128, True, id="q512-k2049-h8/1"),
    pytest.param(4, 1, 4096, 32, 8, 128, True, id="decode-k4096-h32/8"),
    pytest.param(1, 4096, 4096, 8, 8, 64, True, id="s4096-d64"),
]


def emulated_inputs(b, sq, sk, hq, hkv, d, dtype):
    """q, k, v on the CPU (the emulator's side, GPU or not) inside NaN padding: a read past a
    mask shows as NaN."""
    return qkv_inputs(b, sq, sk, hq, hkv, d, dtype, device="cpu")


def check_all(got, q, k, v, dout, causal, scale):
    """got = (out, dq, dk, dv): each within the tolerance rule of the reference."""
    def ref(upcast):
        return lambda *t: reference.attention(*t, causal=causal, softmax_scale=scale,
                                              upcast=upcast)
    want = attention_grads(ref(True), q.float(), k.float(), v.float(), dout.float())
    eager = attention_grads(ref(False), q, k, v, dout)
    for name, g, r, e in zip(("out", "dq", "dk", "dv"), got, want, eager):
        assert_close(g, r, e, name)


# ------------------------------------------------------------------------------ emulated


@needs_emulator
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("b,sq,sk,hq,hkv,d,causal", CASES)
def test_emulated_forward_backward(b, sq, sk, hq, hkv, d, causal, dtype):
    q, k, v = emulated_inputs(b, sq, sk, hq, hkv, d, dtype)
    scale = d ** -0.5
    out, lse = cuda_emulator.flash_forward(q, k, v, causal, scale)
    _, ref_lse = reference.attention_with_lse(q, k, v, causal=causal, softmax_scale=scale)
    _, eager_lse = reference.attention_with_lse(q, k, v, causal=causal, softmax_scale=scale,
                                                upcast=False)
    assert_close(lse, ref_lse, eager_lse, "lse")
    dout = torch.randn(q.shape).to(dtype)
    grads = cuda_emulator.flash_backward(dout, q, k, v, out, lse, causal, scale)
    check_all((out, *grads), q, k, v, dout, causal, scale)


@needs_emulator
@pytest.mark.parametrize("scale", [-0.3, 0.0], ids=["negative", "zero"])
def test_emulated_any_scale(scale):
    # Scores are scaled before the running max and the mask, so a negative scale (the max of
    # scale * s is scale * min s) and a zero scale (uniform weights) are right too.
    q, k, v = emulated_inputs(1, 70, 70, 2, 1, 64, torch.float16)
    dout = torch.randn(q.shape).half()
    out, lse = cuda_emulator.flash_forward(q, k, v, True, scale)
    grads = cuda_emulator.flash_backward(dout, q, k, v, out, lse, True, scale)
    check_all((out, *grads), q, k, v, dout, True, scale)


@needs_emulator
def test_emulated_no_keys():
    # Sk == 0 (non-causal): no key block to visit. Every row is empty: O = 0, lse = -inf, as
    # the reference; the block must still wait for its Q copies before reusing their buffer
    # (the emulator reports copies never waited for). The cuda op returns early here; the
    # kernel is safe anyway.
    q = torch.randn(1, 5, 2, 64).half()
    k = torch.randn(1, 0, 2, 64).half()
    out, lse = cuda_emulator.flash_forward(q, k, k, False, 0.125)
    ref_out, ref_lse = reference.attention_with_lse(q, k, k, causal=False, softmax_scale=0.125)
    assert torch.equal(out.float(), ref_out.float()) and not out.any()
    assert torch.equal(lse, ref_lse) and bool((lse == float("-inf")).all())


@needs_emulator
def test_emulated_dkdv_without_queries():
    # Sq == 0 leaves each dK/dV block no query step. It must still wait for its K and V copies
    # before staging dK and dV through their buffers (the emulator reports copies never waited
    # for), and write zeros. The cuda op returns early here; the delta and dQ grids are empty,
    # so the emulator is told to skip empty launches instead of refusing them as CUDA does.
    q = torch.randn(1, 0, 4, 64).half()
    k, v = torch.randn(1, 150, 2, 64).half(), torch.randn(1, 150, 2, 64).half()
    lib = cuda_emulator.build("flash_attention_emu", ["flash_attention_emu.cpp"])
    lib.emu_skip_empty_grids(1)
    try:
        dq, dk, dv = cuda_emulator.flash_backward(q, q, k, v, q, torch.zeros(1, 4, 0), True, 0.1)
    finally:
        lib.emu_skip_empty_grids(0)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert not dk.any() and not dv.any()


@needs_emulator
def test_emulated_fused_qkv_views():
    # q, k, v sliced out of one fused projection: strided over heads, no copy in the kernels.
    b, s, hq, hkv, d = 1, 65, 4, 2, 64
    qkv = torch.randn(b, s, hq + 2 * hkv, d).to(torch.bfloat16)
    q, k, v = qkv.split([hq, hkv, hkv], dim=2)
    assert not q.is_contiguous()
    dout = torch.randn(q.shape).to(torch.bfloat16)
    out, lse = cuda_emulator.flash_forward(q, k, v, True, d ** -0.5)
    grads = cuda_emulator.flash_backward(dout, q, k, v, out, lse, True, d ** -0.5)
    check_all((out, *grads), q, k, v, dout, True, d ** -0.5)


@needs_emulator
def test_emulated_backward_is_deterministic():
    q, k, v = emulated_inputs(1, 97, 97, 4, 1, 64, torch.float16)
    dout = torch.randn(q.shape).half()
    out, lse = cuda_emulator.flash_forward(q, k, v, True, 0.125)
    first = cuda_emulator.flash_backward(dout, q, k, v, out, lse, True, 0.125)
    second = cuda_emulator.flash_backward(dout, q, k, v, out, lse, True, 0.125)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ shared memory

# Opt-in dynamic shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin): an A100
# (8.0), the consumer Ampere / Ada parts that run the sm_80 build (8.6, 8.9), an H100 (9.0),
# and sm_75's 64 KiB, which some tiles exceed, for the refusal path.
SMEM_LIMITS = {(8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 9): 99 * 1024, (9, 0): 227 * 1024,
               (7, 5): 64 * 1024}
# Bytes of dynamic shared memory per block of each launch, in launch order, for the shapes of
# test_emulated_shared_memory_limits: forward (prefill), decode with 1, 2 and 4 m16 tiles of
# packed rows (key splits merged by the combine kernel, which uses none), backward (delta,
# dK/dV, dQ). The refusals under sm_75's limit show which decode tile a launch picked.
SMEM_NEEDS = {
    64: {"forward": [("flash_fwd_kernel", 32768)],
         "decode": [("flash_decode_kernel", 34816), ("flash_decode_combine_kernel", 0)],
         "decode32": [("flash_decode_kernel", 36864), ("flash_decode_combine_kernel", 0)],
         "decode64": [("flash_decode_kernel", 40960), ("flash_decode_combine_kernel", 0)],
         "backward": [("flash_bwd_delta_kernel", 0), ("flash_bwd_dkdv_kernel", 50176),
                      ("flash_bwd_dq_kernel", 50176)]},
    128: {"forward": [("flash_fwd_kernel", 65536)],
          "decode": [("flash_decode_kernel", 69632), ("flash_decode_combine_kernel", 0)],
          "decode32": [("flash_decode_kernel", 73728), ("flash_decode_combine_kernel", 0)],
          "decode64": [("flash_decode_kernel", 81920), ("flash_decode_combine_kernel", 0)],
          "backward": [("flash_bwd_delta_kernel", 0), ("flash_bwd_dkdv_kernel", 66048),
                       ("flash_bwd_dq_kernel", 99328)]},
}


def test_tiles_fit_sm80_and_sm86_limits():
    """Every tile fits the 99 KiB of sm_86 / sm_89 (the largest, dQ at d128, needs 99,328
    bytes), and so the 163 KiB of sm_80 and the 227 KiB of sm_90."""
    needs = [b for per_d in SMEM_NEEDS.values() for launches in per_d.values()
             for _, b in launches]
    assert max(needs) == 99328 <= SMEM_LIMITS[(8, 6)]


@needs_emulator
@pytest.mark.parametrize("cc", list(SMEM_LIMITS), ids=lambda cc: f"sm{cc[0]}{cc[1]}")
@pytest.mark.parametrize("d", [64, 128])
def test_emulated_shared_memory_limits(cc, d):
    """On an emulated device of each compute capability, every launch sequence (prefill,
    split decode, backward) either runs and matches the reference, or is refused before any
    kernel runs with the message naming the first kernel over the limit, its bytes and the
    limit."""
    limit, dtype, scale = SMEM_LIMITS[cc], torch.float16, d ** -0.5
    shapes = {"forward": (1, 40, 70, 2, 1), "decode": (1, 1, 300, 4, 1),
              "decode32": (1, 2, 300, 16, 1), "decode64": (1, 4, 300, 16, 1),
              "backward": (1, 40, 70, 2, 1)}
    for part, (b, sq, sk, hq, hkv) in shapes.items():
        over = [(name, n) for name, n in SMEM_NEEDS[d][part] if n > limit]
        q, k, v = emulated_inputs(b, sq, sk, hq, hkv, d, dtype)
        dout = torch.randn(q.shape).to(dtype)

        def run():
            if part != "backward":
                return cuda_emulator.flash_forward(q, k, v, True, scale, compute_capability=cc)
            out, lse = cuda_emulator.flash_forward(q, k, v, True, scale)
            return (out, *cuda_emulator.flash_backward(dout, q, k, v, out, lse, True, scale,
                                                       compute_capability=cc))
        if over:
            name, n = over[0]
            with pytest.raises(cuda_emulator.EmulatorError,
                               match=f"^flash attention \\(head_dim {d}\\): {name} needs {n} "
                                     f"bytes of shared memory per block, but device 0 allows "
                                     f"at most {limit} "):
                run()
            continue
        got = run()
        if part == "backward":
            check_all(got, q, k, v, dout, True, scale)
        else:
            ref = reference.attention(q.float(), k.float(), v.float(), causal=True,
                                      softmax_scale=scale)
            eager = reference.attention(q, k, v, causal=True, softmax_scale=scale, upcast=False)
            assert_close(got[0], ref, eager, f"{part} out")


@needs_emulator
def test_emulated_launch_over_the_limit_fails():
    """Without the launcher's check, the emulated launch itself refuses a block over the
    device's limit, as cudaLaunchKernel would."""
    q, k, v = emulated_inputs(1, 40, 70, 2, 1, 128, torch.float16)
    lib = cuda_emulator._attention_lib()
    lib.emu_check_smem_before_launch(0)
    try:
        with pytest.raises(cuda_emulator.EmulatorError,
                           match="^launch: 69632 bytes of dynamic shared memory per block, over "
                                 "the 65536-byte opt-in limit of compute capability 7.5"):
            cuda_emulator.flash_forward(q[:, :1], k, v, True, 0.1, compute_capability=(7, 5))
    finally:
        lib.emu_check_smem_before_launch(1)


# ------------------------------------------------------------------------------ tile arithmetic


@pytest.fixture(scope="module")
def tiles():
    if not EMULATOR:
        pytest.skip(f"no emulator: {EMULATOR_WHY_NOT}")
    lib = cuda_emulator.build("tile_arithmetic", ["tile_arithmetic.cpp"])
    return lib


def _visible_pairs(sq, sk, causal):
    """Brute force: the (i, j) pairs the reference's mask keeps."""
    mask = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        mask = torch.ones(sq, sk, dtype=torch.bool).tril(diagonal=sk - sq)
    return mask


@pytest.mark.parametrize("sq,sk", [(1, 1), (1, 77), (40, 150), (130, 130), (150, 40), (64, 64),
                                   (129, 200)])
@pytest.mark.parametrize("causal", [True, False])
def test_tile_arithmetic(tiles, sq, sk, causal):
    """The kernels' own visit / mask / first-block functions against a walk over every pair:
    a query block visits exactly the key blocks holding a visible pair (causal ones stop at
    the diagonal), a tile is masked whenever it holds an invisible pair of real rows, and the
    dK/dV loop starts at the first query block that sees the key block."""
    if causal and sq > sk:
        pytest.skip("causal needs seqlen_q <= seqlen_k (the op refuses it)")
    mask = _visible_pairs(sq, sk, causal)
    for i, j in itertools.product(range(sq), range(sk + 3)):
        expect = j < sk and bool(mask[i, j])
        assert tiles.lk_visible(i, j, sq, sk, causal) == expect, (i, j)
    for bm, bn in ((128, 64), (64, 64), (64, 32), (16, 64)):
        for m in range((sq + bm - 1) // bm):
            rows = mask[m * bm:(m + 1) * bm]
            visited = [n for n in range((sk + bn - 1) // bn) if rows[:, n * bn:(n + 1) * bn].any()]
            end = tiles.lk_key_block_end(m, bm, bn, sq, sk, causal)
            assert end == (visited[-1] + 1 if visited else 0), (bm, bn, m)
            for n in range(end):
                tile = rows[:, n * bn:(n + 1) * bn]
                full = tile.shape[1] == bn and bool(tile.all())
                needs = tiles.lk_tile_needs_mask(m, n, bm, bn, sq, sk, causal)
                assert needs or full, f"tile ({m}, {n}) of {bm}x{bn} holds masked pairs"
        for n in range((sk + bn - 1) // bn):
            cols = mask[:, n * bn:(n + 1) * bn]
            first = next(m for m in range((sq + bm - 1) // bm)
                         if cols[m * bm:(m + 1) * bm].any())
            assert tiles.lk_query_block_begin(n, bm, bn, sq, sk, causal) == first, (bm, bn, n)


@pytest.mark.parametrize("d", [64, 128])
def test_swizzle_is_a_conflict_free_permutation(tiles, d):
    """Each row's 16-byte chunks are permuted within the row, and the 8 rows one ldmatrix reads
    at one logical chunk fall in 8 different bank groups (offset / 8 elements mod 8)."""
    rows = 16
    offsets = [[tiles.lk_swizzle(d, r, c) for c in range(d)] for r in range(rows)]
    for r in range(rows):
        assert sorted(offsets[r]) == list(range(r * d, (r + 1) * d))
        for c in range(0, d, 8):  # a chunk stays contiguous
            assert offsets[r][c:c + 8] == list(range(offsets[r][c], offsets[r][c] + 8))
    for r0 in range(0, rows, 8):
        for c in range(0, d, 8):
            groups = {offsets[r][c] // 8 % 8 for r in range(r0, r0 + 8)}
            assert len(groups) == 8, (r0, c)


def test_tiles_fit_the_hardware(tiles):
    """The tile shapes and shared memory the launch header states: (rows + rows) x D x 2
    bytes per 16-bit tile, within sm_80's 163 KiB per block (the launcher opts in past 48)."""
    got = {}
    for d in (64, 128):
        out = (ctypes.c_int * 13)()
        tiles.lk_tiles(d, out)
        got[d] = list(out)
    kib = 1024
    #               D, fwd M, N, threads, smem; dK/dV own, step, thr, smem; dQ own, step, thr, smem
    assert got[64] == [64, 128, 64, 128, 32 * kib, 64, 64, 128, 49 * kib,
                       64, 64, 128, 49 * kib]
    assert got[128] == [128, 128, 64, 256, 64 * kib, 64, 32, 128, 64 * kib + 512,
                        64, 64, 128, 97 * kib]
    assert max(max(v[4], v[8], v[12]) for v in got.values()) <= 163 * kib


# ------------------------------------------------------------------------------ on a GPU


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("b,sq,sk,hq,hkv,d,causal", CASES + GPU_CASES)
def test_gpu_forward_backward(b, sq, sk, hq, hkv, d, causal, dtype):
    q, k, v = qkv_inputs(b, sq, sk, hq, hkv, d, dtype, poison=False, device="cuda")
    dout = torch.randn(q.shape, device="cuda", dtype=dtype)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = lk.flash_attention(*leaves, causal=causal, backend="cuda")
    grads = torch.autograd.grad(out, leaves, dout)
    check_all((out, *grads), q, k, v, dout, causal, d ** -0.5)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_gpu_matches_emulated_and_triton(dtype):
    q, k, v = qkv_inputs(1, 130, 130, 2, 1, 64, dtype, poison=False, device="cuda")
    out, lse = torch.ops.llama_kernels.flash_attention_fwd_cuda(q, k, v, True, 0.125)
    tri_out, tri_lse = torch.ops.llama_kernels.flash_attention_fwd(q, k, v, True, 0.125,
                                                                   "triton")
    ref_out, ref_lse = reference.attention_with_lse(q, k, v, causal=True, softmax_scale=0.125)
    assert_close(out, ref_out.float(), tri_out, "out vs triton's error")
    assert_close(lse, ref_lse, tri_lse, "lse vs triton's error")
    if EMULATOR:  # the emulation is the same arithmetic: it must agree to rounding
        emu_out, emu_lse = cuda_emulator.flash_forward(q.cpu(), k.cpu(), v.cpu(), True, 0.125)
        torch.testing.assert_close(out.cpu(), emu_out, atol=2e-2, rtol=0)
        torch.testing.assert_close(lse.cpu(), emu_lse, atol=1e-4, rtol=0)


@needs_gpu
def test_gpu_backward_is_deterministic():
    q, k, v = qkv_inputs(2, 300, 300, 8, 2, 128, torch.bfloat16, poison=False, device="cuda")
    dout = torch.randn_like(q)
    out, lse = torch.ops.llama_kernels.flash_attention_fwd_cuda(q, k, v, True, 0.1)
    first = torch.ops.llama_kernels.flash_attention_bwd_cuda(dout, q, k, v, out, lse, True, 0.1)
    second = torch.ops.llama_kernels.flash_attention_bwd_cuda(dout, q, k, v, out, lse, True, 0.1)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_gpu
def test_gpu_fused_qkv_views_and_misaligned_rows():
    b, s, hq, hkv, d = 2, 257, 8, 2, 128
    qkv = torch.randn(b, s, hq + 2 * hkv, d, device="cuda", dtype=torch.float16)
    q, k, v = qkv.split([hq, hkv, hkv], dim=2)
    dout = torch.randn(q.shape, device="cuda", dtype=torch.float16)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = lk.flash_attention(*leaves, backend="cuda")
    check_all((out, *torch.autograd.grad(out, leaves, dout)), q, k, v, dout, True, d ** -0.5)
    # Rows not 16-byte aligned (an odd element offset) are copied first, not misread.
    flat = torch.randn(1 + b * s * hq * d, device="cuda", dtype=torch.float16)
    q2 = flat[1:].view(b, s, hq, d)
    out = lk.flash_attention(q2, k, v, backend="cuda")
    ref = reference.attention(q2.float(), k.float(), v.float(), causal=True)
    eager = reference.attention(q2, k, v, causal=True, upcast=False)
    assert_close(out, ref, eager, "misaligned out")


@needs_gpu
def test_gpu_bad_inputs_are_refused_before_launch():
    q = torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="head_dim 96"):
        lk.flash_attention(torch.randn(1, 8, 2, 96, device="cuda", dtype=torch.float16),
                           torch.randn(1, 8, 2, 96, device="cuda", dtype=torch.float16),
                           torch.randn(1, 8, 2, 96, device="cuda", dtype=torch.float16),
                           backend="cuda")
    with pytest.raises(RuntimeError, match="^k: expected dtype"):
        torch.ops.llama_kernels.flash_attention_fwd_cuda(q, q.bfloat16(), q, True, 0.1)
    with pytest.raises(RuntimeError, match="^q: causal attention needs seqlen_q <= seqlen_k"):
        torch.ops.llama_kernels.flash_attention_fwd_cuda(q, q[:, :4], q[:, :4], True, 0.1)
    with pytest.raises(RuntimeError, match="^lse: expected shape"):
        torch.ops.llama_kernels.flash_attention_bwd_cuda(q, q, q, q, q,
                                                         torch.zeros(1, 8, 2, device="cuda"),
                                                         True, 0.1)


@needs_gpu
def test_gpu_opcheck():
    q = torch.randn(1, 70, 4, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    k = torch.randn(1, 70, 2, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    v = torch.randn(1, 70, 2, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    torch.library.opcheck(torch.ops.llama_kernels.flash_attention_fwd, (q, k, v, True, 0.125,
                                                                        "cuda"))
