"""Hostile input, beyond test_api.py's BAD_CALLS: every bad call raises a ValueError or TypeError
naming the argument (never a crash, never a silent wrong answer), every odd-but-legal layout
gives the right answer, and no kernel launch writes outside its outputs.

- BAD: zero-size dimensions per op, non-finite / non-numeric eps, scale and theta, int, bool,
  complex and float64 tensors for every tensor argument, wrong rank for every argument, Sq > Sk
  with causal, tables too short, positions out of range, Hq not divisible by Hkv; mixed
  devices (on a GPU only).
- Unsupported head_dim per backend: asked for by name it raises naming head_dim; auto falls
  back to torch and answers correctly.
- Layouts a kernel cannot take directly (last dimension not unit-stride, size-1 last dimension
  with a stray stride, stride-0 expanded inputs and gradients) are copied or restated: results
  equal the contiguous ones.
- Guard regions: the Triton launchers that accept output buffers are fuzzed over shapes with
  outputs inside NaN-filled buffers (every guard must stay NaN) and inputs inside NaN padding
  (a read past a mask would pull NaN into the result).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import llama_kernels as lk
from llama_kernels import reference
from fuzz_profiles import FUZZ
from helpers import DEVICE, GPU, INTERPRET, Guarded, backend_params, poisoned

BACKENDS = backend_params()
TRITON_RUNS = GPU or INTERPRET


def _t(*shape, dtype=torch.float32, device=DEVICE):
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(*shape, device=device).to(dtype)
    return torch.ones(*shape, device=device).to(dtype)


def _w(n, dtype=torch.float32):
    return torch.ones(n, device=DEVICE, dtype=dtype)


COS, SIN = lk.rotary_tables(8, 16, device=DEVICE)
POS = torch.zeros(1, 4, dtype=torch.long, device=DEVICE)


def _x4(*shape, dtype=torch.float32):
    return _t(*shape, dtype=dtype)


def _attn(q=(1, 4, 4, 16), k=(1, 8, 2, 16), v=None, dtype=torch.float32, **kw):
    v = k if v is None else v
    return lambda: lk.flash_attention(_t(*q, dtype=dtype), _t(*k, dtype=dtype),
                                      _t(*v, dtype=dtype), **kw)


# (call, exception type(s), text the message must contain)
BAD = {
    # ---- zero-size dimensions, per op and per dimension
    "rms_norm x rows 0": (lambda: lk.rms_norm(_t(0, 4), _w(4)), ValueError, "x:"),
    "rms_norm x dim 0": (lambda: lk.rms_norm(_t(4, 0), _w(0)), ValueError, "x:"),
    "rms_norm x batch 0": (lambda: lk.rms_norm(_t(2, 0, 4), _w(4)), ValueError, "x:"),
    "add_rms_norm x empty": (lambda: lk.add_rms_norm(_t(0, 4), _t(0, 4), _w(4)), ValueError,
                             "x:"),
    "swiglu gate empty": (lambda: lk.swiglu(_t(3, 0), _t(3, 0)), ValueError, "gate:"),
    "swiglu gate 1-D empty": (lambda: lk.swiglu(_t(0), _t(0)), ValueError, "gate:"),
    "rotary batch 0": (lambda: lk.apply_rotary(_x4(0, 4, 2, 16), COS, SIN), ValueError, "x:"),
    "rotary seqlen 0": (lambda: lk.apply_rotary(_x4(1, 0, 2, 16), COS, SIN), ValueError, "x:"),
    "rotary heads 0": (lambda: lk.apply_rotary(_x4(1, 4, 0, 16), COS, SIN), ValueError, "x:"),
    "rotary head_dim 0": (lambda: lk.apply_rotary(_x4(1, 4, 2, 0), COS[:, :0], SIN[:, :0]),
                          ValueError, "x:"),
    "rotary empty tables": (lambda: lk.apply_rotary(_x4(1, 4, 2, 16), COS[:0], SIN[:0]),
                            ValueError, "cos:"),
    "rotary_tables head_dim 0": (lambda: lk.rotary_tables(8, 0), ValueError, "head_dim"),
    "attention Sq 0": (_attn(q=(1, 0, 4, 16)), ValueError, "q:"),
    "attention Sk 0": (_attn(k=(1, 0, 2, 16)), ValueError, "k:"),
    "attention batch 0": (_attn(q=(0, 4, 4, 16), k=(0, 8, 2, 16)), ValueError, "q:"),
    "attention heads 0": (_attn(q=(1, 4, 0, 16)), ValueError, "q:"),
    "attention kv heads 0": (_attn(k=(1, 8, 0, 16)), ValueError, "k:"),
    "attention head_dim 0": (_attn(q=(1, 4, 4, 0), k=(1, 8, 2, 0)), ValueError, "q:"),
    # ---- eps, softmax_scale, theta: non-finite or not a number
    "rms_norm eps inf": (lambda: lk.rms_norm(_t(2, 4), _w(4), float("inf")), ValueError, "eps"),
    "rms_norm eps -inf": (lambda: lk.rms_norm(_t(2, 4), _w(4), -math.inf), ValueError, "eps"),
    "rms_norm eps str": (lambda: lk.rms_norm(_t(2, 4), _w(4), "1e-6"), ValueError, "eps"),
    "rms_norm eps None": (lambda: lk.rms_norm(_t(2, 4), _w(4), None), ValueError, "eps"),
    "rms_norm eps tensor": (lambda: lk.rms_norm(_t(2, 4), _w(4), torch.tensor(1e-6)),
                            ValueError, "eps"),
    "rms_norm eps complex": (lambda: lk.rms_norm(_t(2, 4), _w(4), 1e-6j), ValueError, "eps"),
    "add_rms_norm eps nan": (lambda: lk.add_rms_norm(_t(2, 4), _t(2, 4), _w(4), math.nan),
                             ValueError, "eps"),
    "add_rms_norm eps inf": (lambda: lk.add_rms_norm(_t(2, 4), _t(2, 4), _w(4), math.inf),
                             ValueError, "eps"),
    "attention scale nan": (_attn(softmax_scale=math.nan), ValueError, "softmax_scale"),
    "attention scale -inf": (_attn(softmax_scale=-math.inf), ValueError, "softmax_scale"),
    "attention scale str": (_attn(softmax_scale="0.1"), ValueError, "softmax_scale"),
    "attention scale tensor": (_attn(softmax_scale=torch.tensor(0.1)), ValueError,
                               "softmax_scale"),
    "rotary_tables theta nan": (lambda: lk.rotary_tables(8, 16, math.nan), ValueError, "theta"),
    "rotary_tables theta inf": (lambda: lk.rotary_tables(8, 16, math.inf), ValueError, "theta"),
    "rotary_tables theta 0": (lambda: lk.rotary_tables(8, 16, 0.0), ValueError, "theta"),
    "rotary_tables theta str": (lambda: lk.rotary_tables(8, 16, "1e4"), ValueError, "theta"),
    "rotary_tables seq_len float": (lambda: lk.rotary_tables(8.0, 16), ValueError, "seq_len"),
    "rotary_tables head_dim negative": (lambda: lk.rotary_tables(8, -16), ValueError,
                                        "head_dim"),
    # ---- Sq > Sk with causal (decode step shapes too)
    "attention causal Sq 2 > Sk 1": (_attn(q=(1, 2, 4, 16), k=(1, 1, 2, 16)), ValueError,
                                     "seqlen_q"),
    "attention causal Sq > Sk triton": (
        _attn(q=(1, 9, 4, 16), backend="triton"), ValueError, "seqlen_q"),
    # ---- tables too short, positions out of range
    "rotary tables one row short": (lambda: lk.apply_rotary(_x4(1, 9, 2, 16), COS, SIN),
                                    ValueError, "cos:"),
    "rotary positions == rows": (
        lambda: lk.apply_rotary(_x4(1, 4, 2, 16), COS, SIN,
                                positions=torch.tensor([[0, 1, 2, 8]], device=DEVICE)),
        ValueError, "positions"),
    "rotary positions huge": (
        lambda: lk.apply_rotary(_x4(1, 4, 2, 16), COS, SIN,
                                positions=torch.full((1, 4), 2**40, device=DEVICE)),
        ValueError, "positions"),
    "rotary positions int32 min": (
        lambda: lk.apply_rotary(_x4(1, 4, 2, 16), COS, SIN,
                                positions=torch.full((1, 4), -2**31, dtype=torch.int32,
                                                     device=DEVICE)),
        ValueError, "positions"),
    "rotary positions bool": (
        lambda: lk.apply_rotary(_x4(1, 4, 2, 16), COS, SIN,
                                positions=torch.zeros(1, 4, dtype=torch.bool, device=DEVICE)),
        ValueError, "positions"),
    "rotary positions uint8": (
        lambda: lk.apply_rotary(_x4(1, 4, 2, 16), COS, SIN,
                                positions=torch.zeros(1, 4, dtype=torch.uint8, device=DEVICE)),
        ValueError, "positions"),
    "rotary positions empty": (
        lambda: lk.apply_rotary(_x4(1, 4, 2, 16), COS, SIN,
                                positions=torch.zeros(1, 0, dtype=torch.long, device=DEVICE)),
        ValueError, "positions"),
    "rotary positions list": (lambda: lk.apply_rotary(_x4(1, 4, 2, 16), COS, SIN,
                                                      positions=[[0, 1, 2, 3]]),
                              TypeError, "positions"),
    # ---- Hq not divisible by Hkv, Hkv > Hq
    "attention Hq 6 Hkv 4": (_attn(q=(1, 4, 6, 16), k=(1, 8, 4, 16)), ValueError, "k:"),
    "attention Hkv > Hq": (_attn(q=(1, 4, 2, 16), k=(1, 8, 4, 16)), ValueError, "k:"),
    "attention Hq 3 Hkv 2 triton": (_attn(q=(1, 4, 3, 16), backend="triton"), ValueError, "k:"),
    # ---- odd head_dim for rotary (also via the tables)
    "rotary head_dim 1": (lambda: lk.apply_rotary(_x4(1, 4, 2, 1), COS[:, :0], SIN[:, :0]),
                          ValueError, "x:"),
    "rotary head_dim 17": (lambda: lk.apply_rotary(_x4(1, 4, 2, 17), COS, SIN), ValueError,
                           "x:"),
    "rotary tables for another head_dim": (
        lambda: lk.apply_rotary(_x4(1, 4, 2, 16), *lk.rotary_tables(8, 32, device=DEVICE)),
        ValueError, "cos:"),
    # ---- mismatched weight
    "rms_norm weight longer": (lambda: lk.rms_norm(_t(2, 4), _w(8)), ValueError, "weight"),
    "rms_norm weight broadcastable (1,)": (lambda: lk.rms_norm(_t(2, 4), _w(1)), ValueError,
                                           "weight"),
    "rms_norm weight bf16 x fp16": (
        lambda: lk.rms_norm(_t(2, 4, dtype=torch.float16), _w(4, torch.bfloat16)),
        ValueError, "weight"),
    "add_rms_norm weight shape": (lambda: lk.add_rms_norm(_t(2, 4), _t(2, 4), _w(3)),
                                  ValueError, "weight"),
    "add_rms_norm residual broadcastable": (
        lambda: lk.add_rms_norm(_t(2, 4), _t(1, 4), _w(4)), ValueError, "residual"),
    "swiglu up broadcastable": (lambda: lk.swiglu(_t(2, 4), _t(1, 4)), ValueError, "up"),
    # ---- not tensors
    "rms_norm weight list": (lambda: lk.rms_norm(_t(2, 4), [1.0] * 4), TypeError, "weight"),
    "add_rms_norm residual None": (lambda: lk.add_rms_norm(_t(2, 4), None, _w(4)), TypeError,
                                   "residual"),
    "swiglu up ndarray": (lambda: lk.swiglu(_t(2, 4), np.ones((2, 4), np.float32)), TypeError,
                          "up"),
    "rotary cos list": (lambda: lk.apply_rotary(_x4(1, 4, 2, 16), COS.tolist(), SIN),
                        TypeError, "cos"),
    "attention v None": (lambda: lk.flash_attention(_t(1, 4, 4, 16), _t(1, 8, 2, 16), None),
                         TypeError, "v"),
}

# ---- int, bool, complex and float64 tensors, for every tensor argument
_BAD_DTYPES = (torch.int32, torch.int64, torch.bool, torch.complex64, torch.float64,
               torch.uint8)


def _dtype_calls(dt):
    x, w = _t(2, 4), _w(4)
    a = lambda **kw: _attn(**kw)()  # noqa: E731
    return {
        "rms_norm x": (lambda: lk.rms_norm(_t(2, 4, dtype=dt), w), "x"),
        "rms_norm weight": (lambda: lk.rms_norm(x, _t(4, dtype=dt)), "weight"),
        "add_rms_norm x": (lambda: lk.add_rms_norm(_t(2, 4, dtype=dt), x, w), "x"),
        "add_rms_norm residual": (lambda: lk.add_rms_norm(x, _t(2, 4, dtype=dt), w),
                                  "residual"),
        "add_rms_norm weight": (lambda: lk.add_rms_norm(x, x, _t(4, dtype=dt)), "weight"),
        "swiglu gate": (lambda: lk.swiglu(_t(2, 4, dtype=dt), x), "gate"),
        "swiglu up": (lambda: lk.swiglu(x, _t(2, 4, dtype=dt)), "up"),
        "rotary x": (lambda: lk.apply_rotary(_x4(1, 4, 2, 16, dtype=dt), COS, SIN), "x"),
        "rotary cos": (lambda: lk.apply_rotary(_x4(1, 4, 2, 16), COS.to(dt), SIN), "cos"),
        "rotary sin": (lambda: lk.apply_rotary(_x4(1, 4, 2, 16), COS, SIN.to(dt)), "sin"),
        "attention q": (lambda: lk.flash_attention(_t(1, 4, 4, 16, dtype=dt), _t(1, 8, 2, 16),
                                                   _t(1, 8, 2, 16)), "q"),
        "attention k": (lambda: lk.flash_attention(_t(1, 4, 4, 16), _t(1, 8, 2, 16, dtype=dt),
                                                   _t(1, 8, 2, 16)), "k"),
        "attention v": (lambda: lk.flash_attention(_t(1, 4, 4, 16), _t(1, 8, 2, 16),
                                                   _t(1, 8, 2, 16, dtype=dt)), "v"),
        "attention all": (lambda: a(dtype=dt), "q"),
    }


for _dt in _BAD_DTYPES:
    for _name, (_call, _arg) in _dtype_calls(_dt).items():
        BAD[f"{_name} {str(_dt).replace('torch.', '')}"] = (_call, ValueError, f"{_arg}:")

# ---- wrong rank, for every argument
BAD.update({
    "rms_norm x 0-d": (lambda: lk.rms_norm(torch.tensor(1.0, device=DEVICE), _w(1)),
                       ValueError, "x:"),
    "rms_norm weight 0-d": (lambda: lk.rms_norm(_t(2, 4), torch.tensor(1.0, device=DEVICE)),
                            ValueError, "weight"),
    "add_rms_norm residual 1-D": (lambda: lk.add_rms_norm(_t(2, 4), _t(8), _w(4)),
                                  ValueError, "residual"),
    "add_rms_norm residual 3-D": (lambda: lk.add_rms_norm(_t(2, 4), _t(1, 2, 4), _w(4)),
                                  ValueError, "residual"),
    "swiglu gate 0-d": (lambda: lk.swiglu(torch.tensor(1.0, device=DEVICE),
                                          torch.tensor(1.0, device=DEVICE)), ValueError, "gate"),
    "swiglu up 3-D": (lambda: lk.swiglu(_t(2, 4), _t(1, 2, 4)), ValueError, "up"),
    "rotary x 5-D": (lambda: lk.apply_rotary(_t(1, 1, 4, 2, 16), COS, SIN), ValueError, "x:"),
    "rotary x 2-D": (lambda: lk.apply_rotary(_t(4, 16), COS, SIN), ValueError, "x:"),
    "rotary cos 1-D": (lambda: lk.apply_rotary(_x4(1, 4, 2, 16), COS[0], SIN), ValueError,
                       "cos"),
    "rotary cos 3-D": (lambda: lk.apply_rotary(_x4(1, 4, 2, 16), COS[None], SIN), ValueError,
                       "cos"),
    "rotary sin 1-D": (lambda: lk.apply_rotary(_x4(1, 4, 2, 16), COS, SIN[0]), ValueError,
                       "sin"),
    "rotary positions 3-D": (lambda: lk.apply_rotary(_x4(1, 4, 2, 16), COS, SIN,
                                                     positions=POS[None]),
                             ValueError, "positions"),
    "rotary positions 0-d": (lambda: lk.apply_rotary(_x4(1, 4, 2, 16), COS, SIN,
                                                     positions=POS[0, 0]),
                             ValueError, "positions"),
    "attention k 3-D": (_attn(k=(8, 2, 16)), ValueError, "k:"),
    "attention v 5-D": (_attn(v=(1, 8, 2, 16, 1)), ValueError, "v:"),
    "attention q 5-D": (_attn(q=(1, 1, 4, 4, 16)), ValueError, "q:"),
})

if GPU:  # ---- mixed devices
    def _cpu(*shape, dtype=torch.float32):
        return torch.randn(*shape).to(dtype)

    BAD.update({
        "rms_norm weight on cpu": (lambda: lk.rms_norm(_t(2, 4), _cpu(4)), ValueError,
                                   "weight"),
        "rms_norm x on cpu, weight on gpu": (lambda: lk.rms_norm(_cpu(2, 4), _w(4)),
                                             ValueError, "weight"),
        "add_rms_norm residual on cpu": (lambda: lk.add_rms_norm(_t(2, 4), _cpu(2, 4), _w(4)),
                                         ValueError, "residual"),
        "swiglu up on cpu": (lambda: lk.swiglu(_t(2, 4), _cpu(2, 4)), ValueError, "up"),
        "rotary cos on cpu": (lambda: lk.apply_rotary(_x4(1, 4, 2, 16), COS.cpu(), SIN),
                              ValueError, "cos"),
        "rotary sin on cpu": (lambda: lk.apply_rotary(_x4(1, 4, 2, 16), COS, SIN.cpu()),
                              ValueError, "sin"),
        "rotary positions on cpu": (lambda: lk.apply_rotary(_x4(1, 4, 2, 16), COS, SIN,
                                                            positions=POS.cpu()),
                                    ValueError, "positions"),
        "attention k on cpu": (lambda: lk.flash_attention(_t(1, 4, 4, 16), _cpu(1, 8, 2, 16),
                                                          _t(1, 8, 2, 16)), ValueError, "k"),
        "attention v on cpu": (lambda: lk.flash_attention(_t(1, 4, 4, 16), _t(1, 8, 2, 16),
                                                          _cpu(1, 8, 2, 16)), ValueError, "v"),
    })
    if torch.cuda.device_count() > 1:
        BAD["attention k on another gpu"] = (
            lambda: lk.flash_attention(_t(1, 4, 4, 16), _t(1, 8, 2, 16).to("cuda:1"),
                                       _t(1, 8, 2, 16)), ValueError, "k")


@pytest.mark.parametrize("name", list(BAD))
def test_bad_call_raises_naming_the_argument(name):
    call, exc, text = BAD[name]
    with pytest.raises(exc, match=text):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_calls_fail_the_same_on_every_backend(backend):
    """Validation runs before dispatch: a backend named explicitly gives the same error (a
    sample of BAD; the kernels are never reached)."""
    for call in (lambda: lk.rms_norm(_t(0, 4), _w(4), backend=backend),
                 lambda: lk.swiglu(_t(2, 4), _t(2, 4, dtype=torch.int32), backend=backend),
                 lambda: lk.apply_rotary(_x4(1, 9, 2, 16), COS, SIN, backend=backend),
                 _attn(q=(1, 4, 3, 16), backend=backend)):
        with pytest.raises(ValueError):
            call()


def test_numpy_scalars_are_numbers():
    """eps, softmax_scale and theta from numpy (a config read with numpy) are accepted."""
    x, w = _t(3, 8), _w(8)
    torch.testing.assert_close(lk.rms_norm(x, w, np.float32(1e-5)), lk.rms_norm(x, w, 1e-5))
    q, k = _t(1, 4, 2, 16), _t(1, 4, 2, 16)
    torch.testing.assert_close(lk.flash_attention(q, k, k, softmax_scale=np.float64(0.3)),
                               lk.flash_attention(q, k, k, softmax_scale=0.3))
    torch.testing.assert_close(lk.rotary_tables(np.int64(8), 16, np.float32(500.0)),
                               lk.rotary_tables(8, 16, 500.0))


# ------------------------------------------------------------------------------ head_dim


@pytest.mark.skipif(not TRITON_RUNS, reason="triton cannot run here")
def test_attention_head_dim_300_triton_refuses_auto_falls_back():
    q, k = _t(1, 3, 2, 300), _t(1, 5, 1, 300)
    with pytest.raises(ValueError, match="head_dim 300"):
        lk.flash_attention(q, k, k, backend="triton")
    with lk.use_backend("triton"):
        with pytest.raises(ValueError, match="head_dim 300"):
            lk.flash_attention(q, k, k)
    out = lk.flash_attention(q, k, k, backend="auto")
    torch.testing.assert_close(out, reference.attention(q, k, k), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not TRITON_RUNS, reason="triton cannot run here")
def test_rotary_head_dim_past_kernels_refused_auto_falls_back():
    x = _t(1, 3, 2, 258)
    cos, sin = lk.rotary_tables(3, 258, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim 258"):
        lk.apply_rotary(x, cos, sin, backend="triton")
    torch.testing.assert_close(lk.apply_rotary(x, cos, sin, backend="auto"),
                               reference.apply_rotary(x, cos, sin))


def test_cuda_attention_refusal_names_why():
    q = _t(1, 3, 2, 48)
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        lk.flash_attention(q, q, q, backend="cuda")


# ------------------------------------------------------------------------------ layouts


def _grads(fn, inputs, dout_fn):
    leaves = [t.detach().clone().requires_grad_(True) if t.is_floating_point() else t
              for t in inputs]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    dout = dout_fn(out)
    g = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], dout)
    return [out.detach(), *g]


def _layout_cases(backend):
    cos, sin = lk.rotary_tables(12, 16, device=DEVICE)
    wide_tables = [torch.stack([t, t], -1).flatten(-2)[:, ::2] for t in (cos, sin)]
    assert wide_tables[0].stride(-1) == 2
    return {
        # a (n, 1) column of a transposed tensor: size-1 last dim with stride 3, which
        # contiguous() keeps (regression: the Triton launchers refused it)
        "rms_norm width-1 column": (lambda x, w: lk.rms_norm(x, w, backend=backend),
                                    [_t(3, 5).t()[:, 1:2], _w(1)]),
        "rms_norm width-1 3-D": (lambda x, w: lk.rms_norm(x, w, backend=backend),
                                 [_t(3, 2, 4).permute(1, 2, 0)[..., :1], _t(1)]),
        "add_rms_norm width-1": (lambda x, r, w: lk.add_rms_norm(x, r, w, backend=backend),
                                 [_t(2, 5).t()[:, :1], _t(2, 5).t()[:, 1:], _t(1)]),
        "swiglu width-1": (lambda g, u: lk.swiglu(g, u, backend=backend),
                           [_t(2, 7).t()[:, :1], _t(2, 7).t()[:, 1:]]),
        "rms_norm stride-0 rows": (lambda x, w: lk.rms_norm(x, w, backend=backend),
                                   [_t(1, 33).expand(6, 33), _t(33)]),
        "rms_norm stride-0 weight": (lambda x, w: lk.rms_norm(x, w, backend=backend),
                                     [_t(4, 33), _t(1).expand(33)]),
        "rms_norm last dim stride 2": (lambda x, w: lk.rms_norm(x, w, backend=backend),
                                       [_t(4, 66)[:, ::2], _t(66)[::2]]),
        "swiglu transposed": (lambda g, u: lk.swiglu(g, u, backend=backend),
                              [_t(40, 6).t(), _t(40, 6).t()]),
        "rotary last dim stride 2": (lambda x: lk.apply_rotary(x, cos, sin, backend=backend),
                                     [_t(2, 12, 3, 32)[..., ::2]]),
        "rotary tables last dim stride 2": (
            lambda x: lk.apply_rotary(x, *wide_tables, backend=backend), [_t(2, 12, 3, 16)]),
        "rotary stride-0 heads": (lambda x: lk.apply_rotary(x, cos, sin, backend=backend),
                                  [_t(2, 12, 1, 16).expand(2, 12, 4, 16)]),
        "attention last dim stride 2": (
            lambda q, k, v: lk.flash_attention(q, k, v, backend=backend),
            [_t(1, 20, 4, 32)[..., ::2], _t(1, 20, 2, 32)[..., ::2], _t(1, 20, 2, 16)]),
        "attention stride-0 kv heads": (
            lambda q, k, v: lk.flash_attention(q, k, v, backend=backend),
            [_t(1, 20, 4, 16), _t(1, 20, 1, 16).expand(1, 20, 2, 16),
             _t(1, 20, 1, 16).expand(1, 20, 2, 16)]),
        "attention head_dim 1 stride 3": (
            lambda q, k, v: lk.flash_attention(q, k, v, backend=backend),
            [_t(1, 20, 4, 3)[..., :1], _t(1, 20, 2, 3)[..., 1:2], _t(1, 20, 2, 3)[..., 2:]]),
    }


LAYOUT_NAMES = list(_layout_cases("torch"))
DOUTS = {
    "random": lambda o: torch.randn_like(o),
    "expanded (sum)": lambda o: torch.ones((), device=o.device, dtype=o.dtype).expand(o.shape),
    "transposed": lambda o: torch.randn(o.shape[::-1], device=o.device,
                                        dtype=o.dtype).permute(*range(o.dim() - 1, -1, -1)),
}


@pytest.mark.parametrize("dout", list(DOUTS))
@pytest.mark.parametrize("name", LAYOUT_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_layouts_match_contiguous(backend, name, dout):
    """Inputs and output gradients in layouts the kernels cannot take directly give the same
    answer as contiguous copies of them, within fp32 rounding: a layout may change a kernel's
    launch settings, or the matmul path eager PyTorch takes, and so the summation order.
    Reordering a sum moves it by a few eps32 of its terms' magnitude, not of its value: an
    attention gradient that cancels to ~0 (a query whose visible keys carry equal weight)
    still moves by ~1e-6 at unit-sized inputs. The absolute term is therefore relative to the
    largest value of the result; a wrong stride or a dropped element is off by O(1)."""
    fn, inputs = _layout_cases(backend)[name]
    torch.manual_seed(0)
    got = _grads(fn, inputs, DOUTS[dout])
    torch.manual_seed(0)
    want = _grads(fn, [t.contiguous() for t in inputs], lambda o: DOUTS[dout](o).contiguous())
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.isfinite(a).all(), f"result {i}: non-finite"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(),
                                   msg=f"result {i}")


# ------------------------------------------------------------------------------ guard regions


def test_guarded_catches_stray_store():
    """The guard-region check (tests/helpers.Guarded) itself can fail, in both layouts."""
    for contiguous in (False, True):
        g = Guarded((2, 3, 4), torch.float32, contiguous=contiguous)
        g.view.fill_(1.0)
        g.check("clean")
        g.buf.view(-1)[0] = 0.0
        with pytest.raises(AssertionError, match="outside"):
            g.check("stray")
        g.buf.view(-1)[0] = float("nan")
        g.view[-1, -1, -1] = float("nan")
        with pytest.raises(AssertionError, match="not written"):
            g.check("unwritten")


GUARD_DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
GUARD_WIDTHS = st.sampled_from([1, 2, 3, 5, 16, 31, 64, 127, 257, 1025])


@pytest.mark.skipif(not TRITON_RUNS, reason="triton cannot run here")
@FUZZ
@given(data=st.data())
def test_guards_rms_norm_launchers(data):
    from llama_kernels.triton import rms_norm as tri

    dtype = data.draw(GUARD_DTYPES, label="dtype")
    rows = data.draw(st.integers(1, 20), label="rows")
    dim = data.draw(GUARD_WIDTHS, label="dim")
    add = data.draw(st.booleans(), label="residual")
    chunked = data.draw(st.booleans(), label="chunked")
    settings = None
    if chunked:  # the wide-row loop at a width the interpreter affords
        block_n = data.draw(st.sampled_from([16, 32, 64]), label="block_n")
        settings = tri.RowLaunch(1, block_n, True, 1, 1)
    x, w = poisoned((rows, dim), dtype), poisoned((dim,), dtype)
    res = poisoned((rows, dim), dtype) if add else None
    y, rstd = Guarded((rows, dim), dtype), Guarded((rows,), torch.float32, contiguous=True)
    h = Guarded((rows, dim), dtype) if add else None
    tri._launch_fwd(x, res, w, 1e-6, y.view, h.view if add else None, rstd.view, settings)
    y.check("y"), rstd.check("rstd")
    if add:
        h.check("h")
    dy = poisoned((rows, dim), dtype)
    dh = poisoned((rows, dim), dtype) if add else None
    dx = Guarded((rows, dim), dtype)
    xs = h.view if add else x
    bwd_settings = tri.RowLaunch(1, settings.block_n, True, 1, 1) if chunked else None
    n_programs = data.draw(st.integers(1, 5), label="programs")
    partial = tri._launch_bwd(dy, xs, w, rstd.view, dh, dx.view, bwd_settings, n_programs)
    dx.check("dx")
    assert torch.isfinite(partial).all()


@pytest.mark.skipif(not TRITON_RUNS, reason="triton cannot run here")
@FUZZ
@given(data=st.data())
def test_guards_swiglu_launchers(data):
    from llama_kernels.triton import swiglu as tri

    dtype = data.draw(GUARD_DTYPES, label="dtype")
    rows = data.draw(st.integers(1, 40), label="rows")
    cols = data.draw(GUARD_WIDTHS, label="cols")
    gate, up, dout = (poisoned((rows, cols), dtype) for _ in range(3))
    out = Guarded((rows, cols), dtype)
    tri._launch_fwd(gate, up, out.view)
    out.check("out")
    dgate, dup = Guarded((rows, cols), dtype), Guarded((rows, cols), dtype)
    tri._launch_bwd(dout, gate, up, dgate.view, dup.view)
    dgate.check("dgate"), dup.check("dup")


@pytest.mark.skipif(not TRITON_RUNS, reason="triton cannot run here")
@FUZZ
@given(data=st.data())
def test_guards_rotary_launcher(data):
    from llama_kernels.triton import rotary as tri

    dtype = data.draw(GUARD_DTYPES, label="dtype")
    b, s = data.draw(st.integers(1, 3), label="batch"), data.draw(st.integers(1, 13), label="s")
    h = data.draw(st.integers(1, 5), label="heads")
    d = data.draw(st.sampled_from([2, 6, 16, 34, 64]), label="head_dim")
    rows = s + data.draw(st.integers(0, 3), label="extra rows")
    cos, sin = (poisoned((rows, d // 2), torch.float32) for _ in range(2))
    positions = None
    if data.draw(st.booleans(), label="positions"):
        positions = torch.randint(0, rows, (b, s), device=DEVICE)
    x = poisoned((b, s, h, d), dtype)
    out = Guarded((b, s, h, d), dtype)
    tri._launch(x, cos, sin, positions, data.draw(st.booleans(), label="interleaved"),
                data.draw(st.booleans(), label="conjugate"), out.view)
    out.check("out")


@pytest.mark.skipif(not TRITON_RUNS, reason="triton cannot run here")
@FUZZ
@given(data=st.data())
def test_guards_attention_launchers(data):
    from llama_kernels.triton import flash_attention as fa

    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]), label="dtype")
    d = data.draw(st.sampled_from([1, 3, 16, 24, 64]), label="head_dim")
    hkv = data.draw(st.integers(1, 2), label="kv heads")
    hq = hkv * data.draw(st.sampled_from([1, 3]), label="group")
    b = data.draw(st.integers(1, 2), label="batch")
    causal = data.draw(st.booleans(), label="causal")
    sk = data.draw(st.integers(1, 70), label="seqlen_k")
    sq = data.draw(st.integers(1, sk if causal else 70), label="seqlen_q")
    assume(b * hq * sq * sk <= 2 * 70 * 70)
    q, k, v = (poisoned((b, n, hh, d), dtype) for n, hh in ((sq, hq), (sk, hkv), (sk, hkv)))
    out, lse = Guarded((b, sq, hq, d), dtype), Guarded((b, hq, sq), torch.float32, True)
    decode = data.draw(st.sampled_from([None, True, False]), label="decode")
    splits = data.draw(st.sampled_from([None, 1, 3, 8]), label="splits") if decode else None
    fa.flash_attention_fwd(q, k, v, causal, d ** -0.5, decode=decode, num_splits=splits,
                           out=out.view, lse=lse.view)
    out.check("out"), lse.check("lse")
    grads = [Guarded(t.shape, dtype) for t in (q, k, v)]
    dout = poisoned((b, sq, hq, d), dtype)
    fa.flash_attention_bwd(dout, q, k, v, out.view, lse.view, causal, d ** -0.5,
                           dq=grads[0].view, dk=grads[1].view, dv=grads[2].view)
    for name, g in zip(("dq", "dk", "dv"), grads):
        g.check(name)


# ------------------------------------------------------------------------------ launch grids

GRID_AXIS_MAX = (2**31 - 1, 65535, 65535)  # CUDA's gridDim limits (x, y, z)


@pytest.mark.skipif(not TRITON_RUNS, reason="triton cannot run here")
def test_attention_grids_fit_cuda_limits(monkeypatch):
    """B * Hq (and B * Hkv) past 65535, e.g. a 2048-sequence batch of a 32-head model: every
    attention launch keeps those programs on grid axis 0, as axes 1 and 2 stop at 65535 (B * Hq
    on axis 1 would be a launch error on a GPU, which no CPU test would see). The kernels are
    replaced by recorders, so only the grids are checked here; tests/test_numerics.py runs such
    a batch on a GPU."""
    from llama_kernels.triton import flash_attention as fa

    grids = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            grids.append((self.name, tuple(grid)))
            return lambda *args, **kwargs: None

    for name in ("_attn_fwd_kernel", "_attn_fwd_splitkv_kernel", "_attn_splitkv_combine_kernel",
                 "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
        monkeypatch.setattr(fa, name, Recorder(name))
    b, heads, d = 3, 24000, 1  # B * Hq = B * Hkv = 72000
    for sq, decode in ((1, True), (40, False)):
        q = torch.zeros(b, sq, heads, d, device=DEVICE)
        k = torch.zeros(b, 40, heads, d, device=DEVICE)
        out, lse = fa.flash_attention_fwd(q, k, k, True, 1.0, decode=decode)
        fa.flash_attention_bwd(q, q, k, k, out, lse, True, 1.0)
    names = {name for name, _ in grids}
    assert len(names) == 6, names
    for name, grid in grids:
        assert all(n <= limit for n, limit in zip(grid, GRID_AXIS_MAX)), (name, grid)
