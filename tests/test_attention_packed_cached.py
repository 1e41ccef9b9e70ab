"""Packed (varlen) and cached (KV-cache, contiguous or paged) attention: the reference against
independent formulations, every backend that runs here against the reference, the registered
ops under opcheck and torch.compile, and bad input refused by name."""

from __future__ import annotations

import importlib

import pytest
import torch

import llama_kernels as lk
from helpers import DEVICE, DTYPES, backend_params, check_fwd_bwd
from llama_kernels import reference
from llama_kernels.ops.flash_attention_kvcache import flash_attention_with_kvcache_op
from llama_kernels.ops.flash_attention_varlen import flash_attention_varlen_fwd

# The modules (the package's attributes of these names are the functions).
flash_attention_varlen = importlib.import_module("llama_kernels.ops.flash_attention_varlen")
flash_attention_kvcache = importlib.import_module("llama_kernels.ops.flash_attention_kvcache")

BACKENDS = backend_params()


def _needs_kernel(backend, module):
    if backend != "torch" and backend not in module.KERNEL_BACKENDS:
        pytest.skip(f"{backend}: no kernel for this op yet (auto runs torch; "
                    "test_kernel_less_backends_are_refused_by_name)")


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,
                        device=DEVICE)


def _packed(lengths_q, lengths_k, hq, hkv, d, dtype=torch.float32):
    q = torch.randn(sum(lengths_q), hq, d, device=DEVICE).to(dtype)
    k = torch.randn(sum(lengths_k), hkv, d, device=DEVICE).to(dtype)
    v = torch.randn(sum(lengths_k), hkv, d, device=DEVICE).to(dtype)
    return q, k, v, _cu(lengths_q), _cu(lengths_k)


def _block_diagonal_attention(q, k, v, lengths_q, lengths_k, causal, scale):
    """All packed rows at once with one (total_q, total_k) mask: same sequence and, if causal,
    key j <= query i + Sk_b - Sq_b within it; rows that see nothing give 0. float64."""
    seq_q = torch.repeat_interleave(torch.arange(len(lengths_q)), torch.tensor(lengths_q))
    seq_k = torch.repeat_interleave(torch.arange(len(lengths_k)), torch.tensor(lengths_k))
    pos_q = torch.cat([torch.arange(n) for n in lengths_q]) if sum(lengths_q) else seq_q
    pos_k = torch.cat([torch.arange(n) for n in lengths_k]) if sum(lengths_k) else seq_k
    offset = torch.tensor(lengths_k)[seq_q] - torch.tensor(lengths_q)[seq_q]
    mask = seq_q[:, None] == seq_k[None, :]
    if causal:
        mask &= pos_k[None, :] <= (pos_q + offset)[:, None]
    mask = mask.to(q.device)
    rep = q.shape[1] // k.shape[1]
    kk, vv = (t.double().repeat_interleave(rep, 1) for t in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q.double(), kk) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # fully masked rows: 0 (inputs finite)
    return torch.einsum("hqk,khd->qhd", probs, vv)


