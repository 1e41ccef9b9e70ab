"""The benchmark's physics: byte and FLOP counts against hand counts, and the rule that a
variant whose output is wrong is reported as failed, never timed."""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks import cases as C
from benchmarks import counts
from benchmarks.__main__ import run_case
from benchmarks.harness import Ceilings
from llama_kernels import reference


def test_row_op_bytes_by_hand():
    # 3 rows of 5 bf16: x read + y written (2*3*5*2 = 60), w read (10), fp32 rstd (12)
    assert counts.rms_norm_bytes(3, 5, 2, "fwd") == 82
    # dy, x read and dx written (90), w read and dw written (20), rstd read (12)
    assert counts.rms_norm_bytes(3, 5, 2, "bwd") == 122
    assert counts.rms_norm_bytes(3, 5, 2, "fwd+bwd") == 82 + 122
    # x, residual read, y, h written (120), w (10), rstd (12)
    assert counts.add_rms_norm_bytes(3, 5, 2, "fwd") == 142
    assert counts.swiglu_bytes(4, 10, 2, "fwd") == 3 * 40 * 2
    assert counts.swiglu_bytes(4, 10, 2, "bwd") == 5 * 40 * 2
    # 6 tokens x 2 heads x 8 dims bf16 read and written (384) + cos, sin: 6 rows x 4 fp32 (192)
    assert counts.rotary_bytes(6, 2, 8, 2, 6, "fwd") == 384 + 192


def test_attention_flops_by_hand():
    # causal 4 x 4: 1 + 2 + 3 + 4 = 10 visible scores; 2 matmuls x 2 FLOPs x D each
    assert counts.attention_flops(1, 4, 4, 1, 8, causal=True) == 4 * 8 * 10
    assert counts.attention_flops(2, 4, 4, 3, 8, causal=False) == 4 * 8 * 16 * 2 * 3
    assert counts.attention_flops(1, 4, 4, 1, 8, causal=True, backward=True) == 2.5 * 320
    # decoding 1 query against 7 cached keys sees all 7
    assert counts.attention_flops(1, 1, 7, 1, 8, causal=True) == 4 * 8 * 7
    # q (2x3x4 heads) and out read/written, k and v (2x5x2 heads), head_dim 8, fp16
    assert counts.attention_kv_bytes(2, 3, 5, 4, 2, 8, 2) == (2 * 24 + 2 * 20) * 8 * 2


def _case(impls):
    return C.Case("swiglu", "test", 12, impls,
                  lambda: [torch.randn(3, 4), torch.randn(3, 4)], reference.swiglu,
                  bytes_fn=lambda d: counts.swiglu_bytes(3, 4, 4, d), directions=("fwd",))


def test_wrong_variant_is_reported_not_timed():
    right = lambda g, u: reference.swiglu(g, u)  # noqa: E731
    wrong = lambda g, u: reference.swiglu(g, u) * 1.01  # noqa: E731
    case = _case({"right": right, "wrong": wrong})
    inputs = case.make_inputs()
    assert C.check_output(case, right, inputs) is None
    assert "max error" in C.check_output(case, wrong, inputs)
    rows = {r["impl"]: r for r in run_case(case, Ceilings(1e3, 1e3), quick=True)}
    assert rows["right"]["ms"] > 0 and "error" not in rows["right"]
    assert "not timed" in rows["wrong"]["error"] and "ms" not in rows["wrong"]


def test_model_flops_counts_every_linear_weight():
    from benchmarks.model_bench import model_flops
    from llama_kernels.model import ModelArgs, Transformer

    args = ModelArgs.from_name("tiny")
    with torch.device("meta"):
        model = Transformer(args)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    # one token: 2 FLOPs per linear weight, and attention to itself (4 * head_dim per head)
    one = 2 * linear + args.n_layers * 4 * args.head_dim * args.n_heads
    assert model_flops(args, 1, 1, backward=False) == one
    assert model_flops(args, 1, 1, backward=True) == 3 * one
    # 7B: about 2 x 6.5B non-embedding weights FLOPs per token forward, as the paper's 6ND rule
    seven = ModelArgs.from_name("7B")
    per_token = model_flops(seven, 1, 1, backward=False)
    assert 2 * 6.6e9 < per_token < 2 * 6.8e9


