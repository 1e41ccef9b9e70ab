"""The model under PyTorch's own distributed engine: FSDP2 and tensor (+ sequence) parallel.

    mesh = init_device_mesh("cuda", (dp, tp), mesh_dim_names=("dp", "tp"))
    parallelize_llama(model, mesh["tp"], sequence_parallel=True)   # tensor parallel first,
    shard_llama_fsdp(model, mesh["dp"], mp_policy=MixedPrecisionPolicy(torch.bfloat16,
                                                                       torch.float32))

Either call works alone (a 1-D mesh); ``examples/train_distributed.py`` launches both with
torchrun. Our ops are ``torch.library`` custom ops with no DTensor sharding rules: given a
DTensor they raise DTensor's ``NotImplementedError: Operator llama_kernels.<op> does not have a
sharding strategy registered``. So both wrappers hand them plain tensors:

- FSDP2 all-gathers each block's parameters into plain tensors before its forward.
- Tensor parallel (Megatron-LM's split): ``ColwiseParallel`` wq/wk/wv/w1/w3 and
  ``RowwiseParallel`` wo/w2 with local outputs, so rotary, flash attention and SwiGLU run on each
  rank's whole heads / FFN columns as plain tensors (``Attention`` reads its local head count
  from the projection width and sizes its KV cache by ``tp_size``). The embedding is split by
  vocabulary rows, the output projection by vocabulary columns (logits are gathered).
- The RMSNorms keep their weight as a replicated DTensor (so every parameter is a DTensor on the
  tp mesh, as gradient clipping, DCP and FSDP2 want) and compute on its local tensor
  (``TensorParallelRMSNorm``).

Sequence parallel (Korthikanti et al. 2022) shards the activations between the matmuls along the
sequence: the norms, the residual stream and the residual adds run on ``seqlen / tp`` tokens per
rank. torch's own ``SequenceParallel`` style cannot be used as it is: it passes on only the first
input of a module, and our norms take ``(delta, residual)`` (the residual add fused into the
norm, see ``layers.py``), and it would hand DTensors to our ops. The fusion suits sequence
parallel well, though: both halves of the pair are sequence shards, so ``add_rms_norm`` runs on
local shards unchanged and the residual stream never leaves its shard. Between modules the
activations are plain tensors holding this rank's sequence shard; attention and the FFN
all-gather the sequence once at their input and reduce-scatter it at their output (the reverse
in the backward). The norm weights see only local tokens, so their local gradients are partial
sums: the backward all-reduces them over the tp ranks (``_ReplicateGrad``), as Megatron-LM does.
Sequence parallel needs ``seqlen % tp == 0``, so one-token decoding needs
``sequence_parallel=False``.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import (DTensor, Partial, Placement, Replicate, Shard,
                                      distribute_module, distribute_tensor)
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle,
                                               PrepareModuleInput, RowwiseParallel,
                                               parallelize_module)

from llama_kernels.layers import RMSNorm
from llama_kernels.ops import add_rms_norm, rms_norm

SEQUENCE_DIM = 1  # activations are (batch, seqlen, dim)


class TensorParallelRMSNorm(RMSNorm):
    """An ``RMSNorm`` whose weight is a replicated DTensor, computed on plain local tensors.

    ``parallelize_llama`` turns the model's norms into this class in place (same parameter
    name, same state-dict key). Under sequence parallel each rank normalizes its own tokens, so
    the weight's local gradient is a partial sum, all-reduced in the backward; otherwise every
    rank sees every token and the local gradient is already the whole one.
    """

    sequence_parallel: bool = False

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        weight = self.weight
        if isinstance(weight, DTensor):
            if self.sequence_parallel:
                weight = _ReplicateGrad.apply(weight).to_local(grad_placements=(Partial(),))
            else:
                weight = weight.to_local(grad_placements=(Replicate(),))
        if residual is None:
            return rms_norm(x, weight, self.eps)
        return add_rms_norm(x, residual, weight, self.eps)


class _ReplicateGrad(torch.autograd.Function):
    """Identity on a replicated DTensor whose backward all-reduces the ``Partial`` gradient, so
    the parameter's ``.grad`` is the whole gradient on every rank (as Megatron-LM reduces its
    sequence-parallel norm weights), not a pending ``Partial`` sum left to whatever reads it
    (clipping and AdamW do reduce those correctly, but each read pays a collective, and on gloo
    we saw processes holding such pending work abort at exit)."""

    @staticmethod
    def forward(ctx, weight: DTensor) -> DTensor:
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: DTensor) -> DTensor:
        return grad.redistribute(grad.device_mesh, (Replicate(),))


class RMSNormParallel(ParallelStyle):
    """Tensor-parallel style for our ``RMSNorm``: weight replicated, activations local.

    With ``sequence_parallel`` the inputs are this rank's sequence shards (plain tensors are
    taken as such, DTensors are redistributed to ``Shard(1)``); without it they are whole
    (DTensors are redistributed to ``Replicate``). Outputs are plain local tensors either way.
    """

    def __init__(self, *, sequence_parallel: bool = False):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        self.layout: Placement = Shard(SEQUENCE_DIM) if sequence_parallel else Replicate()

    def _partition_fn(self, name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        if not isinstance(module, RMSNorm):
            raise TypeError(f"RMSNormParallel: expected a llama_kernels RMSNorm, got "
                            f"{type(module).__name__}")
        # distribute_tensor broadcasts from the first rank: the replicas start equal.
        weight = distribute_tensor(module.weight.detach(), mesh, [Replicate()])
        module.register_parameter("weight", nn.Parameter(weight,
                                                         module.weight.requires_grad))
        module.__class__ = TensorParallelRMSNorm
        module.sequence_parallel = self.sequence_parallel

    @staticmethod
    def _local_inputs(layout: Placement, module: nn.Module, inputs: tuple,
                      mesh: DeviceMesh) -> tuple:
        return tuple(t.redistribute(mesh, (layout,)).to_local() if isinstance(t, DTensor) else t
                     for t in inputs)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._partition_fn,
                                 partial(self._local_inputs, self.layout))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sequence_parallel={self.sequence_parallel})"


def llama_tp_plan(model: nn.Module, *, sequence_parallel: bool = False) -> dict[str, ParallelStyle]:
    """The ``parallelize_module`` plan of a ``Transformer``, by Meta's parameter names."""
    act = Shard(SEQUENCE_DIM) if sequence_parallel else Replicate()  # between modules
    norm = partial(RMSNormParallel, sequence_parallel=sequence_parallel)
    plan: dict[str, ParallelStyle] = {
        # vocab-row shards; each token's row lives on one rank: Partial -> all-reduce (or
        # reduce-scatter onto the sequence shards)
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=act),
        "norm": norm(),
        # vocab-column shards of the logits, gathered: every rank gets the whole (B, S, vocab)
        "output": ColwiseParallel(input_layouts=act, output_layouts=Replicate()),
    }
    for i in range(len(model.layers)):
        p = f"layers.{i}."
        plan.update({
            p + "attention_norm": norm(),
            p + "ffn_norm": norm(),
            # x -> one replicated DTensor shared by wq/wk/wv (all-gathered from the sequence
            # shards under sequence parallel), so the backward reduces its gradient once
            p + "attention": PrepareModuleInput(input_layouts=(act, None, None, None),
                                                desired_input_layouts=(Replicate(), None,
                                                                       None, None)),
            p + "attention.wq": ColwiseParallel(),
            p + "attention.wk": ColwiseParallel(),
            p + "attention.wv": ColwiseParallel(),
            p + "attention.wo": RowwiseParallel(output_layouts=act),
            p + "feed_forward": PrepareModuleInput(input_layouts=(act,),
                                                   desired_input_layouts=(Replicate(),)),
            p + "feed_forward.w1": ColwiseParallel(),
            p + "feed_forward.w3": ColwiseParallel(),
            p + "feed_forward.w2": RowwiseParallel(output_layouts=act),
        })
    return plan


