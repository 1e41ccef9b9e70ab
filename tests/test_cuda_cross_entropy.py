"""The CUDA backend of linear_cross_entropy.

On the host emulator (tests/cuda_emulator), through the header's launch path
(run_cross_entropy_chunk, the code csrc/cross_entropy.cu calls): the chunk kernel of
csrc/cross_entropy_kernels.cuh against fp32 torch on the same logits (the math of
reference.linear_cross_entropy after its matmul), by the rule of llama_kernels.testing (eager in
the logits' dtype sets the bound), for fp32 / fp16 / bf16, the scalar path (a vocabulary that is
not a whole number of vectors, or rows that are not 16-byte aligned) and the 16-byte path, one
and several steps of a block along the row, ignored rows (loss 0, dz 0), per-row and scalar
scales. The logits sit in row-strided views whose padding and surrounding rows are NaN: a read
outside a row shows in its loss, a write outside it in the padding; the loss comes back between
NaN guard bands (tests/cuda_emulator, cross_entropy_chunk). A target outside [0, vocab) gives
its row a NaN loss and reads nothing out of bounds (the emulator checks every access against the
registered spans, which end at the last row). Random warp schedules give bitwise-equal results.

On a GPU only: the whole linear_cross_entropy with backend="cuda" against reference.py
(check_fwd_bwd), with several chunks; without one those tests are skipped with the reason.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cuda_emulator as emu
import llama_kernels as lk
from helpers import GPU, assert_close
from llama_kernels import reference
from llama_kernels.ops import _backend
from llama_kernels.testing import check_fwd_bwd

OK, WHY = emu.available()
needs_emulator = pytest.mark.skipif(not OK, reason=f"CUDA emulator: {WHY}")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]
IGNORE = -100
MAX_THREADS = 256  # cross_entropy_kernels.cuh: kMaxThreads
ITEMS = 2  # kItems: vectors per thread per step


def _vec16(dtype) -> int:
    return 16 // torch.empty((), dtype=dtype).element_size()


def _padded_logits(rows, vocab, dtype, *, aligned=True, seed=0):
    """(buf, view): a (rows, vocab) view of 3 * randn logits inside a NaN buffer, one NaN row
    before and after and NaN padding after each row; the row stride keeps every row 16-byte
    aligned (aligned=True) or starts the view one element off (aligned=False)."""
    gen = torch.Generator().manual_seed(seed)
    vec = _vec16(dtype)
    stride = -(-(vocab + 1) // vec) * vec + vec  # at least one padding vector per row
    buf = torch.full(((rows + 2) * stride + vec,), float("nan"), dtype=dtype)
    start = stride + (0 if aligned else 1)
    view = buf[start:start + rows * stride].view(rows, stride)[:, :vocab]
    view.copy_(3 * torch.randn(rows, vocab, generator=gen))
    return buf, view


def _outside(buf: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """The elements of buf that are not in view (all of them NaN when nothing was written)."""
    mask = torch.ones(buf.shape, dtype=torch.bool)
    inside = torch.zeros(buf.shape, dtype=torch.bool)
    start = view.storage_offset() - buf.storage_offset()
    rows, vocab = view.shape
    for r in range(rows):
        inside[start + r * view.stride(0):start + r * view.stride(0) + vocab] = True
    return buf[mask & ~inside]


def _targets(rows, vocab, ignore_index=IGNORE, seed=0):
    gen = torch.Generator().manual_seed(seed + 1)
    t = torch.randint(0, vocab, (rows,), generator=gen)
    t[1] = ignore_index
    t[-1] = vocab - 1  # the last class: the row's last vector, in the last (partial) step
    t[0] = 0
    return t


def _expected(z: torch.Tensor, t: torch.Tensor, c: torch.Tensor, ignore_index: int):
    """(loss, dz) of logits z computed by torch in z's dtype (fp32 z: the fp32 answer); loss
    always fp32. dz = (softmax - onehot) * c, 0 where ignored."""
    valid = t != ignore_index
    loss = F.cross_entropy(z, t, ignore_index=ignore_index, reduction="none").float()
    dz = torch.softmax(z, -1)
    rows = valid.nonzero()[:, 0]
    dz[rows, t[rows]] -= 1
    c = torch.where(valid, c.float().expand(t.shape), 0.0)
    return loss, (dz * c.to(z.dtype)[:, None]).to(z.dtype)


def _check_chunk(z, t, c, ignore_index, *, write_grad, expect_vec, steps=None):
    z_in = z.clone()
    launch: dict = {}
    loss = emu.cross_entropy_chunk(z, t, c, ignore_index, write_grad, launch=launch)
    rows, vocab = z.shape
    assert launch["vec"] == expect_vec and launch["blocks"] == rows
    if steps is not None:  # vocabulary steps of a block along one row
        assert -(-vocab // (launch["vec"] * ITEMS * launch["threads"])) == steps
    ref_loss, ref_dz = _expected(z_in.float(), t, c, ignore_index)
    eager_loss, eager_dz = _expected(z_in, t, c, ignore_index)
    assert_close(loss, ref_loss, eager_loss.float(), name="loss")
    valid = t != ignore_index
    assert torch.equal(loss[~valid], torch.zeros_like(loss[~valid]))
    if write_grad:
        assert_close(z, ref_dz, eager_dz, name="dz")
        assert torch.equal(z[~valid].float(), torch.zeros_like(z[~valid]).float())
    else:
        assert torch.equal(z, z_in), "the loss-only pass changed the logits"


# ------------------------------------------------------------------------------ emulator


@needs_emulator
@pytest.mark.parametrize("write_grad", [False, True], ids=["loss", "grad"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab,path", [(1001, "scalar"), (40, "vector"), (4096, "vector"),
                                        (8200, "vector")])
def test_chunk_matches_reference(dtype, vocab, path, write_grad):
    """1001: not a whole number of vectors (scalar path, two steps of 256 threads); 40: one warp,
    one step; 4096: a whole number of steps for 16-bit types; 8200: a partial last step."""
    rows = 4
    buf, z = _padded_logits(rows, vocab, dtype)
    t = _targets(rows, vocab)
    c = torch.rand(rows) + 0.5
    expect_vec = 1 if path == "scalar" else _vec16(dtype)
    steps = -(-vocab // (expect_vec * ITEMS * MAX_THREADS)) if vocab > 1000 else 1
    _check_chunk(z, t, c, IGNORE, write_grad=write_grad, expect_vec=expect_vec, steps=steps)
    assert torch.isnan(_outside(buf, z)).all(), "the kernel wrote outside the rows"


@needs_emulator
@pytest.mark.parametrize("dtype", DTYPES)
def test_chunk_misaligned_rows_take_the_scalar_path(dtype):
    """A vocabulary of whole vectors whose rows do not start 16-byte aligned: scalar path, same
    answer (a vector access there would fault in the emulator)."""
    buf, z = _padded_logits(3, 96, dtype, aligned=False)
    t = _targets(3, 96)
    _check_chunk(z, t, torch.ones(()), IGNORE, write_grad=True, expect_vec=1)
    assert torch.isnan(_outside(buf, z)).all()


@needs_emulator
def test_chunk_scales_and_ignore_index_inside_vocab():
    """A scalar scale of inf (the "mean" of zero counted rows) reaches only ignored rows (dz 0,
    not NaN); an ignore_index that is a class; a per-row scale broadcast with stride 0."""
    rows, vocab = 5, 200
    _, z = _padded_logits(rows, vocab, torch.bfloat16)
    t = torch.full((rows,), 7)
    z_in = z.clone()
    loss = emu.cross_entropy_chunk(z, t, torch.tensor(float("inf")), 7, True)
    assert torch.equal(loss, torch.zeros(rows)) and torch.equal(z.float(), torch.zeros(rows, vocab))
    z.copy_(z_in)
    t = _targets(rows, vocab, ignore_index=7)
    t[3] = 7
    c = torch.tensor(0.25).expand(rows)
    assert c.stride(0) == 0
    _check_chunk(z, t, c, 7, write_grad=True, expect_vec=8)


@needs_emulator
@pytest.mark.parametrize("write_grad", [False, True], ids=["loss", "grad"])
def test_chunk_bad_target_gives_nan_without_reading_out_of_bounds(write_grad):
    """Targets past the end (vocab, 2**40) and below 0 (not ignore_index): those rows' losses are
    NaN, the others exact; the last row's bad target would read past the registered logits
    (the emulator fails the call on such an access) and a huge one far outside everything."""
    rows, vocab = 5, 64
    buf, z = _padded_logits(rows, vocab, torch.float16)
    t = torch.tensor([3, vocab, -1, 2 ** 40, vocab])
    z_in = z.clone()
    loss = emu.cross_entropy_chunk(z, t, torch.ones(()), IGNORE, write_grad)
    good = torch.tensor([True, False, False, False, False])
    assert torch.isnan(loss[~good]).all()
    torch.testing.assert_close(loss[good], F.cross_entropy(z_in[good].float(), t[good],
                                                           reduction="none"))
    assert torch.isnan(_outside(buf, z)).all()
    if write_grad:  # no onehot to subtract: the softmax itself, finite
        torch.testing.assert_close(z[~good].float(), torch.softmax(z_in[~good].float(), -1),
                                   rtol=0, atol=1e-3)


@needs_emulator
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_chunk_schedules_agree_bitwise(seed):
    """The block reduction's barriers: a random warp schedule gives the round-robin bits."""
    rows, vocab = 3, 2000
    _, z0 = _padded_logits(rows, vocab, torch.float16, seed=4)
    _, z1 = _padded_logits(rows, vocab, torch.float16, seed=4)
    t = _targets(rows, vocab)
    c = torch.ones(())
    loss0 = emu.cross_entropy_chunk(z0, t, c, IGNORE, True, schedule_seed=0)
    loss1 = emu.cross_entropy_chunk(z1, t, c, IGNORE, True, schedule_seed=seed)
    assert torch.equal(loss0, loss1) and torch.equal(z0, z1)


