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
    shape: str  # a label, e.g. "7B tokens=4096 dim=4096"
    size: float  # x-axis of the plots (elements or tokens)
    impls: dict[str, Callable]  # name -> forward callable taking the inputs
    make_inputs: Callable[[], list[torch.Tensor]]
    bytes_fn: Callable[[str], float] | None = None  # direction -> minimum bytes moved
    flops_fn: Callable[[str], float] | None = None  # direction -> FLOPs
    directions: tuple[str, ...] = DIRECTIONS


def _ours(op_fn, backends):
    return {f"ours[{b}]": (lambda b_: (lambda *a: op_fn(*a, backend=b_)))(b) for b in backends}


def _with_compile(impls, eager_name, eager_fn):
    impls[eager_name] = eager_fn
    impls["torch.compile"] = torch.compile(eager_fn, dynamic=False)
    return impls


def row_cases(backends, presets, tokens, dtype, device):
    cases = []
    s = torch.finfo(dtype).bits // 8
    for name in presets:
        p = PRESETS[name]
        dim, hidden, n = p["dim"], p["hidden"], tokens

        def norm_inputs(dim=dim):
            return [torch.randn(n, dim, device=device, dtype=dtype),
                    (1 + 0.1 * torch.randn(dim, device=device)).to(dtype)]

        def norm_bytes(direction, dim=dim):
            fwd = 2 * n * dim * s + dim * s + 4 * n
            bwd = 3 * n * dim * s + 2 * dim * s + 4 * n
            return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]

        impls = _ours(lambda x, w, backend: lk.rms_norm(x, w, backend=backend), backends)
        _with_compile(impls, "eager", eager_rms_norm)
        if LIGER:
            impls["liger"] = LIGER["rms_norm"]
        cases.append(Case("rms_norm", f"{name} tokens={n} dim={dim}", n * dim, impls,
                          norm_inputs, bytes_fn=norm_bytes))

        def add_inputs(dim=dim):
            x, w = norm_inputs(dim)
            return [x, torch.randn_like(x), w]

        def add_bytes(direction, dim=dim):
            fwd = 4 * n * dim * s + dim * s + 4 * n
            bwd = 4 * n * dim * s + 2 * dim * s + 4 * n
            return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]

        impls = _ours(lambda x, r, w, backend: lk.add_rms_norm(x, r, w, backend=backend),
                      backends)
        _with_compile(impls, "eager", eager_add_rms_norm)
        if LIGER:
            impls["liger"] = LIGER["add_rms_norm"]
        cases.append(Case("add_rms_norm", f"{name} tokens={n} dim={dim}", n * dim, impls,
                          add_inputs, bytes_fn=add_bytes))

        def swiglu_inputs(hidden=hidden):
            return [torch.randn(n, hidden, device=device, dtype=dtype),
                    torch.randn(n, hidden, device=device, dtype=dtype)]

        def swiglu_bytes(direction, hidden=hidden):
            fwd, bwd = 3 * n * hidden * s, 5 * n * hidden * s
            return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]

        impls = _ours(lambda g, u, backend: lk.swiglu(g, u, backend=backend), backends)
        _with_compile(impls, "eager", eager_swiglu)
        if LIGER:
            impls["liger"] = LIGER["swiglu"]
        cases.append(Case("swiglu", f"{name} tokens={n} hidden={hidden}", n * hidden, impls,
                          swiglu_inputs, bytes_fn=swiglu_bytes))

        heads, seqlen = p["heads"], min(2048, n)
        batch = max(1, n // seqlen)
        cos, sin = lk.rotary_tables(seqlen, HEAD_DIM, device=device)

        def rotary_inputs(heads=heads, batch=batch):  # q and k of one layer
            shape = (batch, seqlen, heads, HEAD_DIM)
            return [torch.randn(shape, device=device, dtype=dtype),
                    torch.randn(shape, device=device, dtype=dtype)]

        def rotary_bytes(direction, heads=heads, batch=batch):
            one = 4 * batch * seqlen * heads * HEAD_DIM * s + 2 * seqlen * HEAD_DIM // 2 * 4
            return {"fwd": one, "bwd": one, "fwd+bwd": 2 * one}[direction]

        impls = _ours(lambda q, k, backend, cos=cos, sin=sin: (
            lk.apply_rotary(q, cos, sin, backend=backend),
            lk.apply_rotary(k, cos, sin, backend=backend)), backends)
        _with_compile(impls, "eager", lambda q, k, cos=cos, sin=sin: (
            eager_rotary(q, cos, sin), eager_rotary(k, cos, sin)))
        if LIGER:
            impls["liger"] = lambda q, k, cos=cos, sin=sin: LIGER["rope"](q, k, cos, sin)
        cases.append(Case("apply_rotary",
                          f"{name} q+k batch={batch} seqlen={seqlen} heads={heads}",
                          2 * batch * seqlen * heads * HEAD_DIM, impls, rotary_inputs,
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


def attention_cases(backends, presets, dtype, device, quick):
    cases = []
    for name in presets:
        heads = PRESETS[name]["heads"]
        shapes = [("prefill", 2, 2048, 2048, heads, heads)]
        shapes.append(("decode", 8, 1, 4096, heads, heads))
        if not quick:
            shapes.append(("prefill-gqa", 2, 2048, 2048, heads, 8))
            shapes.append(("decode-gqa", 8, 1, 8192, heads, 8))
        for kind, b, sq, sk, hq, hkv in shapes:

            def inputs(b=b, sq=sq, sk=sk, hq=hq, hkv=hkv):
                return [torch.randn(b, sq, hq, HEAD_DIM, device=device, dtype=dtype),
                        torch.randn(b, sk, hkv, HEAD_DIM, device=device, dtype=dtype),
                        torch.randn(b, sk, hkv, HEAD_DIM, device=device, dtype=dtype)]

            def flops(direction, b=b, sq=sq, sk=sk, hq=hq):
                fwd = reference.attention_flops(b, sq, sk, hq, HEAD_DIM, causal=True)
                bwd = reference.attention_flops(b, sq, sk, hq, HEAD_DIM, causal=True,
                                                backward=True)
                return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]

            def kv_bytes(direction, b=b, sq=sq, sk=sk, hq=hq, hkv=hkv):
                s = torch.finfo(dtype).bits // 8
                return (2 * b * sq * hq + 2 * b * sk * hkv) * HEAD_DIM * s

            impls = _ours(lambda q, k, v, backend: lk.flash_attention(q, k, v, backend=backend),
                          [x for x in backends if x != "torch"])
            _with_compile(impls, "eager", eager_attention)
            if device.type == "cuda":
                for sdpa in ("flash", "efficient", "cudnn"):
                    impls[f"sdpa-{sdpa}"] = _sdpa(sdpa)
            decode = kind.startswith("decode")
            cases.append(Case(
                "flash_attention", f"{name} {kind} b={b} sq={sq} sk={sk} hq={hq} hkv={hkv}",
                b * sq * sk * hq, impls, inputs, flops_fn=flops,
                bytes_fn=kv_bytes if decode else None,
                directions=("fwd",) if decode else DIRECTIONS))
    return cases
