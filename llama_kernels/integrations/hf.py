"""Drop-in use in Hugging Face transformers: ``patch_llama(model)`` makes a ``LlamaForCausalLM``
/ ``LlamaModel`` compute through llama-kernels, in place, with the same weights and outputs.

What is patched, each through the most public hook transformers offers:

- ``LlamaRMSNorm`` instances: their ``forward`` becomes ``rms_norm`` (the math is done in fp32
  and rounded once; the output keeps the input dtype).
- ``LlamaMLP`` instances with ``hidden_act`` silu: ``down_proj(swiglu(gate_proj x, up_proj x))``.
- Attention: an attention function registered with transformers' ``AttentionInterface`` under
  the name ``"llama_kernels"`` (with ``AttentionMaskInterface`` reusing sdpa's mask builder) and
  selected on the model's config, in place of whatever implementation the model had. It calls
  ``flash_attention`` whenever the attention is plain causal (no mask, no dropout, ``Sq == Sk``
  or a one-token decoding step), and ``flash_attention_varlen`` for
  - padded batches (left, right or holes, prefill or decoding against a padded KV cache): the
    real tokens are gathered from the mask, packed, attended and scattered back; padding
    queries come back as 0;
  - packed batches, several documents per row: from ``position_ids`` restarting inside a row
    (transformers' block-diagonal mask), or from the ``cu_seq_lens_q`` / ``cu_seq_lens_k`` /
    ``max_length_q`` / ``max_length_k`` keywords that
    ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` supplies.
  ``output_attentions=True`` (keyword or config) runs transformers' eager attention, which
  returns the weights. Any other case (a mask that is not causal-with-padding-or-packing such
  as a static cache's, dropout in training, a mask under ``torch.compile``) goes to
  transformers' own sdpa function, so the result is never silently wrong. Needs transformers
  >= 4.53; older versions keep their attention and are told so by a warning.
- Rotary: Llama's attention calls the module-level ``apply_rotary_pos_emb`` of its modeling
  file, so that name is replaced there by a wrapper around ``apply_rotary`` (HF's half-split
  layout, its own cos/sin, whatever rope scaling produced them). This one is process-wide: every
  Llama model of the process then rotates through llama-kernels, with the same math. Calls the
  wrapper does not recognize go to the original function. ``rotary=False`` skips it.
- Loss (``cross_entropy=True``, off by default): ``LlamaForCausalLM.forward`` of this instance
  computes the loss from the last hidden states with ``linear_cross_entropy`` when labels are
  given, without the logits (see ``patch_llama``).

The decoder layers' residual adds are left alone (fusing them would mean replacing
``LlamaDecoderLayer.forward``, whose signature changes between transformers versions).
"""

from __future__ import annotations

import inspect
import sys
import types
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from llama_kernels.ops import (apply_rotary, flash_attention, flash_attention_varlen,
                               linear_cross_entropy, rms_norm, swiglu)

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


