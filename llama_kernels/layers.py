"""The LLaMA layers as thin modules over the functional ops.

Parameter names follow Meta's reference code (``wq``/``wk``/``wv``/``wo``, ``w1``/``w2``/``w3``,
``attention_norm``/``ffn_norm``) so its checkpoints load as they are. Every computation goes
through ``llama_kernels.ops``, so the backend choice (``backend=`` keyword, ``use_backend``,
``LLAMA_KERNELS_BACKEND``, auto) reaches every layer. Layouts are Meta's: activations
``(batch, seqlen, dim)``, heads ``(batch, seqlen, heads, head_dim)``.

Residual fusion. A pre-norm block computes ``h = x + attn(norm1(x)); out = h + ffn(norm2(h))``.
Each residual add is immediately followed by an RMSNorm (the block's own ``ffn_norm``, or the
*next* block's ``attention_norm``, or the model's final ``norm``), so ``add_rms_norm`` fuses
them: a block takes and returns the pair ``(delta, residual)`` whose sum is the hidden state,
and leaves the last add to whichever norm comes next (as flash-attn's prenorm blocks do). Each
residual sum is the same single rounding to the model dtype as Meta's ``h = x + ...``; only
where it is computed moves. A block holds one fused add + norm (ffn_norm) and one norm that is
fused with the previous block's last add (attention_norm; a plain norm in the first block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llama_kernels.ops import (add_rms_norm, apply_rotary, flash_attention, flash_attention_varlen,
                               flash_attention_with_kvcache, rms_norm, swiglu)


def ffn_hidden_dim(hidden_dim: int, multiple_of: int,
                   ffn_dim_multiplier: float | None = None) -> int:
    """Meta's FFN width rule: ``2/3 * hidden_dim`` (keeping SwiGLU's parameter count equal to a
    ``hidden_dim`` ReLU FFN), times an optional multiplier, rounded up to ``multiple_of``."""
    hidden_dim = int(2 * hidden_dim / 3)
    if ffn_dim_multiplier is not None:
        hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x**2) + eps) * weight`` over the last dimension."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """``rms_norm(x)``; with ``residual``, ``(rms_norm(x + residual), x + residual)``.

        The ops take one dtype; under ``torch.autocast`` (fp32 weights and residual stream,
        bf16 branch outputs) the sum is taken in the wider of the two dtypes, as eager
        ``x + residual`` would, and the weight is cast to it (differentiably)."""
        if residual is not None and residual.dtype != x.dtype:
            wide = torch.promote_types(x.dtype, residual.dtype)
            x, residual = x.to(wide), residual.to(wide)
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        if residual is None:
            return rms_norm(x, weight, self.eps)
        return add_rms_norm(x, residual, weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class FeedForward(nn.Module):
    """SwiGLU feed-forward ``w2(silu(w1 x) * w3 x)``.

    ``hidden_dim`` is Meta's nominal width (``4 * dim``), turned into the real one by
    ``ffn_hidden_dim``; ``exact=True`` takes ``hidden_dim`` as the real width (Hugging Face
    configs state it as ``intermediate_size``).
    """

    def __init__(self, dim: int, hidden_dim: int, multiple_of: int,
                 ffn_dim_multiplier: float | None = None, *, exact: bool = False):
        super().__init__()
        if not exact:
            hidden_dim = ffn_hidden_dim(hidden_dim, multiple_of, ffn_dim_multiplier)
        self.hidden_dim = hidden_dim
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x)))


@dataclass
class RaggedBatch:
    """Sequences of different lengths in one batch without padding: generation's sequences
    sharing one KV cache, or documents packed end to end for training.

    ``cache_seqlens`` (B,) int32 on the model's device: the tokens each sequence has cached;
    None for packed documents (``RaggedBatch.packed``), which neither read nor write a cache.
    Packed (``cu_seqlens`` given): the sequences end to end in one row of tokens (1, T),
    ``cu_seqlens`` (B + 1,) int32 their boundaries, ``max_seqlen`` the longest one,
    ``positions`` (1, T) each token's position in its own sequence and ``seq_ids`` (T,) its
    sequence; each sequence attends only to itself. With a cache, that is generation's prefill
    (the cache starts empty); without one, a training batch of documents. Decode
    (``cu_seqlens`` None): tokens (B, S_new), the new tokens of sequence b at positions
    ``cache_seqlens[b] + i``.
    """
    cache_seqlens: Tensor | None
    cu_seqlens: Tensor | None = None
    max_seqlen: int = 0
    positions: Tensor | None = None
    seq_ids: Tensor | None = None

    @classmethod
    def prefill(cls, lengths: list[int], device: torch.device) -> RaggedBatch:
        """The layout of prompts of ``lengths`` tokens packed end to end."""
        sizes = torch.tensor(lengths, device=device)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
        cu[1:] = sizes.cumsum(0)
        seq_ids = torch.repeat_interleave(torch.arange(len(lengths), device=device), sizes)
        positions = torch.arange(int(sum(lengths)), device=device) - cu[:-1].long()[seq_ids]
        return cls(torch.zeros(len(lengths), dtype=torch.int32, device=device), cu,
                   max(lengths), positions[None], seq_ids)

    @classmethod
    def packed(cls, cu_seqlens: Tensor, total: int, max_seqlen: int | None = None) -> RaggedBatch:
        """Documents packed end to end for training, no cache: ``cu_seqlens`` (B + 1,) int32
        from 0 to ``total`` tokens (an empty document is allowed). ``max_seqlen`` (the longest
        document) is read from ``cu_seqlens`` when not given: one host sync."""
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens: expected int32 (n_documents + 1,) boundaries, got "
                             f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        sizes = cu_seqlens.diff().long()  # (B,)
        if max_seqlen is None:
            max_seqlen = int(sizes.max())
        seq_ids = torch.repeat_interleave(torch.arange(sizes.numel(), device=sizes.device),
                                          sizes, output_size=total)  # (T,)
        positions = torch.arange(total, device=sizes.device) - cu_seqlens[:-1].long()[seq_ids]
        return cls(None, cu_seqlens, max_seqlen, positions[None], seq_ids)


class Attention(nn.Module):
    """Causal self-attention with rotary embedding, grouped-query heads and an optional KV cache.

    Rotary uses Meta's interleaved pairs ``(x[2i], x[2i+1])``, the layout Meta's checkpoints were
    trained with (``Transformer.from_hf`` undoes Hugging Face's row permutation to match it).

    Tensor parallel (``llama_kernels.distributed.parallelize_llama``) splits wq/wk/wv by output
    rows and wo by input columns, whole heads per rank, and sets ``tp_size``: the forward takes
    the head count of each rank from its projections' output width, and the KV cache holds the
    ``n_kv_heads // tp_size`` local heads. ``n_heads`` and ``n_kv_heads`` stay the model's.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if dim % n_heads:
            raise ValueError(f"n_heads: {n_heads} must divide dim {dim}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads: {n_kv_heads} must divide n_heads {n_heads}")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.tp_size = 1  # ranks the heads are split across (set by parallelize_llama)
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.register_buffer("cache_k", None, persistent=False)  # set up by setup_cache
        self.register_buffer("cache_v", None, persistent=False)

    def setup_cache(self, max_batch: int, max_seq_len: int, *, dtype: torch.dtype | None = None,
                    device: torch.device | None = None) -> None:
        """Allocate zeroed ``(max_batch, max_seq_len, n_kv_heads, head_dim)`` key and value
        buffers (dtype and device of the weights unless given); forward then uses them."""
        dtype = self.wk.weight.dtype if dtype is None else dtype
        device = self.wk.weight.device if device is None else device
        shape = (max_batch, max_seq_len, self.n_kv_heads // self.tp_size, self.head_dim)
        self.register_buffer("cache_k", torch.zeros(shape, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("cache_v", torch.zeros(shape, dtype=dtype, device=device),
                             persistent=False)

    def clear_cache(self) -> None:
        self.cache_k = self.cache_v = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, start_pos: int = 0, *,
                use_cache: bool = True, batch: RaggedBatch | None = None) -> Tensor:
        """``x`` (B, S, dim) at positions ``start_pos .. start_pos + S - 1``; ``cos``/``sin``
        are the fp32 rotary rows of those positions, ``(S, head_dim // 2)``.

        With a cache set up (and ``use_cache``), the new keys and values are written at
        ``start_pos`` and the queries attend to all ``start_pos + S`` cached ones; the causal
        mask of ``flash_attention`` is bottom-right aligned, so prefill and one-token decoding
        are the same call. The cache stores detached keys and values: with autograd on, the
        gradient reaches this call's keys and values, not those of earlier calls.

        With a ``RaggedBatch`` (sequences of different lengths, see its docstring), ``cos`` and
        ``sin`` are the whole tables and ``start_pos`` is unused: each token is rotated at its
        own sequence's position.
        """
        n_rows, seqlen, _ = x.shape
        # -1: the heads of this rank (all of them unless tensor parallel splits them)
        q = self.wq(x).view(n_rows, seqlen, -1, self.head_dim)  # (B, S, Hq, D)
        k = self.wk(x).view(n_rows, seqlen, -1, self.head_dim)  # (B, S, Hkv, D)
        v = self.wv(x).view(n_rows, seqlen, -1, self.head_dim)  # (B, S, Hkv, D)
        if batch is not None:
            out = self._ragged(q, k, v, cos, sin, batch)
            return self.wo(out.reshape(n_rows, seqlen, -1))
        batch = n_rows
        q = apply_rotary(q, cos, sin, interleaved=True)
        k = apply_rotary(k, cos, sin, interleaved=True)
        if use_cache and self.cache_k is not None:
            end = start_pos + seqlen
            if k.shape[2] != self.cache_k.shape[2]:
                raise ValueError(
                    f"x: {k.shape[2]} kv heads on this rank but the KV cache holds "
                    f"{self.cache_k.shape[2]} (n_kv_heads {self.n_kv_heads} / tp_size "
                    f"{self.tp_size}); set tp_size to the tensor-parallel degree (as "
                    "parallelize_llama does) before setup_cache")
            if batch > self.cache_k.shape[0] or end > self.cache_k.shape[1]:
                raise ValueError(
                    f"x: batch {batch} at positions [{start_pos}, {end}) does not fit the KV "
                    f"cache (max_batch {self.cache_k.shape[0]}, max_seq_len "
                    f"{self.cache_k.shape[1]}); call setup_cache with larger sizes")
            # the cache holds values, never graph: it outlives this step
            self.cache_k[:batch, start_pos:end] = k.detach()
            self.cache_v[:batch, start_pos:end] = v.detach()
            if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
                # gradients through a cached forward: this step's keys keep their graph, the
                # past ones are constants, and a fresh tensor (not a view of the cache) is
                # what attention saves, so later cache writes cannot invalidate it
                k = torch.cat((self.cache_k[:batch, :start_pos].to(k.dtype), k), dim=1)
                v = torch.cat((self.cache_v[:batch, :start_pos].to(v.dtype), v), dim=1)
            else:
                k = self.cache_k[:batch, :end]  # (B, start_pos + S, Hkv, D)
                v = self.cache_v[:batch, :end]
            if k.dtype != q.dtype:  # autocast: a cache in the weights' dtype, bf16 queries
                k, v = k.to(q.dtype), v.to(q.dtype)
        elif start_pos != 0:
            raise ValueError(f"start_pos: {start_pos} without a KV cache; call setup_cache "
                             "first or pass the whole sequence with start_pos=0")
        out = flash_attention(q, k, v, causal=True)  # (B, S, Hq, D)
        return self.wo(out.reshape(batch, seqlen, -1))  # (B, S, Hq * D) -> (B, S, dim)

    def _ragged(self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor,
                batch: RaggedBatch) -> Tensor:
        """Attention of a ``RaggedBatch``. Packed sequences (q, k, v (1, T, H, D), end to end)
        are rotated at their own positions and attend within themselves through
        ``flash_attention_varlen``; generation's prefill also writes each prompt's keys at rows
        0.. of its own sequence in the cache. A decode step appends, rotates and attends in one
        ``flash_attention_with_kvcache`` call."""
        cached = batch.cache_seqlens is not None
        if not cached and batch.cu_seqlens is None:
            raise ValueError("batch: a decode step needs cache_seqlens (the tokens cached)")
        if cached and self.cache_k is None:
            raise ValueError("batch: a ragged batch runs through the KV cache; call setup_cache "
                             "first")
        if batch.cu_seqlens is not None:
            q = apply_rotary(q, cos, sin, interleaved=True, positions=batch.positions)
            k = apply_rotary(k, cos, sin, interleaved=True, positions=batch.positions)
            if cached:
                dtype = self.cache_k.dtype
                self.cache_k[batch.seq_ids, batch.positions[0]] = k[0].detach().to(dtype)
                self.cache_v[batch.seq_ids, batch.positions[0]] = v[0].detach().to(dtype)
            out = flash_attention_varlen(q[0], k[0], v[0], batch.cu_seqlens, batch.cu_seqlens,
                                         batch.max_seqlen, batch.max_seqlen)  # (T, Hq, D)
            return out[None]
        dtype = self.cache_k.dtype
        rows = q.shape[0]
        out = flash_attention_with_kvcache(
            q.to(dtype), self.cache_k[:rows], self.cache_v[:rows], batch.cache_seqlens,
            k.to(dtype), v.to(dtype), rotary_cos=cos, rotary_sin=sin, rotary_interleaved=True)
        return out.to(q.dtype)  # (B, S_new, Hq, D)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + attention(attention_norm(x)); out = h + ffn(ffn_norm(h))``.

    Takes and returns ``(delta, residual)``, the hidden state being their sum (``residual=None``
    means the hidden state is ``delta`` itself); the final add is fused into the next norm (see
    the module docstring). ``forward_hidden`` is the block as a map of hidden states, x -> out.
    ``ffn_hidden_dim`` is the FFN's real width (default: Meta's rule for ``4 * dim``).
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None,
                 ffn_hidden_dim: int | None = None, norm_eps: float = 1e-6):
        super().__init__()
        self.attention = Attention(dim, n_heads, n_kv_heads)
        if ffn_hidden_dim is None:
            self.feed_forward = FeedForward(dim, 4 * dim, multiple_of=256)
        else:
            self.feed_forward = FeedForward(dim, ffn_hidden_dim, 1, exact=True)
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.ffn_norm = RMSNorm(dim, norm_eps)

    def forward(self, delta: Tensor, residual: Tensor | None, cos: Tensor, sin: Tensor,
                start_pos: int = 0, *, use_cache: bool = True,
                batch: RaggedBatch | None = None) -> tuple[Tensor, Tensor]:
        if residual is None:
            x, h = self.attention_norm(delta), delta
        else:
            x, h = self.attention_norm(delta, residual)  # h = delta + residual, x = norm(h)
        a = self.attention(x, cos, sin, start_pos, use_cache=use_cache, batch=batch)
        x, h = self.ffn_norm(a, h)  # h = h + a, x = norm(h)
        return self.feed_forward(x), h

    def forward_hidden(self, x: Tensor, cos: Tensor, sin: Tensor, start_pos: int = 0) -> Tensor:
        delta, residual = self(x, None, cos, sin, start_pos)
        return delta + residual


__all__ = ["Attention", "FeedForward", "RMSNorm", "RaggedBatch", "TransformerBlock",
           "ffn_hidden_dim"]
