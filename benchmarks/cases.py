"""What is measured: each op at the LLaMA shapes, ours on every backend that runs, and the
baselines in the same process (eager PyTorch written as in Meta's reference code, torch.compile
of that same code, PyTorch SDPA's backends for attention, Liger-Kernel when importable).

A case builds its inputs lazily and returns one callable per direction (fwd, bwd, fwd+bwd),
with the bytes it must move at the least (each input read once, each output written once) or
the FLOPs it must do, so the report can put each time next to the hardware ceiling.
"""

from __future__ import annotations

import importlib
import itertools
import math
import random
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import llama_kernels as lk
from benchmarks import counts
from llama_kernels.testing import compare
from llama_kernels import reference

# The paper's configurations: model dim, FFN hidden (2/3 * 4 * dim rounded up to 256), heads.
PRESETS = {
    "7B": dict(dim=4096, hidden=11008, heads=32),
    "13B": dict(dim=5120, hidden=13824, heads=40),
    "33B": dict(dim=6656, hidden=17920, heads=52),
    "65B": dict(dim=8192, hidden=22016, heads=64),
}
HEAD_DIM = 128
DIRECTIONS = ("fwd", "bwd", "fwd+bwd")


# ------------------------------------------------------------------------------ baselines


def eager_rms_norm(x, w, eps=1e-6):
    """Meta's llama/model.py RMSNorm.forward."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def eager_add_rms_norm(x, residual, w, eps=1e-6):
    h = x + residual
    return eager_rms_norm(h, w, eps), h


def eager_swiglu(gate, up):
    return F.silu(gate) * up


def eager_rotary(x, cos, sin):
    """Hugging Face's rotate_half form (the half-split layout), tables in x's dtype."""
    cos = torch.cat((cos, cos), -1)[None, :, None, :].to(x.dtype)
    sin = torch.cat((sin, sin), -1)[None, :, None, :].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos + rotated * sin


def eager_attention(q, k, v, causal=True):
    """Meta's Attention.forward: repeat_kv, materialized scores, fp32 softmax."""
    n_rep = q.shape[2] // k.shape[2]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=2)
        v = v.repeat_interleave(n_rep, dim=2)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    scores = qt @ kt.transpose(2, 3) / math.sqrt(q.shape[-1])
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        mask = torch.full((sq, sk), float("-inf"), device=q.device).triu(sk - sq + 1)
        scores = scores + mask
    probs = F.softmax(scores.float(), dim=-1).type_as(q)
    return (probs @ vt).transpose(1, 2)


def eager_linear_cross_entropy(x, w, target):
    """The LM head's loss as training code writes it: the logits materialized, upcast to fp32."""
    return F.cross_entropy((x @ w.T).float(), target)


def _liger():
    """Liger-Kernel's autograd functions, called as its own modules call them (no in-place)."""
    try:
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None

    def rope(q, k, cos, sin):
        # Liger takes (B, H, S, D) views and full-width (S, D) tables; it rotates in place.
        cos, sin = torch.cat((cos, cos), -1).to(q.dtype), torch.cat((sin, sin), -1).to(q.dtype)
        q2, k2 = LigerRopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q2.transpose(1, 2), k2.transpose(1, 2)

    return {
        "rms_norm": lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "llama", False),
        "add_rms_norm": lambda x, r, w: LigerFusedAddRMSNormFunction.apply(
            x, r, w, 1e-6, 0.0, "llama", False),
        "swiglu": lambda g, u: LigerSiLUMulFunction.apply(g, u),
        "rope": rope,
    }


LIGER = _liger()


def _liger_flce():
    """Liger-Kernel's fused linear cross entropy module, called as its users call it."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    loss_fn = LigerFusedLinearCrossEntropyLoss()

    def run(x, w, target):
        out = loss_fn(w, x, target)  # (lin_weight, input, target), as the module takes them
        return out[0] if isinstance(out, tuple) else out  # the z-loss, when returned, is not ours

    return run


LIGER_FLCE = _liger_flce()


def _flash_attn():
    """flash-attn's packed and cached attention, the functions our two ops mirror."""
    try:
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return {"varlen": flash_attn_varlen_func, "kvcache": flash_attn_with_kvcache}


