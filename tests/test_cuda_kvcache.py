"""The CUDA attention against a KV cache: the append kernel (csrc/kvcache_append_kernels.cuh),
the decode kernel's KVCACHE specialization (csrc/flash_decode_kernels.cuh, contiguous and paged),
launched by run_kvcache (csrc/flash_attention_kernels.cuh) from csrc/flash_attention.cu's
flash_attention_kvcache_cuda.

Without a GPU the very kernel source runs on the host emulator (tests/cuda_emulator, as
tests/test_cuda_varlen.py): the output against reference.attention_with_kvcache by the tolerance
rule (llama_kernels.testing: the exact answer is fp32 attention over the reference's cache after
its append, with its rotated q; eager is the reference in the test dtype, upcast=False), over
ragged cache lengths (0 cached tokens included), contiguous caches and paged pools (blocks of 16
and 64, a shuffled block table, so a 64-key stage spans four blocks or one), with and without new
keys, with and without rotary (both layouts), GQA and MQA, 1 to 4 packed row tiles, several key
splits. The caches after the call must equal the reference's caches bit for bit over all the
memory the kernels could reach: the written rows (the rotation is fp32 without FMA contraction,
as the reference) and, untouched, every other row, which is NaN (rows past each sequence,
blocks no sequence owns, guard rows around a contiguous cache), so a read of any of them shows in
the output too. Planted faults (a rotation one position off, an append one row late) must fail
these checks. The GPU half runs the same through lk.flash_attention_with_kvcache(backend="cuda").

Emulator runs cost about a second per block of 64-key stages: a few small shapes, no sweep.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import cuda_emulator
import llama_kernels as lk
from helpers import GPU
from llama_kernels import reference
from llama_kernels.ops import _backend
from llama_kernels.testing import assert_close

ops_kvcache = importlib.import_module("llama_kernels.ops.flash_attention_kvcache")

EMULATOR, EMULATOR_WHY_NOT = cuda_emulator.available()
needs_emulator = pytest.mark.skipif(not EMULATOR, reason=f"no emulator: {EMULATOR_WHY_NOT}")
HAS_CUDA_KERNEL = ops_kvcache.CUDA_KERNEL in _backend.CUDA_AVAILABLE_KERNELS
needs_gpu = pytest.mark.skipif(
    not (GPU and HAS_CUDA_KERNEL),
    reason="needs a GPU and the built CUDA extension"
    + ("" if GPU else " (no GPU here)")
    + ("" if HAS_CUDA_KERNEL else f" ({_backend._EXTENSION_WHY_NOT or 'kernel not built'})"))

BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16}


class Cache:
    """Random keys and values in rows [0, lengths[b]) of each sequence, NaN everywhere else:
    contiguous (B, capacity, Hkv, D) between a NaN guard sequence on each side (page 0), or a
    paged pool of B * capacity / page + 3 blocks handed out by a shuffled block table (3 blocks
    no sequence owns). ``bufs``: all the memory the kernels could reach."""

    def __init__(self, lengths, capacity, hkv, d, dtype, page=0, device="cpu"):
        batch = len(lengths)
        self.page, self.table = page, None
        if page:
            per_seq = capacity // page
            n_blocks = batch * per_seq + 3
            table = torch.randperm(n_blocks)[:batch * per_seq].view(batch, per_seq)
            self.table = table.to(torch.int32).to(device)
            shape = (n_blocks, page, hkv, d)
        else:
            shape = (batch + 2, capacity, hkv, d)
        self.bufs = [torch.full(shape, float("nan"), dtype=dtype, device=device)
                     for _ in range(2)]
        for b, n in enumerate(lengths):
            t = torch.arange(n, device=device)
            slots = ((self.table[b, t // page].long(), t % page) if page
                     else (torch.full_like(t, b), t))
            for cache in (self.k, self.v):
                cache[slots] = torch.randn(n, hkv, d, device=device).to(dtype)

    @property
    def k(self):
        return self.bufs[0] if self.page else self.bufs[0][1:-1]

    @property
    def v(self):
        return self.bufs[1] if self.page else self.bufs[1][1:-1]

    def clone(self):
        other = object.__new__(Cache)
        other.__dict__.update(self.__dict__)
        other.bufs = [t.clone() for t in self.bufs]
        return other


def _rotary(rotary, rows, d, device="cpu"):
    if rotary is None:
        return dict(rotary_cos=None, rotary_sin=None, rotary_interleaved=False)
    cos, sin = lk.rotary_tables(rows, d, device=device)
    return dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=rotary == "interleaved")


def _expected(q, cache, seqlens, k, v, rot, causal, scale):
    """(ref32, eager, cache after): fp32 attention over the reference's cache after its append
    with its rotated q (both rounded to the dtype, as the kernels store them), the reference
    in the dtype, and the reference's cache after the call."""
    after, eager_cache = cache.clone(), cache.clone()
    kw = dict(block_table=cache.table, causal=causal, softmax_scale=scale, **rot)
    eager = reference.attention_with_kvcache(q, eager_cache.k, eager_cache.v, seqlens, k, v,
                                             upcast=False, **kw)
    reference.attention_with_kvcache(q, after.k, after.v, seqlens, k, v, **kw)
    q_rot = q
    if rot["rotary_cos"] is not None:
        pos = seqlens.long()[:, None] + torch.arange(q.shape[1], device=q.device)[None]
        q_rot = reference.apply_rotary(q, rot["rotary_cos"], rot["rotary_sin"], positions=pos,
                                       interleaved=rot["rotary_interleaved"])
    s_new = 0 if k is None else k.shape[1]
    ref32 = reference.attention_with_kvcache(
        q_rot.float(), after.k.float(), after.v.float(), seqlens + s_new,
        block_table=cache.table, causal=causal, softmax_scale=scale)
    return ref32, eager, after


