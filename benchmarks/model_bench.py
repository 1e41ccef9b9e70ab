"""The model benchmark: LLaMA-7B-shaped blocks (a few layers at full width) in bf16.

- training step (forward + backward of the next-token loss) at seq 2048: tokens/s and model
  FLOPs utilization against the matmul peak measured in the same run, for the torch, triton
  and auto (cuda row kernels, triton attention) backends and torch.compile of the torch
  backend;
- decoding: one token per sequence against a 2k KV cache at batch 1 and 16: tokens/s, and the
  bandwidth of reading the weights and the cache once per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import llama_kernels as lk
from benchmarks import counts, harness
from llama_kernels.model import ModelArgs, Transformer


def model_flops(args: ModelArgs, batch: int, seqlen: int, *, backward: bool) -> float:
    """Matmul FLOPs of one forward (x3 with the backward): 2 per weight per token for every
    linear layer (attention, FFN, output), plus causal attention's two score matmuls."""
    d, hd = args.dim, args.head_dim
    kv = (args.n_kv_heads or args.n_heads) * hd
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * args.hidden_dim  # wq, wo, wk, wv, w1, w2, w3
    linear = 2 * batch * seqlen * (args.n_layers * per_layer + d * args.vocab_size)
    attn = args.n_layers * counts.attention_flops(batch, seqlen, seqlen, args.n_heads, hd,
                                                  causal=True)
    return (linear + attn) * (3 if backward else 1)


def _variants(gpu: bool) -> dict[str, str]:
    """Row label -> backend. The torch backend is the eager baseline; on a CPU machine only it
    runs (the interpreter would take minutes)."""
    if not gpu:
        return {"eager": "torch"}
    avail = lk.available_backends()
    variants = {"eager": "torch"}
    if avail["triton"] is None:
        variants["ours[triton]"] = "triton"
    if avail["cuda"] is None:
        variants["ours[auto]"] = "auto"  # cuda where it has kernels, triton elsewhere
    return variants


def run(ceilings: harness.Ceilings, *, quick: bool, device: torch.device,
        dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    gpu = device.type == "cuda"
    if gpu:
        args = ModelArgs.from_name("7B", n_layers=2 if quick else 4)
        batch, seqlen, cache = 1 if quick else 2, 2048, 2048
        decode_batches = (1, 16)
    else:  # the CPU smoke: the same code on a tiny model
        args = ModelArgs.from_name("tiny")
        batch, seqlen, cache = 1, 32, 64
        decode_batches = (1, 2)
    args.max_seq_len = max(args.max_seq_len, cache + 8)
    with torch.device(device):
        model = Transformer(args).to(dtype)
    params = list(model.parameters())
    shape = f"7B-shaped x{args.n_layers} layers" if gpu else "tiny"
    rows = []

    tokens = torch.randint(0, args.vocab_size, (batch, seqlen + 1), device=device)

    def train_step():
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        return torch.autograd.grad(loss, params)

    variants = {label: (backend, train_step) for label, backend in _variants(gpu).items()}
    if gpu:
        compiled = torch.compile(model)

        def compiled_step():
            logits = compiled(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            return torch.autograd.grad(loss, params)

        variants["torch.compile"] = ("torch", compiled_step)  # of the torch backend
    flops = model_flops(args, batch, seqlen, backward=True)
    for label, (backend, step) in variants.items():
        row = {"op": "model", "shape": f"{shape} train batch={batch} seq={seqlen}",
               "size": batch * seqlen, "direction": "fwd+bwd", "impl": label}
        try:
            with lk.use_backend(backend):
                t = harness.time_host(step, rep_ms=200 if gpu else 1)
            row.update(ms=t.ms, p20=t.p20, p80=t.p80, timing=t.method,
                       host_ms=t.ms, tokens_per_s=batch * seqlen / (t.ms * 1e-3),
                       tflops=flops / (t.ms * 1e-3) / 1e12)
            row["frac_matmul"] = row["tflops"] / ceilings.matmul_tflops
        except Exception as e:  # noqa: BLE001 - a failing variant is a result too
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)

    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    for b in decode_batches:
        model.setup_cache(b, cache + 8)
        prompt = torch.randint(0, args.vocab_size, (b, cache), device=device)
        step_tokens = torch.randint(0, args.vocab_size, (b, 1), device=device)
        kv_bytes = 2 * args.n_layers * b * cache * (args.n_kv_heads or args.n_heads) \
            * args.head_dim * torch.finfo(dtype).bits // 8
        for label, backend in _variants(gpu).items():
            row = {"op": "model", "shape": f"{shape} decode batch={b} cache={cache}",
                   "size": b, "direction": "fwd", "impl": label}
            try:
                with lk.use_backend(backend), torch.no_grad():
                    model(prompt, start_pos=0)  # prefill the cache

                    def decode_step():
                        return model(step_tokens, start_pos=cache)

                    try:
                        t = harness.time_graph(lambda: decode_step, rep_ms=50 if gpu else 1)
                    except Exception:  # noqa: BLE001 - not capturable: one call at a time
                        t = harness.time_host(decode_step, rep_ms=50 if gpu else 1)
                row.update(ms=t.ms, p20=t.p20, p80=t.p80, timing=t.method,
                           tokens_per_s=b / (t.ms * 1e-3),
                           gbps=(weight_bytes + kv_bytes) / (t.ms * 1e-3) / 1e9)
                row["frac_copy_bw"] = row["gbps"] / ceilings.copy_gbps
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
        model.clear_cache()
    return rows
