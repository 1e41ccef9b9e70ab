"""The GPU record path: a gpu_check.sh OUTDIR becomes a committed record folder, and README.md's
"Latest measurements" section is regenerated from its results.json, not typed by hand."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from benchmarks import record
from helpers import REPO

RUN2 = os.path.join(REPO, "benchmarks", "results", "2026-11-26-h100-run2", "results.json")
SUMMARY = """date: 2026-11-26T18:53:57Z
commit: 3e46950
build: ok in 56 s
tests-fast: ok in 40 s
bench: FAILED (rc=124, time limit) in 120 s
memcheck: SKIPPED (time budget spent)
"""


def _run_dir(tmp_path, mutate=None):
    with open(RUN2) as f:
        rec = json.load(f)
    if mutate:
        mutate(rec)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(json.dumps(rec))
    (out / "summary.txt").write_text(SUMMARY)
    return out, rec


def test_readme_section_is_the_committed_one():
    """README.md's section is exactly what the script writes from the newest record."""
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    with open(RUN2) as f:
        rec = json.load(f)
    section = record.latest_section(rec, os.path.dirname(RUN2))
    assert section in readme, "README.md's latest measurements differ from the record's; run " \
        "python -m benchmarks.record --readme-only " + os.path.relpath(RUN2, REPO)


def test_import_run_writes_the_record_and_the_readme(tmp_path):
    def slower_triton_rms_norm(rec):
        for r in rec["results"]:
            if (r["op"], r["direction"], r["impl"]) == ("rms_norm", "fwd", "ours[triton]"):
                r["frac_copy_bw"] = 0.5
    out, rec = _run_dir(tmp_path, slower_triton_rms_norm)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{record.BEGIN}\nold table\n{record.END}\n\nafter\n")
    dest = record.import_run(str(out), str(tmp_path / "results"), str(readme))
    assert os.path.basename(dest) == "2026-11-26-h100-80gb-hbm3-3e46950"
    files = set(os.listdir(dest))
    assert {"README.md", "results.json", "report.md", "summary.txt"} <= files
    text = readme.read_text()
    assert "old table" not in text and text.endswith("\nafter\n")
    assert "| rms_norm 16384 x 4096 | fwd | 92% | 50% | 98% | 97% | 9% |" in text
    rec_readme = open(os.path.join(dest, "README.md")).read()
    assert "- bench: FAILED (rc=124, time limit) in 120 s" in rec_readme
    assert "- memcheck: SKIPPED (time budget spent)" in rec_readme
    assert "tune.json, logs.tar.gz" in rec_readme  # files the run did not produce are named


def test_import_refuses_a_cpu_run_and_readme_without_markers(tmp_path):
    out, _ = _run_dir(tmp_path, lambda rec: rec["environment"].update(gpu=None))
    with pytest.raises(ValueError, match="no GPU"):
        record.import_run(str(out), str(tmp_path / "results"))
    with pytest.raises(ValueError, match="markers"):
        record.update_readme("# no markers here\n", "section")


def test_gpu_check_dry_run_lists_every_step_within_the_budget():
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_check.sh"), "--dry-run"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    steps = [line.split()[0] for line in proc.stdout.splitlines() if " s  (by " in line]
    assert steps[:3] == ["build", "tests-fast", "bench"], steps
    assert {"tests", "memcheck", "racecheck", "synccheck", "initcheck", "tests-slow"} <= set(steps)
    planned = int(proc.stdout.split("worst case: ")[1].split()[0])
    assert planned <= 600, f"step limits add up to {planned} s: the run must fit in 10 minutes"
