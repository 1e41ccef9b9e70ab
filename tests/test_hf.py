"""Hugging Face transformers: a tiny random Llama gives the same logits, gradients and greedy
generations before and after ``patch_llama`` (plain, padded and packed batches, attention weights,
the fused loss), and ``Transformer.from_hf`` reproduces it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers", reason="needs transformers "
                                   "(pip install transformers)")

from transformers.models.llama import modeling_llama  # noqa: E402

from llama_kernels.integrations import hf as hf_integration  # noqa: E402
from llama_kernels.integrations.hf import ATTN_IMPLEMENTATION, patch_llama  # noqa: E402
from llama_kernels.model import Transformer  # noqa: E402
from llama_kernels.testing import assert_close  # noqa: E402

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
    mask[0, :4] = 0  # left padding: attention must honour it, not ignore it
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


# --- padded and packed batches, attention weights, the fused loss ---------------------------
#
# Each result is checked by the tolerance rule (llama_kernels.testing): the unpatched model in
# fp64 is the exact answer, the unpatched model in the test's dtype the baseline whose error the
# patched model may at most double (plus the rounding floor).


def references(hf, fn, dtype=torch.float32):
    """fn(model) on the unpatched model in fp64 (the exact answer) and in ``dtype`` (the
    baseline); run before patch_llama, which swaps the rotary process-wide."""
    return fn(copy.deepcopy(hf).double()), fn(copy.deepcopy(hf).to(dtype))


def check_rule(out, exact, baseline, name):
    if isinstance(out, dict):
        assert set(out) == set(exact), name
        for key in out:
            check_rule(out[key], exact[key], baseline[key], f"{name} {key}")
        return
    assert_close(out, exact.to(out.dtype) if exact.dtype != torch.float64 else exact,
                 baseline, name=name)


@pytest.fixture
def no_fallback(monkeypatch):
    """Fails the test if the patched attention hands anything to transformers' sdpa."""
    def fallback():
        pytest.fail("the patched attention fell back to sdpa")
    monkeypatch.setattr(hf_integration, "_sdpa_fallback", fallback)


def attention_ops(rec):
    return {name for name, _ in rec.calls if "attention" in name}


def padded_batch(lengths, seqlen, side):
    ids = torch.randint(1, VOCAB, (len(lengths), seqlen))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, seqlen - n:] = 1
        else:
            mask[row, :n] = 1
    return ids.masked_fill(mask == 0, 0), mask


def real_logits_and_grads(model, ids, mask, weights):
    """Logits of the real tokens, and the gradients of a loss that reads only those."""
    model.zero_grad(set_to_none=True)
    logits = model(ids, attention_mask=mask).logits
    real = logits[mask.bool()]  # (real tokens, vocab)
    (real * weights.to(real.dtype)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return {"logits": real.detach(), **grads}


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_runs_varlen_and_matches_hf(unpatched_rotary, no_fallback, side):
    """Rows of different lengths, padded left or right: the real tokens' logits and the
    gradients match HF's, and every attention call (forward and backward) is the varlen one."""
    hf = tiny_hf()
    ids, mask = padded_batch([13, 6, 9], 13, side)
    weights = torch.randn(int(mask.sum()), VOCAB, dtype=torch.float64)
    exact, baseline = references(hf, lambda m: real_logits_and_grads(m, ids, mask, weights))
    patched = patch_llama(copy.deepcopy(hf))
    with OpRecorder() as rec:
        out = real_logits_and_grads(patched, ids, mask, weights)
    assert attention_ops(rec) == {"flash_attention_varlen_fwd", "flash_attention_varlen_bwd"}
    check_rule(out, exact, baseline, f"{side}-padded")


def test_left_padded_generation_decodes_through_varlen(unpatched_rotary, no_fallback):
    """Batched greedy generation from left-padded prompts: prefill and every decode step (one
    query per row against a padded KV cache) go through flash_attention_varlen; the tokens are
    HF's."""
    hf = tiny_hf()
    ids, mask = padded_batch([11, 4, 7], 11, "left")
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                  eos_token_id=None)
    expected = hf.generate(ids, **kwargs)
    patched = patch_llama(copy.deepcopy(hf))
    with OpRecorder() as rec:
        tokens = patched.generate(ids, **kwargs)
    assert tokens.tolist() == expected.tolist()
    q_rows = [shape[0] for name, shape in rec.calls if name == "flash_attention_varlen_fwd"]
    layers = hf.config.num_hidden_layers
    assert q_rows == [22] * layers + [3] * (4 * layers)  # 11 + 4 + 7 real prompt tokens
    assert attention_ops(rec) == {"flash_attention_varlen_fwd"}


