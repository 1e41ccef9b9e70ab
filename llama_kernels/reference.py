"""Plain eager PyTorch for every op of the contract: the "torch" backend and the ground truth.

Each forward takes ``upcast``: with ``upcast=True`` (the default) all math is done in fp32 and
the result is cast back to the input dtype once, which is the contract of every backend; with
``upcast=False`` the math runs in the input dtype, the way naive eager code would. Tests measure
a kernel's error against the fp32 result and allow about twice the error of the
``upcast=False`` eager result: a kernel in dtype T may be about twice as wrong as plain eager
PyTorch in T, never more (``llama_kernels.testing`` holds the rule).

The explicit backward functions are the "torch" backend's backward; tests prove each one
against ``torch.autograd`` applied to the forward.

Rounding choice for RMSNorm: ``y = x * rstd * weight`` all in fp32, rounded to the output dtype
once (Transformer Engine's order). Hugging Face rounds ``x * rstd`` to the input dtype before
multiplying by the weight; the two differ in the last bit, within the tolerance rule.

Non-finite values and extremes (every backend; tests/test_numerics.py):

- A NaN reaches exactly the values that depend on it; every other value is bitwise what it is
  without the NaN. rms_norm / add_rms_norm: a NaN in a row makes that row of y NaN (and of dx;
  dweight, a sum over rows, is all NaN); h = x + residual is NaN only at that element. swiglu:
  the element only. apply_rotary: the rotated pair only (the backward does not read x).
- An inf in a row of rms_norm gives rstd = 0: NaN at the inf (inf * 0), 0 elsewhere in the row,
  as eager PyTorch. eps = 0 with an all-zero row gives NaN likewise (0 * inf).
- Attention: a NaN in key j (in k) poisons exactly the queries that see j (all, or with the
  causal mask i >= j - (Sk - Sq)); the others are bitwise unchanged. A NaN in a value row v_j
  poisons the queries that see j; a query that does not see j is unchanged or NaN (P @ V
  multiplies its zero weight by NaN; this reference gives NaN for every query), never a wrong
  finite number.
- Fully masked query rows cannot occur: causal attention with Sq > Sk is refused (ValueError).
- Scores of any size stay finite: the softmax subtracts the running row maximum, so scores of
  1e4 give the (nearly one-hot) answer, not inf or NaN.
- Squares and sums are taken in fp32: fp16 rows with |x| up to 65504, whose squares overflow
  fp16, normalize correctly. swiglu saturates cleanly: silu(g) = g for large g and 0 (or a
  denormal) for large negative g (exp(-g) overflows, sigmoid = 0), with finite gradients.
- A result that does not fit the output dtype (fp16 swiglu of 300 * 300) is inf, as eager.
- Kernel offsets are 64-bit wherever a product can pass 2**31 elements.
"""

from __future__ import annotations

import torch


def _compute_dtype(t: torch.Tensor, upcast: bool) -> torch.dtype:
    return torch.float32 if upcast and t.dtype in (torch.float16, torch.bfloat16) else t.dtype


# --------------------------------------------------------------------------------------------
# RMSNorm:  y = x * rstd * w,  rstd = 1 / sqrt(mean(x^2) + eps)
# backward: dx = rstd * (dy*w - x * rstd^2 * mean(dy*w*x)),  dw = sum_rows(dy * x * rstd)
# --------------------------------------------------------------------------------------------


def rms_norm_rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32 reciprocal RMS of each row of ``x`` (shape ``x.shape[:-1]``)."""
    xf = x.float()
    return torch.rsqrt(xf.pow(2).mean(-1) + eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, upcast: bool = True):
    ct = _compute_dtype(x, upcast)
    xc = x.to(ct)
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    return (xc * rstd * weight.to(ct)).to(x.dtype)


def add_rms_norm(x, residual, weight, eps: float = 1e-6, *, upcast: bool = True):
    """Returns ``(rms_norm(h), h)`` with ``h = x + residual`` (h rounded to x's dtype)."""
    ct = _compute_dtype(x, upcast)
    h = (x.to(ct) + residual.to(ct)).to(x.dtype)
    return rms_norm(h, weight, eps, upcast=upcast), h


def rms_norm_backward(dy, x, weight, rstd, dh=None):
    """Gradients ``(dx, dweight)`` of ``rms_norm`` given the saved fp32 ``rstd``; ``dh`` (the
    gradient reaching h of add_rms_norm directly) is added to dx in fp32 before the rounding."""
    dyf, xf, wf = dy.float(), x.float(), weight.float()
    r = rstd.float().unsqueeze(-1)
    xhat = xf * r
    g = dyf * wf
    dx = r * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    if dh is not None:
        dx = dx + dh.float()
    dw = (dyf * xhat).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


# --------------------------------------------------------------------------------------------
# SwiGLU:  out = silu(g) * u,  silu(g) = g * sigmoid(g)
# backward: du = dout * silu(g),  dg = dout * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
# --------------------------------------------------------------------------------------------


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, upcast: bool = True) -> torch.Tensor:
    ct = _compute_dtype(gate, upcast)
    g, u = gate.to(ct), up.to(ct)
    return (g * torch.sigmoid(g) * u).to(gate.dtype)