def _eager_function(module: nn.Module):
    """The eager attention of the module's own modeling file (the one an unpatched model with
    ``attn_implementation="eager"`` runs)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


def _eager_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                     attention_mask: Tensor | None, dropout: float, scaling: float | None,
                     is_causal: bool, **kwargs) -> tuple[Tensor, Tensor]:
    """transformers' eager attention, which returns the weights, given the mask that sdpa's
    builder made: True/False become 0/min as transformers' own eager mask does, and no mask
    means what it means to sdpa, causal aligned top-left when several queries come (a single
    query sees every key)."""
    sq, sk = query.shape[2], key.shape[2]
    if attention_mask is None and sq > 1 and is_causal:
        attention_mask = (torch.arange(sq, device=query.device)[:, None]
                          >= torch.arange(sk, device=query.device)[None, :])  # (Sq, Sk)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.where(attention_mask, 0.0, torch.finfo(query.dtype).min).to(
            query.dtype)
    return _eager_function(module)(module, query, key, value, attention_mask,
                                   scaling=scaling, dropout=dropout, is_causal=is_causal,
                                   **kwargs)


@dataclass(frozen=True)
class _VarlenPlan:
    """Where the real tokens of a masked batch go in flash_attention_varlen's packed layout:
    packed query row r is flat token ``q_index[r]`` of ``(B * Sq)``, packed key row r is
    ``k_index[r]`` of ``(B * Sk)``; sequences as in flash_attention_varlen."""

    q_index: Tensor
    k_index: Tensor
    cu_seqlens_q: Tensor
    cu_seqlens_k: Tensor
    max_seqlen_q: int
    max_seqlen_k: int


def _varlen_plan(mask: Tensor, sq: int, sk: int) -> _VarlenPlan | None:
    """The packed layout that computes exactly what the boolean mask ``(B, 1, Sq, Sk)`` asks
    for, or None when no such layout exists.

    Candidate: a key is real when some query sees it; with ``Sq == Sk`` each token belongs to
    the group named by the first key its own query row sees (one group per row under padding,
    one per document under position_ids packing), with ``Sq < Sk`` (a cached decode or chunked
    prefill) each row is one group and query ``i`` is the token of key ``Sk - Sq + i``. The
    candidate is then checked against the whole mask: the plan exists only if ``mask[b, 0, i,
    j]`` equals "key j real, same group as query i, and ``j <= i + Sk - Sq``" everywhere. That
    check is what makes the plan exact whatever built the mask: within one group the real
    queries are the group's last real keys, in order (a real query is its own key, and every
    key before the queries' span is older than all of them), so causal bottom-right alignment
    per packed sequence sees precisely the keys the mask allows. Queries that are not real
    (padding) are left out and come back as 0.
    """
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2:] != (sq, sk) or sq > sk:
        return None
    allowed = mask[:, 0]  # (B, Sq, Sk)
    batch, device = allowed.shape[0], allowed.device
    real_k = allowed.any(dim=1)  # (B, Sk)
    if sq == sk:
        group_k = allowed.to(torch.uint8).argmax(dim=-1)  # (B, S): first key each row sees
        group_q = group_k
    else:
        group_k = torch.zeros(batch, sk, dtype=torch.long, device=device)
        group_q = group_k[:, :sq]
    visible = (torch.arange(sk, device=device)[None, :]
               <= torch.arange(sq, device=device)[:, None] + (sk - sq))  # (Sq, Sk)
    expected = visible & real_k[:, None, :] & (group_q[:, :, None] == group_k[:, None, :])
    if not torch.equal(expected, allowed):
        return None
    if not bool(real_k.any()):  # nothing to attend: sdpa's answer for an all-padding batch
        return None
    real_q = real_k[:, sk - sq:]  # (B, Sq)
    rows = torch.arange(batch, device=device)[:, None]
    key_group = (rows * sk + group_k).flatten()  # (B * Sk,) one id per (row, group)
    query_group = (rows * sk + group_q).flatten()  # (B * Sq,)
    k_index = real_k.flatten().nonzero().flatten()
    q_index = real_q.flatten().nonzero().flatten()
    # a stable sort keeps each group's tokens in sequence order
    k_index = k_index[torch.sort(key_group[k_index], stable=True).indices]
    q_index = q_index[torch.sort(query_group[q_index], stable=True).indices]
    groups, count_k = torch.unique_consecutive(key_group[k_index], return_counts=True)
    count_q = torch.bincount(torch.searchsorted(groups, query_group[q_index]),
                             minlength=groups.numel())
    zero = torch.zeros(1, dtype=torch.int32, device=device)
    cu_k = torch.cat([zero, count_k.cumsum(0).to(torch.int32)])
    cu_q = torch.cat([zero, count_q.cumsum(0).to(torch.int32)])
    max_k, max_q = (int(m) for m in torch.stack([count_k.max(), count_q.max()]).tolist())
    return _VarlenPlan(q_index, k_index, cu_q, cu_k, max_q, max_k)


# One plan per mask: transformers builds the mask once per forward and hands the same tensor
# to every layer, so the check and its host syncs happen once per forward, not per layer.
_PLANS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _plan_for(mask: Tensor, sq: int, sk: int) -> _VarlenPlan | None:
    key = (sq, sk, mask._version)  # a mask written in place since is planned again
    cached = _PLANS.get(mask)
    if cached is None or cached[0] != key:
        cached = (key, _varlen_plan(mask, sq, sk))
        _PLANS[mask] = cached
    return cached[1]


def _varlen_attention(query: Tensor, key: Tensor, value: Tensor, plan: _VarlenPlan,
                      scaling: float | None) -> Tensor:
    """q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D) -> (B, Sq, Hq, D), padding queries 0."""
    batch, hq, sq, dim = query.shape
    flat_q = query.transpose(1, 2).reshape(batch * sq, hq, dim)  # (B*Sq, Hq, D)
    flat_k = key.transpose(1, 2).reshape(-1, key.shape[1], dim)  # (B*Sk, Hkv, D)
    flat_v = value.transpose(1, 2).reshape(-1, value.shape[1], dim)
    out = flash_attention_varlen(flat_q[plan.q_index], flat_k[plan.k_index],
                                 flat_v[plan.k_index], plan.cu_seqlens_q, plan.cu_seqlens_k,
                                 plan.max_seqlen_q, plan.max_seqlen_k, causal=True,
                                 softmax_scale=scaling)  # (total_q, Hq, D)
    return flat_q.new_zeros(flat_q.shape).index_copy(0, plan.q_index, out).view(
        batch, sq, hq, dim)


def _wants_attentions(module: nn.Module, kwargs: dict) -> bool:
    """The request as transformers' output capture reads it: the call's keyword, else the
    config's default."""
    default = getattr(getattr(module, "config", None), "output_attentions", False)
    return bool(kwargs.get("output_attentions", default))


