"""The tolerance rule: how far a kernel's result may be from the exact answer. The tests and the
correctness sweep of the benchmarks all check through this module (public, like torch.testing).

The bound
---------
A kernel's output or gradient ``out`` in dtype T is measured against the answer of reference.py
computed in fp32 (``ref32``, the exact answer) and against a baseline, normally eager PyTorch
running the same reference in T (``upcast=False``). Where the exact answer fits T::

    max |out - ref32|  <=  2 * max |baseline - ref32|  +  floor  +  atol

- ``2 * max |baseline - ref32|``: a kernel in T may be about twice as wrong as plain eager PyTorch
  in T, never more. Eager's error measures what T itself costs on these inputs; the factor 2 leaves
  room for rounding in other places and summing in another order.
- ``floor`` = 1e-5 in fp32, eps(T) in fp16 and bf16, times max(1, max |ref32|): where eager happens
  to be exact (in fp32 eager *is* the reference), a few units of rounding from a different
  summation order.
- ``atol``: rounding the kernel's algorithm cannot avoid where eager's is exact, bounded from the
  inputs by the caller (``ToleranceTerms``; attention's in ``attention_tolerance_terms``). 0 for
  the row ops.

Overflow
--------
- Where the exact answer lies beyond T's range (finite in fp32, +-inf once rounded to T), the
  output may be that inf, or a finite value of the same sign in the top half of T's range (a
  kernel's rounding error away from the overflow); those places are left out of the bound.
  Everywhere else the output must be finite.
- Where eager in T overflows (fp16 squares past 65504) there is no finite error to double: if any
  output or gradient of eager is not finite, the baseline of the whole call is the exact answer
  rounded to T once (the reference with ``upcast=True`` on the T inputs). A baseline that is still
  not finite where the exact answer fits T fails the check: it never makes the bound infinite.

Gradients
---------
Each gradient is checked by the same bound, with the same random output gradients given to the
kernel, the reference and eager. A caller may name a second baseline
(``ToleranceTerms.grad_baseline``): gradients a correct kernel may be as far from as eager is; the
larger of the two errors sets the bound. A second baseline that is not finite where the exact
gradient fits T is set aside (it would make the bound infinite).

Attention
---------
``attention_tolerance_terms`` bounds three roundings of a flash-attention kernel that eager's
materialized softmax does not have, all from one exact fp32 P = softmax(scale q k^T):

- ``grad_baseline``, the exact backward from the kernel's saved output: every flash backward
  computes delta = rowsum(dO * O) from the output its forward saved in T (FlashAttention-2 does),
  so an error E in a row of O moves that row's dq by -scale (dO . E) (P K), P K the
  attention-weighted mean key: as large as a key where P is peaked. Eager's backward (from its
  saved P) has no such term. The exact fp32 backward given the kernel's saved output and dO
  rounded to T is as far off, so it is the second baseline; the forward check bounds the output's
  own error.
- ``grad_atol``, the dP - delta cancellation: the flash backward forms dS = P (dP - delta) from two
  separately summed fp32 terms (dP_ij = dO_i . v_j, delta_i = dO_i . o_i), where eager subtracts
  sum_j P_ij dP_ij formed from the same dP (one visible key, P = 1: exactly 0). Each term carries
  up to eps32 times its sum of |products|; through dQ = scale dS K and dK = scale dS^T Q that is
  at most |scale| (P * c) |K| and |scale| (P * c)^T |Q|, c_ij = eps32 (|dO_i| . |v_j| +
  |dO_i| . |o_i|): noise eager does not have, in every dtype. It matters only where the gradients
  nearly vanish (one visible key: the exact dq and dk are 0 and eager's are exactly 0). The term
  is 4 times the largest element of the two bounds (dk's times the query heads per kv head, which
  dk sums over).
- ``out_atol``, P's rounding: the forward rounds P to T before P V, as eager rounds its softmax
  output: up to half an eps(T) of each term of sum_j P_ij v_j, which cancel where v's signs mix.
  Eager's own max error estimates that well over many outputs, not over a handful (one query,
  head_dim 1: one draw of eager's rounding); the term is half eps(T) max_i sum_j P_ij |v_j|.

API
---
``compare(out, ref32, baseline, atol=0) -> Comparison`` checks one tensor without raising
(``.problem``, ``.ratio`` = error / bound); ``assert_close`` raises on its problem.
``compare_fwd_bwd`` / ``check_fwd_bwd`` run a kernel, the fp32 reference and eager forward and
backward and check every output and gradient; their ``terms`` adds a caller's ToleranceTerms, for
attention ``terms=attention_terms(causal=..., softmax_scale=...)``. ``tolerance`` is the bound
from an error and a scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from llama_kernels import reference

__all__ = [
    "Comparison", "ToleranceTerms", "assert_close", "attention_terms",
    "attention_tolerance_terms", "check_fwd_bwd", "compare", "compare_fwd_bwd", "max_err",
    "rounding_floor", "tolerance",
]

_EPS32 = torch.finfo(torch.float32).eps


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in fp32 (0 for empty tensors)."""
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def rounding_floor(dtype: torch.dtype, scale: float) -> float:
    """The bound's floor: 1e-5 in fp32, eps(dtype) otherwise, times max(1, scale)."""
    rel = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    return rel * max(1.0, scale)


