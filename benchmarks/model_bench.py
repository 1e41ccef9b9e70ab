"""The model benchmark: LLaMA-7B-shaped models (full width, as many layers as the run affords)
with random bf16 weights.

- training step (forward + backward of the next-token loss, gradients of every parameter, no
  optimizer) at seq 2048: tokens/s, model FLOPs utilization against the matmul peak measured in
  the same run, and peak memory, for eager PyTorch (torch backend), torch.compile of it, and
  ours with each activation checkpointing policy (none / selective / full), each with the loss
  from the logits (``F.cross_entropy``) and with the fused ``linear_cross_entropy`` of the final
  hidden states and the output weight (the model's `targets=` loss);
- the loss step alone (fused vs logits) at vocab 32000 and 128256: peak memory and time;
- generation, prompt 128 against a 2k KV cache at batch 1, 8 and 64: tokens/s of ours (the
  decode step eager and as one CUDA graph) and of Hugging Face ``generate`` (sdpa) on the same
  weights, end to end; the decode step alone at a nearly full cache for ours and for a
  ``torch.compile(mode="reduce-overhead")`` baseline (torch ops, a static cache, SDPA, the
  gpt-fast recipe), with the bandwidth of reading the weights and the cache once per step as a
  fraction of the copy ceiling; time to first token at prompt 2048.

Quick mode (scripts/gpu_check.sh) keeps each part small: 2 layers, few tokens, the compile
baselines at batch 1 only. Without --quick the models have every layer that fits (32 where
memory allows).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import llama_kernels as lk
from benchmarks import counts, harness
from llama_kernels import reference
from llama_kernels.model import DecodeStep, ModelArgs, Transformer

GIB = 2**30
PROMPT, CACHE, TTFT_PROMPT = 128, 2048, 2048
GEN_BATCHES = (1, 8, 64)


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


def layer_bytes(args: ModelArgs, dtype: torch.dtype) -> int:
    d, kv = args.dim, (args.n_kv_heads or args.n_heads) * args.head_dim
    return (2 * d * d + 2 * d * kv + 3 * d * args.hidden_dim + 2 * d) * _size(dtype)


def kv_bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
    """Keys and values of one token in every layer."""
    return 2 * args.n_layers * (args.n_kv_heads or args.n_heads) * args.head_dim * _size(dtype)


def _size(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _fit_layers(args: ModelArgs, dtype: torch.dtype, per_layer: int, fixed: int) -> int:
    """Layers (at most the preset's) whose ``per_layer`` bytes, plus ``fixed``, fit in 85% of
    the free device memory."""
    free = torch.cuda.mem_get_info()[0] * 0.85 - fixed - 2 * args.vocab_size * args.dim \
        * _size(dtype)
    return max(1, min(args.n_layers, int(free // per_layer)))


def _error(row: dict, e: Exception) -> dict:
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else \
        type(e).__name__
    return row


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _wall(fn, reps: int) -> harness.Timing:
    """Wall-clock ms of ``fn()`` (synchronized), after one untimed warm-up call."""
    fn()
    samples = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return harness.Timing(statistics.median(samples), samples[len(samples) // 5],
                          samples[(4 * len(samples)) // 5], method=f"wall x{reps}")


def _peak_mb(fn) -> float | None:
    return harness.peak_memory_mb(fn)


def _timed(row: dict, t: harness.Timing, **extra) -> dict:
    row.update(ms=t.ms, p20=t.p20, p80=t.p80, timing=t.method, **extra)
    return row


# ---- training ------------------------------------------------------------------------------


def training_rows(ceilings: harness.Ceilings, *, quick: bool, device: torch.device,
                  dtype: torch.dtype) -> list[dict]:
    gpu = device.type == "cuda"
    if gpu:
        args = ModelArgs.from_name("7B")
        batch, seqlen = (1, 2048) if quick else (4, 2048)
        # weights, gradients, the logits in fp32 and their gradient, plus about 1.5 GiB of
        # activations per layer per 2k tokens without checkpointing
        per_layer = 2 * layer_bytes(args, dtype) + int(1.5 * GIB * batch)
        args.n_layers = 2 if quick else _fit_layers(
            args, dtype, per_layer, 4 * batch * seqlen * args.vocab_size * 2)
    else:  # the CPU smoke: the same code on a tiny model
        args = ModelArgs.from_name("tiny")
        batch, seqlen = 1, 32
    with torch.device(device):
        model = Transformer(args).to(dtype)
    model.train()
    params = list(model.parameters())
    shape = f"7B-shaped x{args.n_layers} layers" if gpu else "tiny"
    tokens = torch.randint(0, args.vocab_size, (batch, seqlen + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def unfused(step_model):
        def step():
            logits = step_model(inputs)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            return torch.autograd.grad(loss, params)
        return step

    def fused():  # the model's own loss: linear_cross_entropy of its final hidden states
        loss = model(inputs, targets=targets)
        return torch.autograd.grad(loss, params)

    variants = [("eager", "torch", "none", unfused(model))]
    if gpu:
        variants.append(("torch.compile", "torch", "none", unfused(torch.compile(model))))
    for policy in ("none", "selective", "full"):
        variants.append((f"ours ckpt={policy} loss=logits", "auto", policy, unfused(model)))
        variants.append((f"ours ckpt={policy} loss=fused", "auto", policy, fused))
    flops = model_flops(args, batch, seqlen, backward=True)
    rows = []
    for label, backend, policy, step in variants:
        row = {"op": "model", "shape": f"{shape} train batch={batch} seq={seqlen}",
               "size": batch * seqlen, "direction": "fwd+bwd", "impl": label}
        model.args.checkpoint_activations = policy
        try:
            with lk.use_backend(backend):
                t = harness.time_host(step, rep_ms=200 if gpu else 1)
                peak = _peak_mb(step)
            _timed(row, t, host_ms=t.ms, tokens_per_s=batch * seqlen / (t.ms * 1e-3),
                   tflops=flops / (t.ms * 1e-3) / 1e12, peak_mem_mb=peak)
            row["frac_matmul"] = row["tflops"] / ceilings.matmul_tflops  # MFU
        except Exception as e:  # noqa: BLE001 - a failing variant is a result too
            _error(row, e)
        rows.append(row)
    model.args.checkpoint_activations = "none"
    model = params = None
    _free()
    return rows


def loss_rows(*, quick: bool, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """The loss step alone (forward + backward to x and the weight): logits + F.cross_entropy
    against the fused ``linear_cross_entropy``."""
    gpu = device.type == "cuda"
    n_tokens, dim = (8192, 4096) if gpu else (64, 32)
    vocabs = (32000, 128256) if gpu else (100, 300)
    rows = []
    for vocab in vocabs:
        x = torch.randn(n_tokens, dim, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(vocab, dim, device=device, dtype=dtype) * dim ** -0.5).requires_grad_()
        target = torch.randint(0, vocab, (n_tokens,), device=device)

        def logits_loss():
            loss = F.cross_entropy((x @ w.T).float(), target)
            return torch.autograd.grad(loss, (x, w))

        def fused_loss():
            return torch.autograd.grad(lk.linear_cross_entropy(x, w, target), (x, w))

        base_peak = None
        for label, fn in (("eager", logits_loss), ("ours fused", fused_loss)):
            row = {"op": "model", "shape": f"loss step tokens={n_tokens} dim={dim} "
                   f"vocab={vocab}", "size": n_tokens, "direction": "fwd+bwd", "impl": label}
            try:
                t = harness.time_host(fn, rep_ms=100 if gpu else 1)
                peak = _peak_mb(fn)
                _timed(row, t, host_ms=t.ms, tokens_per_s=n_tokens / (t.ms * 1e-3),
                       peak_mem_mb=peak)
                if label == "eager":
                    base_peak = peak
                elif peak and base_peak:
                    row["mem_vs_eager"] = peak / base_peak
            except Exception as e:  # noqa: BLE001
                _error(row, e)
            rows.append(row)
        x = w = None
        _free()
    return rows


# ---- generation ----------------------------------------------------------------------------


def _hf_llama(args: ModelArgs, device: torch.device, dtype: torch.dtype):
    """A transformers LlamaForCausalLM of ``args``' shape (random weights, sdpa attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.dim, intermediate_size=args.hidden_dim,
                         num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                         num_key_value_heads=args.n_kv_heads or args.n_heads,
                         vocab_size=args.vocab_size, max_position_embeddings=args.max_seq_len,
                         rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
                         tie_word_embeddings=False, attn_implementation="sdpa",
                         eos_token_id=None, bos_token_id=None, pad_token_id=0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    for module in hf.modules():  # the scale of trained weights, so activations stay finite
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
    return hf.to(dtype).eval()  # in case this transformers version ignored the default


def _torch_decode_step(model: Transformer):
    """The gpt-fast recipe in torch ops, on the model's weights and KV cache buffers: one token
    per sequence at positions ``pos`` (B,), a static cache, SDPA over the whole cache with a
    mask of the positions written; returns the greedy next token (B,). Made for
    ``torch.compile(mode="reduce-overhead")``."""
    args = model.args
    for layer in model.layers:  # mutated in place between replays: fixed addresses
        torch._dynamo.mark_static_address(layer.attention.cache_k)
        torch._dynamo.mark_static_address(layer.attention.cache_v)

    def step(token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        n_seqs = token.shape[0]
        rows = torch.arange(n_seqs, device=token.device)
        h = model.tok_embeddings(token)[:, None]  # (B, 1, dim)
        capacity = model.layers[0].attention.cache_k.shape[1]
        mask = (torch.arange(capacity, device=token.device)[None] <= pos[:, None])[:, None, None]
        for layer in model.layers:
            attn = layer.attention
            x = reference.rms_norm(h, layer.attention_norm.weight, args.norm_eps)
            q = attn.wq(x).view(n_seqs, 1, -1, attn.head_dim)  # (B, 1, Hq, D)
            k = attn.wk(x).view(n_seqs, 1, -1, attn.head_dim)  # (B, 1, Hkv, D)
            v = attn.wv(x).view(n_seqs, 1, -1, attn.head_dim)
            q = reference.apply_rotary(q, model.rope_cos, model.rope_sin, interleaved=True,
                                       positions=pos[:, None])
            k = reference.apply_rotary(k, model.rope_cos, model.rope_sin, interleaved=True,
                                       positions=pos[:, None])
            attn.cache_k.index_put_((rows, pos), k[:, 0].to(attn.cache_k.dtype))
            attn.cache_v.index_put_((rows, pos), v[:, 0].to(attn.cache_v.dtype))
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), attn.cache_k[:n_seqs].transpose(1, 2),
                attn.cache_v[:n_seqs].transpose(1, 2), attn_mask=mask,
                enable_gqa=attn.n_heads != attn.n_kv_heads)  # (B, Hq, 1, D)
            h = h + attn.wo(out.transpose(1, 2).reshape(n_seqs, 1, -1))
            x = reference.rms_norm(h, layer.ffn_norm.weight, args.norm_eps)
            ffn = layer.feed_forward
            h = h + ffn.w2(reference.swiglu(ffn.w1(x), ffn.w3(x)))
        logits = model.output(reference.rms_norm(h, model.norm.weight, args.norm_eps))
        return logits[:, -1].float().argmax(-1)

    return step


