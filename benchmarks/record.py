"""Commit one GPU run of scripts/gpu_check.sh as a record, and keep README.md's table in step.

    python -m benchmarks.record OUTDIR                 # OUTDIR: what gpu_check.sh wrote
    python -m benchmarks.record --readme-only benchmarks/results/<run>/results.json

The first form copies OUTDIR's files (summary.txt, results.json, report.md, tune.json,
logs.tar.gz) into ``benchmarks/results/<date>-<gpu>-<commit>/``, renders the plots from
results.json there, writes the record's README.md (GPU, driver, versions, commit, each step's
status, the headline tables) and replaces README.md's "Latest measurements" section (between
its two ``latest-measurements`` markers) with the tables of this record. The second form only
regenerates that section from a committed record.

Every figure is read from results.json: nothing here is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys

from benchmarks import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
BEGIN, END = "<!-- latest-measurements -->", "<!-- /latest-measurements -->"
RUN_FILES = ("summary.txt", "results.json", "report.md", "tune.json", "logs.tar.gz")
ROW_OPS = (("rms_norm", "rms_norm"), ("add_rms_norm", "add_rms_norm"), ("swiglu", "swiglu"),
           ("apply_rotary", "rotary q+k"))
ROW_IMPLS = ("ours[cuda]", "ours[triton]", "torch.compile", "liger", "eager")
ATTN_IMPLS = ("ours[cuda]", "ours[triton]", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient",
              "flex", "torch.compile", "eager")


def _rows(record: dict, op: str) -> list[dict]:
    return [r for r in record["results"] if r["op"] == op]


def _pick(rows: list[dict], direction: str, impl: str) -> dict | None:
    for r in rows:
        if r["direction"] == direction and r["impl"] == impl:
            return r
    return None


def _pct(r: dict | None) -> str:
    if r is None:
        return "-"
    if "error" in r:
        return "error"
    return f"{100 * r['frac_copy_bw']:.0f}%" if "frac_copy_bw" in r else "-"


def _shape_label(op: str, shape: str) -> str:
    """'7B tokens=16384 dim=4096' -> '16384 x 4096'; rotary: '8 x 2048 x 32 x 128' (head_dim is
    128 in every LLaMA preset: dim / heads)."""
    nums = dict(re.findall(r"(\w+)=(\d+)", shape))
    if op == "apply_rotary" and {"batch", "seqlen", "heads"} <= nums.keys():
        return f"{nums['batch']} x {nums['seqlen']} x {nums['heads']} x 128"
    width = nums.get("dim") or nums.get("hidden")
    return f"{nums['tokens']} x {width}" if "tokens" in nums and width else shape


def row_table(record: dict) -> list[str]:
    """The row ops' % of the measured copy bandwidth, one line per op and direction."""
    impls = [i for i in ROW_IMPLS if any(r["impl"] == i for r in record["results"])]
    head = ["op", "dir"] + [("Liger-Kernel" if i == "liger" else i) for i in impls]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for op, label in ROW_OPS:
        rows = _rows(record, op)
        if not rows:
            continue
        first = f"{label} {_shape_label(op, rows[0]['shape'])}"
        for direction in ("fwd", "bwd"):
            cells = [first if direction == "fwd" else label, direction]
            cells += [_pct(_pick(rows, direction, i)) for i in impls]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def attention_table(record: dict) -> list[str]:
    """TFLOP/s of every attention implementation (GB/s of K and V for decoding)."""
    rows = _rows(record, "flash_attention")
    if not rows:
        return []
    impls = [i for i in ATTN_IMPLS if any(r["impl"] == i for r in rows)]
    lines = ["| case | " + " | ".join(impls) + " |", "|" + "---|" * (len(impls) + 1)]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        decode = " decode " in f" {shape} "
        for direction in ("fwd",) if decode else ("fwd", "bwd", "fwd+bwd"):
            cells = [f"{shape.split(' ', 1)[1]} {direction}"]
            for impl in impls:
                r = _pick([x for x in rows if x["shape"] == shape], direction, impl)
                if r is None:
                    cells.append("-")
                elif "error" in r:
                    cells.append("error")
                elif decode:
                    cells.append(f"{r['gbps']:.0f} GB/s" if "gbps" in r else "-")
                else:
                    cells.append(f"{r['tflops']:.0f}")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