CASES = [  # (lengths_q, lengths_k, hq, hkv, d)
    ([5, 9, 1], [5, 9, 1], 4, 2, 16),       # self-attention of packed documents
    ([3, 0, 7], [3, 4, 7], 2, 2, 8),        # an empty query sequence
    ([2, 6], [9, 0], 4, 1, 16),             # an empty key sequence: its queries see nothing
    ([6, 1], [4, 12], 3, 3, 8),             # more queries than keys: the first two see nothing
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_varlen_reference_is_block_diagonal_attention(case, causal):
    lq, lk_, hq, hkv, d = case
    q, k, v, cu_q, cu_k = _packed(lq, lk_, hq, hkv, d, torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = _block_diagonal_attention(*leaves, lq, lk_, causal, d ** -0.5)
    out, lse = reference.attention_varlen_with_lse(q, k, v, cu_q, cu_k, causal=causal)
    torch.testing.assert_close(out, want)
    dout = torch.randn_like(out)
    want_grads = torch.autograd.grad(want, leaves, dout)
    grads = reference.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k,
                                                causal=causal)
    for name, g, w in zip("qkv", grads, want_grads):  # the backward's math is fp32
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"d{name}: {m}")
    blind = ~torch.isfinite(lse)
    assert (out.transpose(0, 1)[blind] == 0).all(), "a query that sees no key must output 0"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_against_reference(backend, case, dtype):
    _needs_kernel(backend, flash_attention_varlen)
    lq, lk_, hq, hkv, d = case
    q, k, v, cu_q, cu_k = _packed(lq, lk_, hq, hkv, d, dtype)
    check_fwd_bwd(
        lambda a, b, c: lk.flash_attention_varlen(a, b, c, cu_q, cu_k, max(lq), max(lk_),
                                                  backend=backend),
        lambda a, b, c, upcast: reference.attention_varlen(a, b, c, cu_q, cu_k, upcast=upcast),
        [q, k, v])


def test_varlen_of_one_sequence_is_flash_attention():
    q, k, v = (torch.randn(1, 13, 4, 16, device=DEVICE) for _ in range(3))
    cu = _cu([13])
    got = lk.flash_attention_varlen(q[0], k[0], v[0], cu, cu, 13, 13)
    torch.testing.assert_close(got, lk.flash_attention(q, k, v)[0])


# ------------------------------------------------------------------------------ KV cache


def _cached_reference(q, k_cache, v_cache, lengths, k_new, v_new, tables, interleaved, causal):
    """Per sequence: the cached keys, the new ones (rotated), q rotated, then plain attention."""
    outs = []
    for b, n in enumerate(lengths):
        kb, vb, qb = k_cache[b:b + 1, :n], v_cache[b:b + 1, :n], q[b:b + 1]
        kn, vn = k_new[b:b + 1], v_new[b:b + 1]
        if tables is not None:
            cos, sin = tables
            kn = reference.apply_rotary(kn, cos[n:n + kn.shape[1]], sin[n:n + kn.shape[1]],
                                        interleaved=interleaved)
            qb = reference.apply_rotary(qb, cos[n:n + qb.shape[1]], sin[n:n + qb.shape[1]],
                                        interleaved=interleaved)
        keys, values = torch.cat([kb, kn], 1), torch.cat([vb, vn], 1)
        outs.append(reference.attention(qb, keys, values, causal=causal))
    return torch.cat(outs)


