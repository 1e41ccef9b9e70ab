"""Drop-in use in Hugging Face transformers: ``patch_llama(model)`` makes a ``LlamaForCausalLM``
/ ``LlamaModel`` compute through llama-kernels, in place, with the same weights and outputs.

What is patched, each through the most public hook transformers offers:

- ``LlamaRMSNorm`` instances: their ``forward`` becomes ``rms_norm`` (the math is done in fp32
  and rounded once; the output keeps the input dtype).
- ``LlamaMLP`` instances with ``hidden_act`` silu: ``down_proj(swiglu(gate_proj x, up_proj x))``.
- Attention: an attention function registered with transformers' ``AttentionInterface`` under
  the name ``"llama_kernels"`` (with ``AttentionMaskInterface`` reusing sdpa's mask builder) and
  selected on the model's config. It calls ``flash_attention`` whenever the attention is plain
  causal (no padding mask, no dropout, ``Sq == Sk`` or a one-token decoding step), and
  ``flash_attention_varlen`` for padding-free packed batches (one row of several sequences, with
  the ``cu_seq_lens_q`` / ``cu_seq_lens_k`` / ``max_length_q`` / ``max_length_k`` keywords that
  ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` supplies); it hands any other
  case (padded batches, static-cache prefill, dropout in training) to transformers' own sdpa
  function, so the result is never silently wrong. Needs transformers >= 4.53; older versions
  keep their attention and are told so by a warning.
- Rotary: Llama's attention calls the module-level ``apply_rotary_pos_emb`` of its modeling
  file, so that name is replaced there by a wrapper around ``apply_rotary`` (HF's half-split
  layout, its own cos/sin, whatever rope scaling produced them). This one is process-wide: every
  Llama model of the process then rotates through llama-kernels, with the same math. Calls the
  wrapper does not recognize go to the original function. ``rotary=False`` skips it.

The decoder layers' residual adds are left alone (fusing them would mean replacing
``LlamaDecoderLayer.forward``, whose signature changes between transformers versions).
"""

from __future__ import annotations

import sys
import types
import warnings

import torch
from torch import Tensor, nn

from llama_kernels.ops import (apply_rotary, flash_attention, flash_attention_varlen, rms_norm,
                               swiglu)

ATTN_IMPLEMENTATION = "llama_kernels"
_SILU = ("silu", "swish")


def _rms_norm_forward(self, hidden_states: Tensor) -> Tensor:
    if self.weight.dtype != hidden_states.dtype:
        # e.g. fp32 norms over bf16 hidden states: HF promotes the output to fp32, which our
        # one-dtype op does not; its own forward keeps that behaviour exactly
        return type(self).forward(self, hidden_states)
    eps = self.variance_epsilon if hasattr(self, "variance_epsilon") else self.eps
    return rms_norm(hidden_states, self.weight, eps)


def _mlp_forward(self, x: Tensor) -> Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _sdpa_fallback():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    return ALL_ATTENTION_FUNCTIONS["sdpa"]


def llama_kernels_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                            attention_mask: Tensor | None, dropout: float = 0.0,
                            scaling: float | None = None, is_causal: bool | None = None,
                            **kwargs) -> tuple[Tensor, None]:
    """transformers attention function: q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D) ->
    ``(out (B, Sq, Hq, D), None)``."""
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    sq, sk = query.shape[2], key.shape[2]
    simple = (dropout == 0.0 and is_causal and kwargs.get("softcap") is None
              and kwargs.get("sliding_window") is None
              and not kwargs.get("output_attentions", False))
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if simple and cu_q is not None and cu_k is not None and query.shape[0] == 1:
        # padding-free packing: the sequences of one row attend only to themselves (the mask
        # transformers built from position_ids says the same, block-diagonal)
        out = flash_attention_varlen(query[0].transpose(0, 1),  # (T, Hq, D)
                                     key[0].transpose(0, 1), value[0].transpose(0, 1),
                                     cu_q.to(torch.int32), cu_k.to(torch.int32),
                                     int(kwargs["max_length_q"]), int(kwargs["max_length_k"]),
                                     causal=True, softmax_scale=scaling)
        return out[None], None  # (1, T, Hq, D)
    plain = simple and attention_mask is None and (sq == sk or sq == 1)
    if not plain:
        return _sdpa_fallback()(module, query, key, value, attention_mask, dropout=dropout,
                                scaling=scaling, is_causal=is_causal, **kwargs)
    # strided views, no copies: a copy of the whole KV cache per decode step would cost as
    # much memory traffic as the attention itself
    out = flash_attention(query.transpose(1, 2),  # (B, Sq, Hq, D)
                          key.transpose(1, 2),  # (B, Sk, Hkv, D)
                          value.transpose(1, 2),
                          causal=True, softmax_scale=scaling)
    return out, None


