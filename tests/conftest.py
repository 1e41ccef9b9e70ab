"""Test-session setup: on a machine without a GPU, Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before anything imports triton (Triton reads it when a kernel is
decorated), so it is set here, at the top of the first file pytest imports.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import llama_kernels  # noqa: E402,F401  (imports triton after the variable is set)
import fuzz_profiles  # noqa: E402,F401  (hypothesis profiles "ci" and "long", before collection)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different seed per test (fresh random inputs), printed on failure to reproduce it."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        for key, value in item.user_properties:
            if key == "seed":
                print(f"\n[seed {value}]")
