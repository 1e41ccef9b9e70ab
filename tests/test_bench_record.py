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


def _with_new_rows(rec):
    """RUN2's record plus rows of the packed / cached attention and loss cases, as run_case
    writes them (the loss rows with their peak memory over eager's)."""
    loss = "7B tokens=8192 dim=4096 vocab=128256"
    rec["results"] += [
        {"op": "flash_attention_varlen", "shape": "packed tokens=16384 docs=8", "size": 1,
         "direction": "fwd", "impl": "ours[triton]", "ms": 1.0, "p20": 1.0, "p80": 1.0,
         "tflops": 301.4, "frac_matmul": 0.38},
        {"op": "flash_attention_varlen", "shape": "packed tokens=16384 docs=8", "size": 1,
         "direction": "fwd", "impl": "sdpa-padded-mask", "error": "RuntimeError: no kernel"},
        {"op": "flash_attention_with_kvcache", "shape": "decode b=64", "size": 1,
         "direction": "fwd", "impl": "ours[triton] paged-16", "ms": 0.2, "p20": 0.2,
         "p80": 0.2, "gbps": 2700.0, "frac_copy_bw": 0.9},
        {"op": "linear_cross_entropy", "shape": loss, "size": 1, "direction": "fwd+bwd",
         "impl": "ours[triton]", "ms": 41.0, "p20": 41.0, "p80": 41.0, "peak_mem_mb": 2500.0,
         "mem_vs_eager": 0.25},
        {"op": "linear_cross_entropy", "shape": loss, "size": 1, "direction": "fwd+bwd",
         "impl": "eager", "ms": 40.0, "p20": 40.0, "p80": 40.0, "peak_mem_mb": 10000.0,
         "mem_vs_eager": 1.0},
    ]
    return rec


def test_new_ops_reach_the_report_and_the_headline():
    from benchmarks import report

    with open(RUN2) as f:
        old = json.load(f)
    rec = _with_new_rows(json.loads(json.dumps(old)))
    md = report.markdown(rec)
    loss_table = md.split("## linear_cross_entropy: ")[1]
    assert "| peak vs eager |" in loss_table.splitlines()[2]
    assert loss_table.splitlines()[4].endswith("| 2500 | 0.25x |")  # ours, after the header
    assert "| peak vs eager |" not in md.split("## linear_cross_entropy: ")[0]  # memory ops
    head = "\n".join(record.headline(rec, ""))
    assert "| packed tokens=16384 docs=8 fwd | 301 | error |" in head
    assert "| decode b=64 fwd | 2700 GB/s (90%) |" in head
    assert "| 7B tokens=8192 dim=4096 vocab=128256 fwd+bwd | 41.00 ms, 2500 MiB (0.25x) | " \
           "40.00 ms, 10000 MiB (1.00x) |" in head
    # a record without these ops keeps the headline it had
    assert "Packed attention" not in "\n".join(record.headline(old, ""))


def test_append_adds_rows_to_the_record_with_its_ceilings(tmp_path, monkeypatch):
    """A second run with --append (how a separately timed step adds the full-run ops to the quick
    run's record) keeps the first run's rows, ceilings and environment and adds its own rows."""
    from benchmarks import __main__ as bench

    monkeypatch.setattr(bench.sweep, "main", lambda: 0)  # the CPU sweep is not under test
    out = str(tmp_path)
    common = ["--quick", "--no-plots", "--out", out]
    assert bench.main(["--ops", "rms_norm", *common]) == 0
    first = json.loads((tmp_path / "results.json").read_text())
    first["ceilings"]["copy_gbps"] = 1234.0  # as if measured on a GPU: must be reused, not redone
    (tmp_path / "results.json").write_text(json.dumps(first))
    assert bench.main(["--ops", "swiglu,linear_cross_entropy", "--append", *common]) == 0
    rec = json.loads((tmp_path / "results.json").read_text())
    n = len(first["results"])
    assert n > 0 and rec["results"][:n] == first["results"]
    assert {r["op"] for r in rec["results"][n:]} == {"swiglu"}
    assert rec["ceilings"]["copy_gbps"] == 1234.0 and rec["args"]["ops"] == ["rms_norm"]
    assert rec["appended_args"][0]["ops"] == ["swiglu", "linear_cross_entropy"]
    assert len(rec["notes"]) == len(set(rec["notes"]))
    assert any("linear_cross_entropy: GPU-only" in n for n in rec["notes"])
    assert "## swiglu" in (tmp_path / "report.md").read_text()
