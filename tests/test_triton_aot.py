"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90, no GPU needed.

Each kernel module's AOT_CASES holds its kernels with the launch settings its own settings
function picks at the LLaMA widths (rows 4096..65536, FFN widths, head_dim 64/128, fp16/bf16).
They are compiled in a subprocess without TRITON_INTERPRET (this session runs the kernels
under the interpreter, where @triton.jit functions cannot be compiled), and every case must
compile with zero register spills and no local-memory stack. Registers and shared memory are
printed (run pytest with -s to see them) and recorded as user properties of the test.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("triton", reason="triton is not installed")

from llama_kernels.triton import _aot  # noqa: E402
from helpers import run_compiler_script  # noqa: E402

ARCHS = (80, 90)
# Shared memory a program may use: 163 KB on sm_80 (A100), 227 KB on sm_90 (H100).
MAX_SHARED = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    why = _aot.tools_missing()
    if why:
        pytest.skip(f"cannot compile ahead of time: {why}")
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    code = ("import sys; from llama_kernels.triton._aot import main; "
            "sys.exit(main(sys.argv[1:]))")
    proc = run_compiler_script(code, "--arch", *map(str, ARCHS), "--json", str(out),
                               timeout=600)
    assert proc.returncode == 0, f"AOT compile failed:\n{proc.stdout}\n{proc.stderr}"
    print("\n" + proc.stdout)
    return json.loads(out.read_text())


def test_every_case_compiles_for_each_arch(aot_results):
    n_cases = len(_aot.all_cases())
    assert n_cases > 0
    assert len(aot_results) == n_cases * len(ARCHS)
    for arch in ARCHS:
        names = [r["name"] for r in aot_results if r["arch"] == f"sm_{arch}"]
        assert len(names) == len(set(names)) == n_cases


def test_no_spills(aot_results, record_property):
    bad = [r for r in aot_results
           if r["spill_stores"] or r["spill_loads"] or r["stack"] or r["local"]]
    for r in aot_results:
        record_property(f"{r['arch']} {r['name']}",
                        f"regs={r['registers']} spill={r['spill_stores'] + r['spill_loads']} "
                        f"shared={r['shared']} warps={r['num_warps']}")
    assert not bad, "register spills / local memory:\n" + "\n".join(
        f"{r['arch']} {r['name']}: regs {r['registers']} spill stores {r['spill_stores']} "
        f"loads {r['spill_loads']} stack {r['stack']} local {r['local']}" for r in bad)


def test_resources_fit(aot_results):
    """Registers within the hardware's 255 per thread; shared memory within a program's limit;
    and the row kernels keep the whole register file usable (<= 64K per program)."""
    for r in aot_results:
        assert 0 < r["registers"] <= 255, r
        assert r["shared"] <= MAX_SHARED[r["arch"]], r
        assert r["registers"] * 32 * r["num_warps"] <= 65536, r


def test_wide_rows_take_the_chunked_path(aot_results):
    """At 65536 the RMSNorm kernels loop over chunks rather than hold a next_pow2 row."""
    wide = [r for r in aot_results if "dim=65536" in r["name"]]
    assert wide and all(r["constexprs"]["CHUNKED"] for r in wide)
