"""The host emulator of csrc/tensor_core.cuh (tests/cuda_emulator) against the PTX semantics.

The attention kernels are checked on the CPU by running them on this emulator, so the emulator
itself must be right: the mma / ldmatrix fragment layouts give torch's matmul, pack2 turns an
accumulator into an A fragment, shuffles read the right lane, fp16/bf16 conversions round like
torch, and the bugs it promises to report (reading a cp.async tile before waiting, bad
addresses, deadlocks) are reported. The random schedules (schedule_seed != 0) are reproducible,
differ between seeds, run warps far ahead of each other, and expose a missing barrier between
warps that round-robin hides. The kernels under test are in primitives_selftest.cpp.
"""

from __future__ import annotations

import ctypes
import itertools

import pytest
import torch

import cuda_emulator as emu
from helpers import poisoned

OK, WHY = emu.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"CUDA emulator: {WHY}")

DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
CODE = {torch.float16: 0, torch.bfloat16: 1}
_P, _I = ctypes.c_void_p, ctypes.c_int
_SIGS = {
    "emu_convert": [_I, _I, _P, _P, ctypes.c_int64],
    "emu_pack2": [_I, ctypes.c_float, ctypes.c_float, _P],
    "selftest_gemm": [_I, _I, _I, _I, _P, _P, _P],
    "selftest_chain": [_I, _P, _P, _P, _P],
    "selftest_shfl": [_P, _P, _P, _I, _I, _I],
    "selftest_reuse": [_P, _P],
    "selftest_race": [_P, _P, _I, _I],
    "selftest_order": [_P, _I, _I],
    "selftest_deadlock": [_I, _P],
    "selftest_fault": [_I],
}
SEEDS = range(1, 9)  # the random schedules each schedule test tries


@pytest.fixture(scope="module")
def lib():
    lib = emu.build("primitives_selftest", ["primitives_selftest.cpp"])
    for name, sig in _SIGS.items():
        getattr(lib, name).argtypes = sig + [ctypes.c_char_p, ctypes.c_size_t]
        getattr(lib, name).restype = _I
    return lib


def _ref_matmul(a, b):
    # Products of 16-bit values are exact; float64 sums then one rounding, as the emulator.
    return (a.double() @ b.double()).float()


