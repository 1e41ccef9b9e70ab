"""Every op of the contract, every backend that runs here, against reference.py in fp32.

Forward and backward, fp32/fp16/bf16, odd shapes, strided views. Tolerance: the rule of
llama_kernels.testing (at most about twice eager PyTorch's error in the same dtype, plus a floor;
attention adds its terms for the flash algorithm's own roundings). On a CPU machine the Triton
backend runs under the interpreter, so the shapes are small there; on a GPU the sweep adds the
LLaMA widths.
"""

from __future__ import annotations

import pytest
import torch

import llama_kernels as lk
from llama_kernels import reference
from llama_kernels.testing import attention_terms, check_fwd_bwd
from helpers import DEVICE, DTYPES, GPU, backend_params

BACKENDS = backend_params()


# ------------------------------------------------------------------------------ RMSNorm

ROW_SHAPES = [(1, 123), (3, 5, 64), (7, 4096), (2, 6656)]
if GPU:
    ROW_SHAPES += [(1000, 5120), (4, 8192), (3, 65536), (257, 11008)]


def _weight(dim, dtype):
    return (1.0 + 0.1 * torch.randn(dim, device=DEVICE)).to(dtype)


@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm(backend, dtype, shape):
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    check_fwd_bwd(lambda a, w: lk.rms_norm(a, w, 1e-6, backend=backend),
                  lambda a, w, upcast: reference.rms_norm(a, w, 1e-6, upcast=upcast),
                  [x, _weight(shape[-1], dtype)])


