"""The attention tuning path: the committed candidate list (compiled here, spill-free, the rule
first), the winners a GPU run's timings pick, and the package table the launch settings read."""

from __future__ import annotations

import json

import pytest

from benchmarks import tune
from helpers import run_compiler_script
from llama_kernels.triton import _aot
from llama_kernels.triton import attention_launch as al


@pytest.fixture
def table(tmp_path, monkeypatch):
    """A tuned table in a temporary file, read by attention_launch_settings."""
    path = tmp_path / "attention_tuned.json"

    def write(content: dict):
        path.write_text(json.dumps(content))
        al.tuned_table.cache_clear()

    monkeypatch.setattr(al, "TUNED_PATH", str(path))
    al.tuned_table.cache_clear()
    yield write
    al.tuned_table.cache_clear()


def test_tuned_entries_replace_the_rules_where_they_apply(table):
    rule_fwd = al.attention_launch_settings("fwd", 128, (9, 0))
    rules = {(k, d, a): al.attention_launch_settings(k, d, a)
             for k in ("fwd", "bwd_dq") for d in (64, 128) for a in ((8, 0), (9, 0))}
    rule_decode = al.attention_launch_settings("decode", 128, (9, 0), rows=64)
    table({"9.0": {"128": {"fwd": [64, 128, 4, 4], "decode": [16, 128, 4, 2]}}})
    assert al.attention_launch_settings("fwd", 128, (9, 0)) == al.AttentionLaunch(64, 128, 4, 4)
    # decode keeps the block_m its query rows need
    assert al.attention_launch_settings("decode", 128, (9, 0), rows=64) == \
        rule_decode._replace(block_n=128, num_warps=4, num_stages=2)
    # another capability, head_dim, kernel or an fp32 input: the rules
    for (kernel, d, arch), rule in rules.items():
        if (kernel, d, arch) != ("fwd", 128, (9, 0)):
            assert al.attention_launch_settings(kernel, d, arch) == rule, (kernel, d, arch)
    assert al.attention_launch_settings("fwd", 128, (9, 0), elem_bytes=4) != \
        al.AttentionLaunch(64, 128, 4, 4)
    table({})
    assert al.attention_launch_settings("fwd", 128, (9, 0)) == rule_fwd


def test_a_malformed_table_is_refused(table):
    table({"9.0": {"128": {"combine": [1, 1, 4, 1]}}})
    with pytest.raises(ValueError, match="combine"):
        al.attention_launch_settings("fwd", 128, (9, 0))


def test_winners_are_the_least_total_time_over_the_cases_timed():
    rows = [
        dict(kernel="fwd", head_dim=128, causal=True, settings=[128, 64, 8, 3], ms=1.0),
        dict(kernel="fwd", head_dim=128, causal=False, settings=[128, 64, 8, 3], ms=2.0),
        dict(kernel="fwd", head_dim=128, causal=True, settings=[64, 64, 4, 3], ms=0.9),
        dict(kernel="fwd", head_dim=128, causal=False, settings=[64, 64, 4, 3], ms=2.2),
        # fastest causal, but never timed non-causal: not eligible
        dict(kernel="fwd", head_dim=128, causal=True, settings=[128, 128, 8, 3], ms=0.5),
        dict(kernel="fwd", head_dim=128, causal=False, settings=[128, 128, 8, 3],
             error="not timed (budget spent)"),
        dict(kernel="decode", head_dim=64, causal=True, settings=[16, 64, 4, 3], ms=0.3),
        dict(kernel="decode", head_dim=64, causal=True, settings=[16, 128, 4, 3],
             error="output differs from the rule's"),
    ]
    assert tune.winners(dict(rows=rows)) == {"128": {"fwd": [128, 64, 8, 3]},
                                            "64": {"decode": [16, 64, 4, 3]}}


def test_blocked_backward_is_a_winner_only_where_it_beat_the_split_one():
    """bwd_blocked (the structure switch) is kept for a head_dim only when its fastest
    whole-backward time is below the fastest bwd_dkdv / bwd_dq one."""
    def rows(d, kernel, settings, ms):
        return [dict(kernel=kernel, head_dim=d, causal=c, settings=settings, ms=ms)
                for c in (True, False)]

    record = dict(rows=rows(64, "bwd_dkdv", [32, 128, 8, 3], 1.0)
                  + rows(64, "bwd_dq", [128, 64, 8, 3], 1.1)
                  + rows(64, "bwd_blocked", [32, 128, 8, 5], 0.8)
                  + rows(64, "bwd_blocked", [32, 64, 4, 5], 0.9)
                  + rows(128, "bwd_dkdv", [16, 128, 8, 2], 2.0)
                  + rows(128, "bwd_blocked", [16, 128, 8, 3], 2.0))
    out = tune.winners(record)
    assert out["64"]["bwd_blocked"] == [32, 128, 8, 5]
    assert out["64"]["bwd_dkdv"] == [32, 128, 8, 3]
    assert "bwd_blocked" not in out["128"] and out["128"]["bwd_dkdv"] == [16, 128, 8, 2]


def test_write_winners_keeps_other_capabilities(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"8.0": {"64": {"fwd": [128, 64, 8, 2]}}}))
    record = dict(capability="9.0", rows=[
        dict(kernel="bwd_dq", head_dim=64, causal=c, settings=[128, 32, 8, 3], ms=1.0)
        for c in (True, False)])
    table = tune.write_winners(record, str(path))
    assert table == json.loads(path.read_text()) == {
        "8.0": {"64": {"fwd": [128, 64, 8, 2]}}, "9.0": {"64": {"bwd_dq": [128, 32, 8, 3]}}}


def test_candidate_list_is_spill_free_and_starts_with_the_rule():
    candidates = tune.load_candidates()
    for arch in tune.ARCHS:
        for d in tune.HEAD_DIMS:
            by_kernel = candidates[f"sm_{arch}"][str(d)]
            assert set(by_kernel) == set(al.TUNED_KERNELS)
            for kernel, cands in by_kernel.items():
                assert cands[0][:4] == list(tune.rule(kernel, d, arch)), (arch, d, kernel)
                assert len({tuple(c[:4]) for c in cands}) == len(cands) >= 2
                for bm, bn, warps, stages, registers, shared in cands:
                    assert registers <= 255 and shared <= 227 * 1024


@pytest.mark.skipif(_aot.tools_missing() is not None, reason="no ptxas / cuobjdump here")
def test_a_sample_of_the_candidates_still_compiles_without_spills():
    """The list was compiled with --refresh-candidates; one candidate of each kernel (the last,
    the least like the rule) is compiled again with the Triton installed here."""
    code = """
import json, os
os.environ["TRITON_INTERPRET"] = "0"  # benchmarks/__init__.py would turn it on without a GPU
from benchmarks import tune
from llama_kernels.triton import _aot
from llama_kernels.triton.attention_launch import AttentionLaunch
out = []
for kernel, cands in tune.load_candidates()["sm_90"]["128"].items():
    r = _aot.compile_case(tune.aot_case(kernel, 128, AttentionLaunch(*cands[-1][:4])), 90)
    out.append((kernel, r["spill_stores"] + r["spill_loads"], r["registers"]))
print(json.dumps(out))
"""
    proc = run_compiler_script(code, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(al.TUNED_KERNELS)
    for kernel, spills, registers in results:
        assert spills == 0, (kernel, spills, registers)


def test_dry_run_lists_the_candidates(capsys):
    assert tune.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sm_90 d128 fwd:" in out and "rule first" in out
