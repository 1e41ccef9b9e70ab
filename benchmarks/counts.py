"""The least bytes each op must move and the FLOPs it must do, in one place.

Bytes: each input read once, each output written once (the floor any implementation pays);
the ceiling they are compared with is a device-to-device copy counting bytes read plus written.
``s`` is the element size in bytes; rstd is fp32 (4 bytes a row); the weight gradient is
written once in the weight's dtype.
"""

from __future__ import annotations

from llama_kernels.reference import attention_flops

__all__ = ["rms_norm_bytes", "add_rms_norm_bytes", "swiglu_bytes", "rotary_bytes",
           "attention_flops", "attention_kv_bytes", "varlen_attention_flops",
           "kvcache_decode_bytes", "linear_cross_entropy_flops", "total"]


def total(direction: str, fwd: float, bwd: float) -> float:
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def rms_norm_bytes(rows: int, dim: int, s: int, direction: str) -> float:
    fwd = 2 * rows * dim * s + dim * s + 4 * rows  # read x, w; write y, rstd
    bwd = 3 * rows * dim * s + 2 * dim * s + 4 * rows  # read dy, x, w, rstd; write dx, dw
    return total(direction, fwd, bwd)


def add_rms_norm_bytes(rows: int, dim: int, s: int, direction: str) -> float:
    fwd = 4 * rows * dim * s + dim * s + 4 * rows  # read x, residual, w; write y, h, rstd
    # read dy, dh, h, w, rstd; write one gradient (x's and residual's are the same tensor), dw
    bwd = 4 * rows * dim * s + 2 * dim * s + 4 * rows
    return total(direction, fwd, bwd)


def swiglu_bytes(rows: int, cols: int, s: int, direction: str) -> float:
    n = rows * cols
    return total(direction, 3 * n * s, 5 * n * s)  # fwd: g, u -> out; bwd: dout, g, u -> dg, du


def rotary_bytes(tokens: int, heads: int, head_dim: int, s: int, table_rows: int,
                 direction: str) -> float:
    """One tensor rotated (read, write), plus the fp32 cos and sin rows once."""
    one = 2 * tokens * heads * head_dim * s + 2 * table_rows * (head_dim // 2) * 4
    return total(direction, one, one)


def attention_kv_bytes(batch: int, seqlen_q: int, seqlen_k: int, heads_q: int, heads_kv: int,
                       head_dim: int, s: int) -> float:
    """Forward: read q, k, v, write out (decoding is bound by reading the KV cache)."""
    return (2 * batch * seqlen_q * heads_q + 2 * batch * seqlen_k * heads_kv) * head_dim * s


def varlen_attention_flops(lengths, heads: int, head_dim: int, *, causal: bool,
                           backward: bool = False) -> float:
    """Packed self-attention: each sequence attends only to itself, so the FLOPs are the sum of
    one attention per sequence (an empty one does none)."""
    return sum(attention_flops(1, n, n, heads, head_dim, causal=causal, backward=backward)
               for n in lengths if n)


def kvcache_decode_bytes(cache_lengths, new_tokens: int, heads_q: int, heads_kv: int,
                         head_dim: int, s: int) -> float:
    """One step against a KV cache: q read and out written; the new k and v read and written
    into the cache; each sequence's cached K and V read up to its own length only (what a
    ragged or paged kernel needs, not the padded cache or the whole block pool)."""
    b = len(cache_lengths)
    q_out = 2 * b * new_tokens * heads_q * head_dim * s
    appended = 2 * 2 * b * new_tokens * heads_kv * head_dim * s
    cached = 2 * sum(cache_lengths) * heads_kv * head_dim * s
    return q_out + appended + cached


def linear_cross_entropy_flops(tokens: int, vocab: int, dim: int, direction: str) -> float:
    """The matmuls: logits x W^T forward (2 N V D); dx = dz W and dW = dz^T x backward
    (4 N V D). The softmax is O(N V), negligible next to them at any LM-head width."""
    n = tokens * vocab * dim
    return total(direction, 2.0 * n, 4.0 * n)