def _register_attention() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(ATTN_IMPLEMENTATION, llama_kernels_attention)
    # Without a registered mask function transformers builds *no* mask for a custom name, which
    # would drop padding; sdpa's builder returns None exactly when the mask is plain causal.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return True


def _make_rotary(original):
    def apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *args, **kwargs):
        """HF's ``apply_rotary_pos_emb`` (q, k (B, H, S, D); cos, sin (1 or B, S, D), the halves
        equal) through ``apply_rotary(interleaved=False)``."""
        batch, _, seqlen, head_dim = q.shape
        if (args or kwargs.get("unsqueeze_dim", 1) != 1 or cos.dim() != 3 or q.dim() != 4
                or cos.shape[-1] != head_dim or cos.shape[1] != seqlen
                or cos.shape[0] not in (1, batch) or k.shape[0] != batch):
            return original(q, k, cos, sin, *args, **kwargs)
        half = head_dim // 2
        if cos.shape[0] == 1:  # row s rotates token s: no positions needed
            cos_t, sin_t, positions = cos[0, :, :half].float(), sin[0, :, :half].float(), None
        else:  # one table row per (batch, token)
            cos_t = cos[..., :half].reshape(batch * seqlen, half).float()  # (B*S, D/2)
            sin_t = sin[..., :half].reshape(batch * seqlen, half).float()
            positions = torch.arange(batch * seqlen, device=q.device).view(batch, seqlen)
        q_rot = apply_rotary(q.transpose(1, 2), cos_t, sin_t, positions=positions)  # (B, S, H, D)
        k_rot = apply_rotary(k.transpose(1, 2), cos_t, sin_t, positions=positions)
        return q_rot.transpose(1, 2), k_rot.transpose(1, 2)  # (B, H, S, D)

    apply_rotary_pos_emb.__wrapped__ = original
    apply_rotary_pos_emb._llama_kernels = True
    return apply_rotary_pos_emb


def _patch_rotary(attention_classes: set[type]) -> int:
    patched = 0
    for cls in attention_classes:
        module = sys.modules.get(cls.__module__)
        original = getattr(module, "apply_rotary_pos_emb", None)
        if original is None:
            continue
        if not getattr(original, "_llama_kernels", False):
            module.apply_rotary_pos_emb = _make_rotary(original)
        patched += 1
    return patched


def patch_llama(model: nn.Module, *, norm: bool = True, mlp: bool = True,
                attention: bool = True, rotary: bool = True) -> nn.Module:
    """Patch a transformers Llama model in place (see the module docstring); returns it.

    Idempotent. Records what was patched in ``model._llama_kernels_patched`` (a dict of counts).
    """
    try:
        from transformers.models.llama import modeling_llama as ml
    except ImportError as e:
        raise ImportError("patch_llama needs transformers: pip install transformers") from e
    counts = {"rms_norm": 0, "mlp": 0, "attention": 0, "rotary": 0}
    attention_classes: set[type] = set()
    for module in model.modules():
        if norm and isinstance(module, ml.LlamaRMSNorm):
            module.forward = types.MethodType(_rms_norm_forward, module)
            counts["rms_norm"] += 1
        elif mlp and isinstance(module, ml.LlamaMLP):
            act = getattr(getattr(module, "config", None), "hidden_act", "silu")
            if act in _SILU:
                module.forward = types.MethodType(_mlp_forward, module)
                counts["mlp"] += 1
        elif isinstance(module, ml.LlamaAttention):
            attention_classes.add(type(module))
            counts["attention"] += 1
    if attention and counts["attention"]:
        if _register_attention():
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation(ATTN_IMPLEMENTATION)
            else:
                model.config._attn_implementation = ATTN_IMPLEMENTATION
        else:
            warnings.warn("patch_llama: this transformers version has no AttentionInterface / "
                          "AttentionMaskInterface (>= 4.53 needed); attention left unpatched",
                          stacklevel=2)
            counts["attention"] = 0
    else:
        counts["attention"] = 0
    if rotary:
        counts["rotary"] = _patch_rotary(attention_classes)
    model._llama_kernels_patched = counts
    return model


__all__ = ["ATTN_IMPLEMENTATION", "llama_kernels_attention", "patch_llama"]
