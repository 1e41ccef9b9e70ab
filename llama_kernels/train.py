"""A training step as in the paper (section 2.3): AdamW with beta1 0.9, beta2 0.95 and weight
decay 0.1, a cosine learning-rate schedule with linear warmup whose final rate is 10% of the
peak, and gradient clipping at 1.0.

    python -m llama_kernels.train --help
    python -m llama_kernels.train --model tiny --steps 60            # synthetic corpus, CPU
    python -m llama_kernels.train --model small --data corpus.txt --tokenizer tok.model \\
        --device cuda --dtype bfloat16 --backend triton
    python -m llama_kernels.train --model tiny --pack                # documents packed, no padding

Weight decay goes to the matrices (linears, embeddings), not to the RMSNorm gains.

The loss is the model's own fused one (``model(inputs, targets=...)``: ``linear_cross_entropy``
on the final norm's output, never the (tokens, vocab) logits at once). A batch is a token tensor
(B, S + 1), inputs ``[:, :-1]`` and targets ``[:, 1:]``, or a ``PackedBatch``: documents of
different lengths end to end in one row, each attending only to itself and predicting only its
own next tokens (``--pack`` cuts every row of the usual batches to a random length, 2 to S + 1
tokens, and packs them).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn


def cosine_lr(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int,
              final_ratio: float = 0.1) -> float:
    """Linear warmup to ``peak_lr`` over ``warmup_steps``, then cosine decay to
    ``final_ratio * peak_lr`` at ``total_steps`` (held there after)."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: nn.Module, lr: float, *, weight_decay: float = 0.1,
                   betas: tuple[float, float] = (0.9, 0.95),
                   eps: float = 1e-8) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


class PackedBatch(NamedTuple):
    """Documents end to end in one row: ``tokens`` (1, T) the inputs, ``targets`` (1, T) the
    next token of each (within its own document), ``cu_seqlens`` int32 (D + 1,) the
    boundaries, ``max_seqlen`` the longest document."""
    tokens: Tensor
    targets: Tensor
    cu_seqlens: Tensor
    max_seqlen: int