def _cache_problems(cache, after) -> list[str]:
    """Where the caches' reachable memory differs bitwise from the reference's after its call
    (NaN compared by bits): a written row off, or a row written that should not be."""
    problems = []
    for name, got, want in zip(("k_cache", "v_cache"), cache.bufs, after.bufs):
        diff = (got.view(BITS[got.dtype]) != want.view(BITS[want.dtype])).any(-1).any(-1)
        if diff.any():
            problems.append(f"{name}: (block or sequence, row) differ at "
                            f"{diff.nonzero().tolist()[:8]}")
    return problems


def _inputs(lengths, capacity, sq, s_new, hq, hkv, d, dtype, page, rotary, device="cpu"):
    cache = Cache(lengths, capacity, hkv, d, dtype, page, device)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    q = torch.randn(len(lengths), sq, hq, d, device=device).to(dtype)
    k = v = None
    if s_new:
        k, v = (torch.randn(len(lengths), s_new, hkv, d, device=device).to(dtype)
                for _ in range(2))
    return cache, seqlens, q, k, v, _rotary(rotary, capacity + sq, d, device)


# (lengths, capacity, Sq, S_new, Hq, Hkv, head_dim, dtype, page, rotary, causal)
CASES = [
    # a decode step: 0 cached tokens, one stage, more than one; GQA 2; half-split rotary
    pytest.param([0, 5, 70], 80, 1, 1, 4, 2, 64, torch.float16, 0, "half", True,
                 id="contig-decode-rot-h4/2-d64-fp16"),
    # a speculative step of 3 tokens in pages of 16 (a 64-key stage spans 4 blocks), GQA 4
    # (12 packed rows), interleaved rotary, d128
    pytest.param([17, 0, 33], 64, 3, 3, 8, 2, 128, torch.bfloat16, 16, "interleaved", True,
                 id="paged16-spec3-inter-h8/2-d128-bf16"),
    # pages of 64 (a stage within one block), no new keys: attend to the cache as it is; MQA 8
    # (2 row tiles of 16 with Sq 3: 24 rows), no rotary, not causal
    pytest.param([64, 1, 100], 128, 3, 0, 8, 1, 64, torch.float16, 64, None, False,
                 id="paged64-nonew-h8/1-d64-fp16-full"),
    # long enough to split the keys over several blocks (the combine kernel), 4 row tiles
    # (group 16 x Sq 4 = 64 rows), rotary on q only (no new keys), half-split
    pytest.param([600, 0], 640, 4, 0, 16, 1, 64, torch.bfloat16, 0, "half", True,
                 id="contig-splits-rotq-h16/1-d64-bf16"),
]


@needs_emulator
@pytest.mark.parametrize("lengths,capacity,sq,s_new,hq,hkv,d,dtype,page,rotary,causal", CASES)
def test_emulated_kvcache_matches_reference(lengths, capacity, sq, s_new, hq, hkv, d, dtype,
                                            page, rotary, causal):
    """out by the tolerance rule; the caches equal the reference's bit for bit everywhere (the
    written rows, and the NaN rows and blocks untouched); cache_seqlens unchanged."""
    cache, seqlens, q, k, v, rot = _inputs(lengths, capacity, sq, s_new, hq, hkv, d, dtype,
                                           page, rotary)
    scale = d ** -0.5
    ref32, eager, after = _expected(q, cache, seqlens, k, v, rot, causal, scale)
    before = seqlens.clone()
    out = cuda_emulator.flash_kvcache(q, cache.k, cache.v, seqlens, k, v,
                                      block_table=cache.table, causal=causal,
                                      softmax_scale=scale, **rot)
    assert torch.equal(seqlens, before)
    assert not _cache_problems(cache, after), _cache_problems(cache, after)
    assert_close(out, ref32, eager, name="out")


