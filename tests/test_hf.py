"""Hugging Face transformers: a tiny random Llama gives the same logits, gradients and greedy
generations before and after ``patch_llama``, and ``Transformer.from_hf`` reproduces it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers", reason="needs transformers "
                                   "(pip install transformers)")

from transformers.models.llama import modeling_llama  # noqa: E402

from llama_kernels.integrations.hf import ATTN_IMPLEMENTATION, patch_llama  # noqa: E402
from llama_kernels.model import Transformer  # noqa: E402

VOCAB = 128


def tiny_hf(**overrides):
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
        **{"tie_word_embeddings": False, **overrides})
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # non-trivial norm gains, peaked logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.mul_(5)
    return model.eval()


class OpRecorder(TorchDispatchMode):
    """Records (op name, first input shape) of each llama_kernels op that runs."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "llama_kernels":
            self.calls.append((func._opname, tuple(args[0].shape)))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def unpatched_rotary(monkeypatch):
    """HF's own apply_rotary_pos_emb for the reference run (patch_llama swaps it
    process-wide; monkeypatch restores whatever was there after the test)."""
    fn = modeling_llama.apply_rotary_pos_emb
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", getattr(fn, "__wrapped__", fn))


def logits_and_grads(model, ids, **kwargs):
    model.zero_grad(set_to_none=True)
    logits = model(ids, **kwargs).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def close(a, b, rel=1e-5):
    """fp32 on both sides, summation orders differ: rounding relative to the tensor's scale."""
    torch.testing.assert_close(a, b, atol=rel * b.abs().max().item(), rtol=rel)


def test_patched_model_same_logits_and_gradients(unpatched_rotary):
    hf = tiny_hf()
    ids = torch.randint(0, VOCAB, (2, 23))
    ref_logits, ref_grads = logits_and_grads(hf, ids)
    patched = patch_llama(copy.deepcopy(hf))
    assert patched._llama_kernels_patched == {"rms_norm": 5, "mlp": 2, "attention": 2,
                                              "rotary": 1}
    assert patched.config._attn_implementation == ATTN_IMPLEMENTATION
    with OpRecorder() as rec:
        logits, grads = logits_and_grads(patched, ids)
    ops = {name for name, _ in rec.calls}
    assert {"rms_norm_fwd", "rotary_apply", "flash_attention_fwd", "flash_attention_bwd",
            "rms_norm_bwd"} <= ops
    assert any("swiglu" in name for name in ops)
    close(logits, ref_logits)
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        assert g.abs().sum() > 0, name
        close(grads[name], g, rel=1e-4)


def test_patched_model_padding_mask_and_generation(unpatched_rotary):
    hf = tiny_hf()
    ids = torch.randint(0, VOCAB, (2, 15))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: attention must fall back to a masked path, not ignore it
    with torch.no_grad():
        ref_padded = hf(ids, attention_mask=mask).logits
    ref_tokens = hf.generate(ids[1:], max_new_tokens=8, do_sample=False)
    patched = patch_llama(copy.deepcopy(hf))
    with torch.no_grad():
        padded = patched(ids, attention_mask=mask).logits
    close(padded[0, 4:], ref_padded[0, 4:])
    close(padded[1], ref_padded[1])
    with OpRecorder() as rec:
        tokens = patched.generate(ids[1:], max_new_tokens=8, do_sample=False)
    assert tokens.tolist() == ref_tokens.tolist()
    attn_q_lens = [shape[1] for name, shape in rec.calls if name == "flash_attention_fwd"]
    assert attn_q_lens[:2] == [15, 15] and set(attn_q_lens[2:]) == {1}  # prefill, then decode


def test_patched_model_packed_sequences_use_varlen(unpatched_rotary):
    """Padding-free packing (DataCollatorWithFlattening's keywords): one row of three sequences
    gives each sequence's own logits, through flash_attention_varlen."""
    hf = tiny_hf()
    lengths = [5, 11, 3]
    seqs = [torch.randint(0, VOCAB, (1, n)) for n in lengths]
    with torch.no_grad():
        alone = [hf(s).logits[0] for s in seqs]
    patched = patch_llama(copy.deepcopy(hf))
    cu = torch.tensor([0, 5, 16, 19], dtype=torch.int32)
    packed = dict(input_ids=torch.cat(seqs, 1),
                  position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
                  cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=11, max_length_k=11)
    with OpRecorder() as rec, torch.no_grad():
        logits = patched(**packed).logits[0]
    assert [name for name, _ in rec.calls if "attention" in name] == \
        ["flash_attention_varlen_fwd"] * 2
    for seq_logits, (start, stop) in zip(alone, zip(cu[:-1].tolist(), cu[1:].tolist())):
        close(logits[start:stop], seq_logits)


def test_patch_is_idempotent():
    hf = tiny_hf()
    ids = torch.randint(0, VOCAB, (1, 9))
    once = patch_llama(copy.deepcopy(hf))
    twice = patch_llama(patch_llama(copy.deepcopy(hf)))
    with torch.no_grad():
        torch.testing.assert_close(twice(ids).logits, once(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_from_hf_matches_the_hf_model(unpatched_rotary, tied, tmp_path):
    hf = tiny_hf(tie_word_embeddings=tied)
    ids = torch.randint(0, VOCAB, (2, 21))
    with torch.no_grad():
        ref = hf(ids).logits
    ours = Transformer.from_hf(hf)
    assert ours.args.n_kv_heads == 2 and ours.args.hidden_dim == 176
    close(ours(ids), ref)
    # Our parameters are copies: training ours leaves the HF model alone.
    with torch.no_grad():
        ours.output.weight.zero_()
    assert hf.lm_head.weight.abs().sum() > 0
    hf.save_pretrained(tmp_path)  # safetensors, read back without building a HF model
    close(Transformer.from_hf(tmp_path)(ids), ref)
    # Greedy decoding agrees with HF's on the same weights, stopping at the same eos (HF keeps
    # the eos in its output, ours leaves it out).
    ref_tokens = hf.generate(ids[:1], max_new_tokens=6, do_sample=False)[0, 21:].tolist()
    ours = Transformer.from_hf(hf)
    assert ours.eos_id == hf.generation_config.eos_token_id
    if ref_tokens[-1] == ours.eos_id:
        ref_tokens = ref_tokens[:-1]
    assert ours.generate(ids[0].tolist(), 6) == ref_tokens
    # With the eos never seen, both run the full six tokens.
    ref_full = hf.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=6,
                           do_sample=False, eos_token_id=None, pad_token_id=0)[0, 21:].tolist()
    assert ours.generate(ids[0].tolist(), 6, eos_id=-1) == ref_full


def test_from_hf_rejects_unsupported_variants():
    with pytest.raises(ValueError, match="attention_bias"):
        Transformer.from_hf(tiny_hf(attention_bias=True))


def test_patched_norm_keeps_hf_promotion_for_mixed_dtypes():
    """fp32 norm weights over bf16 hidden states: HF returns fp32; so does the patched norm."""
    norm = modeling_llama.LlamaRMSNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    expected = norm(x)
    model = torch.nn.Sequential(norm)
    patch_llama(model)
    got = norm(x)
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