def pack_documents(docs: Sequence[Tensor]) -> PackedBatch:
    """Pack 1-D token tensors (each at least 1 token, on one device): a document of n + 1
    tokens gives n inputs and their n next tokens, so no target crosses a boundary."""
    if not docs or any(d.ndim != 1 or d.numel() < 1 for d in docs):
        raise ValueError("docs: expected 1-D token tensors of at least one token each")
    lengths = [d.numel() - 1 for d in docs]
    cu = torch.zeros(len(docs) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    tokens = torch.cat([d[:-1] for d in docs])[None]  # (1, T)
    targets = torch.cat([d[1:] for d in docs])[None]  # (1, T)
    return PackedBatch(tokens, targets, cu.to(tokens.device), max(lengths))


def packed_batches(batches: Iterable[Tensor], *,
                   generator: torch.Generator | None = None) -> Iterator[PackedBatch]:
    """Each (B, S + 1) batch cut into B documents of random lengths (2 to S + 1 tokens, one
    per row, each from its row's start) and packed: training on documents without padding."""
    for batch in batches:
        n_rows, width = batch.shape
        lengths = torch.randint(2, width + 1, (n_rows,), generator=generator).tolist()
        yield pack_documents([row[:n] for row, n in zip(batch, lengths)])


def lm_loss(model: nn.Module, batch: Tensor | PackedBatch) -> Tensor:
    """Next-token cross entropy (the mean over the targets) through the model's fused loss:
    of ``batch`` (B, S + 1), inputs ``[:, :-1]`` and targets ``[:, 1:]``, or of a
    ``PackedBatch``."""
    if isinstance(batch, PackedBatch):
        return model(batch.tokens, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen,
                     targets=batch.targets)
    return model(batch[:, :-1], targets=batch[:, 1:])


def train(model: nn.Module, batches: Iterable[Tensor | PackedBatch], steps: int, lr: float, *,
          warmup_steps: int | None = None, weight_decay: float = 0.1,
          betas: tuple[float, float] = (0.9, 0.95), grad_clip: float = 1.0,
          final_lr_ratio: float = 0.1,
          log: Callable[[int, float, float], None] | None = None) -> list[float]:
    """Run ``steps`` optimizer steps on ``batches`` (token tensors (B, S + 1) or PackedBatch,
    on the model's device; see ``lm_loss``); returns the loss of each step. ``warmup_steps``
    defaults to 10% of ``steps``."""
    warmup_steps = max(1, steps // 10) if warmup_steps is None else warmup_steps
    optimizer = make_optimizer(model, lr, weight_decay=weight_decay, betas=betas)
    model.train()
    losses: list[float] = []
    it: Iterator[Tensor | PackedBatch] = iter(batches)
    for step in range(steps):
        rate = cosine_lr(step, peak_lr=lr, warmup_steps=warmup_steps, total_steps=steps,
                         final_ratio=final_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = rate
        batch = next(it)
        loss = lm_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if log is not None:
            log(step, losses[-1], rate)
    return losses


def synthetic_batches(vocab_size: int, batch_size: int, seq_len: int, *, period: int = 16,
                      device: torch.device | str | None = None,
                      generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """Endless batches of a learnable corpus: each row repeats a random ``period``-token motif
    (from a small set of motifs) at a random phase, so the next token is predictable in-row."""
    motifs = torch.randint(0, vocab_size, (8, period), generator=generator)
    reps = (seq_len + 1) // period + 2
    while True:
        which = torch.randint(0, len(motifs), (batch_size,), generator=generator)
        phase = torch.randint(0, period, (batch_size,), generator=generator)
        rows = [motifs[w].repeat(reps)[p:p + seq_len + 1] for w, p in zip(which, phase)]
        yield torch.stack(rows).to(device)  # (B, S + 1)


def corpus_batches(ids: Tensor, batch_size: int, seq_len: int, *,
                   device: torch.device | str | None = None,
                   generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """Endless random windows of ``seq_len + 1`` tokens from the 1-D token tensor ``ids``."""
    if ids.numel() < seq_len + 2:
        raise ValueError(f"ids: {ids.numel()} tokens, need more than seq_len + 1 = {seq_len + 1}")
    while True:
        starts = torch.randint(0, ids.numel() - seq_len - 1, (batch_size,), generator=generator)
        yield torch.stack([ids[s:s + seq_len + 1] for s in starts]).to(device)  # (B, S + 1)


def main(argv: list[str] | None = None) -> list[float]:
    from llama_kernels.model import ModelArgs, Transformer
    from llama_kernels.ops import use_backend

    parser = argparse.ArgumentParser(prog="python -m llama_kernels.train",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="ModelArgs preset (default: tiny)")
    parser.add_argument("--data", help="text file to train on (default: a synthetic corpus)")
    parser.add_argument("--tokenizer", help="SentencePiece .model for --data (default: bytes)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=None, help="default: 10%% of --steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--backend", default="auto", choices=["auto", "cuda", "triton", "torch"])
    parser.add_argument("--checkpoint-activations", nargs="?", const="full", default="none",
                        choices=["none", "full", "selective"],
                        help="recompute in the backward: none, full blocks (the flag alone), "
                             "or selective (the paper's: keep matmul and attention outputs)")
    parser.add_argument("--pack", action="store_true",
                        help="train on documents of random lengths packed end to end (each "
                             "attends only to itself) instead of full rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--save", help="write the trained model here (Meta format)")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    ids = None
    if args.data:
        text = open(args.data, encoding="utf-8").read()
        if args.tokenizer:
            from llama_kernels.tokenizer import Tokenizer
            tok = Tokenizer(args.tokenizer)
            ids, vocab = torch.tensor(tok.encode(text, bos=True)), tok.vocab_size
        else:
            ids, vocab = torch.tensor(list(text.encode("utf-8"))), 256
    model_args = ModelArgs.from_name(args.model,
                                     checkpoint_activations=args.checkpoint_activations)
    if ids is not None:
        model_args.vocab_size = vocab
    model_args.max_seq_len = max(model_args.max_seq_len, args.seq_len)
    with device:
        model = Transformer(model_args).to(getattr(torch, args.dtype))
    n_params = sum(p.numel() for p in model.parameters())
    batches = (corpus_batches(ids, args.batch_size, args.seq_len, device=device)
               if ids is not None else
               synthetic_batches(model_args.vocab_size, args.batch_size, args.seq_len,
                                 device=device))
    if args.pack:
        batches = packed_batches(batches)
    print(f"model {args.model}: {n_params / 1e6:.2f}M parameters, {args.dtype} on {device}, "
          f"backend {args.backend}")
    start = time.perf_counter()

    def log(step: int, loss: float, rate: float) -> None:
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss:.4f}  lr {rate:.2e}  "
                  f"{time.perf_counter() - start:.1f}s", flush=True)

    with use_backend(args.backend):
        losses = train(model, batches, args.steps, args.lr, warmup_steps=args.warmup, log=log)
    if args.save:
        model.save_meta(args.save)
        print(f"saved to {args.save}")
    return losses


if __name__ == "__main__":
    main()
