"""Checkpoint formats: Meta's ``params.json`` + ``consolidated.NN.pth`` directories, and Hugging
Face Llama state dicts converted to Meta's names and rotary layout.

Nothing here builds a model: these functions turn files into ``(params, state_dict)`` with
Meta's parameter names, which ``Transformer.from_meta`` / ``Transformer.from_hf`` load.

Meta's model-parallel layout (fairscale, LLaMA-1 and -2 reference code), one file per rank:
- column-parallel linears split their *output* features, concatenated on dim 0:
  ``wq``, ``wk``, ``wv``, ``w1``, ``w3``, ``output``;
- row-parallel linears split their *input* features, concatenated on dim 1: ``wo``, ``w2``;
- ``tok_embeddings`` is a ``ParallelEmbedding``, split along the embedding dim: dim 1;
- the norms are replicated on every rank.
LLaMA-1 files also hold ``rope.freqs`` (the rotary table), which is recomputed and dropped.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping

import torch
from torch import Tensor

_COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "output")
_ROW_PARALLEL = ("wo", "w2", "tok_embeddings")
_DROPPED_PREFIXES = ("rope.",)


def shard_dim(name: str) -> int | None:
    """The dim along which Meta's model-parallel files split ``name`` (None: replicated)."""
    parts = name.split(".")
    module = parts[-2] if len(parts) > 1 else name  # "layers.0.attention.wq.weight" -> "wq"
    if module in _COLUMN_PARALLEL:
        return 0
    if module in _ROW_PARALLEL:
        return 1
    return None


def _shard_files(checkpoint_dir: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(checkpoint_dir, "consolidated.*.pth")))
    if not files:
        raise FileNotFoundError(f"checkpoint_dir: no consolidated.*.pth in {checkpoint_dir!r}")
    return files


def _load_file(path: str, loader=None) -> dict[str, Tensor]:
    """One checkpoint file's tensors; a truncated or foreign file raises a ValueError that
    names it (torch's own message is about pickles and zip archives)."""
    try:
        if loader is not None:
            return loader(path)
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling, zip and safetensors errors vary
        raise ValueError(f"{path!r} is not a readable checkpoint (corrupt or truncated?): "
                         f"{type(e).__name__}: {e}") from e