FLASH_ATTN = _flash_attn()
FLASH_ATTN_MISSING = "flash-attn not importable: its packed and cached attention rows are skipped"


# ------------------------------------------------------------------------------ cases


@dataclass
class Case:
    op: str
    shape: str  # a label, e.g. "7B tokens=16384 dim=4096"
    size: float  # x-axis of the plots (elements or score elements)
    impls: dict[str, Callable]  # name -> forward callable taking the inputs
    make_inputs: Callable[[], list[torch.Tensor]]
    reference: Callable  # (*inputs, upcast) -> reference.py's output(s), for the check
    bytes_fn: Callable[[str], float] | None = None  # direction -> minimum bytes moved
    flops_fn: Callable[[str], float] | None = None  # direction -> FLOPs
    directions: tuple[str, ...] = DIRECTIONS
    # a smaller instance of the inputs for the output check (same semantics), or None
    check_slice: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None
    # peak memory is a headline figure of the case: each row also gets its peak over eager's
    memory: bool = False


def _ours(op_fn, backends):
    return {f"ours[{b}]": (lambda b_: (lambda *a: op_fn(*a, backend=b_)))(b) for b in backends}


def _with_compile(impls, eager_name, eager_fn):
    impls[eager_name] = eager_fn
    impls["torch.compile"] = torch.compile(eager_fn, dynamic=False)
    return impls


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def check_output(case: Case, impl: Callable, inputs: list[torch.Tensor]) -> str | None:
    """None if ``impl``'s forward output matches reference.py by the tolerance rule of
    ``llama_kernels.testing`` (at most twice eager-in-dtype's error against fp32, plus a small
    floor; where eager overflows, the rounded fp32 answer is the baseline), else why not."""
    if case.check_slice is not None:
        inputs = case.check_slice(inputs)
    with torch.no_grad():
        got = _as_tuple(impl(*[t.clone() for t in inputs]))
        ref = _as_tuple(case.reference(*[t.float() for t in inputs], upcast=True))
        eager = _as_tuple(case.reference(*inputs, upcast=False))
    if not all(torch.isfinite(e).all() for e in eager):
        eager = tuple(r.to(g.dtype) for g, r in zip(got, ref))
    for i, (g, r, e) in enumerate(zip(got, ref, eager)):
        result = compare(g, r, e.to(g.dtype), name=f"output {i}")
        if not result.ok:
            return str(result)
    return None