def test_packed_by_position_ids_runs_varlen_and_matches_each_sequence(unpatched_rotary,
                                                                      no_fallback):
    """Two rows, each packing several documents (position_ids restart inside the row, no
    cu_seq_lens keywords; no cache, as in training: transformers reads packing only then):
    each document's logits are its logits alone."""
    hf = tiny_hf()
    rows = [[5, 8, 3], [9, 7]]  # 16 tokens per row
    docs = [[torch.randint(0, VOCAB, (1, n)) for n in row] for row in rows]
    exact, baseline = references(hf, lambda m: [[m(d).logits[0].detach() for d in row]
                                                 for row in docs])
    ids = torch.cat([torch.cat(row, 1) for row in docs])
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])
    patched = patch_llama(copy.deepcopy(hf))
    with OpRecorder() as rec, torch.no_grad():
        logits = patched(ids, position_ids=position_ids, use_cache=False).logits
    assert attention_ops(rec) == {"flash_attention_varlen_fwd"}
    for r, row in enumerate(rows):
        start = 0
        for d, n in enumerate(row):
            check_rule(logits[r, start:start + n], exact[r][d], baseline[r][d], f"doc {r}.{d}")
            start += n


def test_mask_the_kernels_cannot_express_goes_to_sdpa(unpatched_rotary, monkeypatch):
    """A custom 4-D mask (a bidirectional prefix, then causal) is not causal-with-padding: the
    patched attention must hand it to sdpa, whose answer is HF's."""
    hf = tiny_hf()
    seqlen, prefix = 10, 4
    allowed = torch.ones(seqlen, seqlen).tril().bool()
    allowed[:prefix, :prefix] = True
    mask = allowed.expand(2, 1, seqlen, seqlen)
    ids = torch.randint(0, VOCAB, (2, seqlen))
    exact, baseline = references(hf, lambda m: m(ids, attention_mask=mask).logits.detach())
    patched = patch_llama(copy.deepcopy(hf))
    calls = []
    sdpa = hf_integration._sdpa_fallback()
    monkeypatch.setattr(hf_integration, "_sdpa_fallback",
                        lambda: calls.append(1) or sdpa)
    with torch.no_grad():
        logits = patched(ids, attention_mask=mask).logits
    assert len(calls) == hf.config.num_hidden_layers
    check_rule(logits, exact, baseline, "prefix-LM mask")


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("how", ["keyword", "config"])
def test_output_attentions_returns_eager_weights(unpatched_rotary, how, side):
    """output_attentions=True on a patched model returns the weights of the unpatched eager
    model (padded batch, so the mask is honoured too), and the switch back works."""
    hf = tiny_hf()
    ids, mask = padded_batch([12, 7], 12, side)

    def weights(model):
        model.set_attn_implementation("eager")
        if how == "config":
            model.config.output_attentions = True
            return [a.detach() for a in model(ids, attention_mask=mask).attentions]
        return [a.detach() for a in model(ids, attention_mask=mask,
                                          output_attentions=True).attentions]
    exact, baseline = references(hf, weights)
    if any(torch.isnan(e).any() for e in exact):
        # HF's eager in fp64: a left-padding query sees no key, its fp64 mask minimum turns
        # -inf in the fp32 softmax, and the NaN row reaches every token of the next layer. The
        # fp32 eager model is then the answer (the rule's fp32 case: eager is the reference).
        exact = baseline
    model = copy.deepcopy(hf)
    if how == "config":  # transformers accepts the config flag only on an eager model
        model.set_attn_implementation("eager")
        model.config.output_attentions = True
    patched = patch_llama(model)
    previous = "eager" if how == "config" else "sdpa"
    assert patched._llama_kernels_previous_attn == previous
    if how == "config":
        attentions = patched(ids, attention_mask=mask).attentions
    else:
        attentions = patched(ids, attention_mask=mask, output_attentions=True).attentions
    assert len(attentions) == hf.config.num_hidden_layers
    real = mask.bool()  # the rows of padding queries are not compared
    for layer, (w, e, b) in enumerate(zip(attentions, exact, baseline)):
        assert w.shape == (2, 4, 12, 12)
        pick = lambda t: t.transpose(1, 2)[real]  # (real queries, heads, keys)
        check_rule(pick(w), pick(e), pick(b), f"layer {layer} weights")
    patched.set_attn_implementation(patched._llama_kernels_previous_attn)
    assert patched.config._attn_implementation == previous