def llama_kernels_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                            attention_mask: Tensor | None, dropout: float = 0.0,
                            scaling: float | None = None, is_causal: bool | None = None,
                            **kwargs) -> tuple[Tensor, Tensor | None]:
    """transformers attention function: q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D) ->
    ``(out (B, Sq, Hq, D), weights or None)``. The module docstring lists the cases."""
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if _wants_attentions(module, kwargs):
        return _eager_attention(module, query, key, value, attention_mask, dropout, scaling,
                                is_causal, **kwargs)
    sq, sk = query.shape[2], key.shape[2]
    simple = (dropout == 0.0 and is_causal and kwargs.get("softcap") is None
              and kwargs.get("sliding_window") is None)
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
    if simple and attention_mask is None and (sq == sk or sq == 1):
        # strided views, no copies: a copy of the whole KV cache per decode step would cost as
        # much memory traffic as the attention itself
        out = flash_attention(query.transpose(1, 2),  # (B, Sq, Hq, D)
                              key.transpose(1, 2),  # (B, Sk, Hkv, D)
                              value.transpose(1, 2),
                              causal=True, softmax_scale=scaling)
        return out, None
    # Padded or position_ids-packed batches: the real tokens are gathered into the packed
    # layout (under padding that copies K and V once per layer, as the masked sdpa path's
    # repeat_kv does). Reading the mask needs the host, so a graph being traced keeps sdpa.
    if (simple and isinstance(attention_mask, Tensor) and attention_mask.dtype == torch.bool
            and not torch.compiler.is_compiling()):
        plan = _plan_for(attention_mask, sq, sk)
        if plan is not None:
            return _varlen_attention(query, key, value, plan, scaling), None
    return _sdpa_fallback()(module, query, key, value, attention_mask, dropout=dropout,
                            scaling=scaling, is_causal=is_causal, **kwargs)


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