def test_triton_copy_of_the_copy_ceiling_copies():
    """The Triton stream the copy ceiling times copies every element, ragged tail included."""
    from benchmarks import harness

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton cannot run here")
    src = torch.randn(3 * harness.COPY_BLOCK + 17, device="cuda" if harness.GPU else "cpu")
    dst = torch.full_like(src, float("nan"))
    harness._triton_copy()(dst, src)
    assert torch.equal(dst, src)


def test_flex_attention_peer_is_bottom_right_causal_gqa():
    """The FlexAttention peer computes the same attention as ours (bottom-right causal mask,
    grouped kv heads), so its row in the benchmark compares like with like."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    flex = C._flex()
    for sq, sk, hq, hkv in ((5, 40, 4, 1), (33, 33, 4, 2)):
        q = torch.randn(1, sq, hq, 16, device=device)
        k, v = (torch.randn(1, sk, hkv, 16, device=device) for _ in range(2))
        torch.testing.assert_close(flex(q, k, v), reference.attention(q, k, v),
                                   rtol=1e-4, atol=1e-5)


def test_packed_cached_and_loss_counts_by_hand():
    # documents of 4, 0 and 2 tokens, causal: 1+2+3+4 and 1+2 visible scores, none for the
    # empty one; 2 matmuls x 2 FLOPs x head_dim 8 x 3 heads each
    assert counts.varlen_attention_flops([4, 0, 2], 3, 8, causal=True) == 13 * 4 * 8 * 3
    assert counts.varlen_attention_flops([4, 0, 2], 3, 8, causal=False) == 20 * 4 * 8 * 3
    assert counts.varlen_attention_flops([4, 0, 2], 3, 8, causal=True,
                                         backward=True) == 2.5 * 13 * 4 * 8 * 3
    # 2 sequences with 3 and 5 cached tokens, 1 new, 4/2 heads of 8, fp16: q read + out written
    # (2 x 2 x 4 x 8 x 2 = 256), new k, v read and written (4 x 2 x 2 x 8 x 2 = 256), the cached
    # K and V of 3 + 5 tokens (2 x 8 x 2 x 8 x 2 = 512), whatever the padded or pooled size
    assert counts.kvcache_decode_bytes([3, 5], 1, 4, 2, 8, 2) == 256 + 256 + 512
    # 3 tokens, vocab 5, dim 7: logits 2 x 105; dx and dW 4 x 105
    assert counts.linear_cross_entropy_flops(3, 5, 7, "fwd") == 210
    assert counts.linear_cross_entropy_flops(3, 5, 7, "fwd+bwd") == 630


def test_packed_and_cache_lengths_are_seeded():
    lengths = C.doc_lengths(8, 16384, seed=0)
    assert len(lengths) == 8 and sum(lengths) == 16384 and min(lengths) > 0
    assert C.doc_lengths(8, 16384, seed=0) == lengths != C.doc_lengths(8, 16384, seed=1)
    assert len(set(lengths)) > 1  # ragged, not 8 x 2048
    cache = C.cache_lengths(64, 100, 4000, seed=0)
    assert len(cache) == 64 and 100 <= min(cache) < max(cache) <= 4000
    assert C.cache_lengths(64, 100, 4000, seed=0) == cache


def _tiny_new_cases(notes):
    """Issue 14's and 16's cases at tiny shapes: the same builders and peers as on a GPU."""
    bf16, cpu = torch.bfloat16, torch.device("cpu")
    cases = C.varlen_cases(["torch"], bf16, cpu, notes, docs=3, total=48, heads=2, head_dim=16)
    cases += C.kvcache_cases(["torch"], bf16, cpu, notes, batch=3, lengths=(5, 40), heads=4,
                             kv_heads=2, head_dim=16, seed=3)
    cases += C.cross_entropy_cases(["torch"], bf16, cpu, notes, tokens=24, dim=32,
                                   vocabs=(50,))
    for case in cases:  # compiling takes minutes on a CPU; the main run drops it there too
        case.impls.pop("torch.compile", None)
    return cases


def test_packed_cached_and_loss_rows_build_and_check_on_cpu():
    """Every peer of the new rows computes the op's answer (the output check runs before any
    timing, so a wrong padding mask, block table or GQA grouping is an error row here), and
    each row carries the figure its table reports."""
    notes = []
    cases = _tiny_new_cases(notes)
    by_shape = {}
    for case in cases:
        for r in run_case(case, Ceilings(1e3, 1e3), quick=True):
            assert "error" not in r, (case.shape, r["impl"], r["error"])
            by_shape.setdefault(case.shape.split()[0], []).append(r)
    packed, dense, decode, dense_decode, loss = (by_shape[k] for k in (
        "packed", "dense", "decode", "decode-dense", "7B"))
    assert {(r["impl"], r["direction"]) for r in packed} == {
        (i, d) for i in ("ours[torch]", "sdpa-padded-mask", "sdpa-padded-causal")
        for d in ("fwd", "fwd+bwd")}
    assert {r["impl"] for r in dense} == {"ours[torch]"} and all("tflops" in r for r in dense)
    assert {r["impl"] for r in decode} == {"ours[torch] paged-16", "ours[torch] contiguous",
                                           "sdpa-padded"}
    lens = C.cache_lengths(3, 5, 40, seed=3)
    kv_bytes = counts.kvcache_decode_bytes(lens, 1, 4, 2, 16, 2)
    for r in decode + dense_decode:
        assert r["direction"] == "fwd" and r["gbps"] > 0
    r = decode[0]
    assert r["gbps"] == pytest.approx(kv_bytes / (r["ms"] * 1e-3) / 1e9)
    assert {r["impl"] for r in loss} == {"ours[torch]", "eager"}
    assert all(r["direction"] == "fwd+bwd" and r["tflops"] > 0 for r in loss)
    if C.FLASH_ATTN is None:
        assert C.FLASH_ATTN_MISSING in notes
    if C.LIGER_FLCE is None:
        assert any("LigerFusedLinearCrossEntropyLoss" in n for n in notes)


def test_packed_peer_with_a_leaking_mask_is_caught():
    """The output check the rows rely on fails a padded peer that lets a query see the next
    document (what a mask built from the wrong lengths does)."""
    case = _tiny_new_cases([])[0]
    inputs = case.make_inputs()

    def leaky(q, k, v, cu, *padded):  # one causal sequence over the whole packed row
        return reference.attention(q[None], k[None], v[None])[0]

    assert C.check_output(case, case.impls["sdpa-padded-causal"], inputs) is None
    assert "max error" in C.check_output(case, leaky, inputs)


def test_memory_ratio_is_peak_over_eager_in_the_same_direction():
    from benchmarks.__main__ import _memory_vs_eager

    rows = [{"impl": "eager", "direction": "fwd+bwd", "peak_mem_mb": 400.0},
            {"impl": "ours[triton]", "direction": "fwd+bwd", "peak_mem_mb": 100.0},
            {"impl": "ours[triton]", "direction": "fwd", "peak_mem_mb": 50.0},
            {"impl": "liger", "direction": "fwd+bwd", "error": "not timed"}]
    _memory_vs_eager(rows)
    assert rows[0]["mem_vs_eager"] == 1.0 and rows[1]["mem_vs_eager"] == 0.25
    assert "mem_vs_eager" not in rows[2] and "mem_vs_eager" not in rows[3]


def test_full_run_ops_are_out_of_quick_unless_named():
    from benchmarks.__main__ import FULL_RUN_OPS, parse_args

    assert not set(FULL_RUN_OPS) & set(parse_args(["--quick"]).ops)
    assert set(FULL_RUN_OPS) <= set(parse_args([]).ops)
    assert parse_args(["--quick", "--ops", "linear_cross_entropy"]).ops == ["linear_cross_entropy"]