def tolerance(baseline_err: float, dtype: torch.dtype, scale: float, atol: float = 0.0) -> float:
    """The bound on max |out - ref32|: twice the baseline's error, plus the floor for ``scale``
    (max |ref32|), plus ``atol``."""
    return 2 * baseline_err + rounding_floor(dtype, scale) + atol


@dataclass(frozen=True)
class Comparison:
    """One tensor checked by the rule: its error, its bound, and what is wrong (None: nothing).
    A tensor that fails before any error is measured (shape, dtype, non-finite values) has
    ``err`` inf and ``tol`` 0."""

    name: str
    err: float
    tol: float
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def ratio(self) -> float:
        """err / tol: at most 1 within the bound."""
        return self.err / self.tol if self.tol > 0 else math.inf

    def __str__(self) -> str:
        return f"{self.name}: {self.problem or f'max error {self.err:.3e} <= {self.tol:.3e}'}"


def compare(out: torch.Tensor, ref32: torch.Tensor, baseline: torch.Tensor, *, name: str = "out",
            atol: float = 0.0) -> Comparison:
    """``out`` (dtype T) against the fp32 answer ``ref32`` by the rule, with ``baseline`` (in T:
    eager, or the rounded answer) setting the bound; ``atol``: the caller's absolute term."""
    def failed(problem: str) -> Comparison:
        return Comparison(name, math.inf, 0.0, problem)

    if out.shape != ref32.shape:
        return failed(f"shape {tuple(out.shape)} != {tuple(ref32.shape)}")
    if out.dtype != baseline.dtype:
        return failed(f"dtype {out.dtype} != {baseline.dtype}")
    rounded = ref32.to(out.dtype)
    beyond = torch.isinf(rounded) & torch.isfinite(ref32)
    if not (torch.isfinite(out) | (beyond & (out == rounded))).all():
        return failed("non-finite values (unwritten, NaN, or an overflow the exact answer has not)")
    if beyond.any():
        top = out[beyond].float() * rounded[beyond].sign() >= torch.finfo(out.dtype).max / 2
        if not top.all():
            return failed("far from the overflow of the exact answer")
        keep = ~beyond
        out, ref32, baseline = out[keep], ref32[keep], baseline[keep]
        if out.numel() == 0:
            return Comparison(name, 0.0, math.inf)
    err, base_err = max_err(out, ref32), max_err(baseline, ref32)
    if not math.isfinite(base_err):
        return failed("the baseline is not finite where the answer is")
    tol = tolerance(base_err, out.dtype, ref32.abs().max().item(), atol)
    problem = None if err <= tol else f"max error {err:.3e} > {tol:.3e} (eager {base_err:.3e})"
    return Comparison(name, err, tol, problem)


