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
