"""llama-kernels: fused CUDA and Triton kernels for the layers of LLaMA, behind one API.

Every function takes ``backend=None`` ("cuda", "triton", "torch" or "auto"); see
``available_backends()`` for what runs on this machine and why not.
"""

from llama_kernels.ops import (
    add_rms_norm,
    apply_rotary,
    available_backends,
    flash_attention,
    flash_attention_varlen,
    flash_attention_with_kvcache,
    linear_cross_entropy,
    rms_norm,
    rotary_tables,
    swiglu,
    use_backend,
)

__version__ = "0.1.0"

__all__ = [
    "add_rms_norm", "apply_rotary", "available_backends", "flash_attention",
    "flash_attention_varlen", "flash_attention_with_kvcache", "linear_cross_entropy", "rms_norm",
    "rotary_tables", "swiglu", "use_backend", "__version__",
]
