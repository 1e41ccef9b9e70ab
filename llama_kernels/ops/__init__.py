"""Registered ops (torch.library) and the functional names defined next to them."""

from llama_kernels.ops._backend import available_backends, use_backend
from llama_kernels.ops.flash_attention import flash_attention
from llama_kernels.ops.flash_attention_kvcache import flash_attention_with_kvcache
from llama_kernels.ops.flash_attention_varlen import flash_attention_varlen
from llama_kernels.ops.linear_cross_entropy import linear_cross_entropy
from llama_kernels.ops.rms_norm import add_rms_norm, rms_norm
from llama_kernels.ops.rotary import apply_rotary, rotary_tables
from llama_kernels.ops.swiglu import swiglu

__all__ = [
    "add_rms_norm", "apply_rotary", "available_backends", "flash_attention",
    "flash_attention_varlen", "flash_attention_with_kvcache", "linear_cross_entropy", "rms_norm",
    "rotary_tables", "swiglu", "use_backend",
]