def swiglu_backward(dout, gate, up):
    d, g, u = dout.float(), gate.float(), up.float()
    s = torch.sigmoid(g)
    dup = d * g * s
    dgate = d * u * s * (1.0 + g * (1.0 - s))
    return dgate.to(gate.dtype), dup.to(up.dtype)


# --------------------------------------------------------------------------------------------
# Rotary embedding. Pair (a, b) at angle t: (a cos t - b sin t, a sin t + b cos t).
# The backward is the rotation by -t (``conjugate=True``): R(t)^T = R(-t).
# --------------------------------------------------------------------------------------------


def rotary_tables(seq_len: int, head_dim: int, theta: float = 10000.0, *, device=None):
    """``(cos, sin)``, each fp32 ``(seq_len, head_dim // 2)``; angle ``t * theta**(-2i/D)``."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim
    )
    t = torch.arange(seq_len, device=device, dtype=torch.float64)
    angles = torch.outer(t, inv_freq)
    return angles.cos().float(), angles.sin().float()


def _gather_tables(cos, sin, x, positions):
    """Table rows for each token, broadcastable to ``(B, S, 1, D/2)``."""
    seqlen = x.shape[1]
    if positions is None:
        c, s = cos[:seqlen], sin[:seqlen]
        return c[None, :, None, :], s[None, :, None, :]
    return cos[positions][:, :, None, :], sin[positions][:, :, None, :]


def apply_rotary(x, cos, sin, *, interleaved: bool = False, positions=None,
                 conjugate: bool = False, upcast: bool = True):
    """Rotate x ``(B, S, H, D)``; ``interleaved`` pairs ``(2i, 2i+1)``, else ``(i, i + D/2)``."""
    ct = _compute_dtype(x, upcast)
    c, s = _gather_tables(cos, sin, x, positions)
    c, s = c.to(ct), s.to(ct)
    if conjugate:
        s = -s
    xc = x.to(ct)
    if interleaved:
        a, b = xc[..., 0::2], xc[..., 1::2]
        out = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
    else:
        half = x.shape[-1] // 2
        a, b = xc[..., :half], xc[..., half:]
        out = torch.cat((a * c - b * s, a * s + b * c), dim=-1)
    return out.to(x.dtype)


def rotary_table_grads(dy, x, cos, sin, *, interleaved: bool = False, positions=None):
    """Gradients of ``apply_rotary`` w.r.t. the tables (fp32, shaped like cos and sin)."""
    ct = torch.promote_types(torch.promote_types(dy.dtype, cos.dtype), torch.float32)
    dyf, xf = dy.to(ct), x.to(ct)
    if interleaved:
        a, b = xf[..., 0::2], xf[..., 1::2]
        da, db = dyf[..., 0::2], dyf[..., 1::2]
    else:
        half = x.shape[-1] // 2
        a, b = xf[..., :half], xf[..., half:]
        da, db = dyf[..., :half], dyf[..., half:]
    # out_a = a c - b s, out_b = a s + b c
    dc = (da * a + db * b).sum(2)  # (B, S, D/2)
    ds = (db * a - da * b).sum(2)
    dcos = torch.zeros_like(cos, dtype=ct)
    dsin = torch.zeros_like(sin, dtype=ct)
    if positions is None:
        seqlen = x.shape[1]
        dcos[:seqlen] += dc.sum(0)
        dsin[:seqlen] += ds.sum(0)
    else:
        idx = positions.reshape(-1)
        dcos.index_add_(0, idx, dc.reshape(-1, dc.shape[-1]))
        dsin.index_add_(0, idx, ds.reshape(-1, ds.shape[-1]))
    return dcos.to(cos.dtype), dsin.to(sin.dtype)


# --------------------------------------------------------------------------------------------
# Attention. q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D); query head h reads kv head h // (Hq/Hkv).
# Causal mask aligned bottom-right: query i sees keys j <= i + Sk - Sq.
# lse (B, Hq, Sq) fp32 = log(sum_j exp(scale * q.k_j)) over the visible keys.
# backward: dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ = scale dS K,
#           dK = scale dS^T Q, with dK and dV summed over each query-head group.
# --------------------------------------------------------------------------------------------


def causal_mask(seqlen_q: int, seqlen_k: int, device=None) -> torch.Tensor:
    """Boolean ``(Sq, Sk)``, True where query i may see key j (bottom-right aligned)."""
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    return j <= i + (seqlen_k - seqlen_q)


def _blind_rows(seqlen_q: int, seqlen_k: int, device=None) -> torch.Tensor:
    """Boolean ``(Sq, 1)``: the causal rows that see no key (the first Sq - Sk when Sq > Sk)."""
    return (torch.arange(seqlen_q, device=device) < seqlen_q - seqlen_k)[:, None]


def _repeat_kv(t: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, S, Hkv, D) -> (B, S, Hkv * n_rep, D), as ``repeat_kv`` in Meta's code."""
    if n_rep == 1:
        return t
    b, s, h, d = t.shape
    return t[:, :, :, None, :].expand(b, s, h, n_rep, d).reshape(b, s, h * n_rep, d)