@needs_emulator
def test_emulated_kvcache_is_schedule_independent():
    """The decode kernel's warps merge in a fixed order: a random schedule gives the same
    output bits (a missing barrier between the append-free stages would not)."""
    cache, seqlens, q, k, v, rot = _inputs([40, 3], 64, 2, 2, 4, 2, 64, torch.float16, 16,
                                           "half")
    runs = []
    for seed in (0, 11):
        c = cache.clone()
        runs.append((cuda_emulator.flash_kvcache(q, c.k, c.v, seqlens, k, v, block_table=c.table,
                                                 schedule_seed=seed, **rot), c))
    assert torch.equal(runs[0][0], runs[1][0])
    assert not _cache_problems(runs[0][1], runs[1][1])


@needs_emulator
@pytest.mark.parametrize("fault", ["rotary position + 1", "append one row late"])
def test_emulated_kvcache_checks_catch_planted_faults(fault):
    """The checks above fail for a kernel that rotates at the wrong position (tables shifted
    one row) or writes one row past where it should (cache_seqlens + 1): the cache comparison
    names the rows, and the output leaves the tolerance."""
    cache, seqlens, q, k, v, rot = _inputs([5, 20], 32, 1, 1, 2, 1, 64, torch.float16, 16,
                                           "half")
    ref32, eager, after = _expected(q, cache, seqlens, k, v, rot, True, 0.125)
    run_rot, run_lens = dict(rot), seqlens
    if fault == "rotary position + 1":
        run_rot["rotary_cos"], run_rot["rotary_sin"] = rot["rotary_cos"][1:], rot["rotary_sin"][1:]
    else:
        run_lens = seqlens + 1
    out = cuda_emulator.flash_kvcache(q, cache.k, cache.v, run_lens, k, v,
                                      block_table=cache.table, softmax_scale=0.125, **run_rot)
    assert _cache_problems(cache, after), "a planted fault must change the caches"
    with pytest.raises(AssertionError):
        assert_close(out, ref32, eager, name="out")


# ------------------------------------------------------------------------------ dispatch


def test_cuda_reasons_for_what_the_kernel_cannot_take():
    """Named, the cuda backend refuses what its kernels cannot take, with the reason; auto
    passes over it (to triton or torch). Triton stays first in auto's order."""
    q = torch.zeros(1, 1, 8, 64, dtype=torch.float16)
    cache = torch.zeros(1, 16, 2, 64, dtype=torch.float16)
    assert ops_kvcache.cuda_unsupported_reason(q, cache, cache) is None
    unaligned = torch.zeros(1, 16, 2, 65, dtype=torch.float16)[..., 1:]
    for args, why in (
            ((torch.zeros(1, 1, 8, 96, dtype=torch.float16),
              torch.zeros(1, 16, 2, 96, dtype=torch.float16)), "head_dim 96"),
            ((q.float(), cache.float()), "torch.float32"),
            ((torch.zeros(1, 17, 8, 64, dtype=torch.float16), cache), "68 packed query rows"),
            ((q, unaligned), "16-byte aligned rows")):
        assert why in ops_kvcache.cuda_unsupported_reason(args[0], args[1], args[1])
    assert "cuda" in ops_kvcache.KERNEL_BACKENDS
    assert ops_kvcache.AUTO_ORDER[0] == "triton"


@pytest.mark.skipif(not HAS_CUDA_KERNEL, reason="the CUDA extension's kvcache kernel is not built")
def test_cuda_backend_refuses_cpu_tensors():
    cache, seqlens, q, k, v, rot = _inputs([3], 16, 1, 1, 2, 1, 64, torch.float16, 0, None)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        lk.flash_attention_with_kvcache(q, cache.k, cache.v, seqlens, k, v, backend="cuda")


@pytest.mark.skipif(not HAS_CUDA_KERNEL, reason="the CUDA extension's kvcache kernel is not built")
def test_cuda_schema_declares_the_cache_writes():
    schema = torch.ops.llama_kernels.flash_attention_kvcache_cuda.default._schema
    mutable = [a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write]
    assert mutable == ["k_cache", "v_cache"]


# ------------------------------------------------------------------------------ on a GPU

GPU_CASES = CASES + [
    # batch 8 of ragged lengths up to 4000 in pages of 16, a decode step, GQA 4, d128
    pytest.param([0, 1, 15, 16, 100, 1000, 2500, 3999], 4096, 1, 1, 32, 8, 128, torch.bfloat16,
                 16, "half", True, id="paged16-long-h32/8-d128-bf16"),
    pytest.param([7, 300, 4000], 4096, 2, 2, 8, 8, 64, torch.float16, 0, "interleaved", True,
                 id="contig-long-h8/8-d64-fp16"),
]