# The ops measured against their peers in one table each: (op, title, figure in each cell).
PEER_TABLES = (
    ("flash_attention_varlen", "Packed attention (TFLOP/s of each document's visible scores; the "
     "dense row is our kernel on the same tokens at the mean document length):", "tflops"),
    ("flash_attention_with_kvcache", "Decoding against a KV cache (GB/s of the K and V each "
     "sequence's own length needs, % of the copy ceiling; the dense row reads every sequence "
     "at the longest length):", "gbps"),
    ("linear_cross_entropy", "LM-head loss, forward + backward (GPU ms, peak MiB beyond the "
     "inputs, peak over eager's):", "memory"),
)


def _figure(r: dict | None, metric: str) -> str:
    if r is None:
        return "-"
    if "error" in r:
        return "error"
    if metric == "tflops":
        return f"{r['tflops']:.0f}" if "tflops" in r else "-"
    if metric == "gbps":
        return f"{r['gbps']:.0f} GB/s ({100 * r['frac_copy_bw']:.0f}%)" if "gbps" in r else "-"
    peak = r.get("peak_mem_mb")
    cell = f"{r['ms']:.2f} ms" + (f", {peak:.0f} MiB" if peak is not None else "")
    return cell + (f" ({r['mem_vs_eager']:.2f}x)" if "mem_vs_eager" in r else "")


def peer_table(record: dict, op: str, metric: str) -> list[str]:
    """One line per case and direction of ``op``, one column per implementation."""
    rows = _rows(record, op)
    if not rows:
        return []
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    lines = ["| case | " + " | ".join(impls) + " |", "|" + "---|" * (len(impls) + 1)]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape]
        for direction in dict.fromkeys(r["direction"] for r in mine):
            cells = [f"{shape} {direction}"]
            cells += [_figure(_pick(mine, direction, impl), metric) for impl in impls]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def model_lines(record: dict) -> list[str]:
    rows = [r for r in record["results"] if r["op"] == "model" and "error" not in r]
    out = []
    for r in rows:
        figure = (f"{r['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in r
                  else f"{r['ms']:.3f} ms")
        out.append(f"- model {r['shape']} {r['direction']} {r['impl']}: {figure}")
    return out


def headline(record: dict, where: str) -> list[str]:
    """The record's summary: where and on what it ran, the row ops' table, attention, model."""
    env, ceil = record["environment"], record["ceilings"]
    lines = [
        f"{env.get('gpu')}, torch {env['torch'].split('+')[0]} / triton {env.get('triton')}, "
        f"{record['args']['dtype']}, LLaMA-7B shapes, {env['date'][:10]} ({where}commit "
        f"{env['commit']}). GPU time from CUDA-graph replay; % of the device-to-device copy "
        f"bandwidth measured in the same run ({ceil['copy_gbps']:.0f} GB/s).",
        "",
        *row_table(record),
    ]
    attn = attention_table(record)
    if attn:
        lines += ["", "Attention (TFLOP/s, causal counts the visible half; decoding: GB/s of K "
                      f"and V; matmul peak measured at {ceil['matmul_tflops']:.0f} TFLOP/s):",
                  "", *attn]
    for op, title, metric in PEER_TABLES:
        table = peer_table(record, op, metric)
        if table:
            lines += ["", title, "", *table]
    model = model_lines(record)
    if model:
        lines += ["", *model]
    return lines


def latest_section(record: dict, record_dir: str) -> str:
    where = f"`{os.path.relpath(record_dir, REPO)}/`, "
    return "\n".join([BEGIN, *headline(record, where), END])


def update_readme(readme: str, section: str) -> str:
    """README text with the section between the markers replaced (markers must be there)."""
    start, stop = readme.find(BEGIN), readme.find(END)
    if start < 0 or stop < start:
        raise ValueError(f"README.md: expected the markers {BEGIN} ... {END}")
    return readme[:start] + section + readme[stop + len(END):]


