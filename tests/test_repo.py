"""The repository's promises to a newcomer: README's commands are what CI runs, and the main
job (python -m benchmarks) works on a machine without a GPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from helpers import GPU

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_block(marker: str) -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    m = re.search(r"<!-- %s -->\s*```bash\n(.*?)```" % re.escape(marker), text, re.S)
    assert m, f"README.md lacks a bash block after <!-- {marker} -->"
    return m.group(1).strip()


def test_ci_runs_the_readme_commands():
    install, test = _readme_block("install-and-run"), _readme_block("test")
    assert "pip install" in install and "--no-build-isolation" in install
    assert "python -m benchmarks" in install
    assert "pytest" in test
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "readme_block install-and-run" in ci and "readme_block test" in ci
    assert 'bash -euo pipefail -c "$INSTALL && $TEST"' in ci


@pytest.mark.skipif(GPU, reason="on a GPU the main job is the full benchmark (gpu_check.sh)")
def test_main_job_on_cpu(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("no CUDA GPU here"), proc.stdout[:200]
    assert "correctness sweep: 0 failure(s)" in proc.stdout
    record = json.load(open(tmp_path / "results.json"))
    assert record["environment"]["torch"]
    ops = {r["op"] for r in record["results"]}
    assert {"rms_norm", "add_rms_norm", "swiglu", "apply_rotary"} <= ops
    timed = [r for r in record["results"] if "ms" in r]
    assert timed and all(r["ms"] > 0 for r in timed)
    assert not [r for r in record["results"] if "error" in r]
    assert "## rms_norm" in (tmp_path / "report.md").read_text()