def _generation_model(args: ModelArgs, device, dtype, want_hf: bool):
    """(ours, hf or None, why hf is missing): the same random weights in both."""
    hf, why = None, None
    if want_hf:
        try:
            hf = _hf_llama(args, device, dtype)
        except ImportError as e:
            why = f"transformers not importable ({e})"
    if hf is not None:
        model = Transformer.from_hf(hf, dtype=dtype, device=device,
                                    max_seq_len=args.max_seq_len)
    else:
        with torch.device(device):
            model = Transformer(args).to(dtype)
    model.eos_id = None
    return model.eval(), hf, why


def generation_rows(ceilings: harness.Ceilings, *, quick: bool, device: torch.device,
                    dtype: torch.dtype) -> list[dict]:
    gpu = device.type == "cuda"
    if gpu:
        base = ModelArgs.from_name("7B", max_seq_len=CACHE + 16)
        prompt, cache, ttft_prompt = PROMPT, CACHE, TTFT_PROMPT
        new_tokens, step_reps, batches = (16, 20, GEN_BATCHES) if quick else (128, 100,
                                                                               GEN_BATCHES)
    else:
        base = ModelArgs.from_name("tiny", max_seq_len=80)
        prompt, cache, ttft_prompt, new_tokens, step_reps, batches = 8, 64, 64, 4, 2, (1, 2)
    rows = []
    for b in batches:
        args = ModelArgs(**{**vars(base), "extra": {}})
        if gpu:
            # ours: weights + a full cache; hf (built first, its weights copied into ours):
            # two copies of the weights + its cache of prompt + new tokens
            ours = layer_bytes(args, dtype) + b * cache * kv_bytes_per_token(args, dtype) \
                // args.n_layers
            both = 2 * layer_bytes(args, dtype) + b * (prompt + new_tokens) \
                * kv_bytes_per_token(args, dtype) // args.n_layers
            args.n_layers = 2 if quick else _fit_layers(args, dtype, max(ours, both), 2 * GIB)
        rows += _generation_batch(ceilings, args, b, prompt, cache, new_tokens, step_reps,
                                  quick=quick, device=device, dtype=dtype,
                                  ttft_prompt=ttft_prompt if b == 1 else None,
                                  compile_baseline=gpu and (b == 1 or not quick))
        _free()
    return rows


