"""Input validation shared by every backend: each check names the argument and what it expected.

Called by the functional layer before any kernel runs, so a bad call fails the same way on
cuda, triton and torch.
"""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t, *, dtypes=FLOAT_DTYPES, ndim: int | None = None,
                 min_ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype in {tuple(str(d) for d in dtypes)}, "
                         f"got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimension(s), got shape "
                         f"{tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor) -> None:
    names = list(tensors)
    first = tensors[names[0]]
    for name in names[1:]:
        t = tensors[name]
        if t.device != first.device:
            raise ValueError(f"{name}: expected device {first.device} (that of {names[0]}), "
                             f"got {t.device}")


def check_same_dtype(**tensors: torch.Tensor) -> None:
    names = list(tensors)
    first = tensors[names[0]]
    for name in names[1:]:
        t = tensors[name]
        if t.dtype != first.dtype:
            raise ValueError(f"{name}: expected dtype {first.dtype} (that of {names[0]}), "
                             f"got {t.dtype}")


def is_real(value) -> bool:
    """A real number: Python int/float or a numpy scalar (numbers.Real), not a bool or a
    tensor (``float(value)`` is then exact and cheap, and never syncs a device)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, torch.Tensor))


def check_eps(eps) -> None:
    if not is_real(eps) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: expected a finite non-negative float, got {eps!r}")


def check_norm_weight(x: torch.Tensor, weight: torch.Tensor) -> None:
    check_tensor("weight", weight, ndim=1)
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight: expected shape ({x.shape[-1]},) to match the last dimension "
                         f"of x, got {tuple(weight.shape)}")
