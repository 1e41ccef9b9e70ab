"""Triton kernels, one module per op (rms_norm, swiglu, rotary, flash_attention).

Kernels and their launchers only: no autograd and no backend choice here (that is
llama_kernels.ops). Each module's launchers take and return plain tensors.
"""
