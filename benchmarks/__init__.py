"""The llama-kernels benchmark suite: python -m benchmarks --help."""

import os

import torch

if not torch.cuda.is_available():  # Triton kernels run under the interpreter on a CPU machine
    os.environ.setdefault("TRITON_INTERPRET", "1")