def assert_close(out: torch.Tensor, ref32: torch.Tensor, eager: torch.Tensor, name: str = "out",
                 atol: float = 0.0) -> None:
    """``compare``, raising AssertionError on its problem."""
    result = compare(out, ref32, eager, name=name, atol=atol)
    assert result.ok, str(result)


@dataclass(frozen=True)
class ToleranceTerms:
    """A caller's additions to the bound of one fwd/bwd check: ``out_atol`` and ``grad_atol``,
    absolute terms for every output and every gradient; ``grad_baseline``, one tensor per checked
    gradient that a correct kernel may be as far from as eager is (None: eager alone)."""

    out_atol: float = 0.0
    grad_atol: float = 0.0
    grad_baseline: tuple[torch.Tensor, ...] | None = None


# terms(inputs, output gradients in fp32, the kernel's outputs) -> ToleranceTerms
TermsFn = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence[torch.Tensor]],
                   ToleranceTerms]


def attention_tolerance_terms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              dout: torch.Tensor, out: torch.Tensor, *, causal: bool = True,
                              softmax_scale: float | None = None) -> ToleranceTerms:
    """Attention's terms of the rule (the module docstring says what each is and why) for q
    (B, Sq, Hq, D), k and v (B, Sk, Hkv, D) in dtype T, the output gradient ``dout`` in fp32
    (the kernel's backward is given it rounded to T) and the kernel's output ``out``:
    ``out_atol`` P's rounding, ``grad_atol`` the dP - delta cancellation, ``grad_baseline`` the
    exact (dq, dk, dv) from the kernel's saved output."""
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    rep = q.shape[2] // k.shape[2]
    qf = q.float().transpose(1, 2)  # (B, Hq, S, D)
    kf, vf = (t.float().repeat_interleave(rep, dim=2).transpose(1, 2) for t in (k, v))
    scores = qf @ kf.transpose(-1, -2) * scale
    if causal:
        visible = reference.causal_mask(q.shape[1], k.shape[1], device=q.device)
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query that sees no key: P = 0
    exact_out = p @ vf

    p_rounding = 0.5 * torch.finfo(dtype).eps * (p @ vf.abs()).max().item()

    do = dout.float().abs().transpose(1, 2)
    c = _EPS32 * (do @ vf.abs().transpose(-1, -2) + (do * exact_out.abs()).sum(-1, keepdim=True))
    pc = p * c
    bound_dq = abs(scale) * (pc @ kf.abs())
    bound_dk = abs(scale) * (pc.transpose(-1, -2) @ qf.abs())
    cancellation = 4 * max(bound_dq.max().item(), rep * bound_dk.max().item())

    from_saved_out = reference.attention_backward(
        dout.to(dtype).float(), q.float(), k.float(), v.float(), out.float(), lse,
        causal=causal, softmax_scale=scale)
    return ToleranceTerms(out_atol=p_rounding, grad_atol=cancellation,
                          grad_baseline=tuple(from_saved_out))


def attention_terms(*, causal: bool = True, softmax_scale: float | None = None) -> TermsFn:
    """``terms`` for compare_fwd_bwd / check_fwd_bwd of attention(q, k, v): its
    attention_tolerance_terms."""
    def terms(inputs, grad_outs, outs):
        q, k, v = inputs
        return attention_tolerance_terms(q, k, v, grad_outs[0], outs[0], causal=causal,
                                         softmax_scale=softmax_scale)
    return terms


def _leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_(True) if t.is_floating_point()
            else t for t in tensors]


def _run(fn, tensors, grad_outs=None, grad_inputs=()):
    outs = fn(*tensors)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if grad_outs is None:
        return outs, None
    wanted = [tensors[i] for i in grad_inputs]
    grads = torch.autograd.grad(outs, wanted, [g.to(o.dtype) for g, o in zip(grad_outs, outs)])
    return outs, grads


