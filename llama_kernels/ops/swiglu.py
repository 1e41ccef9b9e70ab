"""SwiGLU as torch.library ops with autograd, one impl per backend.

Registered ops (``backend`` already resolved):
    swiglu_fwd(gate, up, backend) -> out                    # silu(gate) * up
    swiglu_bwd(dout, gate, up, backend) -> (dgate, dup)
Kernels see rows: 2-D (rows, cols) tensors with unit stride along cols and any row stride, so
gate and up may be the two halves of one fused projection without a copy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llama_kernels import reference
from llama_kernels.ops import _backend, _checks
from llama_kernels.ops.rms_norm import _rows


@torch.library.custom_op("llama_kernels::swiglu_fwd", mutates_args=())
def swiglu_fwd(gate: Tensor, up: Tensor, backend: str) -> Tensor:
    if backend == "cuda":
        out = _backend.cuda_op("swiglu_fwd_cuda")(_rows(gate), _rows(up))
    elif backend == "triton":
        out = _backend.triton_module("swiglu").swiglu_fwd(_rows(gate), _rows(up))
    else:
        return reference.swiglu(gate, up).contiguous()
    return out.view(gate.shape)


@swiglu_fwd.register_fake
def _(gate, up, backend):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("llama_kernels::swiglu_bwd", mutates_args=())
def swiglu_bwd(dout: Tensor, gate: Tensor, up: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    if backend == "cuda":
        dgate, dup = _backend.cuda_op("swiglu_bwd_cuda")(_rows(dout), _rows(gate), _rows(up))
    elif backend == "triton":
        dgate, dup = _backend.triton_module("swiglu").swiglu_bwd(
            _rows(dout), _rows(gate), _rows(up))
    else:
        return tuple(g.contiguous() for g in reference.swiglu_backward(dout, gate, up))
    return dgate.view(gate.shape), dup.view(up.shape)


@swiglu_bwd.register_fake
def _(dout, gate, up, backend):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup(ctx, inputs, output):
    gate, up, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.backend = backend


def _backward(ctx, dout):
    gate, up = ctx.saved_tensors
    dgate, dup = swiglu_bwd(dout, gate, up, ctx.backend)
    return dgate, dup, None


swiglu_fwd.register_autograd(_backward, setup_context=_setup)


def swiglu(gate: Tensor, up: Tensor, *, backend: str | None = None) -> Tensor:
    """``silu(gate) * up``; the paper's FFN is ``w2(swiglu(w1 x, w3 x))``."""
    _checks.check_tensor("gate", gate, min_ndim=1)
    _checks.check_tensor("up", up, min_ndim=1)
    if up.shape != gate.shape:
        raise ValueError(f"up: expected shape {tuple(gate.shape)} (that of gate), "
                         f"got {tuple(up.shape)}")
    _checks.check_same_device(gate=gate, up=up)
    _checks.check_same_dtype(gate=gate, up=up)
    name = _backend.resolve(backend, op="swiglu", device=gate.device,
                            cuda_kernel="swiglu_fwd_cuda", triton_module="swiglu")
    return swiglu_fwd(gate, up, name)
