"""Text generation from the command line: a Meta or Hugging Face checkpoint, or a preset with
random weights, several prompts at once (one packed prefill, then batched decoding against the
KV cache), a progress bar while it runs and a tokens/s line at the end.

    python -m llama_kernels.generate --help
    python -m llama_kernels.generate "Hello" "The capital of France" --model tiny
    python -m llama_kernels.generate --checkpoint llama-7b/ --tokenizer tokenizer.model \\
        --prompt-file prompts.txt --device cuda --dtype bfloat16 --temperature 0.8 --top-p 0.95

Without a tokenizer, text is taken as UTF-8 bytes (ids 0..255), which the presets' random
weights accept; a Hugging Face directory with a ``tokenizer.model`` uses it by default.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


class ByteTokenizer:
    """UTF-8 bytes as token ids: the tokenizer of the presets' random weights."""
    bos_id, eos_id = None, None

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def load_model(args: argparse.Namespace):
    from llama_kernels.model import ModelArgs, Transformer

    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    if args.checkpoint is None:
        torch.manual_seed(args.seed)
        with device:
            return Transformer(ModelArgs.from_name(args.model)).to(dtype)
    if os.path.exists(os.path.join(args.checkpoint, "params.json")):
        return Transformer.from_meta(args.checkpoint, dtype=dtype, device=device)
    if os.path.exists(os.path.join(args.checkpoint, "config.json")):
        return Transformer.from_hf(args.checkpoint, dtype=dtype, device=device)
    raise SystemExit(f"--checkpoint: {args.checkpoint} holds neither params.json (Meta) nor "
                     "config.json (Hugging Face)")


def load_tokenizer(args: argparse.Namespace):
    path = args.tokenizer
    if path is None and args.checkpoint is not None:
        candidate = os.path.join(args.checkpoint, "tokenizer.model")
        path = candidate if os.path.exists(candidate) else None
    if path is None:
        return ByteTokenizer()
    from llama_kernels.tokenizer import Tokenizer

    return Tokenizer(path)


def main(argv: list[str] | None = None) -> list[str]:
    from llama_kernels.ops import use_backend

    parser = argparse.ArgumentParser(prog="python -m llama_kernels.generate",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", nargs="*", help="prompts (or --prompt-file)")
    parser.add_argument("--prompt-file", help="a text file, one prompt per line")
    parser.add_argument("--checkpoint", help="a Meta (params.json) or Hugging Face directory")
    parser.add_argument("--model", default="tiny",
                        help="without --checkpoint: a ModelArgs preset with random weights")
    parser.add_argument("--tokenizer", help="a SentencePiece .model (default: the checkpoint's "
                                            "tokenizer.model, else UTF-8 bytes)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the draws")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--backend", default="auto", choices=["auto", "cuda", "triton", "torch"])
    parser.add_argument("--no-progress", action="store_true")
    step = parser.add_mutually_exclusive_group()
    step.add_argument("--no-cuda-graph", action="store_true",
                      help="decode eagerly (default on a GPU: each step replays one CUDA graph)")
    step.add_argument("--compile", action="store_true",
                      help='run the decode step through torch.compile(mode="reduce-overhead")')
    args = parser.parse_args(argv)

    texts = list(args.prompts)
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            texts += [line.rstrip("\n") for line in f if line.strip()]
    if not texts:
        parser.error("no prompts: give them as arguments or with --prompt-file")
    model, tok = load_model(args), load_tokenizer(args)
    model.eval()
    if tok.eos_id is not None and model.eos_id is None:
        model.eos_id = tok.eos_id
    prompts = [tok.encode(t, bos=tok.bos_id is not None) or [0] for t in texts]
    generator = torch.Generator(device=args.device).manual_seed(args.seed)

    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.max_new_tokens, desc="decoding", unit="step", file=sys.stderr)
    start = time.perf_counter()
    with use_backend(args.backend):
        outputs = model.generate(prompts, args.max_new_tokens, args.temperature, args.top_p,
                                 generator=generator,
                                 cuda_graph=False if args.no_cuda_graph or args.compile else None,
                                 compile_step=args.compile,
                                 on_step=None if bar is None else lambda _: bar.update())
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if bar is not None:
        bar.close()
    results = [tok.decode(ids) for ids in outputs]
    for text, result in zip(texts, results):
        print(f"{text}{result}")
        print("-" * 40)
    n_tokens = sum(len(ids) for ids in outputs)
    print(f"{n_tokens} tokens in {elapsed:.2f} s: {n_tokens / elapsed:.1f} tokens/s "
          f"({len(prompts)} sequences, {args.dtype} on {args.device}, backend {args.backend})")
    return results


if __name__ == "__main__":
    main()
