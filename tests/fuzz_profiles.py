"""Hypothesis profiles of the fuzz tests (tests/test_fuzz.py), registered on import.

"ci" (the default): a small budget that keeps test_fuzz.py near a minute on two CPU cores
(Triton under the interpreter), more examples on a GPU. "long": many more examples, for a
night run: ``LLAMA_KERNELS_FUZZ=long pytest tests/test_fuzz.py``. ``--hypothesis-profile=long``
works too once this module is imported before pytest configures hypothesis (an
``import fuzz_profiles`` in conftest.py): hypothesis's plugin loads that profile at start-up.
A profile loaded that way wins; otherwise the environment variable picks one. The chosen
profile is applied to the fuzz tests only (``@FUZZ``), never loaded globally, so other
hypothesis tests keep their own settings.
"""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

ENV_VAR = "LLAMA_KERNELS_FUZZ"
PROFILES = ("ci", "long")
_GPU = torch.cuda.is_available()

_common = dict(
    deadline=None,  # the first call of a kernel compiles it (GPU) or warms the interpreter
    derandomize=False,  # fresh examples every run; a failure prints its @reproduce_failure
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
)
settings.register_profile("ci", max_examples=40 if _GPU else 6, **_common)
settings.register_profile("long", max_examples=2000 if _GPU else 200, **_common)


def _chosen() -> str:
    current = settings.get_current_profile_name()
    if current in PROFILES:  # --hypothesis-profile=ci|long, when registered early enough
        return current
    name = os.environ.get(ENV_VAR, "ci")
    if name not in PROFILES:
        raise ValueError(f"{ENV_VAR}: expected one of {PROFILES}, got {name!r}")
    return name


PROFILE = _chosen()
FUZZ = settings(settings.get_profile(PROFILE))
