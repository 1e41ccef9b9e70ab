"""The Triton attention against a KV cache (llama_kernels/triton/flash_attention_kvcache.py: the
append kernel of kvcache_append.py, the split-KV kernel and combine of attention_decode.py):
contiguous and paged caches, new keys appended in place with and without rotary, per-sequence
lengths from 0 up to several splits, GQA, every dtype, prefill chunks, static launch grids,
opcheck, and an ahead-of-time compile for sm_80 / sm_90.

Kernels run on CPU tensors under TRITON_INTERPRET=1 where there is no GPU (conftest.py), about
1 ms per program instance, so shapes are small; the interpreter's decode tiles are 16 x 16, so
the short caches here still span several key blocks and splits.

Checks: the output against reference.attention_with_kvcache by the tolerance rule
(llama_kernels.testing: the exact answer is fp32 attention over the reference's cache after its
append and its rotated q; eager is the reference in the test dtype, upcast=False); the caches
after the call against the reference's: the written rows within one ulp of the dtype for k
(rotated in fp32, then rounded: the interpreter truncates to bf16, a GPU may fuse a
multiply-add), v exact, and every other element of the cache buffer (NaN guards, rows past each
sequence, unused blocks of a paged pool) bitwise untouched; cache_seqlens unchanged. Rows past
each sequence's length and every block a sequence does not use are NaN, so a read of any of them
shows in the output.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

import llama_kernels as lk  # noqa: E402
from llama_kernels import reference  # noqa: E402
from llama_kernels.ops.flash_attention_kvcache import flash_attention_with_kvcache_op  # noqa: E402
from llama_kernels.triton import flash_attention_kvcache as fak  # noqa: E402
from llama_kernels.triton import kvcache_append  # noqa: E402
from helpers import (DEVICE, GPU, INTERPRET, Guarded, assert_close, poisoned,  # noqa: E402
                     run_compiler_script)

if not (GPU or INTERPRET):
    pytest.skip("the Triton kernels need a CUDA GPU or TRITON_INTERPRET=1 (conftest.py sets it "
                "before triton is imported when no GPU is visible)", allow_module_level=True)

DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


# ------------------------------------------------------------------------------ inputs


class Cache:
    """A KV cache holding random keys and values in rows [0, lengths[b]) of each sequence and
    NaN everywhere else: contiguous (B, capacity, Hkv, D) inside a NaN guard buffer
    (page_size 0), or a paged pool (B * capacity / page_size + 3 blocks, page_size, Hkv, D)
    whose blocks a shuffled block_table hands out (3 blocks, and the rows past each sequence,
    stay NaN). ``bufs``: all the memory the kernels could reach; ``k``, ``v`` the caches in it."""

    def __init__(self, lengths, capacity, hkv, d, dtype, page_size=0):
        batch = len(lengths)
        self.page_size, self.table, self.index = page_size, None, None
        if page_size:
            per_seq = capacity // page_size
            n_blocks = batch * per_seq + 3
            table = torch.randperm(n_blocks)[:batch * per_seq].view(batch, per_seq)
            self.table = table.to(torch.int32).to(DEVICE)
            self.bufs = [torch.full((n_blocks, page_size, hkv, d), float("nan"), dtype=dtype,
                                    device=DEVICE) for _ in range(2)]
        else:
            guards = [Guarded((batch, capacity, hkv, d), dtype) for _ in range(2)]
            self.bufs, self.index = [g.buf for g in guards], guards[0].index
        for b, n in enumerate(lengths):
            t = torch.arange(n, device=DEVICE)
            if page_size:
                slots = (self.table[b, t // page_size].long(), t % page_size)
            else:
                slots = (torch.full_like(t, b), t)
            for cache in (self.k, self.v):
                cache[slots] = torch.randn(n, hkv, d, device=DEVICE).to(dtype)

    @property
    def k(self):
        return self.bufs[0] if self.index is None else self.bufs[0][self.index]

    @property
    def v(self):
        return self.bufs[1] if self.index is None else self.bufs[1][self.index]

    def slot(self, b, t):
        if self.page_size:
            return int(self.table[b, t // self.page_size]), t % self.page_size
        return b, t

    def clone(self):
        other = object.__new__(Cache)
        other.__dict__.update(self.__dict__)
        other.bufs = [t.clone() for t in self.bufs]
        return other


def _bits(t):
    return t.view(BITS[t.dtype])


def _rotary_args(rotary, rows, d):
    if rotary is None:
        return dict(rotary_cos=None, rotary_sin=None, rotary_interleaved=False)
    cos, sin = lk.rotary_tables(rows, d, device=DEVICE)
    return dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=rotary == "interleaved")


def _expected(q, cache, seqlens, k, v, rot, causal, scale):
    """(ref32, eager, cache after): the exact fp32 output given the reference's rotated q and
    cache rows (rounded to the dtype, as the kernels store them), eager in the dtype, and the
    reference's cache after its append."""
    after = cache.clone()
    kw = dict(block_table=cache.table, causal=causal, softmax_scale=scale, **rot)
    eager_cache = cache.clone()
    eager = reference.attention_with_kvcache(q, eager_cache.k, eager_cache.v, seqlens, k, v,
                                             upcast=False, **kw)
    reference.attention_with_kvcache(q, after.k, after.v, seqlens, k, v, **kw)
    q_rot = q
    if rot["rotary_cos"] is not None:
        pos = seqlens.long()[:, None] + torch.arange(q.shape[1], device=DEVICE)[None]
        q_rot = reference.apply_rotary(q, rot["rotary_cos"], rot["rotary_sin"], positions=pos,
                                       interleaved=rot["rotary_interleaved"])
    s_new = 0 if k is None else k.shape[1]
    ref32 = reference.attention_with_kvcache(
        q_rot.float(), after.k.float(), after.v.float(), seqlens + s_new,
        block_table=cache.table, causal=causal, softmax_scale=scale)
    return ref32, eager, after


