"""What is measured: each op at the LLaMA shapes, ours on every backend that runs, and the
baselines in the same process (eager PyTorch written as in Meta's reference code, torch.compile
of that same code, PyTorch SDPA's backends for attention, Liger-Kernel when importable).

A case builds its inputs lazily and returns one callable per direction (fwd, bwd, fwd+bwd),
with the bytes it must move at the least (each input read once, each output written once) or
the FLOPs it must do, so the report can put each time next to the hardware ceiling.
"""

from __future__ import annotations

import math
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
