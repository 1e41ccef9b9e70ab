"""The thin model: the paper's configurations, agreement with an independent transcription of
Meta's reference code, the KV cache, generation, activation checkpointing, compile, backend
choice and the training step. All on tiny configs, CPU-fast."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from llama_kernels import available_backends, use_backend
from llama_kernels import rotary_tables
from llama_kernels import layers
from llama_kernels.layers import FeedForward, TransformerBlock, ffn_hidden_dim
from llama_kernels.model import (CHECKPOINT_POLICIES, ModelArgs, Transformer, num_params,
                                 sample_tokens)
from llama_kernels.testing import assert_close
from helpers import DEVICE
from llama_kernels.train import (PackedBatch, cosine_lr, lm_loss, main, pack_documents,
                                 packed_batches, synthetic_batches, train)

# (parameters, FFN width) of the paper's models; Table 2 prints the counts truncated to 0.1B.
PAPER = {"7B": (6_738_415_616, 11008, 6.7), "13B": (13_015_864_320, 13824, 13.0),
         "33B": (32_528_943_616, 17920, 32.5), "65B": (65_285_660_672, 22016, 65.2)}


def tiny(**overrides) -> Transformer:
    """A tiny model with weights large enough that its logits are far from uniform (so greedy
    decoding is not decided by rounding-level ties)."""
    model = Transformer(ModelArgs.from_name("tiny", **overrides))
    model.init_weights(std=0.3)
    return model


class OpRecorder(TorchDispatchMode):
    """Records each llama_kernels op that runs: (name, resolved backend, first input shape)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "llama_kernels":
            self.calls.append((func._opname, args[-1], tuple(args[0].shape)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_configurations_and_parameter_counts(name):
    count, hidden, billions = PAPER[name]
    args = ModelArgs.from_name(name)
    assert (args.vocab_size, args.max_seq_len, args.norm_eps, args.rope_theta) == \
        (32000, 2048, 1e-6, 10000.0)
    with torch.device("meta"):
        model = Transformer(args)
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    assert args.hidden_dim == hidden and hidden % 256 == 0
    assert hidden >= 2 * 4 * args.dim / 3 > hidden - 256
    assert num_params(model) == count
    assert math.floor(num_params(model) / 1e8) / 10 == billions


def test_ffn_width_rule():
    assert ffn_hidden_dim(4 * 4096, 256) == 11008
    assert ffn_hidden_dim(4 * 8192, 4096, 1.3) == 28672  # LLaMA-2 70B's multiplier
    ffn = FeedForward(48, 4 * 48, multiple_of=32)
    assert ffn.w1.weight.shape == (128, 48) and ffn.w2.weight.shape == (48, 128)
    assert FeedForward(48, 100, 32, exact=True).hidden_dim == 100
    with pytest.raises(ValueError, match="tiny"):
        ModelArgs.from_name("nano")


def test_parameter_names_are_metas():
    names = set(tiny().state_dict())
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    for i in range(2):
        expected |= {f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")}
        expected |= {f"layers.{i}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
        expected |= {f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"}
    assert names == expected


def test_block_fuses_residual_adds_into_the_norms():
    block = TransformerBlock(32, 4, 2, ffn_hidden_dim=48)
    with torch.no_grad():
        block.attention_norm.weight.uniform_(0.5, 1.5)
        block.ffn_norm.weight.uniform_(0.5, 1.5)
    x, residual = torch.randn(2, 9, 32), torch.randn(2, 9, 32)
    cos, sin = rotary_tables(9, 8)
    h = x + residual
    h = h + block.attention(block.attention_norm(h), cos, sin)  # the pre-norm block, unfused
    out = h + block.feed_forward(block.ffn_norm(h))
    delta, res = block(x, residual, cos, sin)
    torch.testing.assert_close(res, h, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(delta + res, out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(block.forward_hidden(x + residual, cos, sin), out,
                               atol=1e-6, rtol=1e-6)


def meta_reference_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Meta's llama/model.py transcribed with plain torch ops: complex-number rotary, repeat_kv,
    materialized causal softmax, unfused residual adds."""
    a, p = model.args, {k: v.float() for k, v in model.state_dict().items()}
    seqlen, hd = tokens.shape[1], a.head_dim
    n_kv = a.n_kv_heads or a.n_heads
    freqs = 1.0 / a.rope_theta ** (torch.arange(0, hd, 2)[: hd // 2].double() / hd)
    angles = torch.outer(torch.arange(seqlen).double(), freqs)
    freqs_cis = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)

    def rope(x):  # (B, S, H, D)
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + a.norm_eps) * w

    mask = torch.full((seqlen, seqlen), float("-inf")).triu(1)
    h = p["tok_embeddings.weight"][tokens]
    for i in range(a.n_layers):
        lp = {k.split(f"layers.{i}.", 1)[1]: v for k, v in p.items()
              if k.startswith(f"layers.{i}.")}
        x = norm(h, lp["attention_norm.weight"])
        b = x.shape[0]
        q = (x @ lp["attention.wq.weight"].T).view(b, seqlen, a.n_heads, hd)
        k = (x @ lp["attention.wk.weight"].T).view(b, seqlen, n_kv, hd)
        v = (x @ lp["attention.wv.weight"].T).view(b, seqlen, n_kv, hd)
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(a.n_heads // n_kv, dim=2)
        v = v.repeat_interleave(a.n_heads // n_kv, dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scores = q @ k.transpose(2, 3) / math.sqrt(hd) + mask
        out = (F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, seqlen, -1)
        h = h + out @ lp["attention.wo.weight"].T
        x = norm(h, lp["ffn_norm.weight"])
        ffn = F.silu(x @ lp["feed_forward.w1.weight"].T) * (x @ lp["feed_forward.w3.weight"].T)
        h = h + ffn @ lp["feed_forward.w2.weight"].T
    return norm(h, p["norm.weight"]) @ p["output.weight"].T


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1], ids=["mha", "gqa", "mqa"])
def test_forward_matches_metas_reference(n_kv_heads):
    model = tiny(n_kv_heads=n_kv_heads, n_layers=3)
    model.init_weights(std=0.1)
    tokens = torch.randint(0, 256, (2, 37))
    logits = model(tokens)
    assert logits.shape == (2, 37, 256) and logits.dtype == torch.float32
    # fp32 on both sides; the only differences are summation orders (1e-5 relative).
    torch.testing.assert_close(logits, meta_reference_logits(model, tokens), atol=1e-4, rtol=1e-4)


def test_kv_cache_prefill_and_decode_match_the_full_forward():
    model = tiny()
    tokens = torch.randint(0, 256, (3, 20))
    full = model(tokens)
    model.setup_cache(max_batch=4, max_seq_len=32)
    assert model.has_cache
    with torch.no_grad():
        chunks = [model(tokens[:, :11], 0), model(tokens[:, 11:14], 11)]
        chunks += [model(tokens[:, s:s + 1], s) for s in range(14, 20)]
    # fp32, different summation orders (over 11..20 keys): rounding of the logits' scale.
    scale = full.abs().max().item()
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5 * scale, rtol=1e-5)
    with pytest.raises(ValueError, match="KV cache"):
        model(tokens[:, :1], 32)  # past the cache (inside the model's context)
    model.clear_cache()
    assert not model.has_cache
    with pytest.raises(ValueError, match="start_pos"):
        model(tokens[:, :1], 5)


def test_greedy_generation_cached_equals_uncached():
    model = tiny()
    prompt = torch.randint(0, 256, (9,)).tolist()
    cached = model.generate(prompt, 16)
    uncached = model.generate(prompt, 16, use_cache=False)
    assert len(cached) == 16 and all(0 <= t < 256 for t in cached)
    assert cached == uncached
    assert not model.has_cache  # the temporary cache is released
    # The first token is the argmax of the prompt's last logits.
    assert cached[0] == int(model(torch.tensor([prompt]))[0, -1].argmax())


def test_generation_sampling_and_eos():
    model = tiny()
    prompt = torch.randint(0, 256, (5,)).tolist()
    greedy = model.generate(prompt, 8)
    # A nucleus this small holds only the most likely token: sampling becomes greedy.
    assert model.generate(prompt, 8, temperature=0.7, top_p=1e-6) == greedy
    draws = [model.generate(prompt, 8, temperature=1.0,
                            generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert draws[0] == draws[1]
    assert model.generate(prompt, 8, eos_id=greedy[3]) == greedy[:greedy.index(greedy[3])]
    model.eos_id = greedy[0]
    assert model.generate(prompt, 8) == []
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(prompt, 300)


@pytest.mark.parametrize("policy", ["full", "selective", True])
def test_activation_checkpointing_gives_the_same_gradients(policy):
    model = tiny()
    recomputed = Transformer(dataclasses.replace(model.args, checkpoint_activations=policy))
    recomputed.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 256, (2, 24))
    grads = []
    for m in (model, recomputed):
        m.train()
        F.cross_entropy(m(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for name, g in grads[0].items():
        assert g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


class LiveStorages(TorchDispatchMode):
    """Bytes of the storages created under it that are still alive: after a forward with the
    outputs dropped, what autograd keeps for the backward (parameters and buffers excluded)."""

    def __init__(self, model):
        super().__init__()
        self.skip = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
        self.storages = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self.skip:
                st = t.untyped_storage()
                self.storages[st._cdata] = (StorageWeakRef(st), st.nbytes())
        return out

    def alive(self) -> int:
        gc.collect()
        return sum(n for ref, n in self.storages.values() if not ref.expired())


def _saved_bytes(policy: str, n_layers: int, dim: int = 128, tokens: int = 64) -> int:
    args = ModelArgs(dim=dim, n_heads=4, n_layers=n_layers, vocab_size=256, multiple_of=16,
                     max_seq_len=tokens, checkpoint_activations=policy)
    model = Transformer(args).train()
    ids = torch.randint(0, 256, (1, tokens + 1))
    with LiveStorages(model) as live:
        loss = F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:])
    saved = live.alive()
    loss.backward()  # the kept tensors were usable
    return saved


def test_checkpoint_policies_keep_what_they_promise():
    """Activation bytes kept per token per layer (two layers minus one: the embedding and the
    loss cancel): "full" keeps exactly the block's two fp32 inputs (delta, residual); the
    paper's "selective" keeps the matmul and attention outputs, less than "none" keeps."""
    dim, tokens = 128, 64
    per_layer = {p: (_saved_bytes(p, 2, dim, tokens) - _saved_bytes(p, 1, dim, tokens)) / tokens
                 for p in ("none", "full", "selective")}
    assert per_layer["full"] == 2 * dim * 4, per_layer
    assert per_layer["full"] < per_layer["selective"] < 0.8 * per_layer["none"], per_layer
    with pytest.raises(ValueError, match="checkpoint_activations"):
        ModelArgs.from_name("tiny", checkpoint_activations="some")


def test_every_layer_computes_through_the_chosen_backend():
    model = tiny()
    tokens = torch.randint(0, 256, (2, 12))
    with OpRecorder() as rec, use_backend("torch"):
        logits = model(tokens)
    ops = {name for name, _, _ in rec.calls}
    assert {"rms_norm_fwd", "add_rms_norm_fwd", "rotary_apply", "flash_attention_fwd"} <= ops
    assert any("swiglu" in name for name in ops)
    assert {backend for _, backend, _ in rec.calls} == {"torch"}
    torch.testing.assert_close(logits, model(tokens), atol=0, rtol=0)
    with use_backend("cuda"), pytest.raises(RuntimeError, match="cuda"):
        model(tokens)  # CPU tensors: the choice reaches the layers and fails there, loudly


def test_generation_prefills_packed_and_decodes_against_the_cache():
    """Prompts are prefilled in one packed call per layer, then each step is one cached call
    per layer with one query per sequence."""
    model = tiny()
    with OpRecorder() as rec:
        model.generate([torch.randint(0, 256, (n,)).tolist() for n in (6, 2)], 3)
    attention = [(name, shape) for name, _, shape in rec.calls if "attention" in name]
    n_layers = model.args.n_layers
    assert attention == ([("flash_attention_varlen_fwd", (8, 4, 16))] * n_layers
                         + [("flash_attention_with_kvcache", (2, 1, 4, 16))] * (2 * n_layers))


def test_batched_ragged_generation_equals_each_prompt_alone():
    model = tiny()
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (7, 1, 12, 3)]
    alone = [model.generate(p, 10) for p in prompts]
    assert model.generate(prompts, 10) == alone
    assert model.generate(prompts, 10, use_cache=False) == alone
    # Each sequence stops at its own eos: choose one that the third sequence emits at step 4.
    eos = alone[2][4]
    cut = [seq[:seq.index(eos)] if eos in seq else seq for seq in alone]
    assert model.generate(prompts, 10, eos_id=eos, check_every=1) == cut
    assert model.generate(prompts, 10, eos_id=eos, check_every=3) == cut
    assert not model.has_cache


def test_sampling_on_the_device_follows_the_distribution():
    """sample_tokens draws token i with probability p_i (top_p 1), never outside the nucleus,
    reproducibly for a seeded generator, and is argmax at temperature 0."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 5.0]])
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    draws = torch.stack([sample_tokens(logits, 1.0, 1.0, g) for _ in range(4000)])  # (N, 2)
    p = torch.softmax(logits, -1)
    freq = torch.stack([(draws == i).float().mean(0) for i in range(4)], -1)  # (2, 4)
    # 4000 draws: a frequency's standard error is at most 0.008; 5 of them is far out
    assert (freq - p).abs().max() < 0.04, (freq, p)
    nucleus = torch.stack([sample_tokens(logits, 1.0, 0.7, g) for _ in range(500)])
    assert set(nucleus[:, 0].tolist()) <= {0, 1} and set(nucleus[:, 1].tolist()) == {3}
    seeded = [sample_tokens(logits, 0.8, 0.9, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1])
    assert sample_tokens(logits, 0.0, 1.0).tolist() == [0, 3]


def test_compiled_forward_matches_eager():
    model = tiny()
    tokens = torch.randint(0, 256, (2, 16))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ref = model(tokens)
    torch.testing.assert_close(compiled(tokens), ref, atol=1e-6 * ref.abs().max().item(),
                               rtol=1e-5)
    # the fused loss of packed documents (max_seqlen given: no host sync) traces whole too
    packed, cu = _pack(_random_documents([5, 9, 2]))
    targets = _random_targets(packed.shape)
    torch.testing.assert_close(compiled(packed, cu_seqlens=cu, max_seqlen=9, targets=targets),
                               model(packed, cu_seqlens=cu, targets=targets),
                               atol=1e-6, rtol=1e-5)


def test_bf16_model_keeps_fp32_rotary_tables():
    model = tiny()
    tokens = torch.randint(0, 256, (1, 40))
    ref = model(tokens)
    half = model.to(torch.bfloat16)
    assert half.rope_cos.dtype == torch.float32 and half.output.weight.dtype == torch.bfloat16
    out = half(tokens)
    assert out.dtype == torch.float32
    # bf16 weights and activations: a loose, relative check that nothing is grossly off.
    assert (out - ref).norm() / ref.norm() < 0.05


@pytest.mark.parametrize("pack", [False, True], ids=["rows", "packed"])
def test_training_step_lowers_the_loss(pack):
    torch.manual_seed(0)  # the loss curve of a fixed run; the seed fixture is for inputs
    model = Transformer(ModelArgs.from_name("tiny"))
    batches = synthetic_batches(256, batch_size=8, seq_len=48)
    if pack:  # documents of 2..49 tokens, each from a row's start, packed end to end
        batches = packed_batches(batches)
    losses = train(model, batches, steps=40, lr=3e-3)
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0], losses


def test_cosine_schedule():
    kw = dict(peak_lr=1.0, warmup_steps=10, total_steps=100)
    assert cosine_lr(0, **kw) == pytest.approx(0.1) and cosine_lr(9, **kw) == pytest.approx(1.0)
    rates = [cosine_lr(s, **kw) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert rates[-1] == pytest.approx(0.1) and cosine_lr(500, **kw) == pytest.approx(0.1)


def test_training_cli(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "--steps" in capsys.readouterr().out
    losses = main(["--steps", "3", "--batch-size", "2", "--seq-len", "16", "--backend", "torch"])
    assert len(losses) == 3
    assert "step     2" in capsys.readouterr().out
    losses = main(["--steps", "2", "--batch-size", "3", "--seq-len", "16", "--pack",
                   "--checkpoint-activations", "selective"])
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_model_on_kernel_backends(backend):
    """Forward, cached decoding (a batch of 2 reads strided cache slices), backward, and the fused
    loss of packed documents, with every op on the kernel backend (the loss's triton one under
    "cuda"), against the same model on the torch backend. On a GPU in bf16, the error may be at
    most about twice the torch backend's own bf16 error (the tolerance rule); without one, the
    Triton kernels run in fp32 under the interpreter."""
    why_not = available_backends()[backend]
    if why_not:
        pytest.skip(f"{backend}: {why_not}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with device:  # head_dim 64: a size every kernel backend takes
        model = Transformer(ModelArgs.from_name("tiny", dim=128, n_heads=2, n_kv_heads=1))
    model.init_weights(std=0.1)
    tokens = torch.randint(0, 256, (2, 12), device=device)
    cu = torch.tensor([0, 5, 5, 24], dtype=torch.int32, device=device)  # one empty document

    def run():
        logits = model(tokens)
        model.zero_grad(set_to_none=True)
        logits.square().mean().backward()
        grad = model.layers[0].attention.wq.weight.grad.float()
        model.setup_cache(max_batch=2, max_seq_len=16)
        with torch.no_grad():
            cached = torch.cat([model(tokens[:, :7], 0), model(tokens[:, 7:8], 7),
                                model(tokens[:, 8:], 8)], dim=1)
        model.clear_cache()
        model.zero_grad(set_to_none=True)
        loss = model(tokens.view(1, -1), cu_seqlens=cu, targets=tokens.roll(1).view(1, -1))
        loss.backward()
        return (logits.detach(), grad, cached, loss.detach(),
                model.layers[0].attention.wq.weight.grad.float())

    with use_backend("torch"):
        ref32 = run()
        model.to(dtype)
        eager = run()
    try:
        with use_backend(backend):
            out = run()
    except RuntimeError as e:
        if "has no kernel" in str(e):  # an op this build of the backend lacks (yet)
            pytest.skip(str(e))
        raise
    names = ("logits", "wq grad", "cached logits", "packed fused loss", "its wq grad")
    for name, o, e, r in zip(names, out, eager, ref32):
        assert torch.isfinite(o).all(), name
        # floor: fp32 rounding at the tensor's scale (the whole error budget in fp32)
        tol = 2 * (e - r).abs().max().item() + 1e-5 * r.abs().max().item()
        err = (o - r).abs().max().item()
        assert err <= tol, f"{name}: error {err:.3e} > {tol:.3e}"


def test_autocast_training_and_cached_decoding():
    """Mixed precision as people train: fp32 weights, bf16 matmuls under torch.autocast. The
    residual stream stays fp32, the norms take the wider dtype, the cache is read in bf16."""
    model = tiny()
    tokens = torch.randint(0, model.args.vocab_size, (2, 9))
    reference_logits = model(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # Relative (Frobenius) error of the logits against the fp32 run: bf16 rounding gives about
    # 2% here (at most 3% for the full logits and 6% for the one cached step over 200-300
    # random draws); a plumbing bug (a norm in the wrong dtype, a misread cache) gives O(1).
    # The maximum elementwise error, bounded at 5% of the largest logit before, failed about
    # one draw in twelve.
    def relative_error(got, want):
        return ((got.float() - want).norm() / want.norm()).item()

    assert relative_error(logits, reference_logits) < 0.1
    model.setup_cache(2, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens[:, :8], start_pos=0)
        step = model(tokens[:, 8:9], start_pos=8)
    assert relative_error(step, reference_logits[:, 8:9]) < 0.1


def test_cached_forward_with_grad_enabled_keeps_graphs_apart():
    """Two cached calls with autograd on: the cache holds detached keys, so the second call's
    graph does not reach into the first's and the cache never requires grad."""
    model = tiny()
    model.setup_cache(1, 32)
    tokens = torch.randint(0, model.args.vocab_size, (1, 9))
    a = model(tokens[:, :8], start_pos=0)
    b = model(tokens[:, 8:], start_pos=8)
    (a.sum() + b.sum()).backward()
    assert not model.layers[0].attention.cache_k.requires_grad


def test_generate_command_line(tmp_path, capsys):
    """python -m llama_kernels.generate: prompts from arguments and a file, batched, greedy
    results equal to the model's own generate, a tokens/s line at the end."""
    from llama_kernels import generate as cli

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("second prompt\n\nthird\n")
    results = cli.main(["first", "--prompt-file", str(prompts), "--max-new-tokens", "5",
                        "--no-progress", "--device", "cpu"])
    torch.manual_seed(0)  # the command seeds its random weights with --seed 0
    model = Transformer(ModelArgs.from_name("tiny")).eval()
    want = model.generate([list(t.encode()) for t in ("first", "second prompt", "third")], 5)
    assert results == [cli.ByteTokenizer().decode(ids) for ids in want]
    out = capsys.readouterr().out
    assert "tokens in" in out and "tokens/s (3 sequences" in out
    with pytest.raises(SystemExit):
        cli.main(["--no-progress"])  # no prompts


# ---- the fused loss, packed documents, and both under each checkpointing policy -------------


def _skip_unless_available(backend: str) -> None:
    why_not = available_backends()[backend]
    if why_not:
        pytest.skip(f"{backend}: {why_not}")


def _loss_chunks(backend: str, rows: int):
    """Force the triton loss to walk the tokens in chunks of ``rows`` (several chunks and a
    partial last one on these small shapes; the rule would take all tokens in one)."""
    if backend != "triton":
        return contextlib.nullcontext()
    from llama_kernels.triton import cross_entropy
    return cross_entropy.forced(chunk_rows=rows)


def _loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_grads_close(grads, ref):
    """Each gradient by the tolerance rule; in fp32 eager is the reference, so the bound is
    the floor: summation-order rounding at the gradient's scale."""
    assert grads.keys() == ref.keys()
    for name, g in ref.items():
        assert g.abs().sum() > 0, name
        assert_close(grads[name], g, g, name)


def _random_targets(shape) -> torch.Tensor:
    targets = torch.randint(0, 256, shape)
    targets[torch.rand(shape) < 0.2] = -100  # ignored positions: out of the mean
    return targets


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_loss_and_gradients_equal_the_logits_path(backend):
    """model(tokens, targets=...) (linear_cross_entropy on the final norm's output) against
    F.cross_entropy of the model's logits, fp32 on the torch backend: the loss and the
    gradient of every parameter."""
    _skip_unless_available(backend)
    model = tiny().to(DEVICE)
    tokens = torch.randint(0, 256, (2, 13), device=DEVICE)
    targets = _random_targets((2, 13)).to(DEVICE)
    with use_backend("torch"):
        ref_loss, ref_grads = _loss_and_grads(model, lambda: F.cross_entropy(
            model(tokens).flatten(0, 1).float(), targets.flatten(), ignore_index=-100))
    with use_backend(backend), _loss_chunks(backend, 7):
        loss, grads = _loss_and_grads(model, lambda: model(tokens, targets=targets))
    assert loss.shape == () and loss.dtype == torch.float32
    assert_close(loss, ref_loss, ref_loss, "loss")
    _assert_grads_close(grads, ref_grads)
    with pytest.raises(ValueError, match="targets"):
        model(tokens, targets=targets[:, :-1])


def _logits_rows(fn, vocab: int) -> set[int]:
    """The row counts of the (..., vocab) tensors ATen ops took while ``fn`` ran. The profiler
    sees every op, inside the custom ops (the loss's chunk matmuls) and in the backward."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return {math.prod(shape[:-1]) for event in prof.events() for shape in event.input_shapes
            if isinstance(shape, list) and len(shape) >= 2 and shape[-1] == vocab}


def test_fused_loss_never_holds_the_logits():
    """Forward and backward of the fused loss on the triton backend (chunks of 16 tokens) take
    no (N, vocab) tensor for N = 80 tokens; the logits path does, so the watch would catch a
    model that computed its loss from the logits again. dim (64) < N keeps the head's
    transposed weight (dim, vocab) below N rows."""
    _skip_unless_available("triton")
    model = tiny().to(DEVICE)
    vocab, n = model.args.vocab_size, 80
    tokens = torch.randint(0, vocab, (2, n // 2), device=DEVICE)
    targets = _random_targets((2, n // 2)).to(DEVICE)
    with use_backend("triton"), _loss_chunks("triton", 16):
        fused = _logits_rows(lambda: model(tokens, targets=targets).backward(), vocab)
        logits = _logits_rows(lambda: F.cross_entropy(
            model(tokens).flatten(0, 1), targets.flatten()).backward(), vocab)
    assert 16 in fused and max(fused) < n, fused  # the chunks are seen; no (N, vocab) tensor
    assert max(logits) == n, logits


def _pack(docs):
    lengths = torch.tensor([len(d) for d in docs])
    cu = torch.zeros(len(docs) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return torch.cat(docs)[None], cu.to(docs[0].device)  # (1, T), (D + 1,)


def _random_documents(lengths):
    return [torch.randint(0, 256, (n,)) for n in lengths]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_documents_equal_each_document_alone(backend):
    """model(tokens, cu_seqlens=...) on documents end to end (one empty): the logits and every
    parameter's gradient equal those of running each document alone, fp32 on the torch
    backend, so attention stays within each document. Rotary is relative (an offset common to
    a document's queries and keys cancels), so what shows that positions restart is that the
    documents together are longer than the model's context (16), each one within it."""
    _skip_unless_available(backend)
    model = tiny(max_seq_len=16).to(DEVICE)
    lengths = [int(torch.randint(9, 17, ())), 0, *torch.randint(1, 17, (2,)).tolist()]
    docs = [d.to(DEVICE) for d in _random_documents(lengths)]
    tokens, cu = (t.to(DEVICE) for t in _pack(docs))
    grad_out = torch.randn(1, tokens.shape[1], 256, device=DEVICE)

    def alone():
        logits = torch.cat([model(d[None]) for d in docs if len(d)], dim=1)  # (1, T, vocab)
        (logits * grad_out).sum().backward()
        return logits.detach()

    def packed():
        logits = model(tokens, cu_seqlens=cu)
        (logits * grad_out).sum().backward()
        return logits.detach()

    with use_backend("torch"):
        model.zero_grad(set_to_none=True)
        ref = alone()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with use_backend(backend):
        model.zero_grad(set_to_none=True)
        out = packed()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert out.shape == (1, sum(lengths), 256)
    assert_close(out, ref, ref, "logits")
    _assert_grads_close(grads, ref_grads)


def _leak(model, docs) -> tuple[float, float]:
    """Redraw the first document: (largest change of the other documents' logits, smallest
    change of its own)."""
    tokens, cu = _pack(docs)
    redrawn, _ = _pack([torch.randint(0, 256, (len(docs[0]),)), *docs[1:]])
    with torch.no_grad():
        change = (model(redrawn, cu_seqlens=cu) - model(tokens, cu_seqlens=cu)).abs()[0]
    first = len(docs[0])
    return change[first:].max().item(), change[:first].amax(-1).min().item()


def test_packed_documents_do_not_see_each_other(monkeypatch):
    """Changing one document changes its own logits and no other document's; attention that
    ignored the boundaries (planted here) is caught."""
    model = tiny()
    docs = _random_documents([9, 5, 12])
    others, own = _leak(model, docs)
    assert others == 0.0 and own > 1e-3, (others, own)
    real = layers.flash_attention_varlen

    def across_documents(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        whole = torch.tensor([0, q.shape[0]], dtype=torch.int32)
        return real(q, k, v, whole, whole, q.shape[0], q.shape[0], **kw)

    monkeypatch.setattr(layers, "flash_attention_varlen", across_documents)
    others, _ = _leak(model, docs)
    assert others > 1e-3, others


def test_packed_documents_bad_input():
    model = tiny(max_seq_len=16)
    tokens, cu = _pack(_random_documents([10, 12]))
    with pytest.raises(ValueError, match="cu_seqlens: expected int32"):
        model(tokens, cu_seqlens=cu.long())
    with pytest.raises(ValueError, match="one row"):
        model(tokens.view(2, -1), cu_seqlens=cu)
    long_doc, cu_long = _pack(_random_documents([3, 17]))
    with pytest.raises(ValueError, match="17 tokens exceeds max_seq_len 16"):
        model(long_doc, cu_seqlens=cu_long)
    with pytest.raises(ValueError, match="targets"):
        model(tokens, cu_seqlens=cu, targets=tokens[:, :-1])


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_checkpoint_policies_give_the_same_gradients_with_the_fused_loss(packed):
    """The fused loss, on full rows or packed documents, under none / full / selective
    checkpointing: the same loss and gradients. Full recomputes each block's attention in the
    backward; selective keeps its output (the paper's policy) and recomputes none."""
    base = tiny()
    if packed:
        tokens, cu = _pack(_random_documents([11, 3, 8]))
        kwargs = dict(cu_seqlens=cu, targets=_random_targets(tokens.shape))
    else:
        tokens, kwargs = torch.randint(0, 256, (2, 11)), dict(targets=_random_targets((2, 11)))
    results = {}
    for policy in CHECKPOINT_POLICIES:
        model = Transformer(dataclasses.replace(base.args, checkpoint_activations=policy))
        model.load_state_dict(base.state_dict())
        model.train()
        loss = model(tokens, **kwargs)
        with OpRecorder() as rec:
            loss.backward()
        attention = sum(1 for name, _, _ in rec.calls if name.startswith("flash_attention")
                        and name.endswith("_fwd"))
        grads = {n: p.grad for n, p in model.named_parameters()}
        results[policy] = loss.detach(), grads, attention
    loss, grads, _ = results["none"]
    for policy in ("full", "selective"):
        torch.testing.assert_close(results[policy][0], loss, atol=0, rtol=1e-6)
        for name, g in grads.items():
            assert g is not None and g.abs().sum() > 0, name
            torch.testing.assert_close(results[policy][1][name], g, atol=1e-6, rtol=1e-5,
                                       msg=name)
    n_layers = base.args.n_layers
    assert [results[p][2] for p in CHECKPOINT_POLICIES] == [0, n_layers, 0]


def test_lm_loss_is_the_models_fused_loss():
    """The training step's loss: model(inputs, targets=...) through linear_cross_entropy, equal
    to the cross entropy of the logits; a PackedBatch's loss is the mean over its documents'
    tokens, each predicting only its own next tokens."""
    model = tiny()
    batch = torch.randint(0, 256, (2, 10))
    with OpRecorder() as rec:
        loss = lm_loss(model, batch)
    assert "linear_cross_entropy_fwd" in {name for name, _, _ in rec.calls}
    want = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-6)

    docs = _random_documents([6, 1, 9])
    packed = pack_documents(docs)
    assert packed.cu_seqlens.tolist() == [0, 5, 5, 13] and packed.max_seqlen == 8
    assert torch.equal(packed.targets[0, 5:], docs[2][1:])  # a document's own next tokens
    per_token = torch.cat([F.cross_entropy(model(d[None, :-1])[0], d[1:], reduction="none")
                           for d in docs if len(d) > 1])
    torch.testing.assert_close(lm_loss(model, packed), per_token.mean(), atol=1e-5, rtol=1e-5)

    batches = packed_batches(synthetic_batches(256, 3, 16))
    first = next(batches)
    assert isinstance(first, PackedBatch) and first.cu_seqlens.numel() == 4
    assert first.tokens.shape == first.targets.shape == (1, int(first.cu_seqlens[-1]))