def _check_caches(cache, before, after, lengths, s_new):
    """The written rows as the reference's (k within an ulp, v exact), every other element of
    the reachable memory bitwise as before."""
    written = [cache.slot(b, n + i) for b, n in enumerate(lengths) for i in range(s_new)]
    eps = torch.finfo(cache.k.dtype).eps
    for slot in written:
        torch.testing.assert_close(cache.k[slot].float(), after.k[slot].float(), rtol=eps,
                                   atol=eps, msg=lambda m: f"written k row {slot}: {m}")
        assert torch.equal(cache.v[slot], after.v[slot]), f"written v row {slot} differs"
    restored = cache.clone()  # the written rows put back: then every bit must be as before
    for slot in written:
        restored.k[slot], restored.v[slot] = before.k[slot], before.v[slot]
    for name, got, old in zip("kv", restored.bufs, before.bufs):
        assert torch.equal(_bits(got), _bits(old)), f"{name}: an element outside the " \
            "written rows changed"


def run_case(lengths, capacity, hq, hkv, d, sq, s_new, dtype, *, page_size=0, rotary=None,
             causal=True, scale=None, num_splits=None, settings=None):
    cache = Cache(lengths, capacity, hkv, d, dtype, page_size)
    before = cache.clone()
    q = poisoned((len(lengths), sq, hq, d), dtype)
    k = v = None
    if s_new:
        k, v = (poisoned((len(lengths), s_new, hkv, d), dtype) for _ in range(2))
    rot = _rotary_args(rotary, capacity + sq, d)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    seqlens_before = seqlens.clone()
    ref32, eager, after = _expected(q, cache, seqlens, k, v, rot, causal, scale)
    out = Guarded(q.shape, dtype)
    fak.flash_attention_with_kvcache(q, cache.k, cache.v, seqlens, k, v,
                                     block_table=cache.table, causal=causal,
                                     softmax_scale=scale, num_splits=num_splits,
                                     settings=settings, out=out.view, **rot)
    out.check("out")
    assert_close(out.view, ref32, eager, "out")
    assert torch.equal(seqlens, seqlens_before), "cache_seqlens changed"
    _check_caches(cache, before, after, lengths, s_new)