@needs_gpu
@pytest.mark.parametrize("lengths,capacity,sq,s_new,hq,hkv,d,dtype,page,rotary,causal",
                         GPU_CASES)
def test_gpu_kvcache_matches_reference(lengths, capacity, sq, s_new, hq, hkv, d, dtype, page,
                                       rotary, causal):
    cache, seqlens, q, k, v, rot = _inputs(lengths, capacity, sq, s_new, hq, hkv, d, dtype,
                                           page, rotary, device="cuda")
    scale = d ** -0.5
    ref32, eager, after = _expected(q, cache, seqlens, k, v, rot, causal, scale)
    out = lk.flash_attention_with_kvcache(q, cache.k, cache.v, seqlens, k, v,
                                          block_table=cache.table, causal=causal,
                                          softmax_scale=scale, backend="cuda", **rot)
    assert not _cache_problems(cache, after), _cache_problems(cache, after)
    assert_close(out, ref32, eager, name="out")


@needs_gpu
def test_gpu_kvcache_matches_emulated_and_captures_in_a_graph():
    cache, seqlens, q, k, v, rot = _inputs([5, 70, 0], 128, 1, 1, 8, 2, 64, torch.float16, 16,
                                           "half", device="cuda")
    fresh = cache.clone()
    out = lk.flash_attention_with_kvcache(q, cache.k, cache.v, seqlens, k, v,
                                          block_table=cache.table, backend="cuda", **rot)
    if EMULATOR:  # the emulation is the same arithmetic: it must agree to rounding
        emu = fresh.clone()
        emu.bufs = [t.cpu() for t in emu.bufs]
        emu.table = emu.table.cpu()
        emu_out = cuda_emulator.flash_kvcache(
            q.cpu(), emu.k, emu.v, seqlens.cpu(), k.cpu(), v.cpu(), block_table=emu.table,
            **{n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in rot.items()})
        torch.testing.assert_close(out.cpu(), emu_out, atol=2e-2, rtol=0)
    graph_cache = fresh.clone()
    static_out = torch.empty_like(q)
    op = torch.ops.llama_kernels.flash_attention_kvcache_cuda
    args = (q, graph_cache.k, graph_cache.v, seqlens, k, v, graph_cache.table, rot["rotary_cos"],
            rot["rotary_sin"], False, True, 64 ** -0.5)
    op(*args)  # warm-up outside the capture (shared-memory opt-in, allocator)
    graph_cache.bufs = [t.copy_(s) for t, s in zip(graph_cache.bufs, fresh.bufs)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out.copy_(op(*args))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, out)
    assert not _cache_problems(graph_cache, cache)


@needs_gpu
def test_gpu_kvcache_bad_inputs_are_refused_before_launch():
    cache, seqlens, q, k, v, rot = _inputs([3, 5], 16, 1, 1, 2, 1, 64, torch.float16, 0, None,
                                           device="cuda")
    op = torch.ops.llama_kernels.flash_attention_kvcache_cuda
    snapshot = cache.clone()
    with pytest.raises(RuntimeError, match="^cache_seqlens: expected dtype int32"):
        op(q, cache.k, cache.v, seqlens.long(), k, v, None, None, None, False, True, 0.1)
    with pytest.raises(RuntimeError, match="^k, v: expected both"):
        op(q, cache.k, cache.v, seqlens, k, None, None, None, None, False, True, 0.1)
    shifted = torch.zeros(2, 16, 1, 72, dtype=torch.float16, device="cuda")[..., 4:68]
    with pytest.raises(RuntimeError, match="^k_cache: expected unit stride"):  # rows at 8 B
        op(q, shifted, shifted, seqlens, None, None, None, None, None, False, True, 0.1)
    with pytest.raises(ValueError, match="cache_seqlens"):  # values: the op's eager check
        lk.flash_attention_with_kvcache(q, cache.k, cache.v, seqlens + 15, k, v, backend="cuda")
    assert not _cache_problems(cache, snapshot)


@needs_gpu
def test_gpu_kvcache_opcheck():
    cache, seqlens, q, k, v, rot = _inputs([3, 40], 64, 2, 2, 4, 2, 64, torch.float16, 16,
                                           "half", device="cuda")
    torch.library.opcheck(ops_kvcache.flash_attention_with_kvcache_op,
                          (q, cache.k, cache.v, seqlens, k, v, cache.table, rot["rotary_cos"],
                           rot["rotary_sin"], False, True, 0.125, "cuda"))