def row_cases(backends, presets, tokens, dtype, device):
    """The row ops at LLaMA's shapes: ``tokens`` rows of each preset's width
    (SwiGLU: the FFN width), rotary on q and k of B x 4096 tokens (query heads of the preset,
    8 kv heads, head_dim 128)."""
    cases = []
    s = torch.finfo(dtype).bits // 8
    for name in presets:
        p = PRESETS[name]
        dim, hidden, n = p["dim"], p["hidden"], tokens

        def norm_inputs(dim=dim):
            return [torch.randn(n, dim, device=device, dtype=dtype),
                    (1 + 0.1 * torch.randn(dim, device=device)).to(dtype)]

        impls = _ours(lambda x, w, backend: lk.rms_norm(x, w, backend=backend), backends)
        _with_compile(impls, "eager", eager_rms_norm)
        if LIGER:
            impls["liger"] = LIGER["rms_norm"]
        cases.append(Case(
            "rms_norm", f"{name} tokens={n} dim={dim}", n * dim, impls, norm_inputs,
            lambda x, w, upcast: reference.rms_norm(x, w, upcast=upcast),
            bytes_fn=lambda d, dim=dim: counts.rms_norm_bytes(n, dim, s, d)))

        def add_inputs(dim=dim):
            x, w = norm_inputs(dim)
            return [x, torch.randn_like(x), w]

        impls = _ours(lambda x, r, w, backend: lk.add_rms_norm(x, r, w, backend=backend),
                      backends)
        _with_compile(impls, "eager", eager_add_rms_norm)
        if LIGER:
            impls["liger"] = LIGER["add_rms_norm"]
        cases.append(Case(
            "add_rms_norm", f"{name} tokens={n} dim={dim}", n * dim, impls, add_inputs,
            lambda x, r, w, upcast: reference.add_rms_norm(x, r, w, upcast=upcast),
            bytes_fn=lambda d, dim=dim: counts.add_rms_norm_bytes(n, dim, s, d)))

        def swiglu_inputs(hidden=hidden):
            return [torch.randn(n, hidden, device=device, dtype=dtype),
                    torch.randn(n, hidden, device=device, dtype=dtype)]

        impls = _ours(lambda g, u, backend: lk.swiglu(g, u, backend=backend), backends)
        _with_compile(impls, "eager", eager_swiglu)
        if LIGER:
            impls["liger"] = LIGER["swiglu"]
        cases.append(Case(
            "swiglu", f"{name} tokens={n} hidden={hidden}", n * hidden, impls, swiglu_inputs,
            reference.swiglu,
            bytes_fn=lambda d, hidden=hidden: counts.swiglu_bytes(n, hidden, s, d)))

        heads, kv_heads, seqlen = p["heads"], 8, min(4096, n)
        batch = max(1, n // seqlen)
        cos, sin = lk.rotary_tables(seqlen, HEAD_DIM, device=device)

        def rotary_inputs(heads=heads, batch=batch):  # q and k of one layer
            return [torch.randn(batch, seqlen, heads, HEAD_DIM, device=device, dtype=dtype),
                    torch.randn(batch, seqlen, kv_heads, HEAD_DIM, device=device, dtype=dtype)]

        def rotary_ref(q, k, upcast, cos=cos, sin=sin):
            return (reference.apply_rotary(q, cos, sin, upcast=upcast),
                    reference.apply_rotary(k, cos, sin, upcast=upcast))

        def rotary_bytes(d, heads=heads, batch=batch):
            return sum(counts.rotary_bytes(batch * seqlen, h, HEAD_DIM, s, seqlen, d)
                       for h in (heads, kv_heads))

        impls = _ours(lambda q, k, backend, cos=cos, sin=sin: (
            lk.apply_rotary(q, cos, sin, backend=backend),
            lk.apply_rotary(k, cos, sin, backend=backend)), backends)
        _with_compile(impls, "eager", lambda q, k, cos=cos, sin=sin: (
            eager_rotary(q, cos, sin), eager_rotary(k, cos, sin)))
        if LIGER:
            impls["liger"] = lambda q, k, cos=cos, sin=sin: LIGER["rope"](q, k, cos, sin)
        cases.append(Case(
            "apply_rotary", f"{name} q+k batch={batch} seqlen={seqlen} heads={heads}/{kv_heads}",
            batch * seqlen * (heads + kv_heads) * HEAD_DIM, impls, rotary_inputs, rotary_ref,
            bytes_fn=rotary_bytes))
    return cases


def _sdpa(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION}[backend_name]

    def run(q, k, v, causal=True):
        sq, sk = q.shape[1], k.shape[1]
        # SDPA's is_causal is aligned top-left; it equals ours when Sq == Sk and, for one
        # query, no mask at all is the bottom-right mask.
        is_causal = causal and sq == sk
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=is_causal,
                enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)

    return run