def _generation_batch(ceilings, args, b, prompt, cache, new_tokens, step_reps, *, quick,
                      device, dtype, ttft_prompt, compile_baseline) -> list[dict]:
    gpu = device.type == "cuda"
    model, hf, hf_why = _generation_model(args, device, dtype, want_hf=True)
    shape = f"7B-shaped x{args.n_layers} layers" if gpu else "tiny"
    prompts = torch.randint(0, args.vocab_size, (b, prompt), device=device)
    reps = 1 if not gpu else 2 if quick else 3
    rows = []

    # -- end to end: prompt -> new_tokens tokens per sequence, greedy, no eos
    e2e = f"{shape} generate batch={b} prompt={prompt} new={new_tokens}"
    listed = prompts.tolist()
    ours = {"ours[graph]": dict(cuda_graph=True), "ours[eager]": dict(cuda_graph=False)}
    for label, kwargs in ours.items():
        row = {"op": "model", "shape": e2e, "size": b, "direction": "fwd", "impl": label}
        if kwargs["cuda_graph"] and not gpu:  # the CPU smoke lists only what runs here
            continue
        try:
            t = _wall(lambda: model.generate(listed, new_tokens, **kwargs), reps)
            rows.append(_timed(row, t, tokens_per_s=b * new_tokens / (t.ms * 1e-3)))
        except Exception as e:  # noqa: BLE001
            rows.append(_error(row, e))
    row = {"op": "model", "shape": e2e, "size": b, "direction": "fwd",
           "impl": "HF generate (sdpa)"}
    if hf is None:
        rows.append(_error(row, RuntimeError(f"skipped: {hf_why}")))
    else:
        try:
            mask = torch.ones_like(prompts)

            def hf_generate():
                with torch.no_grad():
                    return hf.generate(prompts, attention_mask=mask, max_new_tokens=new_tokens,
                                       min_new_tokens=new_tokens, do_sample=False,
                                       pad_token_id=0)

            t = _wall(hf_generate, reps)
            rows.append(_timed(row, t, tokens_per_s=b * new_tokens / (t.ms * 1e-3)))
        except Exception as e:  # noqa: BLE001
            rows.append(_error(row, e))

    # -- time to first token: the prefill of one long prompt and the first draw
    if ttft_prompt is not None:
        long_prompt = torch.randint(0, args.vocab_size, (ttft_prompt,)).tolist()
        ttft = f"{shape} time to first token batch=1 prompt={ttft_prompt}"
        impls = {"ours": lambda: model.generate(long_prompt, 1)}
        if hf is not None:
            ids = torch.tensor([long_prompt], device=device)
            impls["HF generate (sdpa)"] = lambda: hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                pad_token_id=0)
        for label, fn in impls.items():
            row = {"op": "model", "shape": ttft, "size": ttft_prompt, "direction": "fwd",
                   "impl": label}
            try:
                with torch.no_grad():
                    t = _wall(fn, reps)
                rows.append(_timed(row, t, tokens_per_s=ttft_prompt / (t.ms * 1e-3)))
            except Exception as e:  # noqa: BLE001
                rows.append(_error(row, e))
    if hf is not None:
        hf = None
        _free()

    # -- the decode step alone, every sequence holding a nearly full cache
    cached = cache - step_reps - 8
    step_shape = f"{shape} decode step batch={b} cache={cache} (cached {cached})"
    # every weight once, but of the embedding only the rows of the tokens looked up
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) \
        - model.tok_embeddings.weight.numel() * _size(dtype) + b * args.dim * _size(dtype)
    read = weight_bytes + b * (cached + step_reps / 2) * kv_bytes_per_token(args, dtype)
    model.setup_cache(b, cache)
    lengths = torch.full((b,), cached, dtype=torch.int32, device=device)
    modes = {"ours[eager]": "eager", "ours[graph]": "graph"} if gpu else {"ours[eager]": "eager"}
    for label, mode in modes.items():
        row = {"op": "model", "shape": step_shape, "size": b, "direction": "fwd",
               "impl": label}
        try:
            with torch.no_grad():
                decode = DecodeStep(model, lengths, step_reps + 4, mode=mode)
                decode.start(torch.zeros(b, dtype=torch.long, device=device))
                decode()  # Triton's compiles stay out of the timing

                def run_steps():
                    for _ in range(step_reps):
                        decode()

                _sync()
                t0 = time.perf_counter()
                run_steps()
                _sync()
                ms = (time.perf_counter() - t0) * 1e3 / step_reps
                decode = None
            _timed(row, harness.Timing(ms, ms, ms, f"wall / {step_reps} steps"),
                   tokens_per_s=b / (ms * 1e-3), gbps=read / (ms * 1e-3) / 1e9)
            row["frac_copy_bw"] = row["gbps"] / ceilings.copy_gbps
        except Exception as e:  # noqa: BLE001
            _error(row, e)
        rows.append(row)
    row = {"op": "model", "shape": step_shape, "size": b, "direction": "fwd",
           "impl": "torch.compile"}
    if not compile_baseline:
        if gpu:  # the CPU smoke lists only what runs here
            rows.append(_error(row, RuntimeError("skipped in quick mode (batch 1 only)")))
    else:
        try:
            step = torch.compile(_torch_decode_step(model), mode="reduce-overhead",
                                 fullgraph=True)
            token = torch.zeros(b, dtype=torch.long, device=device)
            pos = lengths.long()
            with torch.no_grad():
                for _ in range(3):  # compile, record, warm up the graph
                    token = step(token, pos).clone()
                _sync()
                t0 = time.perf_counter()
                for _ in range(step_reps):
                    token = step(token, pos).clone()
                    pos += 1
                _sync()
            ms = (time.perf_counter() - t0) * 1e3 / step_reps
            _timed(row, harness.Timing(ms, ms, ms, f"wall / {step_reps} steps"),
                   tokens_per_s=b / (ms * 1e-3), gbps=read / (ms * 1e-3) / 1e9)
            row["frac_copy_bw"] = row["gbps"] / ceilings.copy_gbps
            rows.append(row)
        except Exception as e:  # noqa: BLE001
            rows.append(_error(row, e))
        torch._dynamo.reset()
    model.clear_cache()
    model = None
    _free()
    return rows


def run(ceilings: harness.Ceilings, *, quick: bool, device: torch.device,
        dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    rows = training_rows(ceilings, quick=quick, device=device, dtype=dtype)
    rows += loss_rows(quick=quick, device=device, dtype=dtype)
    rows += generation_rows(ceilings, quick=quick, device=device, dtype=dtype)
    return rows