# ------------------------------------------------------------------------------ cases


LAYOUTS = {"contiguous": 0, "paged16": 16, "paged32": 32}
ROTARY = (None, "halves", "interleaved")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cases():
    """Every (layout, rotary, dtype); S_new (0: no new k, v), Sq and the GQA group are
    independent linear functions of the three indices modulo 3, so that every value of each
    meets every value of every other parameter."""
    cases = []
    for (li, layout), (ri, rotary), (ti, dtype) in itertools.product(
            enumerate(LAYOUTS), enumerate(ROTARY), enumerate(DTYPES)):
        s_new = (0, 1, 3)[(li + ri + ti) % 3]
        group = (1, 2, 4)[(li + 2 * ri + 2 * ti) % 3]
        sq = (1, 2, 2)[(li + 2 * ri + ti) % 3]
        cases.append(pytest.param(
            layout, rotary, dtype, s_new, sq, group,
            id=f"{layout}-{rotary or 'norot'}-{DTYPE_IDS[dtype]}-new{s_new}-q{sq}-g{group}"))
    return cases


@pytest.mark.parametrize("layout,rotary,dtype,s_new,sq,group", _cases())
def test_kvcache(layout, rotary, dtype, s_new, sq, group):
    """Four sequences: empty, one token, a block boundary (the new rows end a block or cross
    into the next; without new rows, exactly one full block) and a long one over three splits
    (the short ones' later splits are empty)."""
    page = LAYOUTS[layout]
    boundary = (page or 16) - (1 if s_new else 0)
    capacity = 96
    lengths = [0, 1, boundary, capacity - s_new - 5]
    hkv = 1 if group == 4 else 2
    run_case(lengths, capacity, hkv * group, hkv, 16, sq, s_new, dtype, page_size=page,
             rotary=rotary, num_splits=3)


@pytest.mark.parametrize("causal", [True, False])
def test_prefill_chunk(causal):
    """More queries than DECODE_MAX_SEQLEN_Q (a prefill chunk of 20 queries, 12 new keys):
    several row tiles per kv head, each causal one stopping at its last query's keys; the
    empty sequence has fewer keys than queries (its first 8 queries see nothing: 0)."""
    run_case([0, 30], 64, 2, 1, 16, 20, 12, torch.float16, page_size=16, rotary="halves",
             causal=causal, num_splits=2)


@pytest.mark.parametrize("d,rotary", [(40, "halves"), (8, "interleaved"), (80, None)])
def test_head_dims(d, rotary):
    """head_dim below the 16-column tile, and not a power of two (half of 40 is 20 pairs)."""
    run_case([3, 30], 48, 4, 2, d, 1, 2, torch.float32, page_size=16, rotary=rotary,
             scale=0.3, num_splits=2)


def test_tile_shapes():
    """Key tiles wider than a page (64 keys over pages of 16) and a 32-row tile."""
    from llama_kernels.triton.attention_launch import AttentionLaunch

    cfg = AttentionLaunch(32, 64, 4, 2)
    run_case([0, 50, 17], 128, 8, 2, 16, 2, 1, torch.float16, page_size=16, rotary="halves",
             num_splits=2, settings={"decode": cfg})


def test_api_default_splits():
    """Through the public function (ops layer, backend="triton"), the split heuristic's count:
    one sequence of one kv head leaves the (interpreter's 4) SMs idle, so it splits."""
    cache = Cache([70], 96, 1, 16, torch.float16, page_size=32)
    before = cache.clone()
    q = torch.randn(1, 1, 4, 16, device=DEVICE).to(torch.float16)
    k, v = (torch.randn(1, 1, 1, 16, device=DEVICE).to(torch.float16) for _ in range(2))
    seqlens = torch.tensor([70], dtype=torch.int32, device=DEVICE)
    rot = _rotary_args("interleaved", 128, 16)
    ref32, eager, after = _expected(q, cache, seqlens, k, v, rot, True, None)
    out = lk.flash_attention_with_kvcache(q, cache.k, cache.v, seqlens, k, v,
                                          block_table=cache.table, backend="triton", **rot)
    assert_close(out, ref32, eager, "out")
    _check_caches(cache, before, after, [70], 1)


