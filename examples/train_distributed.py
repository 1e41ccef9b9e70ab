"""Train the thin LLaMA on several processes with PyTorch's engine: FSDP2, tensor parallel, both.

    torchrun --nproc_per_node 2 examples/train_distributed.py --tp 2          # tensor parallel
    torchrun --nproc_per_node 2 examples/train_distributed.py --tp 2 --sequence-parallel
    torchrun --nproc_per_node 2 examples/train_distributed.py --fsdp          # FSDP2, all ranks
    torchrun --nproc_per_node 4 examples/train_distributed.py --fsdp --tp 2   # 2-D: dp 2 x tp 2

With GPUs (one per rank) it runs NCCL and, under --fsdp, bf16 parameters with fp32 gradient
reduction (``--dtype`` changes it); without, gloo on the CPU in fp32. The world is a
``(dp, tp)`` mesh: ``--tp`` ranks split each layer (``parallelize_llama``), and the
``world / tp`` data-parallel groups shard parameters, gradients and optimizer state with FSDP2
(``shard_llama_fsdp``; needed whenever ``world / tp > 1``). Each data-parallel group trains on
its slice of the global batch, so the loss curve is that of one process on the whole batch.
``--save DIR`` writes a sharded ``torch.distributed.checkpoint`` that loads into one process:

    model = Transformer(ModelArgs.from_name("tiny"))
    state = model.state_dict()
    torch.distributed.checkpoint.load(state, checkpoint_id=DIR)   # in place, no process group

Every rank builds the whole model from the same seed before it is sharded: fine for small
models; for large ones build under ``torch.device("meta")``, shard, then ``to_empty`` and load.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy

from llama_kernels import use_backend
from llama_kernels.distributed import parallelize_llama, shard_llama_fsdp
from llama_kernels.model import ModelArgs, Transformer, num_params
from llama_kernels.train import synthetic_batches, train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="ModelArgs preset (default: tiny)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    parser.add_argument("--sequence-parallel", action="store_true",
                        help="also shard norms and the residual stream along the sequence")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 over the data-parallel ranks")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="parameter dtype in the forward (default: bfloat16 with GPUs "
                             "and --fsdp, else float32); FSDP2 reduces gradients in fp32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (all dp ranks)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--backend", default="auto", choices=["auto", "cuda", "triton", "torch"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--save", help="write a sharded DCP checkpoint to this directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[float]:
    args = parse_args(argv)
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group("nccl" if gpu else "gloo")
    else:  # plain `python examples/train_distributed.py`: a world of one
        dist.init_process_group("nccl" if gpu else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    try:
        losses = run(args, "cuda" if gpu else "cpu")
        dist.barrier()  # no rank tears down while another still has collectives in flight
        return losses
    finally:
        # Free the model and its autograd state (cycles through module hooks) while the
        # interpreter is whole: gloo work objects that outlive destroy_process_group can hold
        # tensors and abort the process at exit ("terminate called without an active exception")
        gc.collect()
        dist.destroy_process_group()


def run(args: argparse.Namespace, device_type: str) -> list[float]:
    world, rank = dist.get_world_size(), dist.get_rank()
    if args.tp < 1 or world % args.tp:
        raise SystemExit(f"--tp {args.tp} must divide the world size {world}")
    dp = world // args.tp
    if dp > 1 and not args.fsdp:
        raise SystemExit(f"world size {world} with --tp {args.tp} leaves {dp} data-parallel "
                         "ranks: add --fsdp to shard over them")
    if args.batch_size % dp:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of dp {dp}")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device_type == "cuda" and args.fsdp
                                          else "float32"))
    mesh = init_device_mesh(device_type, (dp, args.tp), mesh_dim_names=("dp", "tp"))
    dp_rank = mesh.get_local_rank("dp")

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model_args = ModelArgs.from_name(args.model)
    model_args.max_seq_len = max(model_args.max_seq_len, args.seq_len)
    with torch.device(device_type):
        model = Transformer(model_args)
    n_params = num_params(model)
    if args.tp > 1:
        parallelize_llama(model, mesh["tp"], sequence_parallel=args.sequence_parallel)
    if args.fsdp:
        shard_llama_fsdp(model, mesh["dp"],
                         mp_policy=MixedPrecisionPolicy(param_dtype=dtype,
                                                        reduce_dtype=torch.float32))
    elif dtype != torch.float32:
        model.to(dtype)

    # The same global batches on every rank; each data-parallel group keeps its slice.
    generator = torch.Generator().manual_seed(args.seed + 1)
    batches = (batch.chunk(dp)[dp_rank].to(device_type) for batch in
               synthetic_batches(model_args.vocab_size, args.batch_size, args.seq_len,
                                 generator=generator))
    if rank == 0:
        print(f"model {args.model}: {n_params / 1e6:.2f}M parameters; world {world} = dp {dp} "
              f"x tp {args.tp} (fsdp {args.fsdp}, sequence parallel "
              f"{args.sequence_parallel}); {dtype} on {device_type}; backend {args.backend}",
              flush=True)
    start = time.perf_counter()

    def log(step: int, loss: float, rate: float) -> None:
        mean = torch.tensor([loss], device=device_type)  # every rank calls this every step
        dist.all_reduce(mean)
        mean = mean.item() / world
        if rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
            print(f"step {step:5d}  loss {mean:.4f}  lr {rate:.2e}  "
                  f"{time.perf_counter() - start:.1f}s", flush=True)

    with use_backend(args.backend):
        losses = train(model, batches, args.steps, args.lr, log=log)
    if args.save:
        dcp.save(model.state_dict(), checkpoint_id=args.save)
        if rank == 0:
            print(f"saved a sharded checkpoint to {args.save}", flush=True)
    return losses


if __name__ == "__main__":
    main()