def _scatter(cache, table, block_size, n_blocks):
    """The contiguous cache (B, S, H, D) placed block by block into a NaN-filled pool."""
    pool = torch.full((n_blocks, block_size, *cache.shape[2:]), float("nan"), dtype=cache.dtype,
                      device=cache.device)
    for b in range(cache.shape[0]):
        for j in range(cache.shape[1] // block_size):
            pool[table[b, j]] = cache[b, j * block_size:(j + 1) * block_size]
    return pool


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("rotary", [None, "halves", "interleaved"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_appends_in_place_and_attends(backend, rotary, paged):
    _needs_kernel(backend, flash_attention_kvcache)
    batch, s_cache, hq, hkv, d, s_new, sq = 3, 64, 4, 2, 16, 2, 2
    lengths = [5, 0, 40]
    k_cache = torch.randn(batch, s_cache, hkv, d, device=DEVICE)
    v_cache = torch.randn(batch, s_cache, hkv, d, device=DEVICE)
    for b, n in enumerate(lengths):  # beyond each sequence's length: poison that must not be read
        k_cache[b, n:] = float("nan")
        v_cache[b, n:] = float("nan")
    q = torch.randn(batch, sq, hq, d, device=DEVICE)
    k_new = torch.randn(batch, s_new, hkv, d, device=DEVICE)
    v_new = torch.randn(batch, s_new, hkv, d, device=DEVICE)
    tables = lk.rotary_tables(s_cache, d, device=DEVICE) if rotary else None
    interleaved = rotary == "interleaved"
    want = _cached_reference(q, k_cache, v_cache, lengths, k_new, v_new, tables, interleaved,
                                True)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    kc, vc, table = k_cache.clone(), v_cache.clone(), None
    if paged:  # blocks of 16 in shuffled order, in a pool with unused blocks
        table = torch.randperm(20)[:batch * s_cache // 16].view(batch, -1).to(torch.int32)
        table = table.to(DEVICE)
        kc, vc = _scatter(k_cache, table, 16, 20), _scatter(v_cache, table, 16, 20)
    before_seqlens = seqlens.clone()
    out = lk.flash_attention_with_kvcache(
        q, kc, vc, seqlens, k_new, v_new, block_table=table,
        rotary_cos=tables[0] if tables else None, rotary_sin=tables[1] if tables else None,
        rotary_interleaved=interleaved, backend=backend)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(seqlens, before_seqlens), "cache_seqlens must not change"
    # The new keys sit at rows lengths[b] + i (rotated); every other cache row is untouched.
    for b, n in enumerate(lengths):
        kn = k_new[b:b + 1]
        if tables is not None:
            kn = reference.apply_rotary(kn, tables[0][n:n + s_new], tables[1][n:n + s_new],
                                        interleaved=interleaved)
        for t in range(s_cache):
            blk, row = (table[b, t // 16], t % 16) if paged else (b, t)
            got_k, got_v = kc[blk, row], vc[blk, row]
            if n <= t < n + s_new:
                torch.testing.assert_close(got_k, kn[0, t - n], rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(got_v, v_new[b, t - n])
            else:
                assert torch.equal(got_k.nan_to_num(7.0), k_cache[b, t].nan_to_num(7.0))
                assert torch.equal(got_v.nan_to_num(7.0), v_cache[b, t].nan_to_num(7.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_without_new_keys_is_decoding_against_the_cache(backend):
    _needs_kernel(backend, flash_attention_kvcache)
    batch, s_cache, h, d = 2, 32, 2, 8
    k_cache, v_cache = (torch.randn(batch, s_cache, h, d, device=DEVICE) for _ in range(2))
    q = torch.randn(batch, 1, h, d, device=DEVICE)
    seqlens = torch.tensor([7, 32], dtype=torch.int32, device=DEVICE)
    out = lk.flash_attention_with_kvcache(q, k_cache, v_cache, seqlens, backend=backend)
    for b, n in enumerate(seqlens.tolist()):
        want = lk.flash_attention(q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n])
        torch.testing.assert_close(out[b:b + 1], want, rtol=1e-5, atol=1e-5)


def test_kernel_less_backends_are_refused_by_name():
    """A backend without a kernel for these ops is refused with the reason when named, and
    passed over by auto (which then runs torch)."""
    q, k, v, cu_q, cu_k = _packed([3, 5], [4, 5], 4, 2, 8)
    for module, call in (
            (flash_attention_varlen,
             lambda b: lk.flash_attention_varlen(q, k, v, cu_q, cu_k, 5, 5, backend=b)),
            (flash_attention_kvcache,
             lambda b: lk.flash_attention_with_kvcache(
                 q[None], k[None], v[None], torch.zeros(1, dtype=torch.int32, device=DEVICE),
                 backend=b))):
        call("auto")
        for name in ("cuda", "triton"):
            if name not in module.KERNEL_BACKENDS:
                with pytest.raises((ValueError, RuntimeError), match=name):
                    call(name)


# ------------------------------------------------------------------------------ registration


def test_opcheck_and_compile():
    q, k, v, cu_q, cu_k = _packed([3, 5], [4, 5], 4, 2, 8)
    torch.library.opcheck(flash_attention_varlen_fwd,
                          (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu_q,
                           cu_k, 5, 5, True, 0.3, "torch"))
    kc, vc = (torch.randn(2, 16, 2, 8, device=DEVICE) for _ in range(2))
    seqlens = torch.tensor([3, 9], dtype=torch.int32, device=DEVICE)
    kn, vn = (torch.randn(2, 1, 2, 8, device=DEVICE) for _ in range(2))
    torch.library.opcheck(flash_attention_with_kvcache_op,
                          (torch.randn(2, 1, 4, 8, device=DEVICE), kc, vc, seqlens, kn, vn, None,
                           None, None, False, True, 0.3, "torch"))

    def step(q, k, v, kc, vc, kn, vn):
        packed = lk.flash_attention_varlen(q, k, v, cu_q, cu_k, 5, 5)
        cached = lk.flash_attention_with_kvcache(packed[:2, None].detach(), kc, vc, seqlens,
                                                 kn, vn)
        return packed, cached

    q, k, v = (t.detach() for t in (q, k, v))
    kc2, vc2 = kc.clone(), vc.clone()
    eager = step(q, k, v, kc, vc, kn, vn)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, kc2, vc2, kn, vn)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2), "the compiled cache write differs"


# ------------------------------------------------------------------------------ bad input


def test_bad_packed_and_cached_calls_name_the_argument():
    q, k, v, cu_q, cu_k = _packed([3, 5], [4, 5], 4, 2, 8)
    varlen = lambda **kw: lk.flash_attention_varlen(  # noqa: E731
        kw.get("q", q), kw.get("k", k), kw.get("k", v), kw.get("cu_q", cu_q), kw.get("cu_k", cu_k),
        kw.get("max_q", 5), 5)
    for kw, text in [({"cu_q": cu_q.long()}, "cu_seqlens_q: expected dtype"),
                     ({"cu_q": _cu([3, 4])}, "cu_seqlens_q: expected cumulative"),
                     ({"cu_k": _cu([9])}, r"cu_seqlens_k: expected shape \(3,\)"),
                     ({"max_q": 4}, "max_seqlen_q: expected at least the longest"),
                     ({"k": k[:, :1].expand(9, 3, 8)}, "kv heads"),
                     ({"q": q[None]}, "q: expected 3 dimensions")]:
        with pytest.raises(ValueError, match=text):
            varlen(**kw)
    rand = lambda *shape: torch.randn(*shape, device=DEVICE)  # noqa: E731
    ints = lambda values: torch.tensor(values, dtype=torch.int32, device=DEVICE)  # noqa: E731
    kc, vc, q4, kn = rand(2, 16, 2, 8), rand(2, 16, 2, 8), rand(2, 1, 4, 8), rand(2, 1, 2, 8)
    ok, table = ints([3, 9]), ints([[0], [4]])
    ones = torch.ones(4, 4, device=DEVICE)
    cached = lk.flash_attention_with_kvcache
    for call, text in [
        (lambda: cached(q4, kc, vc, ok.long()), "cache_seqlens: expected dtype"),
        (lambda: cached(q4, kc, vc, ints([3, 17])), r"cache_seqlens: expected values in \[0, 16\]"),
        (lambda: cached(q4, kc, vc, ints([3, 16]), kn, kn),
         r"cache_seqlens: expected values in \[0, 15\]"),
        (lambda: cached(q4, kc, vc, ok, kn), "k, v: expected both"),
        (lambda: cached(q4, kc, vc.half(), ok), "v_cache: expected dtype"),
        (lambda: cached(q4, kc[:, :, :1].expand(2, 16, 3, 8), vc, ok), "v_cache: expected shape"),
        (lambda: cached(q4, rand(2, 24, 2, 8), rand(2, 24, 2, 8), ok, block_table=table),
         "power of two"),
        (lambda: cached(q4, rand(4, 16, 2, 8), rand(4, 16, 2, 8), ok, block_table=table),
         "block_table: row 1 names blocks outside"),
        (lambda: cached(q4, kc, vc, ok, rotary_cos=ones), "rotary_cos, rotary_sin"),
        (lambda: cached(q4, kc, vc, ok, rotary_cos=ones, rotary_sin=ones),
         "rotary_cos: expected at least 10 rows"),
    ]:
        with pytest.raises(ValueError, match=text):
            call()
