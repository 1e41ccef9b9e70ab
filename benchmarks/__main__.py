"""python -m benchmarks: the ceilings, then every op x direction x implementation, then a report.

    python -m benchmarks --quick --out benchmarks/out
    python -m benchmarks --ops rms_norm,swiglu --shapes 7B,65B --backends cuda,triton

On a machine without a GPU it says so, runs the correctness sweep of every backend that can run
here (benchmarks/sweep.py) and a smoke run of this harness on tiny CPU shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import llama_kernels as lk
from benchmarks import cases as C
from benchmarks import harness, model_bench, report, sweep

OPS = ("rms_norm", "add_rms_norm", "swiglu", "apply_rotary", "flash_attention", "model")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of %(default)s")
    ap.add_argument("--backends", default="cuda,triton",
                    help="our backends to time (those that cannot run are skipped with a note)")
    ap.add_argument("--shapes", default=None,
                    help="LLaMA presets, comma-separated, from 7B,13B,33B,65B (default: all; "
                         "7B with --quick)")
    ap.add_argument("--tokens", type=int, default=16384,
                    help="rows (batch x seqlen) for the row ops (default %(default)s: each "
                         "tensor is then several times the size of an H100's 50 MB L2)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--quick", action="store_true", help="few shapes, short repetitions")
    ap.add_argument("--out", default="benchmarks/out", help="folder for JSON, markdown, plots")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    args.ops = [o for o in args.ops.split(",") if o]
    unknown = set(args.ops) - set(OPS)
    if unknown:
        ap.error(f"--ops: unknown {sorted(unknown)}; choose from {OPS}")
    default_shapes = "7B" if args.quick else ",".join(C.PRESETS)
    args.shapes = [s for s in (args.shapes or default_shapes).split(",") if s]
    unknown = set(args.shapes) - set(C.PRESETS)
    if unknown:
        ap.error(f"--shapes: unknown {sorted(unknown)}; choose from {list(C.PRESETS)}")
    args.backends = [b for b in args.backends.split(",") if b]
    return args


def _progress(items, desc):
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, file=sys.stderr, dynamic_ncols=True)
    except ImportError:
        return items


def run_case(case: C.Case, ceilings: harness.Ceilings, quick: bool) -> list[dict]:
    rows = []
    inputs = case.make_inputs()
    rep = 40 if quick else 100
    wrong = {}
    for impl_name, impl in case.impls.items():  # every variant is checked before it is timed
        try:
            why = C.check_output(case, impl, inputs)
        except Exception as e:  # noqa: BLE001 - an implementation that raises has failed
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if why is not None:
            wrong[impl_name] = why
    for direction in case.directions:
        for impl_name, impl in case.impls.items():
            row = {"op": case.op, "shape": case.shape, "size": case.size,
                   "direction": direction, "impl": impl_name}
            if impl_name in wrong:
                row["error"] = f"failed the output check, not timed: {wrong[impl_name]}"
                rows.append(row)
                continue
            try:
                fn = _direction_fn(impl, inputs, direction)
                host = harness.time_host(fn, rep_ms=rep)
                row.update(host_ms=host.ms, peak_mem_mb=harness.peak_memory_mb(fn))
                del fn
                try:
                    t = harness.time_graph(lambda: _direction_fn(impl, inputs, direction),
                                           rep_ms=rep)
                except Exception as e:  # noqa: BLE001 - not capturable: host time stands in
                    t = host
                    row["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                row.update(ms=t.ms, p20=t.p20, p80=t.p80, timing=t.method)
                if case.bytes_fn is not None:
                    row["gbps"] = case.bytes_fn(direction) / (t.ms * 1e-3) / 1e9
                    row["frac_copy_bw"] = row["gbps"] / ceilings.copy_gbps
                if case.flops_fn is not None:
                    row["tflops"] = case.flops_fn(direction) / (t.ms * 1e-3) / 1e12
                    row["frac_matmul"] = row["tflops"] / ceilings.matmul_tflops
            except Exception as e:  # noqa: BLE001 - a failing implementation is a result too
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
    inputs.clear()  # free the case's tensors before the next case allocates its own
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def _direction_fn(impl, inputs, direction):
    if direction == "fwd":
        return lambda: impl(*inputs)
    leaves = [t.detach().requires_grad_() for t in inputs]

    def outputs():
        out = impl(*leaves)
        return out if isinstance(out, tuple) else (out,)

    grads = [torch.randn_like(o) for o in outputs()]
    if direction == "bwd":
        outs = outputs()
        return lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True)
    return lambda: torch.autograd.grad(outputs(), leaves, grads)


def _write(record: dict, json_path: str, md_path: str) -> str:
    with open(json_path, "w") as f:
        json.dump(record, f, indent=1, default=str)
    md = report.markdown(record)
    with open(md_path, "w") as f:
        f.write(md)
    return md


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    gpu = torch.cuda.is_available()
    if not gpu:
        print("no CUDA GPU here: running the correctness sweep of every backend that runs on "
              "this machine, then a smoke run of the benchmark harness on tiny CPU shapes")
        failures = sweep.main()
        args.quick, args.shapes, args.tokens = True, ["7B"], 8
        args.no_plots = True
    device = torch.device("cuda" if gpu else "cpu")
    dtype = getattr(torch, args.dtype)
    tokens = args.tokens
    report_avail = lk.available_backends()
    backends = [b for b in args.backends if report_avail.get(b) is None] or ["torch"]
    notes = [f"backend {b} skipped: {report_avail.get(b, 'unknown backend')}"
             for b in args.backends if report_avail.get(b) is not None]
    if not C.LIGER:
        notes.append("Liger-Kernel not importable: its rows are skipped")

    env = harness.environment()
    print(f"GPU: {env.get('gpu')}  torch {env['torch']}  triton {env.get('triton')}  "
          f"commit {env['commit']}")
    ceilings = harness.measure_ceilings(quick=args.quick)
    print(f"ceilings: copy {ceilings.copy_gbps:.0f} GB/s, bf16 matmul "
          f"{ceilings.matmul_tflops:.0f} TFLOP/s")

    if not gpu:  # the smoke run times the real case builders at tiny sizes, torch backend only
        backends = ["torch"]
    cases = []
    row_ops = [o for o in args.ops if o not in ("flash_attention", "model")]
    if row_ops:
        cases += C.row_cases(backends, args.shapes, tokens, dtype, device)
        cases = [c for c in cases if c.op in row_ops]
    if "flash_attention" in args.ops and gpu:
        cases += C.attention_cases(backends, args.shapes, dtype, device, args.quick)
    if not gpu:  # compile baselines take minutes on CPU; the smoke keeps eager and ours
        for c in cases:
            c.impls.pop("torch.compile", None)
            c.directions = ("fwd", "bwd")

    results: list[dict] = []
    record = {"environment": env, "ceilings": vars(ceilings), "args": vars(args),
              "notes": notes, "results": results}
    json_path = os.path.join(args.out, "results.json")
    md_path = os.path.join(args.out, "report.md")
    for case in _progress(cases, "benchmarks"):
        results += run_case(case, ceilings, args.quick)
        _write(record, json_path, md_path)  # after every case, so a cut-off run keeps its rows
    if "model" in args.ops:
        results += model_bench.run(ceilings, quick=args.quick, device=device, dtype=dtype)
    md = _write(record, json_path, md_path)
    if not args.no_plots:
        report.plots(record, args.out)
    print(md)
    print(f"wrote {json_path} and {md_path}")
    if not gpu:
        return 1 if failures else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