# ------------------------------------------------------------------------------ mma + ldmatrix

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b_kn", [0, 1], ids=["ldmatrix-nk", "ldmatrix-trans-kn"])
@pytest.mark.parametrize("k_valid", [32, 24, 8])
def test_gemm_matches_torch(lib, dtype, b_kn, k_valid):
    """C += A @ B staged by cp.async (B rows >= k_valid zero-filled), loaded by ldmatrix."""
    a = torch.randn(16, 32).to(dtype)
    b = torch.randn(32, 16).to(dtype)  # B[k][n]
    c0 = torch.randn(16, 16)
    b_in = b.contiguous() if b_kn else b.t().contiguous()
    c = c0.clone()
    emu.call(lib.selftest_gemm, CODE[dtype], b_kn, 0, k_valid, a.data_ptr(), b_in.data_ptr(),
             c.data_ptr())
    ref = (c0.double() + a[:, :k_valid].double() @ b[:k_valid].double()).float()
    torch.testing.assert_close(c, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulator_packs_into_a_fragment(lib, dtype):
    """O = round16(A @ Bt^T) @ V: mma's C layout, through pack2, is the A layout (P @ V)."""
    a, bt, v = (torch.randn(16, 16).to(dtype) for _ in range(3))
    o = torch.full((16, 16), float("nan"))
    emu.call(lib.selftest_chain, CODE[dtype], a.data_ptr(), bt.data_ptr(), v.data_ptr(),
             o.data_ptr())
    p = _ref_matmul(a, bt.t()).to(dtype)
    torch.testing.assert_close(o, _ref_matmul(p, v), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ shuffles

def test_shfl_xor(lib):
    blocks, threads, mask = 3, 64, int(torch.randint(1, 32, ()))
    x = torch.randn(blocks * threads)
    out_xor = torch.full_like(x, float("nan"))
    out_sum = torch.full_like(x, float("nan"))
    emu.call(lib.selftest_shfl, x.data_ptr(), out_xor.data_ptr(), out_sum.data_ptr(), blocks,
             threads, mask)
    t = torch.arange(len(x))
    assert torch.equal(out_xor, x[t // 32 * 32 + (t % 32 ^ mask)]), f"mask {mask}"
    warp_sums = x.double().view(-1, 32).sum(1).float().repeat_interleave(32)
    torch.testing.assert_close(out_sum, warp_sums, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ reported bugs

@pytest.mark.parametrize("dtype", DTYPES)
def test_reading_before_cp_async_wait_sees_poison(lib, dtype):
    """B is read after wait_group 1 (A's group only): every product meets 0xFFFF, a NaN."""
    a, b = torch.randn(16, 32).to(dtype), torch.randn(32, 16).to(dtype)
    c = torch.zeros(16, 16)
    emu.call(lib.selftest_gemm, CODE[dtype], 1, 1, 32, a.data_ptr(), b.data_ptr(), c.data_ptr())
    assert torch.isnan(c).all(), c


def _ldmatrix_x4_ref(tile: torch.Tensor) -> torch.Tensor:
    """(32 lanes, 4 regs) of ldmatrix .x4 when lane l addresses row l of a [32][8] tile."""
    m = tile.view(4, 8, 4, 2).to(torch.int64) & 0xFFFF  # matrix i, row g, pair c, element
    regs = m[..., 0] | m[..., 1] << 16  # (i, g, c): the low half holds the lower column
    return regs.permute(1, 2, 0).reshape(32, 4)  # lane 4g + c, register i


def test_cp_async_poisons_a_reused_buffer(lib):
    """A copy into a buffer still holding the last tile: reads before the wait see 0xFFFF,
    not the stale tile (a missing wait in a pipeline cannot pass by luck). Shared memory is
    0xFF at the start of every block, not what the block before left there."""
    src = torch.randint(0, 1 << 15, (512,), dtype=torch.int16)
    words = torch.zeros(5 * 32 * 4, dtype=torch.int32)
    emu.call(lib.selftest_reuse, src.data_ptr(), words.data_ptr())
    out = words.view(5, 32, 4).to(torch.int64) & 0xFFFFFFFF
    assert (out[3:] == 0xFFFFFFFF).all(), "each block should start with 0xFF shared memory"
    assert torch.equal(out[0], _ldmatrix_x4_ref(src[:256]))
    assert (out[1] == 0xFFFFFFFF).all(), "read before the wait should see the poison"
    assert torch.equal(out[2], _ldmatrix_x4_ref(src[256:]))


def test_exit_with_copies_in_flight_is_an_error(lib):
    a, b = torch.randn(16, 32).half(), torch.randn(32, 16).half()
    c = torch.zeros(16, 16)
    with pytest.raises(emu.EmulatorError, match="never waited for"):
        emu.call(lib.selftest_gemm, 0, 1, 2, 32, a.data_ptr(), b.data_ptr(), c.data_ptr())


@pytest.mark.parametrize("seed", [0, 5], ids=["round-robin", "seed5"])
@pytest.mark.parametrize("variant, message", [
    (0, r"deadlock: 32 thread\(s\) wait at block_sync, 0 at a warp collective \(\), 32 exited"),
    (1, r"deadlock: 33 thread\(s\) wait at block_sync, 31 at a warp collective \(shfl_xor\)"),
    (2, r"deadlock: 0 thread\(s\) wait at block_sync, 32 at a warp collective \(shfl_xor\), "
        r"32 exited"),
    # Which warp meets the divergence first depends on the schedule.
    (3, r"warp divergence: lanes of warp [01] call different collectives"),
], ids=["exited-vs-block_sync", "block_sync-vs-shfl", "half-warp-shfl", "divergent"])
def test_deadlock_is_reported(lib, variant, message, seed):
    with pytest.raises(emu.EmulatorError, match=message) as error:
        emu.call(lib.selftest_deadlock, variant, ctypes.byref(ctypes.c_int()), lib=lib,
                 schedule_seed=seed)
    # An error under a random schedule names the seed that reproduces it.
    assert str(error.value).endswith(f" [schedule seed {seed}]") == bool(seed), error.value


@pytest.mark.parametrize("seed", [0, 5], ids=["round-robin", "seed5"])
def test_balanced_barriers_are_not_a_deadlock(lib, seed):
    finished = ctypes.c_int(-1)
    try:
        emu.call(lib.selftest_deadlock, 4, ctypes.byref(finished), lib=lib, schedule_seed=seed)
    except emu.EmulatorError as error:
        pytest.fail(f"balanced barriers reported as an error: {error}")
    assert finished.value == 2 * 64, "not every thread got past both barriers"


@pytest.mark.parametrize("which, message", [
    (1, "ldmatrix_x4: address .* outside shared memory"),
    (2, "ldmatrix_x4: shared address offset 8 is not 16-byte aligned"),
    (3, "cp_async_16 destination: shared address offset 4 is not 16-byte aligned"),
    (4, "cp_async_16: source .* outside every registered global range"),
    (5, "cp_async_16: source .* not 16-byte aligned"),
    (6, "dynamic shared memory"),
    (7, "block of 1056 threads"),
    (8, "never waited for"),
], ids=["ldmatrix-oob", "ldmatrix-misaligned", "cp.async-dst-misaligned",
        "cp.async-src-unregistered", "cp.async-src-misaligned", "smem-limit", "thread-limit",
        "uncommitted-copy"])
def test_bad_access_is_reported(lib, which, message):
    emu.call(lib.selftest_fault, 0)  # the same kernel, done right, passes
    with pytest.raises(emu.EmulatorError, match=message):
        emu.call(lib.selftest_fault, which)


# ------------------------------------------------------------------------------ schedules

_TILES = 4


def _race(lib, src, barrier: int, seed: int) -> torch.Tensor:
    """(tiles, warps, lanes, 4) ldmatrix words of race_kernel, as int64 in [0, 2**32)."""
    words = torch.zeros(_TILES * 2 * 32 * 4, dtype=torch.int32)
    emu.call(lib.selftest_race, src.data_ptr(), words.data_ptr(), _TILES, barrier, lib=lib,
             schedule_seed=seed)
    return words.view(_TILES, 2, 32, 4).to(torch.int64) & 0xFFFFFFFF


def _race_ref(src) -> torch.Tensor:
    """What race_kernel reads when it is race-free: warp w, tile t, rows 32(1-w).. of tile t."""
    tiles = src.view(_TILES, 2, 32, 8)
    return torch.stack([torch.stack([_ldmatrix_x4_ref(tiles[t, 1 - w]) for w in range(2)])
                        for t in range(_TILES)])


def test_missing_barrier_shows_under_random_schedules(lib):
    """A warp overwriting (cp.async) a shared tile the other warp may still be reading, with no
    block_sync between the read and the copy: round-robin happens to order it right, random
    schedules run one warp ahead and show the race; the same kernel with the barrier is right
    under every schedule."""
    src = torch.randint(0, 1 << 15, (_TILES * 512,), dtype=torch.int16)
    ref = _race_ref(src)
    for seed in (0, *SEEDS):
        assert torch.equal(_race(lib, src, 1, seed), ref), f"with the barrier, seed {seed}"
    assert torch.equal(_race(lib, src, 0, 0), ref), "round-robin is expected to hide the race"
    # What a too-early read can see: the poison of the next tile's copy or that tile itself.
    next_tile = torch.cat([ref[1:], ref[-1:]])
    seen_poison = []
    for seed in SEEDS:
        got = _race(lib, src, 0, seed)
        wrong = got != ref
        assert (got[wrong] == 0xFFFFFFFF).logical_or(got[wrong] == next_tile[wrong]).all(), seed
        if (got == 0xFFFFFFFF).any():
            seen_poison.append(seed)
    assert seen_poison, f"no seed in {list(SEEDS)} exposed the missing barrier"


def _order(lib, seed: int, warps: int = 4, steps: int = 16) -> torch.Tensor:
    order = torch.full((warps * steps,), -1, dtype=torch.int32)
    emu.call(lib.selftest_order, order.data_ptr(), warps, steps, lib=lib, schedule_seed=seed)
    return order.view(warps, steps)


def test_random_schedule_is_reproducible(lib):
    src = torch.randint(0, 1 << 15, (_TILES * 512,), dtype=torch.int16)
    for seed in (1, 2, 3):
        assert torch.equal(_order(lib, seed), _order(lib, seed)), seed
        assert torch.equal(_race(lib, src, 0, seed), _race(lib, src, 0, seed)), seed


def test_seeds_give_different_interleavings(lib):
    """Round-robin passes the warps through each collective in lockstep; every seed orders them
    its own way, and some let one warp finish all its steps before another takes its first."""
    warps, steps = 4, 16
    rr = _order(lib, 0, warps, steps)
    assert torch.equal(rr, torch.arange(warps * steps).view(steps, warps).t())
    orders = {seed: _order(lib, seed, warps, steps) for seed in SEEDS}
    for seed, o in orders.items():
        assert torch.equal(o.flatten().sort().values, torch.arange(warps * steps)), seed
        assert not torch.equal(o, rr), seed
    for (s1, o1), (s2, o2) in itertools.combinations(orders.items(), 2):
        assert not torch.equal(o1, o2), (s1, s2)

    def lead(o):  # the most steps one warp has done before another's first
        return max(int((o[w] < o[x, 0]).sum()) for w in range(warps) for x in range(warps)
                   if x != w)
    assert lead(rr) == 1
    assert max(lead(o) for o in orders.values()) == steps


@pytest.mark.parametrize("shape", [(1, 70, 70, 2, 1, 64), (1, 40, 150, 2, 1, 128)],
                         ids=["s70-h2/1-d64", "q40-k150-d128"])
def test_attention_is_schedule_independent(shape):
    """The CUDA attention kernels give bitwise the same out, lse, dq, dk, dv under random
    schedules as under round-robin: no barrier between warps is missing (the products are
    computed in a fixed order, so any difference is a race)."""
    b, sq, sk, hq, hkv, d = shape
    q, k, v = (poisoned((b, s, h, d), torch.float16) for s, h in ((sq, hq), (sk, hkv), (sk, hkv)))
    dout = torch.randn(q.shape).half()

    def run(seed):
        out, lse = emu.flash_forward(q, k, v, True, d ** -0.5, schedule_seed=seed)
        return (out, lse, *emu.flash_backward(dout, q, k, v, out, lse, True, d ** -0.5,
                                              schedule_seed=seed))
    base = run(0)
    assert not any(torch.isnan(t).any() for t in base)
    for seed in (1, 2, 3):
        for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), run(seed), base):
            assert torch.equal(got, want), f"{name} differs under schedule seed {seed}"


def test_seed_from_the_environment(monkeypatch):
    seen = []
    real = emu._invoke
    monkeypatch.setattr(emu, "_invoke", lambda *a, **kw: seen.append(a[3]) or real(*a, **kw))
    q = k = v = poisoned((1, 1, 1, 64), torch.float16)
    for env, keyword, want in (("", None, 0), ("7", None, 7), ("0x10", None, 16), ("7", 0, 0),
                               ("7", 3, 3)):
        monkeypatch.setenv(emu.SEED_ENV, env)
        emu.flash_forward(q, k, v, True, 0.125, schedule_seed=keyword)
        assert seen[-1] == want, (env, keyword)
    monkeypatch.delenv(emu.SEED_ENV)
    assert emu.schedule_seed_from_env() == 0
    for bad in ("x", "-1", str(1 << 64)):
        monkeypatch.setenv(emu.SEED_ENV, bad)
        with pytest.raises(ValueError, match=emu.SEED_ENV):
            emu.flash_forward(q, k, v, True, 0.125)


# ------------------------------------------------------------------------------ conversions

def _to_bits(lib, dtype, x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(len(x), dtype=torch.int16)
    emu.call(lib.emu_convert, CODE[dtype], 1, x.data_ptr(), out.data_ptr(), len(x))
    return out


def _mismatches(got_bits: torch.Tensor, want: torch.Tensor) -> str:
    """"" when bitwise equal (any NaN matches any NaN), else a description of the first."""
    want_bits = want.view(torch.int16)
    got = got_bits.view(want.dtype)
    both_nan = torch.isnan(got) & torch.isnan(want)
    bad = ((got_bits != want_bits) & ~both_nan).nonzero().flatten()
    if not len(bad):
        return ""
    return (f"{len(bad)} mismatches, first: bits {got_bits[bad[0]].item():#06x}, "
            f"want {want_bits[bad[0]].item():#06x} ({want[bad[0]].item()})")


@pytest.mark.parametrize("dtype", DTYPES)
def test_16bit_to_float_is_exact(lib, dtype):
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)  # every pattern
    out = torch.empty(len(bits))
    emu.call(lib.emu_convert, CODE[dtype], 0, bits.data_ptr(), out.data_ptr(), len(bits))
    want = bits.view(dtype).float()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(out[~nan].view(torch.int32), want[~nan].view(torch.int32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_float_to_16bit_rounds_like_torch(lib, dtype):
    # Random magnitudes from far below the fp16 subnormals to past the overflow threshold.
    mags = torch.randn(200_000) * torch.exp2(torch.empty(200_000).uniform_(-30, 18))
    # Every midpoint between adjacent 16-bit values (exact in fp32): the ties-to-even cases.
    finite = torch.arange(0, 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype).float()
    finite = finite[torch.isfinite(finite)]
    mids = (finite[:-1].double() + finite[1:].double()) / 2
    specials = torch.tensor([0.0, float("inf"), float("nan"), 65504.0, 65519.996, 65520.0,
                             2.0**-25, 2.0**-25 * (1 + 2.0**-23), 1.5 * 2.0**-24, 1e-45, 3e38])
    x = torch.cat([mags, mids.float(), finite, specials, torch.randn(1000) * 1e-40])
    x = torch.cat([x, -x])
    mismatches = _mismatches(_to_bits(lib, dtype, x), x.to(dtype))
    assert not mismatches, mismatches


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack2_puts_lo_in_the_low_half(lib, dtype):
    lo, hi = torch.randn(2).tolist()
    out = (ctypes.c_uint32 * 3)()
    emu.call(lib.emu_pack2, CODE[dtype], lo, hi, out)
    want = torch.tensor([lo, hi]).to(dtype)
    assert out[0] & 0xFFFF == want.view(torch.int16)[0].item() & 0xFFFF
    assert out[0] >> 16 == want.view(torch.int16)[1].item() & 0xFFFF
    unpacked = torch.tensor([out[1], out[2]], dtype=torch.int64).to(torch.int32).view(torch.float32)
    assert torch.equal(unpacked, want.float())