def _in_range_err(a: torch.Tensor, ref32: torch.Tensor) -> float:
    """max_err over the places where the exact answer fits a's dtype."""
    keep = torch.isfinite(ref32.to(a.dtype))
    return max_err(a[keep], ref32[keep])


def _wider_baseline(ref32: torch.Tensor, eager: torch.Tensor, alt: torch.Tensor) -> torch.Tensor:
    """Whichever of eager and ``alt`` (rounded to eager's dtype) is farther from ``ref32``; alt
    only where it is finite wherever the exact answer fits the dtype."""
    alt = alt.to(eager.dtype)
    usable = bool(torch.isfinite(alt)[torch.isfinite(ref32.to(eager.dtype))].all())
    return alt if usable and _in_range_err(alt, ref32) > _in_range_err(eager, ref32) else eager


def compare_fwd_bwd(kernel_fn, ref_fn, inputs, *, grad_inputs=None,
                    terms: TermsFn | None = None) -> list[Comparison]:
    """``kernel_fn(*inputs)`` against ``ref_fn(*inputs, upcast=True)`` in fp32, forward and
    backward (gradients of the inputs at ``grad_inputs``, default all) with the same random
    output gradients, the baseline eager in the dtype (``ref_fn(..., upcast=False)``) or the
    rounded fp32 answer where eager overflows. ``terms(inputs, grad_outs, kernel_outs)``: the
    caller's ToleranceTerms. One Comparison per output, then per gradient; a first one named
    "inputs" if the kernel wrote into an input."""
    grad_inputs = list(range(len(inputs))) if grad_inputs is None else grad_inputs
    snapshot = [t.clone() for t in inputs]
    r_out, _ = _run(lambda *a: ref_fn(*a, upcast=True), _leaves(inputs, torch.float32))
    grad_outs = [torch.randn_like(o) for o in r_out]
    k_out, k_grads = _run(kernel_fn, _leaves(inputs), grad_outs, grad_inputs)
    results = []
    if not all(torch.equal(b.nan_to_num(), a.nan_to_num()) for b, a in zip(snapshot, inputs)):
        results.append(Comparison("inputs", math.inf, 0.0, "an op wrote into its input"))
    r_out, r_grads = _run(lambda *a: ref_fn(*a, upcast=True), _leaves(inputs, torch.float32),
                          grad_outs, grad_inputs)
    e_out, e_grads = _run(lambda *a: ref_fn(*a, upcast=False), _leaves(inputs), grad_outs,
                          grad_inputs)
    if not all(torch.isfinite(t).all() for t in e_out + e_grads):
        e_out, e_grads = _run(lambda *a: ref_fn(*a, upcast=True), _leaves(inputs), grad_outs,
                              grad_inputs)
    extra = ToleranceTerms() if terms is None else terms(
        inputs, grad_outs, [o.detach() for o in k_out])
    for i, (k, r, e) in enumerate(zip(k_out, r_out, e_out)):
        results.append(compare(k, r, e, name=f"output {i}", atol=extra.out_atol))
    if extra.grad_baseline is not None:
        e_grads = [_wider_baseline(r, e, alt)
                   for r, e, alt in zip(r_grads, e_grads, extra.grad_baseline)]
    for i, (k, r, e) in zip(grad_inputs, zip(k_grads, r_grads, e_grads)):
        results.append(compare(k, r, e, name=f"grad of input {i}", atol=extra.grad_atol))
    return results


def check_fwd_bwd(kernel_fn, ref_fn, inputs, *, grad_inputs=None,
                  terms: TermsFn | None = None) -> None:
    """compare_fwd_bwd, raising AssertionError on the first problem."""
    for result in compare_fwd_bwd(kernel_fn, ref_fn, inputs, grad_inputs=grad_inputs,
                                  terms=terms):
        assert result.ok, str(result)
