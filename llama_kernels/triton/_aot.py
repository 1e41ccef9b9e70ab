"""Ahead-of-time compile of the Triton kernels for a GPU that is not here (sm_80, sm_90).

Each kernel module lists ``AOT_CASES``: its kernels with the constexprs, warps and stages that
its own launch-settings function picks at the LLaMA widths, so what is compiled here is what
runs there. ``compile_case`` compiles one case to a cubin and reads back registers, spill bytes,
stack and shared memory; ``python -m llama_kernels.triton._aot --arch 80 90 --json out.json``
does every case of the row-kernel and cross-entropy modules (MODULES), whose settings are the
same on every arch, for each arch. The attention settings depend on the arch, so each of
flash_attention.AOT_CASES is meant for one arch, flash_attention.AOT_CASE_ARCH[case.name];
tests/test_triton_attention.py compiles them.

Must run in a process WITHOUT ``TRITON_INTERPRET=1``: under the interpreter ``@triton.jit``
gives an interpreted function that cannot be compiled. No GPU or driver is needed.

Triton's launcher specializes arguments at run time: a pointer aligned to 16 bytes and an
integer divisible by 16 compile with a ``tt.divisibility = 16`` hint (wider vector loads), a
``None`` pointer becomes a constexpr. ``case`` reproduces that for the usual LLaMA shapes,
where every size and stride is a multiple of 16 and every tensor is freshly allocated.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile


@dataclasses.dataclass(frozen=True)
class AotCase:
    name: str
    fn: object  # the @triton.jit kernel
    signature: dict  # every argument of fn: "*fp16", "i32", "fp32", ... or "constexpr"
    constexprs: dict  # argument name -> value, for each "constexpr" of the signature
    divisible_16: tuple  # argument names compiled with a divisibility-by-16 hint
    num_warps: int
    num_stages: int


def case(name: str, fn, *, types: dict, constexprs: dict, num_warps: int, num_stages: int,
         none: tuple = (), not_divisible: tuple = ()) -> AotCase:
    """A case for ``fn``: ``types`` gives each runtime argument's Triton type, ``none`` the
    pointer arguments the launcher passes as None, ``not_divisible`` the integer arguments
    that are not multiples of 16 at the shapes this case stands for (eps-like floats never are).
    """
    signature, consts = {}, {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg], consts[arg] = "constexpr", constexprs[arg]
        elif arg in none:
            signature[arg], consts[arg] = "constexpr", None
        elif arg in types:
            signature[arg] = types[arg]
        else:
            raise ValueError(f"{name}: no type or constexpr value for argument {arg!r}")
    divisible = tuple(a for a, t in signature.items()
                      if (t.startswith("*") or t in ("i32", "i64")) and a not in not_divisible)
    return AotCase(name, fn, signature, consts, divisible, num_warps, num_stages)


def _nvidia_bin(tool: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{tool} not found at {path} (triton's nvidia backend missing)")
    return path


def tools_missing() -> str | None:
    """None when the nvidia backend and its ptxas/cuobjdump are there, else why not."""
    try:
        import triton.backends.nvidia  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401

        for tool in ("ptxas", "cuobjdump"):
            _nvidia_bin(tool)
    except (ImportError, FileNotFoundError) as e:
        return str(e)
    return None


def _source(c: AotCase):
    import triton

    attrs = {(c.fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in c.divisible_16}
    # Triton >= 3.3 (3.6 on the GPU machine, 3.8 here) names the argument ``constexprs``;
    # 3.2 called it ``constants`` (same format: argument name -> value).
    params = inspect.signature(triton.compiler.ASTSource.__init__).parameters
    key = "constexprs" if "constexprs" in params else "constants"
    return triton.compiler.ASTSource(fn=c.fn, signature=dict(c.signature),
                                     attrs=attrs, **{key: dict(c.constexprs)})


def compile_case(c: AotCase, arch: int) -> dict:
    """Compile ``c`` for sm_<arch>; registers/stack from cuobjdump, spills from ptxas -v."""
    import triton
    from triton.backends.compiler import GPUTarget

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("AOT compile needs a process without TRITON_INTERPRET=1")
    compiled = triton.compile(_source(c), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": c.num_warps, "num_stages": c.num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptx = os.path.join(tmp, "k.cubin"), os.path.join(tmp, "k.ptx")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        usage = subprocess.run([_nvidia_bin("cuobjdump"), "--dump-resource-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
        gpu_name = "sm_90a" if arch == 90 else f"sm_{arch}"
        cmd = [_nvidia_bin("ptxas"), "-v", f"--gpu-name={gpu_name}", ptx, "-o",
               os.path.join(tmp, "p.o")]
        # Triton 3.8 passes --regAllocOptLevel=2 (a ptxas 13 workaround); older ptxas lack it
        ptxas = subprocess.run(cmd[:2] + ["--regAllocOptLevel=2"] + cmd[2:],
                               capture_output=True, text=True)
        if ptxas.returncode != 0:
            first = ptxas.stderr
            ptxas = subprocess.run(cmd, capture_output=True, text=True)
            if ptxas.returncode != 0:
                raise RuntimeError(f"{c.name} sm_{arch}: ptxas failed:\n{first[-2000:]}\n"
                                   f"{ptxas.stderr[-2000:]}")
    res = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                       ptxas.stdout + ptxas.stderr)
    if not res or spills is None:
        raise RuntimeError(f"{c.name}: could not read resource usage:\n{usage}\n{ptxas.stderr}")
    return {
        "name": c.name, "kernel": c.fn.__name__, "arch": f"sm_{arch}",
        "num_warps": c.num_warps, "num_stages": c.num_stages,
        "constexprs": {k: v for k, v in c.constexprs.items() if v is not None},
        "registers": int(res["REG"]), "stack": int(res["STACK"]), "local": int(res["LOCAL"]),
        "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2)),
        # Triton's shared memory is dynamic: metadata.shared, not the cubin's static SHARED
        "shared": int(compiled.metadata.shared),
    }


MODULES = ("rms_norm", "swiglu", "rotary", "cross_entropy")


def all_cases(modules=MODULES) -> list[AotCase]:
    import importlib

    out = []
    for m in modules:
        out.extend(importlib.import_module(f"llama_kernels.triton.{m}").AOT_CASES)
    return out


def _compile_indexed(args):
    index, arch, modules = args
    return compile_case(all_cases(modules)[index], arch)


def run(archs=(80, 90), modules=MODULES, jobs: int | None = None) -> list[dict]:
    """Compile every case of ``modules`` for each arch, in ``jobs`` worker processes."""
    n = len(all_cases(modules))
    work = [(i, a, tuple(modules)) for a in archs for i in range(n)]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        return [_compile_indexed(w) for w in work]
    with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_compile_indexed, work))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--module", nargs="+", default=list(MODULES), choices=MODULES)
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--json", help="write the results to this file")
    a = p.parse_args(argv)
    why = tools_missing()
    if why:
        print(f"cannot compile ahead of time: {why}", file=sys.stderr)
        return 2
    results = run(a.arch, a.module, a.jobs)
    print(f"{'case':44} {'arch':6} {'warps':>5} {'regs':>4} {'spill':>5} {'stack':>5} "
          f"{'shared':>6}")
    for r in results:
        print(f"{r['name']:44} {r['arch']:6} {r['num_warps']:5d} {r['registers']:4d} "
              f"{r['spill_stores'] + r['spill_loads']:5d} {r['stack']:5d} {r['shared']:6d}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
