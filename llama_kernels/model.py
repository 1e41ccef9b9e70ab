"""The thin LLaMA model: the paper's configurations, a Transformer with Meta's parameter names,
a KV cache, and generation.

Every layer computes through ``llama_kernels.ops`` (see ``layers.py``), so the backend choice
reaches the whole model. No device is hard-coded: the model lives where its parameters are
(build it under ``with torch.device("cuda"):`` or move it with ``.to``). The forward returns
fp32 logits whatever the parameter dtype, as Meta's reference code does, so that the loss and
sampling are computed at full precision; given targets it returns the fp32 loss instead, fused
with the output projection (no logits held). It trains on rows of tokens or on documents packed
end to end (``cu_seqlens``).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                    create_selective_checkpoint_contexts)

from llama_kernels import checkpoint as ckpt
from llama_kernels.decoding import DecodeStep, sample, sample_tokens
from llama_kernels.layers import RaggedBatch, RMSNorm, TransformerBlock, ffn_hidden_dim
from llama_kernels.ops import linear_cross_entropy, rotary_tables
from llama_kernels.ops._backend import requested_backend


CHECKPOINT_POLICIES = ("none", "full", "selective")
IGNORE_INDEX = -100  # a target the loss skips (F.cross_entropy's default)

# The paper's checkpointing (section 2.4): keep the activations that are expensive to recompute,
# the outputs of the linear layers and of attention (with its log-sum-exp), and recompute the
# cheap ones in the backward: the norms, SwiGLU and rotary, each one fused kernel here.
_SAVED_BY_SELECTIVE = {"mm", "addmm", "bmm", "linear", "flash_attention_fwd",
                       "flash_attention_varlen_fwd"}


def _selective_policy(ctx, op, *args, **kwargs):
    save = getattr(op, "overloadpacket", op).__name__ in _SAVED_BY_SELECTIVE
    return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_selective_policy)


def _is_dtensor(t: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: multi-head attention (n_kv_heads == n_heads)
    vocab_size: int = 32000
    multiple_of: int = 256  # the FFN width is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    ffn_hidden_dim: int | None = None  # the FFN width itself, overriding the rule (HF configs)
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    # What each block keeps for its backward while training (CHECKPOINT_POLICIES): "none" keeps
    # everything autograd saves, "full" keeps the block's inputs and recomputes the whole block,
    # "selective" keeps the matmul and attention outputs and recomputes the rest (True / False
    # mean "full" / "none")
    checkpoint_activations: str | bool = "none"
    extra: dict = field(default_factory=dict, repr=False)  # unknown params.json keys, kept

    def __post_init__(self):
        if isinstance(self.checkpoint_activations, bool):
            self.checkpoint_activations = "full" if self.checkpoint_activations else "none"
        if self.checkpoint_activations not in CHECKPOINT_POLICIES:
            raise ValueError(f"checkpoint_activations: expected one of {CHECKPOINT_POLICIES} "
                             f"(or a bool), got {self.checkpoint_activations!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """The FFN's real width: ``2/3 * 4 * dim`` (times the multiplier), rounded up."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        return ffn_hidden_dim(4 * self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @classmethod
    def from_name(cls, name: str, **overrides) -> ModelArgs:
        """A preset of ``PRESETS`` ("7B", "13B", "33B", "65B", "tiny", "small"), with overrides."""
        if name not in PRESETS:
            raise ValueError(f"name: unknown model {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_params(cls, params: dict, **overrides) -> ModelArgs:
        """From a Meta ``params.json`` dict (``vocab_size: -1`` means: give it in overrides)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in params.items() if k in names}
        extra = {k: v for k, v in params.items() if k not in names}
        args = cls(**{**known, **overrides}, extra=extra)
        if args.vocab_size <= 0:
            raise ValueError("params: vocab_size is unset (-1); pass vocab_size=...")
        return args

    def to_params(self) -> dict:
        """The Meta ``params.json`` dict (``None`` fields omitted)."""
        skip = {"checkpoint_activations", "extra", "max_seq_len"}
        params = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in skip and getattr(self, f.name) is not None}
        return {**self.extra, **params}


# The paper's Table 2 (and its parameter counts: 6.7B, 13.0B, 32.5B, 65.2B), plus small ones.
PRESETS: dict[str, dict] = {
    "7B": dict(dim=4096, n_heads=32, n_layers=32),
    "13B": dict(dim=5120, n_heads=40, n_layers=40),
    "33B": dict(dim=6656, n_heads=52, n_layers=60),
    "65B": dict(dim=8192, n_heads=64, n_layers=80),
    # For tests and examples: grouped-query attention, a byte-sized vocab, CPU-fast.
    "tiny": dict(dim=64, n_heads=4, n_kv_heads=2, n_layers=2, vocab_size=256, multiple_of=16,
                 max_seq_len=256),
    # llama2.c's 15M-parameter shape, with LLaMA's vocabulary.
    "small": dict(dim=288, n_heads=6, n_layers=6, multiple_of=32, max_seq_len=256),
}


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(args.dim, args.n_heads, args.n_kv_heads, args.hidden_dim,
                             args.norm_eps)
            for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.eos_id: int | None = None  # generate() stops there; set it from the tokenizer
        self._build_rope_tables(None)
        self.init_weights()

    # ---- rotary tables: fp32 buffers that follow the model's device but never its dtype ----

    def _build_rope_tables(self, device: torch.device | None) -> None:
        cos, sin = rotary_tables(self.args.max_seq_len, self.args.head_dim, self.args.rope_theta,
                                 device=device)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, head_dim / 2)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() cast every floating buffer; the tables must stay fp32 (rounding
        # them to bf16 would shift far positions), so recompute them where they now live.
        super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32 and self.rope_cos.device.type != "meta":
            self._build_rope_tables(self.rope_cos.device)
        return self

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) weights and unit norms, for training from scratch."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    # ---- KV cache --------------------------------------------------------------------------

    def setup_cache(self, max_batch: int, max_seq_len: int | None = None, *,
                    dtype: torch.dtype | None = None) -> None:
        """Allocate every layer's KV cache (dtype and device of the parameters); from now on
        ``forward`` writes keys and values at ``start_pos`` and attends to the cached prefix."""
        max_seq_len = self.args.max_seq_len if max_seq_len is None else max_seq_len
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"max_seq_len: {max_seq_len} exceeds the model's context "
                             f"{self.args.max_seq_len}")
        for layer in self.layers:
            layer.attention.setup_cache(max_batch, max_seq_len, dtype=dtype)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.clear_cache()

    @property
    def has_cache(self) -> bool:
        return len(self.layers) > 0 and self.layers[0].attention.cache_k is not None

    # ---- forward and generation ------------------------------------------------------------

    def forward(self, tokens: Tensor, start_pos: int = 0, *, use_cache: bool = True,
                batch: RaggedBatch | None = None, cu_seqlens: Tensor | None = None,
                max_seqlen: int | None = None, targets: Tensor | None = None) -> Tensor:
        """``tokens`` (B, S) int at positions ``start_pos ..`` -> fp32 logits (B, S, vocab).

        With a cache set up (``setup_cache``) and ``use_cache``, the new keys and values are
        cached and the tokens attend to the whole cached prefix (prefill with ``start_pos=0``,
        then decode one token at a time). Without one, ``start_pos`` must be 0.

        ``cu_seqlens`` (training on packed documents): ``tokens`` (1, T) holds documents end to
        end, ``cu_seqlens`` int32 (D + 1,) their boundaries from 0 to T (a document may be
        empty); each document attends only to itself (``flash_attention_varlen``) and its
        rotary positions start at 0, so its logits are those of running it alone. Returns the
        logits of every token, (1, T, vocab); no cache is read or written. ``max_seqlen``, the
        longest document, is read from ``cu_seqlens`` (one host sync) when not given.

        ``targets`` (B, S) int64, the token each position should predict (-100: none):
        returns the scalar fp32 mean cross entropy instead of the logits, computed from the
        final norm's output and ``output.weight`` by ``linear_cross_entropy``, which never holds
        the (B * S, vocab) logits at once (its triton backend, also the one a model on "cuda"
        uses: the loss has no CUDA kernel; the torch reference materializes them).
        Works with ``cu_seqlens`` and with every ``checkpoint_activations`` policy. Under
        tensor parallel (``parallelize_llama`` splits ``output`` by vocabulary) the loss is
        ``F.cross_entropy`` of the gathered logits.

        With a ``RaggedBatch`` (generation: sequences of different lengths in one cache;
        ``start_pos`` unused): a packed prefill takes ``tokens`` (1, T) and returns the logits
        of each sequence's last token, (B, 1, vocab); a decode step takes (B, S_new) and
        returns (B, S_new, vocab).
        """
        n_rows, seqlen = tokens.shape
        if cu_seqlens is not None:
            if batch is not None:
                raise ValueError("cu_seqlens: packed documents take no RaggedBatch (batch)")
            if n_rows != 1:
                raise ValueError(f"tokens: packed documents are one row (1, T), got shape "
                                 f"{tuple(tokens.shape)}")
            batch = RaggedBatch.packed(cu_seqlens, seqlen, max_seqlen)
            if max_seqlen is None and batch.max_seqlen > self.args.max_seq_len:  # read exactly
                raise ValueError(f"cu_seqlens: a document of {batch.max_seqlen} tokens exceeds "
                                 f"max_seq_len {self.args.max_seq_len}")
        generating = batch is not None and batch.cache_seqlens is not None
        if targets is not None and (targets.shape != tokens.shape or generating):
            raise ValueError(f"targets: expected shape {tuple(tokens.shape)} (that of tokens), "
                             f"without a generation batch; got {tuple(targets.shape)}")
        if batch is not None:
            cos, sin = self.rope_cos, self.rope_sin  # each token picks its own row
        else:
            if start_pos + seqlen > self.args.max_seq_len:
                raise ValueError(f"tokens: positions up to {start_pos + seqlen} exceed "
                                 f"max_seq_len {self.args.max_seq_len}")
            cos = self.rope_cos[start_pos:start_pos + seqlen]  # (S, head_dim / 2)
            sin = self.rope_sin[start_pos:start_pos + seqlen]
        delta, residual = self.tok_embeddings(tokens), None  # (B, S, dim)
        policy = self.args.checkpoint_activations
        recompute = policy != "none" and self.training and torch.is_grad_enabled()
        context = {"context_fn": _selective_contexts} if policy == "selective" else {}
        for layer in self.layers:
            if recompute:
                delta, residual = checkpoint(layer, delta, residual, cos, sin, start_pos,
                                             use_cache=use_cache, batch=batch,
                                             use_reentrant=False, **context)
            else:
                delta, residual = layer(delta, residual, cos, sin, start_pos, use_cache=use_cache,
                                        batch=batch)
        if generating and batch.cu_seqlens is not None:  # each sequence's last token
            last = batch.cu_seqlens[1:].long() - 1
            delta = delta[0, last][:, None]  # (B, 1, dim)
            residual = None if residual is None else residual[0, last][:, None]
        h = self.norm(delta) if residual is None else self.norm(delta, residual)[0]
        if targets is None:
            return self.output(h).float()  # (B, S, vocab)
        return self._loss(h, targets)

    def _loss(self, h: Tensor, targets: Tensor) -> Tensor:
        """Mean cross entropy of the logits ``output(h)`` (B, S, vocab) against ``targets``
        (B, S), without the logits where the output weight is a plain tensor."""
        if _is_dtensor(self.output.weight):
            # tensor parallel splits the vocabulary across ranks: the module gathers the logits
            logits = self.output(h).float()  # (B, S, vocab)
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                   ignore_index=IGNORE_INDEX)
        # the loss has no CUDA kernel: its triton backend (cuBLAS matmuls and one kernel a
        # chunk) is the fused one, so a model running on "cuda" computes its loss there
        backend = "triton" if requested_backend(None) == "cuda" else None
        return linear_cross_entropy(h, self.output.weight, targets, ignore_index=IGNORE_INDEX,
                                    backend=backend)

    @torch.no_grad()
    def generate(self, prompt_tokens: list[int] | list[list[int]], max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, *, eos_id: int | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None,
                 check_every: int = 8, on_step: Callable[[int], None] | None = None,
                 cuda_graph: bool | None = None,
                 compile_step: bool = False) -> list[int] | list[list[int]]:
        """The generated token ids (without the prompt, without the stopping eos).

        ``prompt_tokens`` is one prompt (a list of ids: returns a list of ids) or several of any
        lengths (a list of lists: returns a list of lists, each sequence stopping at its own
        eos). Greedy at ``temperature=0``, else nucleus sampling of the ``top_p`` mass, drawn on
        the device (``generator`` seeds the draws). The prompts are prefilled in one packed
        ``flash_attention_varlen`` call, then every sequence decodes one token a step against
        the KV cache through ``flash_attention_with_kvcache`` (a temporary cache is set up when
        none is), in a ``DecodeStep`` of static shapes: the whole batch steps every time, a
        finished sequence included (its extra tokens are dropped). ``cuda_graph`` replays the
        step as one CUDA graph (default: on a GPU); ``compile_step`` runs it through
        ``torch.compile(mode="reduce-overhead")`` instead. The host waits on the device only
        every ``check_every`` steps, to see whether every sequence has stopped;
        ``use_cache=False`` reruns the whole sequence every step instead, one prompt at a time
        (the slow reference). Stops at ``eos_id`` (default: the model's ``eos_id``) when there
        is one. Greedy results equal those of generating each prompt alone. ``on_step(i)`` is
        called after decoding step i (a progress bar, say).
        """
        single = not prompt_tokens or not isinstance(prompt_tokens[0], (list, tuple))
        prompts = [list(prompt_tokens)] if single else [list(p) for p in prompt_tokens]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompt_tokens: expected at least one token in every prompt")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature {temperature} / top_p {top_p}: expected "
                             "temperature >= 0 and 0 < top_p <= 1")
        if max_new_tokens < 0 or check_every < 1:
            raise ValueError(f"max_new_tokens {max_new_tokens} / check_every {check_every}: "
                             "expected max_new_tokens >= 0 and check_every >= 1")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.args.max_seq_len:
            raise ValueError(f"prompt_tokens: {longest} + max_new_tokens {max_new_tokens} exceed "
                             f"max_seq_len {self.args.max_seq_len}")
        on_gpu = self.tok_embeddings.weight.device.type == "cuda"
        if cuda_graph and compile_step:
            raise ValueError("cuda_graph, compile_step: pick one (torch.compile's "
                             "reduce-overhead mode captures its own graphs)")
        if cuda_graph and not on_gpu:
            raise ValueError("cuda_graph: CUDA graphs need the model on a GPU; pass "
                             "cuda_graph=False (or None) on the CPU")
        eos_id = self.eos_id if eos_id is None else eos_id
        if not use_cache:
            out = [self._generate_uncached(p, max_new_tokens, temperature, top_p, eos_id,
                                           generator) for p in prompts]
        else:
            # by default a graph on a GPU, unless the torch backend (whose cached attention
            # reads the lengths on the host) is asked for
            auto_graph = (cuda_graph is None and on_gpu and not compile_step
                          and requested_backend(None) != "torch")
            mode = ("graph" if cuda_graph or auto_graph else "compile" if compile_step
                    else "eager")
            out = self._generate_cached(prompts, max_new_tokens, temperature, top_p, eos_id,
                                        generator, check_every, on_step, mode,
                                        fallback=auto_graph)
        return out[0] if single else out

    def _generate_cached(self, prompts, max_new_tokens, temperature, top_p, eos_id, generator,
                         check_every, on_step, mode="eager",
                         fallback=False) -> list[list[int]]:
        device = self.tok_embeddings.weight.device
        n_seqs, capacity = len(prompts), max(len(p) for p in prompts) + max_new_tokens
        own_cache = not self.has_cache
        if own_cache:
            self.setup_cache(n_seqs, capacity)
        else:
            have = self.layers[0].attention.cache_k.shape
            if have[0] < n_seqs or have[1] < capacity:
                raise ValueError(f"prompt_tokens: {n_seqs} sequences of up to {capacity} tokens "
                                 f"do not fit the KV cache set up ({have[0]} x {have[1]})")
        try:
            if max_new_tokens == 0:
                return [[] for _ in prompts]
            batch = RaggedBatch.prefill([len(p) for p in prompts], device)
            packed = torch.tensor([t for p in prompts for t in p], device=device)[None]  # (1, T)
            logits = self(packed, batch=batch)[:, -1]  # (B, vocab)
            first = sample_tokens(logits, temperature, top_p, generator)  # (B,)
            lengths = batch.cu_seqlens.diff().to(torch.int32)  # (B,)
            if max_new_tokens == 1:
                mode = "eager"  # no decode step to run: nothing worth capturing
            try:
                decode = DecodeStep(self, lengths, max_new_tokens, temperature, top_p, eos_id,
                                    generator=generator, mode=mode)
            except RuntimeError as e:
                if not fallback:
                    raise
                warnings.warn(f"generate: the decode step could not be captured in a CUDA "
                              f"graph ({str(e).splitlines()[0][:200]}); decoding eagerly",
                              stacklevel=3)
                decode = DecodeStep(self, lengths, max_new_tokens, temperature, top_p, eos_id,
                                    generator=generator, mode="eager")
            decode.start(first)
            for step in range(max_new_tokens):
                if on_step is not None:
                    on_step(step)
                if step == max_new_tokens - 1 or (
                        eos_id is not None and step % check_every == check_every - 1
                        and bool(decode.stopped.all())):
                    break
                decode()  # token step + 1 of every sequence
            result = decode.tokens[:, :step + 1].tolist()
            del decode  # its graph's memory pool goes with it
        finally:
            if own_cache:
                self.clear_cache()
        if eos_id is not None:
            result = [seq[:seq.index(eos_id)] if eos_id in seq else seq for seq in result]
        return result

    def _generate_uncached(self, prompt, max_new_tokens, temperature, top_p, eos_id,
                           generator) -> list[int]:
        device = self.tok_embeddings.weight.device
        seq = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, P)
        generated: list[int] = []
        for _ in range(max_new_tokens):
            logits = self(seq, 0, use_cache=False)[:, -1]  # (1, vocab)
            token = int(sample_tokens(logits, temperature, top_p, generator)[0])
            if eos_id is not None and token == eos_id:
                break
            generated.append(token)
            seq = torch.cat([seq, seq.new_tensor([[token]])], dim=1)  # (1, P + steps)
        return generated

    # ---- checkpoints -----------------------------------------------------------------------

    @classmethod
    def from_state_dict(cls, args: ModelArgs, state_dict: dict[str, Tensor], *,
                        dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> Transformer:
        """A model holding ``state_dict``'s tensors (no random init, no second copy)."""
        with torch.device("meta"):
            model = cls(args)
        model.load_state_dict(state_dict, strict=True, assign=True)
        model._build_rope_tables(model.tok_embeddings.weight.device)
        return model.to(device=device, dtype=dtype)

    @classmethod
    def from_meta(cls, checkpoint_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None, **overrides) -> Transformer:
        """Load a Meta ``params.json`` + ``consolidated.NN.pth`` directory (shards merged);
        ``overrides`` set ModelArgs fields (``max_seq_len=4096``, say)."""
        params, state = ckpt.load_meta(checkpoint_dir)
        if params.get("vocab_size", -1) <= 0 and "vocab_size" not in overrides:
            overrides["vocab_size"] = state["tok_embeddings.weight"].shape[0]
        return cls.from_state_dict(ModelArgs.from_params(params, **overrides), state,
                                   dtype=dtype, device=device)

    def save_meta(self, checkpoint_dir: str | os.PathLike, *, num_shards: int = 1) -> list[str]:
        """Write a Meta-format directory, split into ``num_shards`` model-parallel files."""
        return ckpt.save_meta(self.state_dict(), self.args.to_params(), checkpoint_dir,
                              num_shards=num_shards)

    @classmethod
    def from_hf(cls, hf_model_or_dir, *, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None, **overrides) -> Transformer:
        """From a transformers ``LlamaForCausalLM`` / ``LlamaModel`` instance or a saved HF
        directory (read with safetensors, without building the HF model). HF's wq/wk row
        permutation is undone, so outputs match the HF model's; generate() stops at the
        config's ``eos_token_id`` as HF's does."""
        if isinstance(hf_model_or_dir, (str, os.PathLike)):
            config, hf_state = ckpt.load_hf_dir(hf_model_or_dir)
        else:
            config, hf_state = hf_model_or_dir.config.to_dict(), hf_model_or_dir.state_dict()
        params = ckpt.hf_config_to_params(config)
        state = ckpt.hf_to_meta_state_dict(hf_state, params)
        if device is None:
            device = state["tok_embeddings.weight"].device
        args = ModelArgs.from_params(params, **overrides)
        # Detach from the HF model: our parameters must not alias its parameters.
        state = {k: v.detach().clone() for k, v in state.items()}
        model = cls.from_state_dict(args, state, dtype=dtype, device=device)
        eos = config.get("eos_token_id")
        if isinstance(eos, (list, tuple)):  # several stop tokens: generate() takes the first
            eos = eos[0] if eos else None
        model.eos_id = eos
        return model


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["CHECKPOINT_POLICIES", "DecodeStep", "IGNORE_INDEX", "ModelArgs", "PRESETS",
           "Transformer", "num_params", "sample", "sample_tokens"]