def causal_lm_loss_and_grads(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return {"loss": out.loss.detach(), **grads}, out.logits


def trunk_exact_loss(model, ids, labels, items=None):
    """HF's causal-LM loss in fp64 from the model's own last hidden states and LM head."""
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state.double()  # (B, S, dim)
        logits = hidden @ model.lm_head.weight.double().T  # (B, S, vocab)
    target = F.pad(labels, (0, 1), value=-100)[:, 1:]
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(),
                           reduction="mean" if items is None else "sum")
    return loss if items is None else loss / items


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("items", [None, 37], ids=["mean", "num_items_in_batch"])
def test_cross_entropy_loss_and_gradients_match_hf(unpatched_rotary, dtype, items):
    """cross_entropy=True: HF's causal-LM loss (labels shifted, -100 ignored, the mean or the
    sum over num_items_in_batch) and its gradients, through linear_cross_entropy, never
    calling the LM head; logits None with labels, HF's own without."""
    hf = tiny_hf()
    ids = torch.randint(0, VOCAB, (2, 14))
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that is not trained on
    labels[1, 9] = -100
    kwargs = {} if items is None else {"num_items_in_batch": torch.tensor(items)}
    exact, baseline = references(
        hf, lambda m: causal_lm_loss_and_grads(m, ids, labels, **kwargs)[0], dtype)
    model = copy.deepcopy(hf).to(dtype)
    # The loss is one number, one draw of eager's rounding, which may happen to cancel: it may
    # also be as far from the exact answer as the loss of the dtype's own last hidden states,
    # computed exactly (the error of the trunk it reads), whichever is farther.
    trunk = trunk_exact_loss(model, ids, labels, items).float()
    if (trunk - exact["loss"]).abs() > (baseline["loss"] - exact["loss"]).abs():
        baseline["loss"] = trunk
    with torch.no_grad():
        plain_logits = model(ids).logits
    patch_llama(model, norm=False, mlp=False, attention=False, rotary=False, cross_entropy=True)

    def lm_head_called(*_):
        pytest.fail("the LM head ran: the logits were materialized")
    hook = model.lm_head.register_forward_hook(lm_head_called)
    with OpRecorder() as rec:
        out, logits = causal_lm_loss_and_grads(model, ids, labels, **kwargs)
    hook.remove()
    assert logits is None
    assert {"linear_cross_entropy_fwd"} <= {name for name, _ in rec.calls}
    check_rule(out, exact, baseline, f"{dtype} loss and gradients")
    with torch.no_grad():  # without labels: the unpatched logits, exactly
        torch.testing.assert_close(model(ids).logits, plain_logits, rtol=0, atol=0)


def test_cross_entropy_bad_combinations_error_clearly():
    hf = tiny_hf()
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        patch_llama(copy.deepcopy(hf.model), cross_entropy=True)
    custom = copy.deepcopy(hf)
    custom.loss_function = lambda *a, **k: torch.zeros(())
    with pytest.raises(ValueError, match="ForCausalLMLoss"):
        patch_llama(custom, cross_entropy=True)
    model = patch_llama(copy.deepcopy(hf), cross_entropy=True)
    ids = torch.randint(0, VOCAB, (2, 6))
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, labels=ids, logits_to_keep=1)
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=ids[:, :4])
    assert model(ids, logits_to_keep=1).logits.shape == (2, 1, VOCAB)  # no labels: HF's forward