def parallelize_llama(model: nn.Module, tp_mesh: DeviceMesh, *,
                      sequence_parallel: bool = False) -> nn.Module:
    """Tensor-parallelize a ``Transformer`` in place over the 1-D ``tp_mesh``; returns it.

    Heads (query and kv), FFN columns and the vocabulary are split across ``tp_mesh.size()``
    ranks; each rank runs our ops on its whole heads as plain tensors. Every rank must hold the
    same weights (build them from the same seed or checkpoint: the norms are broadcast from the
    first rank, the matrices are sharded from each rank's own copy). ``sequence_parallel``
    shards the norms and residual stream along the sequence (see the module docstring); the
    sequence length must then be a multiple of the tp size. Apply before ``shard_llama_fsdp``.
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"tp_mesh: expected a 1-D mesh, got {tp_mesh.ndim} dimensions; pass "
                         "mesh['tp'] of a 2-D mesh")
    tp = tp_mesh.size()
    args = model.args
    n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
    for what, n in (("n_heads", args.n_heads), ("n_kv_heads", n_kv_heads)):
        if n % tp:
            raise ValueError(f"tp_mesh: size {tp} must divide {what} ({n}): each rank holds "
                             "whole heads")
    if model.has_cache:
        raise ValueError("model: clear_cache() before parallelizing (the cache is per rank)")
    parallelize_module(model, tp_mesh, llama_tp_plan(model, sequence_parallel=sequence_parallel))
    for layer in model.layers:
        layer.attention.tp_size = tp
    if sequence_parallel:
        model.register_forward_pre_hook(partial(_check_sequence_shards, tp))
    return model


def _check_sequence_shards(tp: int, module: nn.Module, inputs: tuple) -> None:
    seqlen = inputs[0].shape[1]
    if seqlen % tp:
        raise ValueError(f"tokens: seqlen {seqlen} is not a multiple of the tensor-parallel "
                         f"size {tp}, as sequence parallel needs (decoding one token at a time "
                         "needs a model parallelized with sequence_parallel=False)")


def shard_llama_fsdp(model: nn.Module, dp_mesh: DeviceMesh, *,
                     mp_policy: MixedPrecisionPolicy | None = None,
                     reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 ``fully_shard`` each ``TransformerBlock``, then the root; returns the model.

    ``mp_policy`` (e.g. ``MixedPrecisionPolicy(param_dtype=torch.bfloat16,
    reduce_dtype=torch.float32)``) holds for every unit, except that the blocks never cast their
    floating inputs: those include the fp32 rotary tables, which must stay fp32 (the hidden
    states already arrive in ``param_dtype`` from the embedding).
    """
    mp_policy = MixedPrecisionPolicy() if mp_policy is None else mp_policy
    block_policy = dataclasses.replace(mp_policy, cast_forward_inputs=False)
    for layer in model.layers:
        fully_shard(layer, mesh=dp_mesh, mp_policy=block_policy,
                    reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy,
                reshard_after_forward=reshard_after_forward)
    return model


__all__ = ["RMSNormParallel", "TensorParallelRMSNorm", "llama_tp_plan", "parallelize_llama",
           "shard_llama_fsdp"]