def _flex():
    """FlexAttention, compiled, with the bottom-right causal block mask built once per shape
    (block masks are what let it skip fully masked tiles)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    masks = {}

    def run(q, k, v):
        sq, hq, sk = q.shape[1], q.shape[2], k.shape[1]
        key = (sq, sk, q.device)
        if key not in masks:
            offset = sk - sq
            masks[key] = create_block_mask(lambda b, h, i, j: j <= i + offset, None, None, sq,
                                           sk, device=q.device)
        out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                       block_mask=masks[key], enable_gqa=hq != k.shape[2])
        return out.transpose(1, 2)

    return run


def attention_shapes(presets, quick):
    """(label, batch, Sq, Sk, Hq, Hkv): the attention sweep. Prefill: 16k tokens at S = 1k..16k,
    multi-head and GQA 32/8; decoding: one query against 1k..32k cached keys, batch 8."""
    shapes = []
    for name in presets:
        heads = PRESETS[name]["heads"]
        seqlens = (2048,) if quick else (1024, 2048, 4096, 8192, 16384)
        for kv in ((heads,) if quick else (heads, 8)):
            tag = "" if kv == heads else "-gqa"
            for seqlen in seqlens:
                shapes.append((f"{name} prefill{tag}", 16384 // seqlen, seqlen, seqlen, heads, kv))
        for kv in ((heads,) if quick else (heads, 8)):
            tag = "" if kv == heads else "-gqa"
            for cache in ((4096,) if quick else (1024, 4096, 16384, 32768)):
                shapes.append((f"{name} decode{tag}", 8, 1, cache, heads, kv))
    return shapes


def attention_cases(backends, presets, dtype, device, quick):
    cases = []
    s = torch.finfo(dtype).bits // 8
    for label, b, sq, sk, hq, hkv in attention_shapes(presets, quick):

        def inputs(b=b, sq=sq, sk=sk, hq=hq, hkv=hkv):
            return [torch.randn(b, sq, hq, HEAD_DIM, device=device, dtype=dtype),
                    torch.randn(b, sk, hkv, HEAD_DIM, device=device, dtype=dtype),
                    torch.randn(b, sk, hkv, HEAD_DIM, device=device, dtype=dtype)]

        def flops(d, b=b, sq=sq, sk=sk, hq=hq):
            fwd = counts.attention_flops(b, sq, sk, hq, HEAD_DIM, causal=True)
            bwd = counts.attention_flops(b, sq, sk, hq, HEAD_DIM, causal=True, backward=True)
            return counts.total(d, fwd, bwd)

        def kv_bytes(d, b=b, sq=sq, sk=sk, hq=hq, hkv=hkv):
            return counts.attention_kv_bytes(b, sq, sk, hq, hkv, HEAD_DIM, s)

        impls = _ours(lambda q, k, v, backend: lk.flash_attention(q, k, v, backend=backend),
                      [x for x in backends if x != "torch"])
        # eager materializes (B, H, Sq, Sk) scores, 34 GB in fp32 at 16k: only up to 8k
        if sq * sk * b * hq <= 2**32:
            _with_compile(impls, "eager", eager_attention)
        if device.type == "cuda":
            for sdpa in ("flash", "efficient", "cudnn"):
                impls[f"sdpa-{sdpa}"] = _sdpa(sdpa)
            impls["flex"] = _flex()
        decode = sq == 1
        cases.append(Case(
            "flash_attention", f"{label} b={b} sq={sq} sk={sk} hq={hq} hkv={hkv}",
            b * sq * sk * hq, impls, inputs,
            lambda q, k, v, upcast: reference.attention(q, k, v, upcast=upcast),
            flops_fn=flops, bytes_fn=kv_bytes if decode else None,
            directions=("fwd",) if decode else DIRECTIONS,
            # checked on batch 1 and one kv head with its query group (the fp32 reference
            # materializes the scores)
            check_slice=lambda t, g=hq // hkv: [t[0][:1, :, :g], t[1][:1, :, :1],
                                                t[2][:1, :, :1]]))
    return cases


# ------------------------------------------------------------ packed and cached attention, loss


def doc_lengths(n_docs: int, total: int, seed: int) -> list[int]:
    """``n_docs`` positive lengths summing to ``total``: a row of packed documents cut at
    ``n_docs - 1`` distinct points drawn uniformly (seeded, so every run packs the same row)."""
    cuts = sorted(random.Random(seed).sample(range(1, total), n_docs - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, total])]


def cache_lengths(batch: int, low: int, high: int, seed: int) -> list[int]:
    """Tokens already cached per sequence, uniform in [low, high] (seeded): a serving batch of
    requests at different points of their generation."""
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(batch)]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _kernel_backends(op: str, kernels, backends, device, notes) -> list[str]:
    """Our backends that have a kernel for ``op`` (those without get a note); the torch backend
    only on a CPU, as in attention_cases (on a GPU it is the reference that materializes the
    scores or logits, not a contender)."""
    ours = []
    for b in backends:
        if b == "torch":
            if device.type != "cuda":
                ours.append(b)
        elif b in kernels:
            ours.append(b)
        else:
            notes.append(f"{op}: backend {b} has no kernel for it yet: its rows are skipped")
    return ours


def _declared_kernels(ops_module: str) -> tuple[str, ...]:
    """The KERNEL_BACKENDS an ops module declares, read when the suite runs (kernels are added
    to the ops while this file stays the same)."""
    return importlib.import_module(f"llama_kernels.ops.{ops_module}").KERNEL_BACKENDS


def _dense_backends(backends, device) -> list[str]:
    return [b for b in backends if b != "torch" or device.type != "cuda"]


def varlen_cases(backends, dtype, device, notes, *, docs=8, total=16384, heads=32,
                 head_dim=HEAD_DIM, seed=0) -> list[Case]:
    """Packed causal self-attention (issue 14's training case): ``docs`` documents of seeded
    random lengths summing to ``total`` tokens, forward and forward + backward, TFLOP/s of the
    visible scores of each document. Peers: SDPA on the padded batch, flash-attn's varlen
    function when importable, and (a case of its own, its own FLOPs) our dense kernel at the
    same tokens."""
    lengths = doc_lengths(docs, total, seed)
    max_len = max(lengths)
    cu = [0, *itertools.accumulate(lengths)]
    # SDPA's padded layout: rows rounded up to 16, the alignment its memory-efficient kernel
    # wants of an attention mask's rows
    s_pad = _round_up(max_len, 16)
    counts_t = torch.tensor(lengths)
    doc_of = torch.repeat_interleave(torch.arange(docs), counts_t)
    pos = torch.arange(total) - torch.tensor(cu[:-1]).repeat_interleave(counts_t)
    padded_rows = (doc_of * s_pad + pos).to(device)  # packed token -> row of the padded batch
    lengths_dev = counts_t.to(device)

    def pad(t):  # (total, H, D) -> (docs, s_pad, H, D), zeros past each document
        flat = t.new_zeros(docs * s_pad, *t.shape[1:]).index_copy(0, padded_rows, t)
        return flat.view(docs, s_pad, *t.shape[1:])

    def unpad(o):  # SDPA's (docs, H, s_pad, D) -> (total, H, D)
        flat = o.transpose(1, 2).reshape(docs * s_pad, o.shape[1], o.shape[3])
        return flat.index_select(0, padded_rows)

    def inputs():
        # the packed q, k, v and cu_seqlens, then the same tokens as the padded batch a padded
        # pipeline holds from its input on (SDPA's peers are timed without the padding copies)
        q, k, v = (torch.randn(total, heads, head_dim, device=device, dtype=dtype)
                   for _ in range(3))
        return [q, k, v, torch.tensor(cu, dtype=torch.int32, device=device),
                pad(q), pad(k), pad(v)]

    def sdpa_padded_mask(q, k, v, cu, qp, kp, vp):
        # What a padded batch runs through SDPA in Hugging Face's code: a (B, 1, S, S) mask of
        # causal and padding, built each call, so SDPA takes a kernel that reads a mask.
        i = torch.arange(s_pad, device=q.device)
        mask = (i[None, :] <= i[:, None])[None] & (i < lengths_dev[:, None])[:, None, :]
        return unpad(F.scaled_dot_product_attention(
            qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), attn_mask=mask[:, None]))

    def sdpa_padded_causal(q, k, v, cu, qp, kp, vp):
        # SDPA's best on the same padded batch: with right padding, a real query i only sees
        # keys j <= i < its length, so is_causal alone is exact and SDPA may pick flash.
        return unpad(F.scaled_dot_product_attention(
            qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), is_causal=True))

    ours = _kernel_backends("flash_attention_varlen", _declared_kernels("flash_attention_varlen"),
                            backends, device, notes)
    impls = _ours(lambda q, k, v, cu, qp, kp, vp, backend: lk.flash_attention_varlen(
        q, k, v, cu, cu, max_len, max_len, backend=backend), ours)
    impls["sdpa-padded-mask"] = sdpa_padded_mask
    impls["sdpa-padded-causal"] = sdpa_padded_causal
    if FLASH_ATTN:
        impls["flash-attn"] = lambda q, k, v, cu, qp, kp, vp: FLASH_ATTN["varlen"](
            q, k, v, cu, cu, max_len, max_len, causal=True)
    else:
        notes.append(FLASH_ATTN_MISSING)

    def flops(d):
        return counts.total(
            d, counts.varlen_attention_flops(lengths, heads, head_dim, causal=True),
            counts.varlen_attention_flops(lengths, heads, head_dim, causal=True, backward=True))

    label = (f"packed tokens={total} docs={docs} lengths={'+'.join(map(str, lengths))} "
             f"h={heads} d={head_dim}")
    cases = [Case(
        "flash_attention_varlen", label, heads * sum(n * n for n in lengths), impls, inputs,
        lambda q, k, v, cu, qp, kp, vp, upcast: reference.attention_varlen(
            q, k, v, cu.int(), cu.int(), upcast=upcast),
        flops_fn=flops, directions=("fwd", "fwd+bwd"),
        # checked on one head (the fp32 reference materializes each document's scores)
        check_slice=lambda t: ([x[:, :1].contiguous() for x in t[:3]] + [t[3]]
                               + [x[:, :, :1].contiguous() for x in t[4:]]))]

    # The dense kernel at the packed case's tokens AND documents: docs x (total / docs), the mean
    # document length, so the TFLOP/s ratio prices what packing costs (ragged tile edges,
    # per-sequence bounds). One sequence of `total` tokens would instead do up to docs times
    # the FLOPs at the higher efficiency of long rows (a smaller share of masked diagonal
    # tiles), a rate the packed kernel cannot reach on the same documents.
    if total % docs:
        raise ValueError(f"total ({total}) must be a multiple of docs ({docs}) for the dense peer")
    b, s = docs, total // docs

    def dense_inputs():
        return [torch.randn(b, s, heads, head_dim, device=device, dtype=dtype)
                for _ in range(3)]

    def dense_flops(d):
        return counts.total(
            d, counts.attention_flops(b, s, s, heads, head_dim, causal=True),
            counts.attention_flops(b, s, s, heads, head_dim, causal=True, backward=True))

    cases.append(Case(
        "flash_attention_varlen", f"dense b={b} s={s} h={heads} d={head_dim} (the packed "
        "tokens, the mean document length)", b * s * s * heads,
        _ours(lambda q, k, v, backend: lk.flash_attention(q, k, v, backend=backend),
              _dense_backends(backends, device)), dense_inputs,
        lambda q, k, v, upcast: reference.attention(q, k, v, upcast=upcast),
        flops_fn=dense_flops, directions=("fwd", "fwd+bwd"),
        check_slice=lambda t: [x[:1, :, :1] for x in t]))
    return cases


def kvcache_cases(backends, dtype, device, notes, *, batch=64, lengths=(100, 4000), heads=32,
                  kv_heads=8, head_dim=HEAD_DIM, block_size=16, seed=0) -> list[Case]:
    """One decoding step of a serving batch (issue 14's inference case): ``batch`` sequences with
    seeded cache lengths in ``lengths``, one new token each (appended in place, then attended),
    the cache paged in ``block_size`` blocks and contiguous. GB/s over the K/V bytes each
    sequence's own length needs, against the measured copy ceiling. Peers: SDPA on the padded
    cache, flash-attn's flash_attn_with_kvcache when importable, and (a case of its own, its
    own bytes) our dense split-KV decode with every sequence at the longest length."""
    lens = cache_lengths(batch, *lengths, seed)
    group = heads // kv_heads
    # contiguous rows: the new token's included, rounded to 16 for SDPA's mask alignment
    s_cache = _round_up(max(lens) + 1, 16)
    n_blocks = [_round_up(n + 1, block_size) // block_size for n in lens]
    # a pool in the shuffled order a server's free list reaches after many requests
    pool = torch.randperm(sum(n_blocks), generator=torch.Generator().manual_seed(seed))
    table = torch.zeros(batch, max(n_blocks), dtype=torch.int32)
    for row, (start, n) in enumerate(zip(itertools.accumulate([0, *n_blocks]), n_blocks)):
        table[row, :n] = pool[start:start + n].int()
    # token t of sequence b: row b, t of the contiguous cache; slot table[b, t // bs] * bs +
    # t % bs of the flattened pool (every cached token and the new one's place)
    seq = torch.repeat_interleave(torch.arange(batch), torch.tensor(lens) + 1)
    tok = torch.cat([torch.arange(n + 1) for n in lens])
    slot = (table[seq, tok // block_size].long() * block_size + tok % block_size).to(device)
    seq, tok = seq.to(device), tok.to(device)

    def inputs():
        def rnd(*shape):
            return torch.randn(*shape, device=device, dtype=dtype)

        q, k_new, v_new = rnd(batch, 1, heads, head_dim), *(rnd(batch, 1, kv_heads, head_dim)
                                                            for _ in range(2))
        k_cache, v_cache = (rnd(batch, s_cache, kv_heads, head_dim) for _ in range(2))
        k_pool, v_pool = (rnd(sum(n_blocks), block_size, kv_heads, head_dim) for _ in range(2))
        for cache, paged in ((k_cache, k_pool), (v_cache, v_pool)):  # the same tokens in both
            paged.view(-1, kv_heads, head_dim)[slot] = cache[seq, tok]
        return [q, k_new, v_new, torch.tensor(lens, dtype=torch.int32, device=device), k_cache,
                v_cache, k_pool, v_pool, table.to(device)]

    def sdpa_padded(q, kn, vn, lens_t, kc, vc, kp, vp, bt):
        # A static padded cache, as Hugging Face's: the new token written at each sequence's
        # length, a (B, S) key mask built each step; the query heads of one kv head packed as
        # its query rows (flash-attn's GQA decode), so K and V are read once per kv head.
        rows, at = torch.arange(batch, device=q.device), lens_t.long()
        kc[rows, at], vc[rows, at] = kn[:, 0], vn[:, 0]
        mask = torch.arange(s_cache, device=q.device)[None] <= at[:, None]
        out = F.scaled_dot_product_attention(
            q.view(batch, kv_heads, group, head_dim), kc.transpose(1, 2), vc.transpose(1, 2),
            attn_mask=mask[:, None, None, :])
        return out.reshape(batch, 1, heads, head_dim)

    impls = {}
    for b in _kernel_backends("flash_attention_with_kvcache",
                              _declared_kernels("flash_attention_kvcache"), backends, device,
                              notes):
        impls[f"ours[{b}] paged-{block_size}"] = (
            lambda q, kn, vn, lens_t, kc, vc, kp, vp, bt, b=b: lk.flash_attention_with_kvcache(
                q, kp, vp, lens_t, kn, vn, block_table=bt, backend=b))
        impls[f"ours[{b}] contiguous"] = (
            lambda q, kn, vn, lens_t, kc, vc, kp, vp, bt, b=b: lk.flash_attention_with_kvcache(
                q, kc, vc, lens_t, kn, vn, backend=b))
    impls["sdpa-padded"] = sdpa_padded
    if FLASH_ATTN:
        impls["flash-attn contiguous"] = (
            lambda q, kn, vn, lens_t, kc, vc, kp, vp, bt: FLASH_ATTN["kvcache"](
                q, kc, vc, k=kn, v=vn, cache_seqlens=lens_t, causal=True))
        if block_size % 256 == 0:
            impls[f"flash-attn paged-{block_size}"] = (
                lambda q, kn, vn, lens_t, kc, vc, kp, vp, bt: FLASH_ATTN["kvcache"](
                    q, kp, vp, k=kn, v=vn, cache_seqlens=lens_t, block_table=bt, causal=True))
        else:
            notes.append(f"flash-attn paged-{block_size}: skipped, flash-attn 2 takes paged "
                         "caches in blocks of a multiple of 256 tokens")
    else:
        notes.append(FLASH_ATTN_MISSING)
    n_check = min(batch, 8)  # the reference loops over sequences: a few are enough

    def ref(q, kn, vn, lens_t, kc, vc, kp, vp, bt, upcast):
        return reference.attention_with_kvcache(q, kc.clone(), vc.clone(), lens_t.int(), kn, vn,
                                                upcast=upcast)

    cases = [Case(
        "flash_attention_with_kvcache",
        f"decode b={batch} cache={lengths[0]}..{lengths[1]} (sum {sum(lens)}) hq={heads} "
        f"hkv={kv_heads} d={head_dim} paged block={block_size}", kv_heads * sum(lens), impls,
        inputs, ref,
        bytes_fn=lambda d: counts.kvcache_decode_bytes(lens, 1, heads, kv_heads, head_dim,
                                                       torch.finfo(dtype).bits // 8),
        directions=("fwd",),
        check_slice=lambda t: [x[:n_check] for x in t[:6]] + [t[6], t[7], t[8][:n_check]])]

    # Our dense decode with every sequence at the longest length (flash-attn 2's split-KV
    # decode, reading a full padded cache): the bandwidth a uniform batch reaches, which the
    # ragged and paged rows should match over the bytes they need.
    s_dense = max(lens) + 1

    def dense_inputs():
        return [torch.randn(batch, 1, heads, head_dim, device=device, dtype=dtype),
                *(torch.randn(batch, s_dense, kv_heads, head_dim, device=device, dtype=dtype)
                  for _ in range(2))]

    cases.append(Case(
        "flash_attention_with_kvcache",
        f"decode-dense b={batch} sk={s_dense} hq={heads} hkv={kv_heads} d={head_dim} (every "
        "sequence at the longest length)", kv_heads * batch * s_dense,
        _ours(lambda q, k, v, backend: lk.flash_attention(q, k, v, backend=backend),
              _dense_backends(backends, device)), dense_inputs,
        lambda q, k, v, upcast: reference.attention(q, k, v, upcast=upcast),
        bytes_fn=lambda d: counts.attention_kv_bytes(batch, 1, s_dense, heads, kv_heads,
                                                     head_dim, torch.finfo(dtype).bits // 8),
        directions=("fwd",),
        check_slice=lambda t: [x[:n_check] for x in t]))
    return cases


def cross_entropy_cases(backends, dtype, device, notes, *, tokens=8192, dim=4096,
                        vocabs=(32000, 128256)) -> list[Case]:
    """The LM head's loss, forward + backward (issue 16): time, TFLOP/s of its three matmuls and
    peak memory (each row also over eager's), ours against the unfused eager code, torch.compile
    of it and Liger-Kernel's fused linear cross entropy when importable. LLaMA-1/2's vocabulary
    and Llama-3's."""
    # linear_cross_entropy declares no KERNEL_BACKENDS: its fused kernel is the triton backend
    # (cuda is refused by the op)
    ours = _kernel_backends("linear_cross_entropy", ("triton",), backends, device, notes)
    if LIGER_FLCE is None:
        notes.append("Liger-Kernel's LigerFusedLinearCrossEntropyLoss not importable: its "
                     "linear_cross_entropy rows are skipped")
    cases = []
    for vocab in vocabs:

        def inputs(vocab=vocab):
            x = torch.randn(tokens, dim, device=device, dtype=dtype)
            # unit-scale logits, as a trained head's: W ~ N(0, 1 / dim)
            w = (torch.randn(vocab, dim, device=device) * dim**-0.5).to(dtype)
            return [x, w, torch.randint(0, vocab, (tokens,), device=device)]

        impls = _ours(lambda x, w, t, backend: lk.linear_cross_entropy(x, w, t, backend=backend),
                      ours)
        _with_compile(impls, "eager", eager_linear_cross_entropy)
        if LIGER_FLCE is not None:
            impls["liger"] = LIGER_FLCE
        cases.append(Case(
            "linear_cross_entropy", f"7B tokens={tokens} dim={dim} vocab={vocab}",
            tokens * vocab, impls, inputs,
            lambda x, w, t, upcast: reference.linear_cross_entropy(x, w, t.long(),
                                                                   upcast=upcast),
            flops_fn=lambda d, vocab=vocab: counts.linear_cross_entropy_flops(tokens, vocab, dim,
                                                                              d),
            directions=("fwd+bwd",), memory=True,
            # checked on 1024 tokens (the fp32 reference materializes the logits)
            check_slice=lambda t: [t[0][:1024], t[1], t[2][:1024]]))
    return cases
