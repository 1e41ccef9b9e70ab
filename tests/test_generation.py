"""The decode step that a CUDA graph captures: on the CPU, that it gives the tokens of a plain
eager loop (greedy and seeded sampling, ragged prompts, eos), that it reads no device value on
the host, and that torch.compile traces it whole; on a GPU, that capture and replay (and
torch.compile's reduce-overhead mode) give the eager tokens without a host sync."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch

from helpers import GPU, INTERPRET
from llama_kernels import available_backends, use_backend
from llama_kernels.layers import RaggedBatch
from llama_kernels.model import DecodeStep, ModelArgs, Transformer, sample_tokens

needs_gpu = pytest.mark.skipif(not GPU, reason="CUDA graph capture needs a GPU (gpu_check runs "
                                               "these)")
# Reading a device value on the host: what a CUDA graph cannot capture.
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


def tiny(device="cpu") -> Transformer:
    """Weights large enough that greedy decoding is not decided by rounding-level ties."""
    with torch.device(device):
        model = Transformer(ModelArgs.from_name("tiny"))
    model.init_weights(std=0.3)
    return model


def prompts_of(*lengths: int) -> list[list[int]]:
    return [torch.randint(0, 256, (n,)).tolist() for n in lengths]


def eager_loop(model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, generator=None,
               eos_id=None) -> list[list[int]]:
    """The plain loop the decode step replaces: packed prefill, then a Python loop of cached
    forwards, sampling with the generator, the lengths advanced after each forward."""
    device = model.tok_embeddings.weight.device
    model.setup_cache(len(prompts), max(map(len, prompts)) + max_new_tokens)
    try:
        batch = RaggedBatch.prefill([len(p) for p in prompts], device)
        packed = torch.tensor([t for p in prompts for t in p], device=device)[None]
        logits = model(packed, batch=batch)[:, -1]
        batch = RaggedBatch(batch.cu_seqlens.diff().to(torch.int32))
        out = []
        for step in range(max_new_tokens):
            token = sample_tokens(logits, temperature, top_p, generator)
            out.append(token)
            if step == max_new_tokens - 1:
                break
            logits = model(token[:, None], batch=batch)[:, -1]
            batch.cache_seqlens += 1
    finally:
        model.clear_cache()
    seqs = torch.stack(out, 1).tolist()
    if eos_id is not None:
        seqs = [s[:s.index(eos_id)] if eos_id in s else s for s in seqs]
    return seqs


@contextlib.contextmanager
def no_host_reads():
    """Every way of reading a tensor's value on the host raises, and the ops' value checks
    (which read cache_seqlens, and are skipped while torch.compile traces or a CUDA graph is
    captured) are skipped as they are under capture."""
    def host_read(*args, **kwargs):
        raise AssertionError("a device value was read on the host inside the decode step")

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch("torch.compiler.is_compiling", lambda: True))
        for name in HOST_READS:
            stack.enter_context(mock.patch.object(torch.Tensor, name, host_read))
        yield


def started_step(model, prompts, max_new_tokens, **kwargs) -> DecodeStep:
    """A DecodeStep after the prefill of ``prompts`` (the cache must be set up)."""
    batch = RaggedBatch.prefill([len(p) for p in prompts], torch.device("cpu"))
    logits = model(torch.tensor([[t for p in prompts for t in p]]), batch=batch)[:, -1]
    step = DecodeStep(model, batch.cu_seqlens.diff().to(torch.int32), max_new_tokens, **kwargs)
    step.start(logits.argmax(-1))
    return step


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_decode_step_gives_the_eager_loops_tokens(sampling):
    model = tiny()
    prompts = prompts_of(7, 1, 12, 3)
    kwargs = {} if sampling == "greedy" else dict(temperature=0.9, top_p=0.8)

    def gen(seed):
        return None if sampling == "greedy" else torch.Generator().manual_seed(seed)

    want = eager_loop(model, prompts, 9, generator=gen(3), **kwargs)
    got = model.generate(prompts, 9, generator=gen(3), cuda_graph=False, **kwargs)
    assert got == want
    if sampling == "seeded":
        assert got != eager_loop(model, prompts, 9, generator=gen(4), **kwargs)
    # A sequence that stops keeps stepping with the others; its tokens past eos are dropped.
    eos = want[0][2]
    cut = [s[:s.index(eos)] if eos in s else s for s in want]
    for check_every in (1, 4, 100):
        assert model.generate(prompts, 9, generator=gen(3), eos_id=eos, cuda_graph=False,
                              check_every=check_every, **kwargs) == cut
    assert not model.has_cache


def test_decode_step_state_advances_in_place():
    """The state tensors keep their storage (a graph replays fixed addresses) and advance by
    one token per step; a stopped sequence stays stopped."""
    model = tiny()
    prompts = prompts_of(5, 2)
    model.setup_cache(2, 16)
    step = started_step(model, prompts, 6, eos_id=7)
    ptrs = [t.data_ptr() for t in step._state()]
    step.tokens[1, 0] = 7
    step.stopped[1] = True
    for _ in range(3):
        step()
    assert [t.data_ptr() for t in step._state()] == ptrs
    assert step.cache_seqlens.tolist() == [8, 5]
    assert step.index.tolist() == [4]
    assert bool(step.stopped[1])
    assert step.token.tolist() == step.tokens[:, 3].tolist()
    model.clear_cache()


@pytest.mark.skipif(not INTERPRET and not GPU, reason="the triton backend needs a GPU or "
                                                      "TRITON_INTERPRET=1")
@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_decode_step_reads_no_device_value_on_the_host(sampling):
    """The step (model, cached attention, sampling, state update) runs with every host read of a
    tensor patched to raise, on the triton backend (the one a GPU decodes with); the torch
    backend's cached attention, which loops over the lengths on the host, trips the check."""
    if available_backends()["triton"] is not None:
        pytest.skip(f"triton backend: {available_backends()['triton']}")
    model = tiny()
    prompts = prompts_of(4, 9, 1)
    model.setup_cache(3, 20)
    kwargs = dict(temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0),
                  eos_id=5) if sampling == "seeded" else dict(eos_id=5)
    step = started_step(model, prompts, 8, **kwargs)
    with use_backend("triton"):
        with no_host_reads():
            step()
            step()
        assert step.cache_seqlens.tolist() == [6, 11, 3]
        with pytest.raises(AssertionError, match="host"), mock.patch.object(
                torch.Tensor, "tolist", lambda *a: (_ for _ in ()).throw(AssertionError("host"))):
            step()  # the ops' value checks outside capture: a host read, caught
    with use_backend("torch"), no_host_reads(), pytest.raises(AssertionError, match="host"):
        step()
    model.clear_cache()