# ------------------------------------------------------------------------------ no host sync


class _Recorder:
    """Stands in for a kernel of the host module: records the grid, then launches."""

    def __init__(self, name, kernel, grids):
        self.name, self.kernel, self.grids = name, kernel, grids

    def __getitem__(self, grid):
        self.grids.append((self.name, grid))
        return self.kernel[grid]


def test_launch_reads_no_device_value(monkeypatch):
    """The grids depend on shapes only (two calls with other lengths launch the same grids),
    and the launch path never reads a tensor's value on the host (.item, .tolist, int(),
    bool() would sync a GPU and break CUDA-graph capture)."""
    grids = []
    for name in ("_kvcache_append_kernel", "_attn_kvcache_splitkv_kernel",
                 "_attn_splitkv_combine_kernel"):
        monkeypatch.setattr(fak, name, _Recorder(name, getattr(fak, name), grids))
    cache = Cache([5, 20], 64, 1, 16, torch.float32, page_size=16)
    q = torch.randn(2, 1, 2, 16, device=DEVICE)
    k, v = (torch.randn(2, 1, 1, 16, device=DEVICE) for _ in range(2))
    rot = _rotary_args("halves", 80, 16)
    calls = []
    for lengths in ([5, 20], [0, 10]):  # the second within the rows the first call left
        seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
        start = len(grids)

        def forbidden(*args, **kwargs):
            raise AssertionError("the launch path read a device value")

        with monkeypatch.context() as m:
            for method in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__"):
                m.setattr(torch.Tensor, method, forbidden)
            fak.flash_attention_with_kvcache(q, cache.k, cache.v, seqlens, k, v,
                                             block_table=cache.table, **rot)
        calls.append(grids[start:])
    assert len(calls[0]) == 3 and calls[0] == calls[1]


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (graph capture)")
def test_cuda_graph_decode_step():
    """A decode step captured in a CUDA graph and replayed with other lengths and new keys
    gives what an eager call gives."""
    batch, hq, hkv, d, page = 4, 8, 2, 64, 16
    cache = Cache([3, 100, 0, 250], 256, hkv, d, torch.float16, page_size=page)
    eager_cache = cache.clone()
    rot = _rotary_args("halves", 512, d)
    q, k, v = (torch.randn(batch, 1, h, d, device=DEVICE, dtype=torch.float16)
               for h in (hq, hkv, hkv))
    seqlens = torch.tensor([3, 100, 0, 250], dtype=torch.int32, device=DEVICE)
    kw = dict(block_table=cache.table, **rot)
    fak.flash_attention_with_kvcache(q, cache.k.clone(), cache.v.clone(), seqlens, k, v, **kw)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fak.flash_attention_with_kvcache(q, cache.k, cache.v, seqlens, k, v, **kw)
    for lengths in ([4, 101, 1, 251], [200, 7, 30, 2]):
        seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        graph.replay()
        want = fak.flash_attention_with_kvcache(q, eager_cache.k, eager_cache.v, seqlens, k, v,
                                                **kw)
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        torch.testing.assert_close(cache.k, eager_cache.k, rtol=0, atol=0, equal_nan=True)


GPU_CASES = [  # (lengths, capacity, hq, hkv, d, sq, s_new, dtype, page)
    ([0, 1, 4095, 1000], 4096, 32, 8, 128, 1, 1, torch.bfloat16, 16),
    ([17, 3000, 64, 2047], 4096, 32, 8, 128, 4, 4, torch.float16, 256),
    ([5000, 1], 8192, 16, 2, 64, 1, 0, torch.float16, 0),
    ([300, 2000], 4096, 32, 4, 128, 64, 64, torch.bfloat16, 32),
]


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (sizes the interpreter cannot run)")
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_sizes(case):
    lengths, capacity, hq, hkv, d, sq, s_new, dtype, page = case
    run_case(lengths, capacity, hq, hkv, d, sq, s_new, dtype, page_size=page, rotary="halves")