def load_meta(checkpoint_dir: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """``(params, state_dict)`` of a Meta-format directory, model-parallel shards merged.

    Tensors stay in the checkpoint's dtype, on the CPU (memory-mapped while unmerged).
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    with open(os.path.join(checkpoint_dir, "params.json")) as f:
        params = json.load(f)
    shards = [_load_file(path) for path in _shard_files(checkpoint_dir)]
    merged: dict[str, Tensor] = {}
    for name, first in shards[0].items():
        if name.startswith(_DROPPED_PREFIXES):
            continue
        dim = shard_dim(name)
        if len(shards) == 1 or dim is None:
            merged[name] = first
            continue
        missing = [i for i, shard in enumerate(shards) if name not in shard]
        if missing:
            raise ValueError(f"checkpoint_dir: {name!r} is missing from shard(s) {missing}")
        parts = [shard[name] for shard in shards]
        shapes = {tuple(t.shape[:dim]) + tuple(t.shape[dim + 1:]) for t in parts}
        if len(shapes) != 1:
            raise ValueError(f"checkpoint_dir: the shards of {name!r} disagree outside the "
                             f"split dimension {dim}: {[tuple(t.shape) for t in parts]}")
        merged[name] = torch.cat(parts, dim=dim)
    return params, merged


def save_meta(state_dict: Mapping[str, Tensor], params: Mapping, checkpoint_dir: str | os.PathLike,
              *, num_shards: int = 1) -> list[str]:
    """Write ``params.json`` and ``consolidated.00.pth`` .. ``consolidated.{num_shards-1}.pth``
    split as Meta's model-parallel ranks would hold them. Returns the shard paths."""
    if num_shards < 1:
        raise ValueError(f"num_shards: expected a positive int, got {num_shards}")
    checkpoint_dir = os.fspath(checkpoint_dir)
    os.makedirs(checkpoint_dir, exist_ok=True)
    shards: list[dict[str, Tensor]] = [{} for _ in range(num_shards)]
    for name, t in state_dict.items():
        t = t.detach().cpu()
        dim = shard_dim(name)
        if dim is None or num_shards == 1:
            for shard in shards:
                shard[name] = t
            continue
        if t.shape[dim] % num_shards:
            raise ValueError(f"num_shards: {num_shards} does not divide dim {dim} of {name!r} "
                             f"(shape {tuple(t.shape)})")
        for shard, piece in zip(shards, t.chunk(num_shards, dim=dim)):
            shard[name] = piece.clone()  # a view would save the whole storage
    with open(os.path.join(checkpoint_dir, "params.json"), "w") as f:
        json.dump(dict(params), f, indent=2)
    paths = []
    for rank, shard in enumerate(shards):
        path = os.path.join(checkpoint_dir, f"consolidated.{rank:02d}.pth")
        torch.save(shard, path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# Hugging Face Llama -> Meta names and rotary layout.
# HF's conversion script permutes the rows of wq and wk per head, from Meta's interleaved pairs
# (2i, 2i+1) to its rotate_half halves (i, i + D/2): row 2i+j of a head moves to j*D/2 + i.
# Undoing it lets our interleaved rotary reproduce HF's outputs exactly.
# --------------------------------------------------------------------------------------------

_HF_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


def unpermute_hf_rotary(w: Tensor, n_heads: int) -> Tensor:
    """Inverse of HF's ``permute``: rows of each head from (i, i + D/2) halves to (2i, 2i+1)."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    # (n_heads, 2, D/2, cols) -> (n_heads, D/2, 2, cols): row j*D/2 + i becomes row 2i + j
    return w.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_config_to_params(config: Mapping) -> dict:
    """Meta-style params (plus ``ffn_hidden_dim`` and ``max_seq_len``) of a HF ``LlamaConfig``
    dict; raises for the Llama variants the thin model does not implement."""
    hidden, n_heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"hf config: hidden_act {config['hidden_act']!r} (expected silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ValueError(f"hf config: {flag}=True is not supported (LLaMA has no biases)")
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != hidden // n_heads:
        raise ValueError(f"hf config: head_dim {head_dim} != hidden_size / num_attention_heads")
    rope = config.get("rope_parameters") or {}  # transformers 5
    scaling = config.get("rope_scaling") or {}  # transformers 4
    rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in ("default", None):
        raise ValueError(f"hf config: rope type {rope_type!r} is not supported (default only)")
    theta = config.get("rope_theta") or rope.get("rope_theta") or 10000.0
    return {
        "dim": hidden,
        "n_layers": config["num_hidden_layers"],
        "n_heads": n_heads,
        "n_kv_heads": config.get("num_key_value_heads") or n_heads,
        "vocab_size": config["vocab_size"],
        "ffn_hidden_dim": config["intermediate_size"],
        "norm_eps": config.get("rms_norm_eps", 1e-6),
        "rope_theta": float(theta),
        "max_seq_len": config.get("max_position_embeddings", 2048),
    }


def hf_to_meta_state_dict(hf_state_dict: Mapping[str, Tensor],
                          params: Mapping) -> dict[str, Tensor]:
    """Rename a HF ``LlamaForCausalLM`` (or ``LlamaModel``) state dict to Meta's names, undoing
    the wq/wk row permutation; a tied (absent) ``lm_head`` is copied from the embeddings."""
    n_heads, n_kv_heads = params["n_heads"], params["n_kv_heads"]
    out: dict[str, Tensor] = {}
    for name, t in hf_state_dict.items():
        if name.startswith("model."):
            name = name[len("model."):]
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "embed_tokens.weight":
            out["tok_embeddings.weight"] = t
        elif name == "norm.weight":
            out["norm.weight"] = t
        elif name == "lm_head.weight":
            out["output.weight"] = t
        elif name.startswith("layers."):
            _, idx, rest = name.split(".", 2)
            module, param = rest.rsplit(".", 1)
            if module not in _HF_NAMES:
                raise ValueError(f"hf state dict: unexpected parameter {name!r}")
            if module == "self_attn.q_proj":
                t = unpermute_hf_rotary(t, n_heads)
            elif module == "self_attn.k_proj":
                t = unpermute_hf_rotary(t, n_kv_heads)
            out[f"layers.{idx}.{_HF_NAMES[module]}.{param}"] = t
        else:
            raise ValueError(f"hf state dict: unexpected parameter {name!r}")
    if "output.weight" not in out:
        out["output.weight"] = out["tok_embeddings.weight"].clone()
    return out


def load_hf_dir(model_dir: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """``(config dict, state dict)`` of a HF model directory (``config.json`` + safetensors or
    ``pytorch_model*.bin`` files), without building the HF model."""
    model_dir = os.fspath(model_dir)
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    state: dict[str, Tensor] = {}
    st_files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if st_files:
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError("model_dir holds .safetensors files: pip install safetensors") from e
        for path in st_files:
            state.update(_load_file(path, load_file))
    else:
        bin_files = sorted(glob.glob(os.path.join(model_dir, "pytorch_model*.bin")))
        if not bin_files:
            raise FileNotFoundError(f"model_dir: no *.safetensors or pytorch_model*.bin in "
                                    f"{model_dir!r}")
        for path in bin_files:
            state.update(_load_file(path))
    return config, state


__all__ = ["hf_config_to_params", "hf_to_meta_state_dict", "load_hf_dir", "load_meta",
           "save_meta", "shard_dim", "unpermute_hf_rotary"]
