"""Meta-format checkpoints (params.json + model-parallel consolidated.NN.pth shards) and the
Hugging Face rotary permutation, on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch

from llama_kernels.checkpoint import load_meta, shard_dim, unpermute_hf_rotary
from llama_kernels.model import ModelArgs, Transformer
from llama_kernels import apply_rotary, rotary_tables

# Meta's fairscale layout, written out independently of llama_kernels.checkpoint: which dim
# each rank's file splits (column-parallel: outputs, dim 0; row-parallel and the
# ParallelEmbedding: dim 1; norms replicated).
META_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,
              "wo": 1, "w2": 1, "tok_embeddings": 1}


def tiny_model(**overrides) -> Transformer:
    model = Transformer(ModelArgs.from_name("tiny", **overrides))
    model.init_weights(std=0.1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)  # non-trivial gains, to catch a swap
    return model


def write_meta_shards(model: Transformer, path, num_shards: int, dtype=torch.float32):
    """Write ``model`` as Meta's code would have saved it from ``num_shards`` ranks."""
    a = model.args
    params = {"dim": a.dim, "multiple_of": a.multiple_of, "n_heads": a.n_heads,
              "n_layers": a.n_layers, "norm_eps": a.norm_eps, "vocab_size": -1}
    if a.n_kv_heads is not None:
        params["n_kv_heads"] = a.n_kv_heads
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(params))
    shards = [{} for _ in range(num_shards)]
    for name, t in model.state_dict().items():
        dim = META_SPLIT.get(name.split(".")[-2])
        pieces = [t] * num_shards if dim is None else list(t.chunk(num_shards, dim))
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.to(dtype).clone()
    for rank, shard in enumerate(shards):
        shard["rope.freqs"] = torch.randn(a.head_dim // 2)  # LLaMA-1 files carry this too
        torch.save(shard, path / f"consolidated.{rank:02d}.pth")


def test_split_dims_follow_metas_layout():
    for module, dim in META_SPLIT.items():
        prefix = "" if module in ("output", "tok_embeddings") else "layers.3.attention."
        assert shard_dim(f"{prefix}{module}.weight") == dim
    assert shard_dim("layers.0.attention_norm.weight") is None and shard_dim("norm.weight") is None


@pytest.mark.parametrize("num_shards", [1, 2])
def test_load_meta_shards_gives_the_unsharded_logits(tmp_path, num_shards):
    model = tiny_model()
    write_meta_shards(model, tmp_path, num_shards)
    if num_shards == 2:  # the files really are halves
        shard = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
        assert shard["layers.0.attention.wq.weight"].shape == (32, 64)
        assert shard["layers.0.attention.wo.weight"].shape == (64, 32)
        assert shard["tok_embeddings.weight"].shape == (256, 32)
    loaded = Transformer.from_meta(tmp_path)
    assert loaded.args.vocab_size == 256 and loaded.args.n_kv_heads == 2
    assert loaded.args.hidden_dim == model.args.hidden_dim
    tokens = torch.randint(0, 256, (2, 19))
    torch.testing.assert_close(loaded(tokens), model(tokens), atol=0, rtol=0)
    _, state = load_meta(tmp_path)
    assert "rope.freqs" not in state and set(state) == set(model.state_dict())


def test_checkpoint_dtype_is_kept_or_converted(tmp_path):
    model = tiny_model()
    write_meta_shards(model, tmp_path, 2, dtype=torch.bfloat16)
    kept = Transformer.from_meta(tmp_path)
    assert kept.output.weight.dtype == torch.bfloat16
    assert kept.rope_cos.dtype == torch.float32  # rotary tables are never rounded
    as_fp32 = Transformer.from_meta(tmp_path, dtype=torch.float32, max_seq_len=64)
    assert as_fp32.output.weight.dtype == torch.float32 and as_fp32.args.max_seq_len == 64
    bf16_weights = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    for name, t in as_fp32.state_dict().items():
        torch.testing.assert_close(t, bf16_weights[name], atol=0, rtol=0)


@pytest.mark.parametrize("num_shards", [1, 2, 4])
def test_save_meta_round_trip(tmp_path, num_shards):
    model = tiny_model(n_kv_heads=None, ffn_dim_multiplier=1.5)
    paths = model.save_meta(tmp_path, num_shards=num_shards)
    assert len(paths) == num_shards
    params = json.loads((tmp_path / "params.json").read_text())
    assert params["ffn_dim_multiplier"] == 1.5 and "n_kv_heads" not in params
    loaded = Transformer.from_meta(tmp_path)
    assert loaded.args.hidden_dim == model.args.hidden_dim
    for name, t in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], t, atol=0, rtol=0)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        Transformer.from_meta(tmp_path)
    with pytest.raises(ValueError, match="num_shards"):
        tiny_model().save_meta(tmp_path, num_shards=3)  # 3 does not divide dim 64


def test_corrupt_or_mismatched_checkpoints_name_the_file_or_tensor(tmp_path):
    model = tiny_model()
    model.save_meta(tmp_path, num_shards=2)
    shard = tmp_path / "consolidated.01.pth"
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError, match="consolidated.01.pth"):
        Transformer.from_meta(tmp_path)
    shard.write_bytes(good)
    # a shard whose wq disagrees with the other outside the split dimension
    state = torch.load(shard, weights_only=True)
    state["layers.0.attention.wq.weight"] = state["layers.0.attention.wq.weight"][:, :-1]
    torch.save(state, shard)
    with pytest.raises(ValueError, match="layers.0.attention.wq.weight"):
        Transformer.from_meta(tmp_path)
    # a single shard with a wrongly sized tensor: torch's strict load names it
    single = tmp_path / "single"
    model.save_meta(single, num_shards=1)
    state = torch.load(single / "consolidated.00.pth", weights_only=True)
    state["layers.1.feed_forward.w2.weight"] = state["layers.1.feed_forward.w2.weight"][:-1]
    torch.save(state, single / "consolidated.00.pth")
    with pytest.raises(RuntimeError, match="layers.1.feed_forward.w2.weight"):
        Transformer.from_meta(single)


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' convert_llama_weights_to_hf.py ``permute``."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


@pytest.mark.parametrize("n_heads,head_dim", [(4, 16), (2, 6)])
def test_unpermuting_hf_rows_maps_half_split_rotary_to_interleaved(n_heads, head_dim):
    w = torch.randn(n_heads * head_dim, 24)
    w_hf = hf_permute(w, n_heads)
    torch.testing.assert_close(unpermute_hf_rotary(w_hf, n_heads), w, atol=0, rtol=0)
    # What the permutation is for: HF's half-split rotary of the permuted projection is
    # Meta's interleaved rotary of the original, up to the same row permutation.
    x = torch.randn(2, 7, 24)
    cos, sin = rotary_tables(7, head_dim)
    meta = apply_rotary((x @ w.T).view(2, 7, n_heads, head_dim), cos, sin, interleaved=True)
    hf = apply_rotary((x @ w_hf.T).view(2, 7, n_heads, head_dim), cos, sin, interleaved=False)
    features = hf.reshape(14, n_heads * head_dim).T.contiguous()  # (H*D, B*S): rows to permute
    back = unpermute_hf_rotary(features, n_heads)
    torch.testing.assert_close(back.T.reshape(meta.shape), meta, atol=1e-6, rtol=1e-5)


def test_corrupt_hf_safetensors_names_the_file(tmp_path):
    pytest.importorskip("safetensors")
    from llama_kernels.checkpoint import load_hf_dir

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model-00001-of-00001.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(ValueError, match="model-00001-of-00001.safetensors"):
        load_hf_dir(tmp_path)