# ------------------------------------------------------------------------------ the op


@pytest.mark.skipif(_backend._EXTENSION is None, reason="the CUDA extension is not built")
def test_cuda_backend_refuses_cpu_tensors():
    x, w = torch.randn(3, 8), torch.randn(20, 8)
    t = torch.randint(0, 20, (3,))
    if "cross_entropy_chunk_cuda" not in _backend.CUDA_AVAILABLE_KERNELS:
        pytest.skip("the built extension predates cross_entropy_chunk_cuda; rebuild it")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        lk.linear_cross_entropy(x, w, t, backend="cuda")


needs_gpu = pytest.mark.skipif(
    not GPU or "cross_entropy_chunk_cuda" not in _backend.CUDA_AVAILABLE_KERNELS,
    reason="backend 'cuda' needs a GPU and the built extension (the kernel is proven on the "
           "emulator above)")


def _gpu_inputs(shape, dtype, vocab, exact):
    """As tests/test_linear_cross_entropy.py: random, or (exact) on a grid where every logit is
    exact in 16 bits, so the scalar reductions' check is deterministic."""
    dim = shape[-1]
    if exact:
        x = (torch.randint(-2, 3, shape, device="cuda") / 2).to(dtype)
        w = (torch.randint(-3, 4, (vocab, dim), device="cuda") / 4).to(dtype)
    else:
        x = torch.randn(shape, device="cuda").to(dtype)
        w = (3 * dim ** -0.5 * torch.randn(vocab, dim, device="cuda")).to(dtype)
    t = torch.randint(0, vocab, shape[:-1], device="cuda")
    t[torch.rand(t.shape, device="cuda") < 0.2] = IGNORE
    t.view(-1)[0] = vocab - 1
    return x, w, t