def test_decode_step_traces_whole_under_torch_compile():
    """``fullgraph=True`` fails on a graph break, which any host read of a device value or
    branch on one would cause: the step's pure part is one graph (as reduce-overhead needs)."""
    model = tiny()
    prompts = prompts_of(6, 3)
    model.setup_cache(2, 16)
    step = started_step(model, prompts, 4, temperature=0.8, top_p=0.9)
    compiled = torch.compile(step.next_token, backend="aot_eager", fullgraph=True)
    noise = torch.empty(2, model.args.vocab_size).exponential_()
    got = compiled(step.token, step.cache_seqlens, noise)
    want = step.next_token(step.token, step.cache_seqlens, noise)  # rewrites the same rows
    assert got.tolist() == want.tolist()
    model.clear_cache()


def test_warm_up_before_capture_leaves_the_results_unchanged():
    """Capture is preceded by warm-up steps on the live state and cache: they must leave both
    as the next real step needs them."""
    model = tiny()
    prompts = prompts_of(6, 3, 9)
    want = eager_loop(model, prompts, 6, temperature=0.9, top_p=0.9,
                      generator=torch.Generator().manual_seed(5))
    model.setup_cache(3, 15)
    generator = torch.Generator().manual_seed(5)
    batch = RaggedBatch.prefill([len(p) for p in prompts], torch.device("cpu"))
    logits = model(torch.tensor([[t for p in prompts for t in p]]), batch=batch)[:, -1]
    first = sample_tokens(logits, 0.9, 0.9, generator)
    step = DecodeStep(model, batch.cu_seqlens.diff().to(torch.int32), 6, 0.9, 0.9,
                      generator=generator)
    step.start(first)
    step.noise.exponential_(1.0, generator=torch.Generator().manual_seed(99))  # other draws
    step.warm_up(3)
    for _ in range(5):
        step()
    assert step.tokens.tolist() == want
    model.clear_cache()


