"""Tune the Triton attention kernels' launch settings: one GPU run times every candidate.

    python -m benchmarks.tune --dry-run                 list the candidates (no GPU needed)
    python -m benchmarks.tune --refresh-candidates      compile the candidate space here, ahead of
                                                        time for sm_90 (no GPU), and keep in
                                                        benchmarks/tune_candidates.json those
                                                        that do not spill registers
    python -m benchmarks.tune --budget-s 55 --out DIR   on a GPU: time them, write DIR/tune.json
                                                        and DIR/tune.md
    python -m benchmarks.tune --winners DIR/tune.json   write the fastest of each (kernel,
                                                        head_dim) into the package's table,
                                                        llama_kernels/triton/attention_tuned.json

The kernels are those of llama_kernels/triton (fwd, decode, bwd_dkdv, bwd_dq, bwd_blocked), at
head_dim 64 and 128, causal and not, at the benchmark's shapes (prefill 2 x 2048 x 32 heads,
decoding 8 x 1 query against 4096 keys). A candidate is (block_m, block_n, num_warps,
num_stages); decode's block_m follows the query rows, so its candidates vary the rest. GPU time
is scarce, so only candidates that compile without spills are in the list, today's rule comes
first, and the rest follow in the list's order until the time budget is spent: what did not run
is listed as not timed. Every candidate's output is compared with the rule's before it is timed.

The backward has two structures (attention_launch.BWD_STRUCTURES): "split", timed through its
bwd_dkdv and bwd_dq candidates, and "blocked", one kernel (bwd_blocked candidates, its
block_m streamed and block_n resident). Each backward candidate is timed as the whole backward
and compared with the split rule's gradients; the winners name a bwd_blocked entry only where
the fastest blocked candidate beat the fastest split one, and that entry is what switches the
launcher to the blocked structure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CANDIDATES_PATH = os.path.join(REPO, "benchmarks", "tune_candidates.json")
HEAD_DIMS = (64, 128)
ARCHS = (90,)  # the GPU these runs get (H100 / H200); sm_80 keeps its rules until measured
PREFILL = dict(batch=2, seqlen=2048, heads=32)
DECODE = dict(batch=8, seqlen_k=4096, heads=32)

# The space compiled by --refresh-candidates: FlashAttention-2's and Triton's fused-attention
# tutorial's tiles and their neighbours (the tutorial's Hopper backward: 32 x 128 dK/dV, 128 x 32
# dQ, 4 warps, 5 stages; FlexAttention's H100 d128 backward: 64 x 128, 8 warps, 3 stages).
SPACE = {
    "fwd": [(bm, bn, w, s) for bm, bn in ((128, 64), (128, 128), (64, 64), (64, 128))
            for w in (4, 8) for s in (3, 4)],
    "decode": [(16, bn, w, s) for bn in (64, 128) for w in (4, 8) for s in (2, 3, 4)],
    "bwd_dkdv": [(bm, bn, w, s) for bm, bn in ((16, 128), (32, 128), (32, 64), (64, 128),
                                               (64, 64))
                 for w in (4, 8) for s in (3, 5)],
    "bwd_dq": [(bm, bn, w, s) for bm, bn in ((128, 32), (128, 64), (64, 64), (64, 32))
               for w in (4, 8) for s in (3, 5)],
    # the tutorial's 32 streamed x 128 resident, and halves of either side
    "bwd_blocked": [(bm, bn, w, s) for bm, bn in ((32, 128), (16, 128), (32, 64), (16, 64))
                    for w in (4, 8) for s in (3, 5)],
}


def _fa():
    from llama_kernels.triton import flash_attention as fa

    return fa


def aot_case(kernel: str, head_dim: int, cfg, dtype: str = "bf16"):
    """The ahead-of-time case of ``kernel`` at ``cfg`` (causal, as the benchmark's prefill)."""
    fa = _fa()
    t, f32 = "*" + dtype, "*fp32"
    base = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, UPCAST_DOT=False, DOT_PRECISION="tf32",
                CAUSAL=True, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
    if kernel == "bwd_blocked":
        base["MASK_BLOCK"] = fa.mask_block(cfg.block_m)
    fn, ptrs = {
        "fwd": (fa._attn_fwd_kernel, dict(default=t, lse_ptr=f32)),
        "decode": (fa._attn_fwd_splitkv_kernel, dict(default=t, o_part_ptr=f32,
                                                     lse_part_ptr=f32)),
        "bwd_dkdv": (fa._attn_bwd_dkdv_kernel, dict(default=t, lse_ptr=f32, delta_ptr=f32)),
        "bwd_dq": (fa._attn_bwd_dq_kernel, dict(default=t, lse_ptr=f32, delta_ptr=f32)),
        "bwd_blocked": (fa._attn_bwd_blocked_kernel, dict(default=t, lse_ptr=f32,
                                                          delta_ptr=f32)),
    }[kernel]
    name = f"tune {kernel} d{head_dim} {tuple(cfg)}"
    return fa._aot_case(name, fn, ptrs, base, cfg)


def rule(kernel: str, head_dim: int, arch: int):
    from llama_kernels.triton.attention_launch import attention_launch_settings

    # decode at the benchmark's shape: one query of a multi-head model, 1 row per kv head
    return attention_launch_settings(kernel, head_dim, (arch // 10, arch % 10), rows=1)


def load_candidates(path: str = CANDIDATES_PATH) -> dict:
    """{"sm_90": {"128": {kernel: [[bm, bn, w, s], ...]}}}: the rule first, then the rest."""
    with open(path) as f:
        return json.load(f)


def refresh_candidates(jobs: int | None = None, path: str = CANDIDATES_PATH,
                       kernels: tuple | None = None) -> dict:
    """Compile SPACE (and the rules) for ARCHS here; keep what does not spill. ``kernels``
    limits the compile to those kernels and keeps the others' entries of ``path``."""
    import concurrent.futures

    from llama_kernels.triton.attention_launch import AttentionLaunch

    kernels = tuple(kernels or SPACE)
    work = []
    for arch in ARCHS:
        for d in HEAD_DIMS:
            for kernel, space in SPACE.items():
                if kernel not in kernels:
                    continue
                first = tuple(rule(kernel, d, arch))
                for cand in [first] + [c for c in space if c != first]:
                    work.append((arch, d, kernel, cand))
    with concurrent.futures.ProcessPoolExecutor(jobs or os.cpu_count() or 1) as pool:
        results = list(pool.map(_compile_one, work))
    out: dict = {}
    if set(kernels) != set(SPACE) and os.path.exists(path):
        for arch, by_dim in load_candidates(path).items():
            for d, by_kernel in by_dim.items():
                for kernel, cands in by_kernel.items():
                    if kernel not in kernels:
                        out.setdefault(arch, {}).setdefault(d, {})[kernel] = cands
    for (arch, d, kernel, cand), res in zip(work, results):
        slot = out.setdefault(f"sm_{arch}", {}).setdefault(str(d), {}).setdefault(kernel, [])
        if res is not None and res["spill_stores"] + res["spill_loads"] == 0 and res["stack"] == 0:
            slot.append(list(AttentionLaunch(*cand)) + [res["registers"], res["shared"]])
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    return out


def _compile_one(item):
    from llama_kernels.triton import _aot
    from llama_kernels.triton.attention_launch import AttentionLaunch

    arch, d, kernel, cand = item
    try:
        res = _aot.compile_case(aot_case(kernel, d, AttentionLaunch(*cand)), arch)
    except Exception:  # noqa: BLE001 - out of shared memory or registers: not a candidate
        return None
    # a candidate must fit the SM's shared memory (227 KB on sm_90)
    return res if res["shared"] <= 227 * 1024 else None


# ------------------------------------------------------------------------------ timing (GPU)


def _inputs(kind: str, head_dim: int, causal: bool):
    import torch

    fa = _fa()
    dev, dt = "cuda", torch.bfloat16
    if kind == "decode":
        b, sk, h = DECODE["batch"], DECODE["seqlen_k"], DECODE["heads"]
        q = torch.randn(b, 1, h, head_dim, device=dev, dtype=dt)
        k, v = (torch.randn(b, sk, h, head_dim, device=dev, dtype=dt) for _ in range(2))
        return dict(q=q, k=k, v=v)
    b, s, h = PREFILL["batch"], PREFILL["seqlen"], PREFILL["heads"]
    q, k, v = (torch.randn(b, s, h, head_dim, device=dev, dtype=dt) for _ in range(3))
    scale = head_dim ** -0.5
    out, lse = fa.flash_attention_fwd(q, k, v, causal, scale)
    return dict(q=q, k=k, v=v, out=out, lse=lse, dout=torch.randn_like(out))


def _flops(kernel: str, head_dim: int, causal: bool) -> float:
    from benchmarks import counts

    if kernel == "decode":
        return counts.attention_flops(DECODE["batch"], 1, DECODE["seqlen_k"], DECODE["heads"],
                                      head_dim, causal=causal)
    b, s, h = PREFILL["batch"], PREFILL["seqlen"], PREFILL["heads"]
    fwd = counts.attention_flops(b, s, s, h, head_dim, causal=causal)
    # the backward's two kernels share its 2.5x: dK/dV does 4 of the 5 products, dQ 3 (P and
    # dP recomputed in both); each kernel is timed inside the whole backward
    return fwd * (1.0 if kernel == "fwd" else 2.5)


def _runner(kernel: str, head_dim: int, causal: bool, x: dict, cfg):
    fa = _fa()
    scale = head_dim ** -0.5
    settings = {kernel: cfg}
    if kernel in ("fwd", "decode"):
        return lambda: fa.flash_attention_fwd(x["q"], x["k"], x["v"], causal, scale,
                                              settings=settings)[0]
    return lambda: fa.flash_attention_bwd(x["dout"], x["q"], x["k"], x["v"], x["out"], x["lse"],
                                          causal, scale, settings=settings)


def time_all(budget_s: float, candidates: dict) -> list[dict]:
    import torch
    import triton.testing

    from llama_kernels.triton.attention_launch import AttentionLaunch

    cap = torch.cuda.get_device_capability()
    table = candidates.get(f"sm_{cap[0]}{cap[1]}", {})
    start, rows = time.perf_counter(), []
    # round-robin over (kernel, head_dim, causal) so a cut-short budget still covers each
    queues = {}
    for d in HEAD_DIMS:
        for kernel, cands in table.get(str(d), {}).items():
            for causal in ((True,) if kernel == "decode" else (True, False)):
                queues[(kernel, d, causal)] = [AttentionLaunch(*c[:4]) for c in cands]
    first = {key: queue[0] for key, queue in queues.items() if queue}
    inputs, reference = {}, {}
    while any(queues.values()):
        for key, queue in queues.items():
            if not queue:
                continue
            kernel, d, causal = key
            cfg = queue.pop(0)
            row = dict(kernel=kernel, head_dim=d, causal=causal, settings=list(cfg))
            if time.perf_counter() - start > budget_s:
                rows.append({**row, "error": "not timed (budget spent)"})
                continue
            kind = "decode" if kernel == "decode" else "prefill"
            if (kind, d, causal) not in inputs:
                inputs[(kind, d, causal)] = _inputs(kind, d, causal)
            x = inputs[(kind, d, causal)]
            try:
                fn = _runner(kernel, d, causal, x, cfg)
                got = fn()
                # the first candidate of each queue is its rule; every backward candidate is
                # checked against the first backward timed (the split rule's gradients)
                ref_key = ("bwd" if kernel.startswith("bwd") else kernel, d, causal)
                ref = reference.setdefault(ref_key, got)
                same = all(torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2)
                           for a, b in zip(_as_tuple(got), _as_tuple(ref)))
                if not same:
                    rows.append({**row, "error": "output differs from the rule's"})
                    continue
                ms = triton.testing.do_bench(fn, warmup=10, rep=40)
                rows.append({**row, "ms": ms, "rule": cfg == first[key],
                             "tflops": _flops(kernel, d, causal) / (ms * 1e-3) / 1e12})
            except Exception as e:  # noqa: BLE001 - a failing candidate is a result
                rows.append({**row, "error": f"{type(e).__name__}: {str(e)[:160]}"})
    return rows


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def markdown(record: dict) -> str:
    lines = [f"# Attention tuning: {record['gpu']} (capability {record['capability']}), "
             f"triton {record['triton']}", "",
             "| kernel | head_dim | causal | settings (m, n, warps, stages) | ms | TFLOP/s | |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(record["rows"], key=lambda r: (r["kernel"], r["head_dim"], not r["causal"],
                                                   r.get("ms", float("inf")))):
        ms = f"{r['ms']:.4f}" if "ms" in r else r["error"]
        tf = f"{r['tflops']:.0f}" if "tflops" in r else "-"
        lines.append(f"| {r['kernel']} | {r['head_dim']} | {r['causal']} | {tuple(r['settings'])}"
                     f" | {ms} | {tf} | {'rule' if r.get('rule') else ''} |")
    return "\n".join(lines) + "\n"


def winners(record: dict) -> dict:
    """{head_dim: {kernel: settings}}: per (kernel, head_dim) the candidate with the least
    total time over the causal cases it was timed in, among those timed in all of them;
    bwd_blocked only where it beat the split backward (module docstring)."""
    times: dict = {}
    for r in record["rows"]:
        key = (r["kernel"], r["head_dim"])
        if "ms" in r:
            times.setdefault(key, {}).setdefault(tuple(r["settings"]), {})[r["causal"]] = r["ms"]
    out: dict = {}
    best_total: dict = {}
    for (kernel, d), by_cfg in times.items():
        n_cases = max(len(v) for v in by_cfg.values())
        full = {cfg: sum(v.values()) for cfg, v in by_cfg.items() if len(v) == n_cases}
        best = min(full, key=full.get)
        out.setdefault(str(d), {})[kernel] = list(best)
        best_total[(kernel, d)] = full[best]
    # bwd_blocked switches the backward's structure (attention_bwd_structure): keep it only
    # where its whole-backward time beat the split structure's best (bwd_dkdv / bwd_dq rows
    # are whole-backward times too)
    for (kernel, d), total in best_total.items():
        if kernel != "bwd_blocked":
            continue
        split = [best_total[(k, d)] for k in ("bwd_dkdv", "bwd_dq") if (k, d) in best_total]
        if not split or total >= min(split):
            del out[str(d)][kernel]
    return out


def write_winners(record: dict, path: str | None = None) -> dict:
    from llama_kernels.triton import attention_launch as al

    path = path or al.TUNED_PATH
    table = {}
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f)
    table[record["capability"]] = winners(record)
    with open(path, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    al.tuned_table.cache_clear()
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="list the candidates and exit")
    ap.add_argument("--refresh-candidates", action="store_true")
    ap.add_argument("--budget-s", type=float, default=55.0)
    ap.add_argument("--out", default="benchmarks/out/tune")
    ap.add_argument("--winners", metavar="TUNE_JSON",
                    help="write this run's winners into the package's tuned table")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--kernels", nargs="+", choices=list(SPACE), default=None,
                    help="with --refresh-candidates: compile only these kernels' candidates")
    args = ap.parse_args(argv)
    if args.refresh_candidates:
        if os.environ.get("TRITON_INTERPRET") == "1":
            # ahead-of-time compiles need Triton's compiler, not its interpreter (which
            # benchmarks/__init__.py turns on where there is no GPU): run again without it
            env = {**os.environ, "TRITON_INTERPRET": "0"}
            again = (["--refresh-candidates"] + (["--jobs", str(args.jobs)] if args.jobs else [])
                     + (["--kernels", *args.kernels] if args.kernels else []))
            return subprocess.call([sys.executable, "-m", "benchmarks.tune", *again], env=env,
                                   cwd=REPO)
        out = refresh_candidates(args.jobs, kernels=args.kernels)
        n = sum(len(v) for a in out.values() for d in a.values() for v in d.values())
        print(f"wrote {CANDIDATES_PATH}: {n} candidates without spills")
        return 0
    if args.winners:
        with open(args.winners) as f:
            record = json.load(f)
        table = write_winners(record)
        print(json.dumps(table[record["capability"]], indent=1))
        return 0
    candidates = load_candidates()
    if args.dry_run:
        for arch, by_dim in candidates.items():
            for d, by_kernel in by_dim.items():
                for kernel, cands in by_kernel.items():
                    print(f"{arch} d{d} {kernel}: {len(cands)} candidates, rule first: "
                          + ", ".join(str(tuple(c[:4])) for c in cands))
        return 0
    import torch
    import triton

    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to time (use --dry-run to list the candidates)")
        return 2
    cap = torch.cuda.get_device_capability()
    rows = time_all(args.budget_s, candidates)
    record = dict(gpu=torch.cuda.get_device_name(), capability=f"{cap[0]}.{cap[1]}",
                  triton=triton.__version__, torch=torch.__version__, rows=rows,
                  winners=winners(dict(rows=rows)))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tune.json"), "w") as f:
        json.dump(record, f, indent=1)
    md = markdown(record)
    with open(os.path.join(args.out, "tune.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