def _scores(q, k, causal, softmax_scale, ct):
    n_rep = q.shape[2] // k.shape[2]
    qc = q.to(ct).transpose(1, 2)  # (B, Hq, Sq, D)
    kc = _repeat_kv(k, n_rep).to(ct).transpose(1, 2)
    scores = (qc @ kc.transpose(-1, -2)) * softmax_scale  # (B, Hq, Sq, Sk)
    if causal:
        mask = causal_mask(q.shape[1], k.shape[1], device=q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores


def attention(q, k, v, *, causal: bool = True, softmax_scale: float | None = None,
              upcast: bool = True) -> torch.Tensor:
    """Materialized-scores attention; output ``(B, Sq, Hq, D)`` in q's dtype."""
    return attention_with_lse(q, k, v, causal=causal, softmax_scale=softmax_scale,
                              upcast=upcast)[0]


def attention_with_lse(q, k, v, *, causal: bool = True, softmax_scale: float | None = None,
                       upcast: bool = True):
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    ct = _compute_dtype(q, upcast)
    scores = _scores(q, k, causal, softmax_scale, ct)
    lse = torch.logsumexp(scores.float(), dim=-1)  # (B, Hq, Sq)
    probs = torch.softmax(scores, dim=-1)
    if causal and q.shape[1] > k.shape[1]:  # the first Sq - Sk rows see no key: output 0
        probs = probs.masked_fill(_blind_rows(q.shape[1], k.shape[1], q.device), 0.0)
    vc = _repeat_kv(v, q.shape[2] // v.shape[2]).to(ct).transpose(1, 2)
    out = (probs @ vc).transpose(1, 2)  # (B, Sq, Hq, D)
    return out.to(q.dtype), lse


def attention_backward(dout, q, k, v, out, lse, *, causal: bool = True,
                       softmax_scale: float | None = None):
    """Gradients ``(dq, dk, dv)`` from the saved output and fp32 log-sum-exp."""
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    n_rep = q.shape[2] // k.shape[2]
    scores = _scores(q, k, causal, softmax_scale, torch.float32)
    probs = torch.exp(scores - lse.float().unsqueeze(-1))  # (B, Hq, Sq, Sk)
    if causal and q.shape[1] > k.shape[1]:  # rows that see no key (lse -inf) get no gradient
        probs = probs.masked_fill(_blind_rows(q.shape[1], k.shape[1], q.device), 0.0)
    do = dout.float().transpose(1, 2)  # (B, Hq, Sq, D)
    o = out.float().transpose(1, 2)
    qf = q.float().transpose(1, 2)
    kf = _repeat_kv(k, n_rep).float().transpose(1, 2)
    vf = _repeat_kv(v, n_rep).float().transpose(1, 2)
    dv = probs.transpose(-1, -2) @ do  # (B, Hq, Sk, D)
    dp = do @ vf.transpose(-1, -2)
    delta = (do * o).sum(-1, keepdim=True)
    ds = probs * (dp - delta)
    dq = (ds @ kf) * softmax_scale
    dk = (ds.transpose(-1, -2) @ qf) * softmax_scale

    def group_sum(t):  # (B, Hq, Sk, D) -> (B, Sk, Hkv, D)
        b, hq, s, d = t.shape
        return t.reshape(b, hq // n_rep, n_rep, s, d).sum(2).transpose(1, 2)

    return (dq.transpose(1, 2).to(q.dtype), group_sum(dk).to(k.dtype),
            group_sum(dv).to(v.dtype))


# --------------------------------------------------------------------------------------------
# Packed sequences (flash-attn's varlen layout): q (total_q, Hq, D), k/v (total_k, Hkv, D);
# sequence b is rows cu_seqlens[b]:cu_seqlens[b+1] and attends only to itself, causal
# bottom-right per sequence. lse (Hq, total_q). A query that sees no key (an empty key
# sequence, or causal with more queries than keys) outputs 0 with lse -inf.
# --------------------------------------------------------------------------------------------


def _sequences(cu_seqlens_q, cu_seqlens_k):
    """(q rows, k rows) slice pairs, one per sequence."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])) for b in range(len(cq) - 1)]


def attention_varlen_with_lse(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal: bool = True,
                              softmax_scale: float | None = None, upcast: bool = True):
    """Each packed sequence through ``attention_with_lse``; ``(out, lse)``."""
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)
    for rows_q, rows_k in _sequences(cu_seqlens_q, cu_seqlens_k):
        if rows_q.stop == rows_q.start or rows_k.stop == rows_k.start:
            continue
        o, lse_b = attention_with_lse(q[None, rows_q], k[None, rows_k], v[None, rows_k],
                                      causal=causal, softmax_scale=softmax_scale,
                                      upcast=upcast)
        out[rows_q], lse[:, rows_q] = o[0], lse_b[0]
    return out, lse


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal: bool = True,
                     softmax_scale: float | None = None, upcast: bool = True) -> torch.Tensor:
    return attention_varlen_with_lse(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal,
                                     softmax_scale=softmax_scale, upcast=upcast)[0]


def attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *,
                              causal: bool = True, softmax_scale: float | None = None):
    """``(dq, dk, dv)`` of the packed attention, each sequence through ``attention_backward``."""
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for rows_q, rows_k in _sequences(cu_seqlens_q, cu_seqlens_k):
        if rows_q.stop == rows_q.start or rows_k.stop == rows_k.start:
            continue
        g = attention_backward(dout[None, rows_q], q[None, rows_q], k[None, rows_k],
                               v[None, rows_k], out[None, rows_q], lse[None, :, rows_q],
                               causal=causal, softmax_scale=softmax_scale)
        dq[rows_q], dk[rows_k], dv[rows_k] = g[0][0], g[1][0], g[2][0]
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# Attention against a KV cache (inference). Caches (B, S_cache, Hkv, D), or paged
# (num_blocks, block_size, Hkv, D) with block_table (B, max_blocks): token t of sequence b is row
# t % block_size of block block_table[b, t // block_size]. New k, v (B, S_new, Hkv, D) are
# written at cache_seqlens[b] + i (rotated first when tables are given); q is rotated at the
# same positions; attention covers cache_seqlens[b] + S_new keys, causal bottom-right.
# --------------------------------------------------------------------------------------------


def _cache_rows(b: int, n: int, block_table, block_size: int):
    """(block index or b, row) of tokens 0..n-1 of sequence b."""
    t = torch.arange(n, device=block_table.device if block_table is not None else None)
    if block_table is None:
        return torch.full_like(t, b), t
    return block_table[b, t // block_size].long(), t % block_size


def attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k=None, v=None, *,
                           block_table=None, rotary_cos=None, rotary_sin=None,
                           rotary_interleaved: bool = False, causal: bool = True,
                           softmax_scale: float | None = None, upcast: bool = True):
    """Writes the new k, v into the caches (in place) and returns the attention ``(B, Sq, Hq,
    D)``: each sequence's cached plus new keys, gathered, then ``attention_with_lse``."""
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    batch, seqlen_q = q.shape[:2]
    s_new = 0 if k is None else k.shape[1]
    block_size = k_cache.shape[1]
    out = torch.zeros_like(q)
    for b in range(batch):
        start = int(cache_seqlens[b])
        qb = q[b:b + 1]
        if rotary_cos is not None:
            pos_q = torch.arange(start, start + seqlen_q, device=q.device)[None]
            qb = apply_rotary(qb, rotary_cos, rotary_sin, interleaved=rotary_interleaved,
                              positions=pos_q)
        if s_new:
            kb, vb = k[b:b + 1], v[b:b + 1]
            if rotary_cos is not None:
                pos_k = torch.arange(start, start + s_new, device=q.device)[None]
                kb = apply_rotary(kb, rotary_cos, rotary_sin, interleaved=rotary_interleaved,
                                  positions=pos_k)
            blocks, rows = _cache_rows(b, start + s_new, block_table, block_size)
            k_cache[blocks[start:], rows[start:]] = kb[0].to(k_cache.dtype)
            v_cache[blocks[start:], rows[start:]] = vb[0].to(v_cache.dtype)
        n_keys = start + s_new
        if n_keys == 0:
            continue
        blocks, rows = _cache_rows(b, n_keys, block_table, block_size)
        keys, values = k_cache[blocks, rows][None], v_cache[blocks, rows][None]
        out[b] = attention_with_lse(qb, keys, values, causal=causal,
                                    softmax_scale=softmax_scale, upcast=upcast)[0][0]
    return out


def attention_flops(batch, seqlen_q, seqlen_k, heads, head_dim, *, causal: bool,
                    backward: bool = False) -> float:
    """Matmul FLOPs of attention; causal counts only the visible half (as flash-attn)."""
    visible = seqlen_q * seqlen_k
    if causal:  # query i sees i + (Sk - Sq) + 1 keys (Sq <= Sk)
        visible = seqlen_q * (seqlen_k - seqlen_q + 1) + seqlen_q * (seqlen_q - 1) // 2
    flops = 4.0 * batch * heads * head_dim * visible
    return flops * (2.5 if backward else 1.0)


# --------------------------------------------------------------------------------------------
# Linear + cross entropy:  z = x W^T,  loss_i = logsumexp(z_i) - z_i[t_i]   (0 where ignored)
# backward: dz = (softmax(z) - onehot(t)) * row scale,  dx = dz W,  dW = dz^T x
# --------------------------------------------------------------------------------------------


def linear_cross_entropy(x, weight, target, *, ignore_index: int = -100,
                         reduction: str = "mean", upcast: bool = True) -> torch.Tensor:
    """``F.cross_entropy(x @ weight.T, target)`` with the (N, vocab) logits materialized.

    x ``(..., dim)``, weight ``(vocab, dim)``, target ``x.shape[:-1]`` int64. ``reduction``
    "none" gives target's shape with 0 where the target is ignored; "mean" divides by the
    number of non-ignored targets (all ignored: nan, as torch). The loss is fp32 in both modes:
    ``upcast=True`` computes the logits and the loss in fp32 (the contract); ``upcast=False``
    runs ``x @ weight.T`` and ``F.cross_entropy`` in x's dtype, as naive eager code, and casts
    the loss to fp32 at the end (so a kernel's fp32 loss compares to it dtype for dtype).
    """
    ct = _compute_dtype(x, upcast)
    logits = x.to(ct) @ weight.to(ct).T
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, weight.shape[0]), target.reshape(-1), ignore_index=ignore_index,
        reduction=reduction)
    if reduction == "none":
        loss = loss.view(target.shape)
    return loss.float()


__all__ = [
    "rms_norm", "rms_norm_rstd", "add_rms_norm", "rms_norm_backward", "swiglu",
    "swiglu_backward", "rotary_tables", "apply_rotary", "rotary_table_grads", "causal_mask",
    "attention", "attention_with_lse", "attention_backward", "attention_varlen",
    "attention_varlen_with_lse", "attention_varlen_backward", "attention_with_kvcache",
    "attention_flops", "linear_cross_entropy",
]
