"""Decoding machinery of ``Transformer.generate``: sampling on the device without a host sync
(``sample_tokens``) and ``DecodeStep``, one decode step of a whole generation batch with static
shapes, run eagerly, captured as one CUDA graph, or through ``torch.compile``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from llama_kernels.layers import RaggedBatch

if TYPE_CHECKING:
    from llama_kernels.model import Transformer


def sample_tokens(logits: Tensor, temperature: float, top_p: float,
                  generator: torch.Generator | None = None, *,
                  noise: Tensor | None = None) -> Tensor:
    """One token per row of ``logits`` (B, vocab), on the device, without a host sync: argmax
    at ``temperature=0``, else a draw from the smallest set of tokens holding ``top_p`` of the
    probability (Meta's ``sample_top_p``). The draw is ``argmax(p / E)`` with E ~ Exp(1) per
    token, which picks token i with probability p_i (as ``torch.multinomial`` would) in plain
    tensor ops; ``generator`` (on the logits' device) makes it reproducible. ``noise``, fp32
    (B, vocab) of Exp(1) draws, is used as E instead of drawing (for a CUDA graph: the caller
    fills it from the generator before each replay, so the graph holds no generator state);
    the same generator state gives the same E either way."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    probs_sorted, order = torch.sort(probs, dim=-1, descending=True)
    outside = probs_sorted.cumsum(-1) - probs_sorted > top_p  # mass before the token > p
    probs_sorted = probs_sorted.masked_fill(outside, 0.0)
    if noise is None:
        noise = torch.empty_like(probs_sorted).exponential_(1.0, generator=generator)
    choice = torch.argmax(probs_sorted / noise, dim=-1, keepdim=True)
    return order.gather(-1, choice)[..., 0]


class DecodeStep:
    """One decode step of every sequence of a generation batch, with static shapes, so that it
    can run eagerly, as one CUDA graph, or through ``torch.compile(mode="reduce-overhead")``.

    State lives in device tensors updated in place: ``token`` (B,) the last token of each
    sequence, ``cache_seqlens`` (B,) int32 the tokens each has cached, ``tokens`` (B,
    max_new_tokens) the tokens generated so far with ``index`` (1,) the next column,
    ``stopped`` (B,) bool whether a sequence has produced ``eos_id``. A step feeds ``token`` to
    the model against the KV cache, samples the next token on the device (``sample_tokens``),
    and advances the state; nothing in it reads a device value on the host or branches on
    one, and every sequence steps every time (a stopped one keeps writing its cache rows past
    its eos, which nobody reads). Sampling noise is drawn from ``generator`` into a static
    (B, vocab) buffer before each step, outside the step: the same draws, in the same order, as
    ``sample_tokens(..., generator)`` in an eager loop, and no generator state in the graph.

    ``mode``: "eager" runs ``step`` as Python; "graph" warms it up on a side stream (Triton's
    compiles and the allocator's growth stay out of the capture), restores the state, captures
    it in a ``torch.cuda.CUDAGraph`` and replays that; "compile" runs the pure part (model,
    sampling) through ``torch.compile(mode="reduce-overhead", fullgraph=True)``, whose own
    CUDA graphs need inputs it does not mutate, and advances the state eagerly.
    """

    MODES = ("eager", "graph", "compile")

    def __init__(self, model: Transformer, cache_seqlens: Tensor, max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, eos_id: int | None = None, *,
                 generator: torch.Generator | None = None, mode: str = "eager",
                 warmup: int = 2):
        if mode not in self.MODES:
            raise ValueError(f"mode: expected one of {self.MODES}, got {mode!r}")
        device = cache_seqlens.device
        n_seqs = cache_seqlens.shape[0]
        self.model, self.mode = model, mode
        self.temperature, self.top_p, self.eos_id = temperature, top_p, eos_id
        self.generator = generator
        self.cache_seqlens = cache_seqlens.to(torch.int32).clone()  # (B,)
        self.batch = RaggedBatch(self.cache_seqlens)
        self.token = torch.zeros(n_seqs, dtype=torch.long, device=device)  # (B,)
        self.tokens = torch.zeros(n_seqs, max_new_tokens, dtype=torch.long, device=device)
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self.stopped = torch.zeros(n_seqs, dtype=torch.bool, device=device)
        self.noise = None
        if temperature > 0:
            self.noise = torch.ones(n_seqs, model.args.vocab_size, dtype=torch.float32,
                                    device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._compiled = None
        if mode == "graph":
            self._capture(warmup)
        elif mode == "compile":
            self._compiled = torch.compile(self.next_token, mode="reduce-overhead",
                                           fullgraph=True)

    def next_token(self, token: Tensor, cache_seqlens: Tensor, noise: Tensor | None) -> Tensor:
        """The pure part of a step: the next token (B,) after ``token`` (B,), whose sequences
        hold ``cache_seqlens`` (B,) tokens (the only side effect: the token's keys and values
        are written into the KV cache)."""
        batch = RaggedBatch(cache_seqlens)
        logits = self.model(token[:, None], batch=batch)[:, -1]  # (B, vocab)
        return sample_tokens(logits, self.temperature, self.top_p, noise=noise)

    def _record(self, token: Tensor) -> None:
        """``token`` (B,) becomes every sequence's newest token, in column ``index``."""
        self.token.copy_(token)
        self.tokens.index_copy_(1, self.index, token[:, None])
        self.index += 1
        if self.eos_id is not None:
            self.stopped |= token == self.eos_id

    @torch.no_grad()
    def start(self, first: Tensor) -> None:
        """Record the token (B,) sampled from the prefill's logits."""
        self._record(first)

    @torch.no_grad()
    def step(self) -> None:
        """One step in place (what a graph captures): decode ``token``, sample, advance."""
        token = self.next_token(self.token, self.cache_seqlens, self.noise)
        self.cache_seqlens += 1
        self._record(token)

    @torch.no_grad()
    def __call__(self) -> None:
        if self.noise is not None:
            self.noise.exponential_(1.0, generator=self.generator)
        if self.graph is not None:
            self.graph.replay()
        elif self._compiled is not None:
            token = self._compiled(self.token, self.cache_seqlens, self.noise)
            self.cache_seqlens += 1
            self._record(token)
        else:
            self.step()

    def _state(self) -> list[Tensor]:
        return [self.token, self.cache_seqlens, self.tokens, self.index, self.stopped]

    @torch.no_grad()
    def warm_up(self, steps: int) -> None:
        """Run ``steps`` steps, each from the present state, and restore it: JIT compiles and
        the allocator's growth happen, and only the cache rows that the next real step
        overwrites are written."""
        saved = [t.clone() for t in self._state()]
        for _ in range(steps):
            self.step()
            for t, s in zip(self._state(), saved):
                t.copy_(s)

    @torch.no_grad()
    def _capture(self, warmup: int) -> None:
        stream = torch.cuda.Stream(device=self.token.device)
        stream.wait_stream(torch.cuda.current_stream(self.token.device))
        with torch.cuda.stream(stream):
            self.warm_up(warmup)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=stream):
                self.step()
        torch.cuda.current_stream(self.token.device).wait_stream(stream)


def sample(logits: Tensor, temperature: float, top_p: float,
           generator: torch.Generator | None = None) -> int:
    """``sample_tokens`` of one row of logits (vocab,), as a Python int."""
    return int(sample_tokens(logits[None], temperature, top_p, generator)[0])


__all__ = ["DecodeStep", "sample", "sample_tokens"]
