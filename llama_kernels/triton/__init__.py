"""Triton kernels: one module per op (rms_norm, swiglu, rotary, flash_attention), whose
launchers llama_kernels.ops calls. Attention's kernels sit in one module per kernel family
(attention_fwd, attention_decode, attention_bwd; shared helpers in _attention_common) and its
launch settings in attention_launch; flash_attention holds its launchers.

Kernels and their launchers only: no autograd and no backend choice here (that is
llama_kernels.ops). Each module's launchers take and return plain tensors.
"""