def _causal_lm_loss(model: nn.Module, hidden: Tensor, labels: Tensor,
                    num_items_in_batch=None, ignore_index: int = -100,
                    shift_labels: Tensor | None = None, **_) -> Tensor:
    """transformers' ``ForCausalLMLoss`` on the LM head's output, through
    ``linear_cross_entropy``: token t predicts ``labels[t + 1]`` (the last token predicts
    nothing) unless ``shift_labels`` is given; the mean over the counted tokens, or their sum
    divided by ``num_items_in_batch`` when that is given (gradient accumulation)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.to(hidden.device)
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"patch_llama(cross_entropy=True): the (shifted) labels have shape "
                         f"{tuple(target.shape)}; expected {tuple(hidden.shape[:-1])}, the "
                         "tokens' shape")
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(hidden, model.lm_head.weight, target.long(),
                                ignore_index=ignore_index, reduction=reduction)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _fused_loss_forward(self, *args, **kwargs):
    """``LlamaForCausalLM.forward``; with labels, the loss through ``linear_cross_entropy`` and
    ``logits`` None (the (tokens, vocab) logits are never held); without, the class's own."""
    forward = type(self).forward
    bound = inspect.signature(forward).bind(self, *args, **kwargs)
    arguments = dict(bound.arguments)
    if arguments.get("labels") is None:
        return forward(self, *args, **kwargs)
    arguments.pop("self")
    for name, param in bound.signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    labels = arguments.pop("labels")
    logits_to_keep = arguments.pop("logits_to_keep", 0)
    return_dict = arguments.pop("return_dict", None)
    if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        raise ValueError("patch_llama(cross_entropy=True): labels with logits_to_keep="
                         f"{logits_to_keep!r}: the loss covers every position; pass "
                         "logits_to_keep=0 (the default) with labels")
    # the base model gets every other argument, as in transformers' forward (the loss keywords
    # such as num_items_in_batch included)
    outputs = self.model(**arguments)
    loss = _causal_lm_loss(self, outputs.last_hidden_state, labels, **arguments)
    from transformers.modeling_outputs import CausalLMOutputWithPast
    result = CausalLMOutputWithPast(loss=loss, logits=None, **{
        name: value for name, value in outputs.items() if name != "last_hidden_state"})
    return result.to_tuple() if return_dict is False else result


def _patch_loss(model: nn.Module) -> None:
    lm_head = getattr(model, "lm_head", None)
    if not (isinstance(getattr(model, "model", None), nn.Module)
            and isinstance(lm_head, nn.Linear)):
        raise ValueError(f"patch_llama(cross_entropy=True) needs a causal LM with .model and an "
                         f"nn.Linear .lm_head (LlamaForCausalLM); got {type(model).__name__}")
    if lm_head.bias is not None:
        raise ValueError("patch_llama(cross_entropy=True): lm_head has a bias, which "
                         "linear_cross_entropy does not add")
    from transformers.loss.loss_utils import ForCausalLMLoss
    if model.loss_function is not ForCausalLMLoss:
        raise ValueError("patch_llama(cross_entropy=True) computes transformers' "
                         f"ForCausalLMLoss; this model's loss_function is {model.loss_function}")
    model.forward = types.MethodType(_fused_loss_forward, model)


def patch_llama(model: nn.Module, *, norm: bool = True, mlp: bool = True,
                attention: bool = True, rotary: bool = True,
                cross_entropy: bool = False) -> nn.Module:
    """Patch a transformers Llama model in place (see the module docstring); returns it.

    Attention: the model's attention implementation, whatever it was (sdpa, eager,
    flash_attention_2, ...), is replaced by ``"llama_kernels"``; the one it had is kept in
    ``model._llama_kernels_previous_attn``, and ``model.set_attn_implementation(name)`` (or
    ``model.config._attn_implementation = name`` where transformers has no such method)
    switches back. ``output_attentions=True`` runs transformers' eager attention for that call,
    so the weights come back.

    ``cross_entropy=True`` replaces this instance's ``forward`` (a ``LlamaForCausalLM``): given
    ``labels`` it returns transformers' causal-LM loss (labels shifted left, ignore_index -100,
    ``num_items_in_batch`` honoured) computed by ``linear_cross_entropy`` without the
    (tokens, vocab) logits, and ``logits`` None; without labels it returns what the unpatched
    model does. Off by default, so that a patched model returns the same outputs (logits
    included) as before; turn it on for training, where the logits are the largest activation.

    Idempotent. Records what was patched in ``model._llama_kernels_patched`` (a dict of counts).
    """
    try:
        from transformers.models.llama import modeling_llama as ml
    except ImportError as e:
        raise ImportError("patch_llama needs transformers: pip install transformers") from e
    if cross_entropy:
        _patch_loss(model)
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
            previous = getattr(model.config, "_attn_implementation", None)
            if previous != ATTN_IMPLEMENTATION:
                model._llama_kernels_previous_attn = previous
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