def test_opcheck_triton():
    """The registered op with backend="triton" on a paged cache with rotary: schema, fake
    tensor and the declared in-place writes of the pool."""
    cache = Cache([3, 20], 32, 1, 8, torch.float32, page_size=16)
    q = torch.randn(2, 1, 2, 8, device=DEVICE)
    new = [torch.randn(2, 1, 1, 8, device=DEVICE) for _ in range(2)]
    rot = _rotary_args("interleaved", 40, 8)
    seqlens = torch.tensor([3, 20], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(flash_attention_with_kvcache_op,
                          (q, cache.k, cache.v, seqlens, *new, cache.table, rot["rotary_cos"],
                           rot["rotary_sin"], True, True, 0.3, "triton"))


def test_unsupported_caches_are_refused_by_name():
    """Caches without unit stride along head_dim cannot be written in place by the kernels:
    backend="triton" refuses them with the reason, and auto passes over triton to torch."""
    kc, vc = (torch.randn(2, 16, 1, 8, 2, device=DEVICE)[..., 0] for _ in range(2))
    q = torch.randn(2, 1, 2, 8, device=DEVICE)
    seqlens = torch.tensor([3, 9], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="triton.*unit stride along head_dim"):
        lk.flash_attention_with_kvcache(q, kc, vc, seqlens, backend="triton")
    want = reference.attention_with_kvcache(q, kc, vc, seqlens)
    torch.testing.assert_close(lk.flash_attention_with_kvcache(q, kc, vc, seqlens), want)


# ------------------------------------------------------------------------------ ahead of time

# Run in a fresh process WITHOUT TRITON_INTERPRET (it also checks there for ptxas and
# cuobjdump, exiting with the reason when they are missing): each split-KV case for its arch,
# each append case for both; the PTX is searched for tensor-core instructions.
_AOT_SCRIPT = r"""
import concurrent.futures, json, os, sys
from llama_kernels.triton import _aot, kvcache_append
from llama_kernels.triton import flash_attention_kvcache as fak
if _aot.tools_missing():
    sys.exit("cannot compile ahead of time: " + _aot.tools_missing())
import triton
from triton.backends.compiler import GPUTarget

WORK = ([(c, fak.AOT_CASE_ARCH[c.name]) for c in fak.AOT_CASES]
        + [(c, arch) for arch in fak.AOT_ARCHS for c in kvcache_append.AOT_CASES])

def one(i):
    c, arch = WORK[i]
    r = _aot.compile_case(c, arch)
    ptx = triton.compile(_aot._source(c), target=GPUTarget("cuda", arch, 32),
                         options={"num_warps": c.num_warps, "num_stages": c.num_stages}).asm["ptx"]
    r["mma"] = "wgmma.mma_async" in ptx or "mma.sync" in ptx
    return r

with concurrent.futures.ProcessPoolExecutor(os.cpu_count()) as pool:
    print(json.dumps(list(pool.map(one, range(len(WORK))))))
"""

SHARED_LIMIT = {"sm_80": 166912, "sm_90": 232448}


def test_aot_no_spills():
    """Every new kernel variant at the settings it runs with on sm_80 / sm_90: no register
    spills, shared memory within the arch's limit, the split-KV kernel on tensor cores."""
    proc = run_compiler_script(_AOT_SCRIPT)
    if proc.stderr.startswith("cannot compile ahead of time"):
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(fak.AOT_CASES) + 2 * len(kvcache_append.AOT_CASES)
    lines = [f"{r['name']:44} {r['arch']} warps {r['num_warps']} stages {r['num_stages']} "
             f"regs {r['registers']:3d} spill {r['spill_stores'] + r['spill_loads']} "
             f"shared {r['shared']}" for r in results]
    table = "\n".join(lines)
    print(table)
    for r in results:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{r['name']} spills\n{table}"
        assert r["shared"] <= SHARED_LIMIT[r["arch"]], f"{r['name']} shared\n{table}"
        if r["kernel"] == "_attn_kvcache_splitkv_kernel":
            assert r["mma"], f"{r['name']}: no tensor cores\n{table}"