@needs_gpu
@pytest.mark.parametrize("vocab", [1001, 4104])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_cross_entropy_cuda_matches_reference(dtype, reduction, vocab):
    x, w, t = _gpu_inputs((2, 37, 64), dtype, vocab, exact=reduction != "none")
    check_fwd_bwd(
        lambda a, b, c: lk.linear_cross_entropy(a, b, c, reduction=reduction, backend="cuda"),
        lambda a, b, c, upcast: reference.linear_cross_entropy(a, b, c, reduction=reduction,
                                                               upcast=upcast),
        [x, w, t], grad_inputs=[0, 1])


@needs_gpu
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_cuda_launchers_many_chunks(reduction):
    """Chunks of 7 rows (the last partial): every chunk's losses and gradients, dweight summed
    over the chunks in fp32, against the torch backend."""
    from llama_kernels import cuda_cross_entropy as cce
    x, w, t = _gpu_inputs((61, 32), torch.bfloat16, 300, exact=True)
    kw = dict(ignore_index=IGNORE, grad_x=True, grad_weight=True)
    ops = torch.ops.llama_kernels
    if reduction == "sum":
        got = cce.linear_cross_entropy_fwd(x, w, t, reduction="sum", chunk_rows=7, **kw)
        want = ops.linear_cross_entropy_fwd(x, w, t, IGNORE, "sum", True, True, "torch")
    else:
        g = torch.rand(61, device="cuda")
        got = cce.linear_cross_entropy_bwd(g, x, w, t, chunk_rows=7, **kw)
        want = ops.linear_cross_entropy_bwd(g, x, w, t, IGNORE, True, True, "torch")
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@needs_gpu
def test_cuda_scale_rounds_once():
    from llama_kernels import cuda_cross_entropy as cce
    grad = torch.randn(3, 1000, device="cuda").to(torch.bfloat16)
    g = torch.tensor(1.0 + 2 ** -12, device="cuda")
    assert torch.equal(cce.scale(grad, g), (grad.float() * g).to(torch.bfloat16))
