"""The markdown report (a table per op and shape) and the plots (throughput vs size per op, one
line per implementation, the measured ceiling drawn).

    python -m benchmarks.report results.json [--out DIR]   # report.md and the plots, from JSON
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict


def _fmt(x, digits=1):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def markdown(record: dict) -> str:
    env, ceil = record["environment"], record["ceilings"]
    lines = [
        "# llama-kernels benchmark",
        "",
        f"- GPU: {env.get('gpu') or 'none (CPU smoke run: times are not GPU figures)'}"
        f" ({env.get('gpu_memory_gib', '-')} GiB, driver {env.get('driver', '-')}, "
        f"{env.get('sms', '-')} SMs)",
        f"- torch {env['torch']} (CUDA {env.get('cuda_runtime')}), triton {env.get('triton')}, "
        f"python {env['python']}",
        f"- commit {env['commit']}, date {env['date']}",
        f"- ceilings measured in this run: device-to-device copy {_fmt(ceil['copy_gbps'], 0)} "
        f"GB/s (read + write), bf16 {ceil['matmul_size']}^3 matmul "
        f"{_fmt(ceil['matmul_tflops'], 0)} TFLOP/s"
        + (" (copies tried, GB/s: " + ", ".join(f"{k} {v:.0f}" for k, v in
                                                 ceil["copy_streams"].items()) + ")"
           if ceil.get("copy_streams") else ""),
        "- GPU ms: median (p20-p80) per call of N calls captured in one CUDA graph (no host "
        "overhead; inputs several times the L2). host ms: median of one eager call at a time "
        "(triton.testing.do_bench, L2 flushed), which includes Python and launch overhead. "
        "Bandwidth, FLOP rates and speed-ups use GPU ms. peak MiB: device memory one call "
        "allocates beyond what was live before it (torch.cuda.max_memory_allocated after a reset); "
        "peak vs eager: that over eager's, for the ops whose point is memory. "
        f"dtype {record['args']['dtype']}.",
    ]
    for note in record.get("notes", []):
        lines.append(f"- note: {note}")
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in record["results"]:
        groups[(r["op"], r["shape"])].append(r)
    for (op, shape), rows in groups.items():
        lines += ["", f"## {op}: {shape}", ""]
        has_bw = any("gbps" in r for r in rows)
        has_fl = any("tflops" in r for r in rows)
        has_tok = any("tokens_per_s" in r for r in rows)
        has_mem = any("mem_vs_eager" in r for r in rows)
        head = ["direction", "implementation", "GPU ms (p20-p80)"]
        if has_tok:
            head += ["tokens/s"]
        if has_bw:
            head += ["GB/s", "% copy BW"]
        if has_fl:
            head += ["TFLOP/s", "% matmul"]
        head += ["host ms", "vs eager", "vs compile", "peak MiB"]
        if has_mem:
            head += ["peak vs eager"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        base = {(r["direction"], r["impl"]): r.get("ms") for r in rows}
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['direction']} | {r['impl']} | {r['error']} |")
                continue
            cells = [r["direction"], r["impl"],
                     f"{r['ms']:.4f} ({r['p20']:.4f}-{r['p80']:.4f})"]
            if has_tok:
                cells.append(_fmt(r.get("tokens_per_s"), 0))
            if has_bw:
                cells += [_fmt(r.get("gbps"), 0), _fmt(100 * r["frac_copy_bw"], 1)
                          if "frac_copy_bw" in r else "-"]
            if has_fl:
                cells += [_fmt(r.get("tflops"), 1), _fmt(100 * r["frac_matmul"], 1)
                          if "frac_matmul" in r else "-"]
            cells.append(_fmt(r.get("host_ms"), 4))
            for other in ("eager", "torch.compile"):
                t = base.get((r["direction"], other))
                cells.append(f"{t / r['ms']:.2f}x" if t else "-")
            cells.append(_fmt(r.get("peak_mem_mb"), 0))
            if has_mem:
                cells.append(f"{r['mem_vs_eager']:.2f}x" if "mem_vs_eager" in r else "-")
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plots(record: dict, out_dir: str) -> list[str]:
    """One PNG per op: throughput vs size, one line per implementation, per direction."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    ceil = record["ceilings"]
    by_op: dict[str, list[dict]] = defaultdict(list)
    for r in record["results"]:
        if "error" not in r and r["op"] != "model":  # the model's table is its report
            by_op[r["op"]].append(r)
    paths = []
    for op, rows in by_op.items():
        metric = "gbps" if all("gbps" in r for r in rows) else "tflops"
        directions = sorted({r["direction"] for r in rows}, key=["fwd", "bwd", "fwd+bwd"].index)
        fig, axes = plt.subplots(1, len(directions), figsize=(5 * len(directions), 4),
                                 squeeze=False)
        for ax, direction in zip(axes[0], directions):
            lines = defaultdict(list)
            for r in rows:
                if r["direction"] == direction and metric in r:
                    lines[r["impl"]].append((r["size"], r[metric]))
            for impl, pts in sorted(lines.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
            ceiling = ceil["copy_gbps"] if metric == "gbps" else ceil["matmul_tflops"]
            ax.axhline(ceiling, color="k", linestyle="--", linewidth=1,
                       label="copy bandwidth" if metric == "gbps" else "bf16 matmul")
            ax.set_xscale("log")
            ax.set_title(f"{op} {direction}")
            ax.set_xlabel("elements" if metric == "gbps" else "score elements (b*sq*sk*h)")
            ax.set_ylabel("GB/s" if metric == "gbps" else "TFLOP/s")
            ax.legend(fontsize=7)
        fig.suptitle(f"{record['environment'].get('gpu')} - {record['environment']['commit']}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                 description="report.md and the plots from a results.json")
    ap.add_argument("results", help="a results.json written by python -m benchmarks")
    ap.add_argument("--out", default=None, help="folder for report.md and plots (default: the "
                    "folder of results.json)")
    args = ap.parse_args(argv)
    with open(args.results) as f:
        record = json.load(f)
    out = args.out or os.path.dirname(os.path.abspath(args.results))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(markdown(record))
    paths = plots(record, out)
    print(f"wrote {os.path.join(out, 'report.md')}" + "".join(f", {p}" for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