def test_compiled_step_logic_on_cpu():
    """``compile_step=True`` through dynamo with a CPU-cheap backend (inductor would compile C++
    for minutes here): whole-graph tracing, and the state advanced around the compiled call."""
    model = tiny()
    prompts = prompts_of(5, 8)
    want = model.generate(prompts, 6, 0.8, 0.9, generator=torch.Generator().manual_seed(1))
    compile_ = torch.compile

    def cheap_compile(fn, **kwargs):
        assert kwargs == {"mode": "reduce-overhead", "fullgraph": True}
        return compile_(fn, backend="aot_eager", fullgraph=True)

    with mock.patch("torch.compile", cheap_compile):
        got = model.generate(prompts, 6, 0.8, 0.9, generator=torch.Generator().manual_seed(1),
                             compile_step=True)
    assert got == want


def test_benchmark_compile_baseline_decodes_like_ours():
    """model_bench's torch.compile baseline (torch ops, static cache, SDPA over a mask) is a
    fair one: on the same weights and cache it picks the tokens our decode step picks."""
    from benchmarks.model_bench import _torch_decode_step

    model = tiny().eval()
    model.setup_cache(3, 64)
    for layer in model.layers:
        layer.attention.cache_k.normal_()
        layer.attention.cache_v.normal_()
    lengths = torch.tensor([10, 20, 5], dtype=torch.int32)
    token = torch.randint(0, 256, (3,))
    with torch.no_grad():
        want = _torch_decode_step(model)(token, lengths.long())
        step = DecodeStep(model, lengths, 4)
        step.start(token)
        step()
    assert step.token.tolist() == want.tolist()
    model.clear_cache()


def test_cuda_graph_needs_a_gpu():
    model = tiny()
    if not GPU:
        with pytest.raises(ValueError, match="cuda_graph"):
            model.generate([1, 2, 3], 4, cuda_graph=True)
    with pytest.raises(ValueError, match="pick one"):
        model.generate([1, 2, 3], 4, cuda_graph=True, compile_step=True)
    with pytest.raises(ValueError, match="mode"):
        DecodeStep(model, torch.zeros(1, dtype=torch.int32), 4, mode="jit")


# ---- on a GPU ----------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_cuda_graph_generation_equals_eager(sampling):
    model = tiny("cuda")
    prompts = prompts_of(7, 1, 12, 3)
    kwargs = {} if sampling == "greedy" else dict(temperature=0.9, top_p=0.8)

    def gen():
        return None if sampling == "greedy" else torch.Generator("cuda").manual_seed(11)

    eager = model.generate(prompts, 12, generator=gen(), cuda_graph=False, **kwargs)
    assert model.generate(prompts, 12, generator=gen(), cuda_graph=True, **kwargs) == eager
    assert model.generate(prompts, 12, generator=gen(), **kwargs) == eager  # the default
    assert eager == eager_loop(model, prompts, 12, generator=gen(), **kwargs)
    eos = eager[0][3]
    cut = [s[:s.index(eos)] if eos in s else s for s in eager]
    assert model.generate(prompts, 12, generator=gen(), eos_id=eos, cuda_graph=True,
                          **kwargs) == cut


@needs_gpu
def test_cuda_graph_replay_does_not_sync():
    """Capture itself fails on a host sync; replays (and the noise draws between them) run with
    the sync debug mode set to raise."""
    model = tiny("cuda")
    prompts = prompts_of(5, 9)
    model.setup_cache(2, 32)
    batch = RaggedBatch.prefill([5, 9], torch.device("cuda"))
    logits = model(torch.tensor([[t for p in prompts for t in p]], device="cuda"),
                   batch=batch)[:, -1]
    step = DecodeStep(model, batch.cu_seqlens.diff().to(torch.int32), 10, 0.8, 0.9,
                      generator=torch.Generator("cuda").manual_seed(0), mode="graph")
    step.start(logits.argmax(-1))
    assert step.graph is not None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert step.cache_seqlens.tolist() == [9, 13]
    model.clear_cache()


@needs_gpu
def test_compiled_step_equals_eager():
    model = tiny("cuda")
    prompts = prompts_of(6, 2)
    eager = model.generate(prompts, 8, cuda_graph=False)
    assert model.generate(prompts, 8, compile_step=True) == eager