@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_add_rms_norm(backend, dtype, shape):
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    res = 2 * torch.randn(shape, device=DEVICE, dtype=dtype)
    check_fwd_bwd(lambda a, r, w: lk.add_rms_norm(a, r, w, 1e-5, backend=backend),
                  lambda a, r, w, upcast: reference.add_rms_norm(a, r, w, 1e-5, upcast=upcast),
                  [x, res, _weight(shape[-1], dtype)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_strided_rows(backend):
    """Rows of a wider buffer (a slice of a fused tensor) and a transposed view."""
    base = torch.randn(6, 2 * 96, device=DEVICE, dtype=torch.float16)
    x = base[:, 96:]
    assert not x.is_contiguous()
    xt = torch.randn(96, 5, device=DEVICE, dtype=torch.float16).t()
    for a in (x, xt):
        check_fwd_bwd(lambda a_, w: lk.rms_norm(a_, w, backend=backend),
                      lambda a_, w, upcast: reference.rms_norm(a_, w, upcast=upcast),
                      [a, _weight(96, torch.float16)])


# ------------------------------------------------------------------------------ SwiGLU

SWIGLU_SHAPES = [(1, 1), (3, 7, 123), (4, 1376)]
if GPU:
    SWIGLU_SHAPES += [(2, 512, 11008), (8191, 13824), (1, 17920)]


@pytest.mark.parametrize("shape", SWIGLU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu(backend, dtype, shape):
    gate = 3 * torch.randn(shape, device=DEVICE, dtype=dtype)
    up = torch.randn(shape, device=DEVICE, dtype=dtype)
    check_fwd_bwd(lambda g, u: lk.swiglu(g, u, backend=backend), reference.swiglu, [gate, up])


@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_halves_of_one_tensor(backend):
    """gate and up as the two halves of one fused w1|w3 projection, without a copy."""
    fused = torch.randn(5, 3, 2 * 200, device=DEVICE, dtype=torch.bfloat16)
    gate, up = fused.chunk(2, dim=-1)
    check_fwd_bwd(lambda g, u: lk.swiglu(g, u, backend=backend), reference.swiglu, [gate, up])


# ------------------------------------------------------------------------------ rotary

ROTARY_SHAPES = [(2, 1, 4, 64), (1, 97, 3, 128), (2, 17, 2, 96)]
if GPU:
    ROTARY_SHAPES += [(4, 2048, 32, 128), (2, 1025, 8, 64), (1, 33, 5, 256)]


def _rotary_inputs(shape, dtype, with_positions, table_rows=None):
    b, s, h, d = shape
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    rows = table_rows or s + 11
    cos, sin = lk.rotary_tables(rows, d, device=DEVICE)
    positions = None
    if with_positions:  # out of order, repeated, reaching the last row
        positions = torch.randint(0, rows, (b, s), device=DEVICE)
        positions[0, 0] = rows - 1
    return x, cos, sin, positions


@pytest.mark.parametrize("with_positions", [False, True], ids=["rows", "positions"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("shape", ROTARY_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_rotary(backend, dtype, shape, interleaved, with_positions):
    x, cos, sin, positions = _rotary_inputs(shape, dtype, with_positions)

    def kernel(a):
        return lk.apply_rotary(a, cos, sin, interleaved=interleaved, positions=positions,
                               backend=backend)

    def ref(a, upcast):
        return reference.apply_rotary(a, cos, sin, interleaved=interleaved, positions=positions,
                                      upcast=upcast)

    check_fwd_bwd(kernel, ref, [x])


@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_rotary_fused_qkv_views(backend):
    """q and k sliced out of one fused (B, S, 3, H, D) projection rotate without copies."""
    qkv = torch.randn(2, 19, 3, 4, 64, device=DEVICE, dtype=torch.float16)
    cos, sin = lk.rotary_tables(32, 64, device=DEVICE)
    for idx in (0, 1):
        view = qkv[:, :, idx]
        assert not view.is_contiguous()
        check_fwd_bwd(lambda a: lk.apply_rotary(a, cos, sin, backend=backend),
                      lambda a, upcast: reference.apply_rotary(a, cos, sin, upcast=upcast),
                      [view])


@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_rotary_table_gradients(backend):
    x, cos, sin, positions = _rotary_inputs((2, 9, 3, 64), torch.float32, True)
    check_fwd_bwd(lambda a, c, s: lk.apply_rotary(a, c, s, positions=positions, backend=backend),
                  lambda a, c, s, upcast: reference.apply_rotary(a, c, s, positions=positions,
                                                                 upcast=upcast),
                  [x, cos, sin])


# ------------------------------------------------------------------------------ attention

# (batch, Sq, Sk, Hq, Hkv, head_dim)
ATTN_SHAPES = [(1, 17, 17, 4, 4, 64), (2, 1, 97, 8, 2, 64), (1, 7, 300, 4, 1, 96),
               (1, 64, 257, 2, 2, 128)]
if GPU:
    ATTN_SHAPES += [(2, 1025, 1025, 16, 4, 128), (4, 1, 4096, 32, 8, 128)]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attention(backend, dtype, shape, causal):
    b, sq, sk, hq, hkv, d = shape
    q = torch.randn(b, sq, hq, d, device=DEVICE, dtype=dtype)
    k = torch.randn(b, sk, hkv, d, device=DEVICE, dtype=dtype)
    v = torch.randn(b, sk, hkv, d, device=DEVICE, dtype=dtype)
    try:
        lk.flash_attention(q[:, :1], k[:, :1], v[:, :1], causal=causal, backend=backend)
    except RuntimeError as e:
        if "has no kernel" in str(e):
            pytest.skip(str(e))
        raise
    except ValueError as e:
        if "does not support" in str(e):
            pytest.skip(str(e))
        raise
    check_fwd_bwd(lambda q_, k_, v_: lk.flash_attention(q_, k_, v_, causal=causal,
                                                        backend=backend),
                  lambda q_, k_, v_, upcast: reference.attention(q_, k_, v_, causal=causal,
                                                                 upcast=upcast),
                  [q, k, v], terms=attention_terms(causal=causal))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_on_llama_block(backend):
    """One pre-norm block's worth of ops chained, compared with the torch backend."""
    dim, heads, seqlen = 128, 2, 33
    x = torch.randn(2, seqlen, dim, device=DEVICE)
    res = torch.randn_like(x)
    w = _weight(dim, torch.float32)
    cos, sin = lk.rotary_tables(seqlen, dim // heads, device=DEVICE)

    def block(name):
        y, h = lk.add_rms_norm(x, res, w, backend=name)
        q = lk.apply_rotary(y.view(2, seqlen, heads, -1), cos, sin, backend=name)
        a = lk.flash_attention(q, q, q, backend="torch").reshape(2, seqlen, dim)
        return h + lk.swiglu(a, y, backend=name)

    torch.testing.assert_close(block(backend), block("torch"), rtol=1e-4, atol=1e-4)
