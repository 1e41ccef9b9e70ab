"""reference.py proven against independent formulations (in fp64, where rounding cannot hide a
wrong formula): Meta's complex-number rotary, Hugging Face's rotate_half, torch's own rms_norm,
silu and scaled_dot_product_attention, and autograd for every explicit backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llama_kernels import reference

f64 = torch.float64


def test_rms_norm_matches_torch():
    x = torch.randn(4, 7, 123, dtype=f64)
    w = torch.randn(123, dtype=f64)
    torch.testing.assert_close(reference.rms_norm(x, w, 1e-5),
                               F.rms_norm(x, (123,), w, eps=1e-5))


def test_rms_norm_rounds_once_in_low_precision():
    x = torch.randn(8, 256, dtype=torch.bfloat16)
    w = torch.randn(256, dtype=torch.bfloat16)
    expected = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
                * w.float()).bfloat16()
    assert torch.equal(reference.rms_norm(x, w), expected)


def test_add_rms_norm_is_add_then_norm():
    x, r = torch.randn(2, 3, 64, dtype=f64), torch.randn(2, 3, 64, dtype=f64)
    w = torch.randn(64, dtype=f64)
    y, h = reference.add_rms_norm(x, r, w)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, F.rms_norm(x + r, (64,), w, eps=1e-6))


def test_rms_norm_backward_matches_autograd():
    x = torch.randn(5, 3, 77, dtype=f64, requires_grad=True)
    w = torch.randn(77, dtype=f64, requires_grad=True)
    dy = torch.randn(5, 3, 77, dtype=f64)
    dx, dw = torch.autograd.grad(reference.rms_norm(x, w, 1e-6), (x, w), dy)
    rstd = reference.rms_norm_rstd(x.detach(), 1e-6)
    mine = reference.rms_norm_backward(dy, x.detach(), w.detach(), rstd)
    # rstd is fp32 by contract, so the explicit backward is only fp32-accurate.
    torch.testing.assert_close(mine[0], dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine[1], dw, rtol=1e-5, atol=1e-5)


def test_swiglu_and_backward():
    g = torch.randn(3, 50, dtype=f64, requires_grad=True) * 4
    u = torch.randn(3, 50, dtype=f64, requires_grad=True)
    out = reference.swiglu(g, u)
    torch.testing.assert_close(out, F.silu(g) * u)
    dout = torch.randn_like(out)
    expected = torch.autograd.grad(out, (g, u), dout)
    mine = reference.swiglu_backward(dout, g.detach(), u.detach())
    for a, b in zip(mine, expected):
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)


def meta_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """Meta's llama/model.py precompute_freqs_cis (in fp64)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=f64)[: dim // 2] / dim))
    t = torch.arange(end, dtype=f64)
    return torch.polar(torch.ones(end, dim // 2, dtype=f64), torch.outer(t, freqs))


def test_rotary_tables_match_meta():
    cos, sin = reference.rotary_tables(40, 128, 10000.0)
    freqs_cis = meta_freqs_cis(128, 40)
    assert cos.dtype == torch.float32 and cos.shape == (40, 64)
    torch.testing.assert_close(cos.double(), freqs_cis.real, rtol=0, atol=1e-7)
    torch.testing.assert_close(sin.double(), freqs_cis.imag, rtol=0, atol=1e-7)


def test_interleaved_rotary_is_complex_multiplication():
    b, s, h, d = 2, 9, 3, 32
    x = torch.randn(b, s, h, d, dtype=f64)
    freqs_cis = meta_freqs_cis(d, s)
    x_c = torch.view_as_complex(x.reshape(b, s, h, d // 2, 2))
    expected = torch.view_as_real(x_c * freqs_cis[None, :, None, :]).flatten(3)
    cos, sin = freqs_cis.real, freqs_cis.imag
    torch.testing.assert_close(reference.apply_rotary(x, cos, sin, interleaved=True), expected)


def test_half_rotary_is_rotate_half():
    """Hugging Face: q * cos + rotate_half(q) * sin with the tables repeated twice."""
    b, s, h, d = 2, 11, 2, 64
    x = torch.randn(b, s, h, d, dtype=f64)
    cos, sin = reference.rotary_tables(s, d)
    cos, sin = cos.double(), sin.double()
    cos_full = torch.cat((cos, cos), -1)[None, :, None, :]
    sin_full = torch.cat((sin, sin), -1)[None, :, None, :]
    rotate_half = torch.cat((-x[..., d // 2:], x[..., : d // 2]), -1)
    expected = x * cos_full + rotate_half * sin_full
    torch.testing.assert_close(reference.apply_rotary(x, cos, sin), expected)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_positions_conjugate_and_table_grads(interleaved):
    b, s, h, d = 2, 6, 3, 16
    x = torch.randn(b, s, h, d, dtype=f64)
    cos, sin = reference.rotary_tables(20, d)
    cos = cos.double().requires_grad_()
    sin = sin.double().requires_grad_()
    positions = torch.randint(0, 20, (b, s))
    out = reference.apply_rotary(x, cos, sin, interleaved=interleaved, positions=positions)
    # Row-by-row equals slicing the tables at each token's position.
    for bi in range(b):
        for si in range(s):
            p = positions[bi, si].item()
            one = reference.apply_rotary(x[bi:bi + 1, si:si + 1], cos[p:p + 1], sin[p:p + 1],
                                         interleaved=interleaved)
            torch.testing.assert_close(out[bi, si], one[0, 0])
    # Rotating back by the negative angle restores x.
    back = reference.apply_rotary(out, cos, sin, interleaved=interleaved, positions=positions,
                                  conjugate=True)
    torch.testing.assert_close(back, x)
    dy = torch.randn_like(out)
    expected = torch.autograd.grad(out, (cos, sin), dy)
    mine = reference.rotary_table_grads(dy, x, cos.detach(), sin.detach(),
                                        interleaved=interleaved, positions=positions)
    for a, e in zip(mine, expected):
        torch.testing.assert_close(a, e)


def sdpa_reference(q, k, v, causal, scale):
    n_rep = q.shape[2] // k.shape[2]
    qt = q.transpose(1, 2)
    kt = k.repeat_interleave(n_rep, dim=2).transpose(1, 2)
    vt = v.repeat_interleave(n_rep, dim=2).transpose(1, 2)
    mask = None
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        mask = torch.ones(sq, sk, dtype=torch.bool).tril(diagonal=sk - sq)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale).transpose(1, 2)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sq,sk,hq,hkv", [(13, 13, 4, 4), (1, 40, 8, 2), (5, 31, 6, 1)])
def test_attention_matches_sdpa_and_backward(sq, sk, hq, hkv, causal):
    d, scale = 16, 0.3
    q = torch.randn(2, sq, hq, d, dtype=f64, requires_grad=True)
    k = torch.randn(2, sk, hkv, d, dtype=f64, requires_grad=True)
    v = torch.randn(2, sk, hkv, d, dtype=f64, requires_grad=True)
    out, lse = reference.attention_with_lse(q, k, v, causal=causal, softmax_scale=scale)
    expected = sdpa_reference(q, k, v, causal, scale)
    torch.testing.assert_close(out, expected)
    # lse: log of the softmax denominator over the visible keys (fp32 by contract).
    n_rep = hq // hkv
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(n_rep, 2)) * scale
    if causal:
        scores = scores.masked_fill(~reference.causal_mask(sq, sk), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), rtol=1e-6, atol=1e-6)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(expected, (q, k, v), dout)
    mine = reference.attention_backward(dout, q.detach(), k.detach(), v.detach(), out.detach(),
                                        lse, causal=causal, softmax_scale=scale)
    for a, e in zip(mine, grads):  # lse is fp32, so the explicit backward is fp32-accurate
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_causal_mask_bottom_right_and_flops():
    mask = reference.causal_mask(3, 5)
    assert mask.tolist() == [[True, True, True, False, False],
                             [True, True, True, True, False],
                             [True, True, True, True, True]]
    for sq, sk in ((1, 1), (3, 5), (64, 64), (7, 300)):
        visible = int(reference.causal_mask(sq, sk).sum())
        assert reference.attention_flops(1, sq, sk, 1, 1, causal=True) == 4.0 * visible
        assert reference.attention_flops(1, sq, sk, 1, 1, causal=False) == 4.0 * sq * sk
