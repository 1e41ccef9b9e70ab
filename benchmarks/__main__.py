"""python -m benchmarks: the ceilings, then every op x direction x implementation, then a report.

    python -m benchmarks --quick --out benchmarks/out
    python -m benchmarks --ops rms_norm,swiglu --shapes 7B,65B --backends cuda,triton
    python -m benchmarks --quick --append --ops flash_attention_varlen,linear_cross_entropy

On a machine without a GPU it says so, runs the correctness sweep of every backend that can run
here (benchmarks/sweep.py) and a smoke run of this harness on tiny CPU shapes. The third form
adds the ops that only the full run includes by default to the record the first run wrote.
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

# Packed and cached attention and the fused loss are run by default only without --quick: with
# their peers (torch.compile of the loss at two vocabularies, the packed and paged kernels' JIT)
# they would take more than the minutes scripts/gpu_check.sh gives the quick run. --ops names
# them to run them with --quick too.
FULL_RUN_OPS = ("flash_attention_varlen", "flash_attention_with_kvcache", "linear_cross_entropy")
QUICK_OPS = ("rms_norm", "add_rms_norm", "swiglu", "apply_rotary", "flash_attention", "model")
OPS = QUICK_OPS[:-1] + FULL_RUN_OPS + QUICK_OPS[-1:]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", default=None,
                    help=f"comma-separated subset of {','.join(OPS)} (default: all; with --quick "
                         f"all but {','.join(FULL_RUN_OPS)})")
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
    ap.add_argument("--append", action="store_true",
                    help="add this run's rows to OUT/results.json, reusing its ceilings (same "
                         "machine, minutes apart), instead of starting a new record: how a "
                         "second, separately timed step adds --ops to a quick run's record")
    args = ap.parse_args(argv)
    default_ops = QUICK_OPS if args.quick else OPS
    args.ops = [o for o in (args.ops or ",".join(default_ops)).split(",") if o]
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
    if case.memory:
        _memory_vs_eager(rows)
    inputs.clear()  # free the case's tensors before the next case allocates its own
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def _memory_vs_eager(rows: list[dict]) -> None:
    """Each timed row's peak memory over that of eager in the same direction (GPU runs only)."""
    eager = {r["direction"]: r.get("peak_mem_mb") for r in rows if r["impl"] == "eager"}
    for r in rows:
        base = eager.get(r["direction"])
        if base and r.get("peak_mem_mb") is not None:
            r["mem_vs_eager"] = r["peak_mem_mb"] / base


def _direction_fn(impl, inputs, direction):
    if direction == "fwd":
        return lambda: impl(*inputs)
    # Integer inputs (cu_seqlens, targets, cache lengths) are passed through, not differentiated;
    # a float input an implementation does not read (a peer's own layout of the same tokens)
    # gets no gradient.
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    wrt = [t for t in leaves if t.requires_grad]

    def outputs():
        out = impl(*leaves)
        return out if isinstance(out, tuple) else (out,)

    grads = [torch.randn_like(o) for o in outputs()]
    if direction == "bwd":
        outs = outputs()
        return lambda: torch.autograd.grad(outs, wrt, grads, retain_graph=True, allow_unused=True)
    return lambda: torch.autograd.grad(outputs(), wrt, grads, allow_unused=True)


def _full_run_cases(args, backends, dtype, device, notes) -> list[C.Case]:
    """The packed and cached attention and the loss, at the shapes of issues 14 and 16 (LLaMA-7B
    heads and width); GPU only, like the attention rows: under the interpreter these shapes take
    minutes (tests/test_bench_counts.py builds and runs them at tiny shapes on a CPU)."""
    wanted = [o for o in FULL_RUN_OPS if o in args.ops]
    if wanted and device.type != "cuda":
        notes.append(f"{', '.join(wanted)}: GPU-only rows (minutes under the Triton interpreter "
                     "at their shapes), skipped here")
        return []
    cases = []
    if "flash_attention_varlen" in wanted:
        cases += C.varlen_cases(backends, dtype, device, notes)
    if "flash_attention_with_kvcache" in wanted:
        cases += C.kvcache_cases(backends, dtype, device, notes)
    if "linear_cross_entropy" in wanted:
        cases += C.cross_entropy_cases(backends, dtype, device, notes,
                                       tokens=2048 if args.quick else 8192)
    notes[:] = dict.fromkeys(notes)  # one note per missing peer, however many cases name it
    return cases


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
    json_path = os.path.join(args.out, "results.json")
    md_path = os.path.join(args.out, "report.md")
    previous = None
    if args.append and os.path.exists(json_path):
        with open(json_path) as f:
            previous = json.load(f)
    if previous is not None:
        ceilings = harness.Ceilings(**previous["ceilings"])
    else:
        ceilings = harness.measure_ceilings(quick=args.quick)
    print(f"ceilings: copy {ceilings.copy_gbps:.0f} GB/s, bf16 matmul "
          f"{ceilings.matmul_tflops:.0f} TFLOP/s")

    if not gpu:  # the smoke run times the real case builders at tiny sizes, torch backend only
        backends = ["torch"]
    cases = []
    row_ops = [o for o in args.ops if o not in ("flash_attention", "model", *FULL_RUN_OPS)]
    if row_ops:
        cases += C.row_cases(backends, args.shapes, tokens, dtype, device)
        cases = [c for c in cases if c.op in row_ops]
    if "flash_attention" in args.ops and gpu:
        cases += C.attention_cases(backends, args.shapes, dtype, device, args.quick)
    cases += _full_run_cases(args, backends, dtype, device, notes)
    if not gpu:  # compile baselines take minutes on CPU; the smoke keeps eager and ours
        for c in cases:
            c.impls.pop("torch.compile", None)
            c.directions = ("fwd", "bwd")

    results: list[dict] = []
    record = {"environment": env, "ceilings": vars(ceilings), "args": vars(args),
              "notes": notes, "results": results}
    if previous is not None:  # the first run's environment and arguments head the record
        record = previous
        record["notes"] = list(dict.fromkeys(record.get("notes", []) + notes))
        record.setdefault("appended_args", []).append(vars(args))
        results = record["results"]
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