def _steps(summary: str) -> list[str]:
    return [line for line in summary.splitlines()
            if re.match(r"^[\w-]+: (ok|FAILED|SKIPPED)", line)]


def record_readme(record: dict, summary: str, present: list[str]) -> str:
    env, ceil = record["environment"], record["ceilings"]
    steps = _steps(summary)
    missing = [f for f in RUN_FILES if f not in present]
    lines = [
        f"# {env['date'][:10]}, {env.get('gpu')}, commit {env['commit']}",
        "",
        f"`scripts/gpu_check.sh` on one {env.get('gpu')} (driver {env.get('driver', '-')}, "
        f"{env.get('sms', '-')} SMs), torch {env['torch']}, triton {env.get('triton')}, "
        f"python {env['python']}. Ceilings measured in the same run: device-to-device copy "
        f"{ceil['copy_gbps']:.0f} GB/s (read + write), bf16 {ceil['matmul_size']}^3 matmul "
        f"{ceil['matmul_tflops']:.0f} TFLOP/s. Files: summary.txt (each step), results.json "
        "(every figure), report.md (every table), logs.tar.gz (each step's log and JUnit XML); "
        "the plots are rendered from results.json by `python -m benchmarks.report`.",
        "",
        "## Steps",
        "",
        *(f"- {s}" for s in steps),
    ]
    if not steps:
        lines.append("- summary.txt lists no step: the run stopped before its first one ended")
    if missing:
        lines += ["", f"Not in this record (the run did not produce them): {', '.join(missing)}."]
    lines += ["", "## Headline", "", *headline(record, "")]
    return "\n".join(lines) + "\n"


def import_run(out_dir: str, results_root: str = RESULTS, readme_path: str | None = None) -> str:
    """Copy a gpu_check.sh OUTDIR into a new record folder; return the folder."""
    with open(os.path.join(out_dir, "results.json")) as f:
        record = json.load(f)
    env = record["environment"]
    if not env.get("gpu"):
        raise ValueError(f"{out_dir}/results.json: no GPU in its environment; a record holds "
                         "GPU runs only")
    gpu = re.sub(r"[^a-z0-9]+", "-", env["gpu"].lower().replace("nvidia", "")).strip("-")
    name = f"{env['date'][:10]}-{gpu}-{env['commit']}"
    dest = os.path.join(results_root, name)
    os.makedirs(dest, exist_ok=True)
    present = []
    for f in RUN_FILES:
        src = os.path.join(out_dir, f)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(dest, f))
            present.append(f)
    summary = ""
    if "summary.txt" in present:
        with open(os.path.join(dest, "summary.txt")) as f:
            summary = f.read()
    with open(os.path.join(dest, "report.md"), "w") as f:
        f.write(report.markdown(record))
    report.plots(record, dest)
    with open(os.path.join(dest, "README.md"), "w") as f:
        f.write(record_readme(record, summary, present))
    if readme_path:
        write_latest(os.path.join(dest, "results.json"), readme_path)
    return dest


def write_latest(results_json: str, readme_path: str) -> None:
    with open(results_json) as f:
        record = json.load(f)
    with open(readme_path) as f:
        text = f.read()
    text = update_readme(text, latest_section(record, os.path.dirname(results_json)))
    with open(readme_path, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.record", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="a gpu_check.sh OUTDIR, or with --readme-only a results.json")
    ap.add_argument("--readme-only", action="store_true",
                    help="only regenerate README.md's latest-measurements section")
    ap.add_argument("--results", default=RESULTS, help="where records live (%(default)s)")
    ap.add_argument("--readme", default=os.path.join(REPO, "README.md"))
    ap.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    args = ap.parse_args(argv)
    if args.readme_only:
        write_latest(os.path.abspath(args.path), args.readme)
        print(f"updated {args.readme} from {args.path}")
        return 0
    dest = import_run(args.path, args.results, None if args.no_readme else args.readme)
    print(f"wrote {dest}" + ("" if args.no_readme else f" and updated {args.readme}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
