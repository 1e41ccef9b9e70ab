#!/usr/bin/env bash
# The project's one GPU check: build for the local GPU, test every kernel on it, benchmark every
# op against its peers, tune the attention, run compute-sanitizer and the large-tensor tests.
#
#   scripts/gpu_check.sh OUTDIR             run it (GPU_CHECK_BUDGET_S caps the whole run)
#   scripts/gpu_check.sh --dry-run [OUTDIR] print each step, its time limit and its command
#
# For a GPU machine with no network whose python already has torch, triton, nvcc and pytest.
# Steps run in the order a short GPU lease most needs them, each under its own time limit (cut
# to what is left of the budget; a step with under 20 s left is skipped), and every step runs
# even if an earlier one failed. OUTDIR holds at most five files, usable wherever the run stops:
#   summary.txt   GPU, driver, versions, commit; one line per step: ok / FAILED / SKIPPED, seconds
#   results.json  the benchmark record (`python -m benchmarks.report results.json` renders the
#                 report and the plots from it; `python -m benchmarks.record OUTDIR` commits it)
#   report.md     the benchmark tables
#   tune.json     the attention tuning table, when the tuning step ran
#   logs.tar.gz   every step's log and JUnit XML, packed again after each step
# The script exits non-zero if any step failed or was skipped.
set -u -o pipefail

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY_RUN=1
  shift
fi
OUT=${1:-}
if [ -z "$OUT" ]; then
  [ "$DRY_RUN" = 1 ] || { echo "usage: scripts/gpu_check.sh [--dry-run] OUTDIR" >&2; exit 2; }
  OUT=$(mktemp -d)
  SCRATCH_OUT=$OUT
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
BUDGET=${GPU_CHECK_BUDGET_S:-540}
LOGS=$(mktemp -d)  # outside OUTDIR: only the archive of it comes back
trap 'rm -rf "$LOGS" ${SCRATCH_OUT:+"$SCRATCH_OUT"}' EXIT
SUMMARY="$OUT/summary.txt"
FAILED=0
PLANNED=0

pack() {
  tar -czf "$OUT/logs.tar.gz.tmp" -C "$LOGS" . && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
  for f in results.json report.md; do
    [ -f "$LOGS/bench/$f" ] && cp "$LOGS/bench/$f" "$OUT/$f"
  done
  [ -f "$LOGS/tune/tune.json" ] && cp "$LOGS/tune/tune.json" "$OUT/tune.json"
  return 0
}

step() {  # step NAME LIMIT_S COMMAND...: run it, log to NAME.log, record status and time
  local name=$1 limit=$2
  shift 2
  if [ "$DRY_RUN" = 1 ]; then
    PLANNED=$((PLANNED + limit))
    printf '%-11s %4d s  (by %4d s of %d)  %s\n' "$name" "$limit" "$PLANNED" "$BUDGET" "$*"
    return
  fi
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "$name: SKIPPED (time budget spent)" | tee -a "$SUMMARY"
    FAILED=1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS
  echo "== $name (limit $limit s): $*"
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  local status="ok"
  [ $rc -eq 0 ] || status="FAILED (rc=$rc$([ $rc -eq 124 ] && echo ', time limit'))"
  echo "$name: $status in $((SECONDS - start)) s" | tee -a "$SUMMARY"
  tail -n 5 "$LOGS/$name.log"
  [ $rc -eq 0 ] || FAILED=1
  pack
}

if [ "$DRY_RUN" = 0 ]; then
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: ${LLAMA_KERNELS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    echo "budget: $BUDGET s"
  } > "$SUMMARY" 2>&1
  cat "$SUMMARY"
else
  echo "dry run: steps, time limits (cut to what is left of GPU_CHECK_BUDGET_S=$BUDGET) and commands"
fi

# Build for this GPU only, in place (no network: no dependency resolution, no isolation).
# sm_90a where the GPU is an H100/H200 (the arch-specific features of Hopper), else its own arch.
ARCH=${LLAMA_KERNELS_CUDA_ARCH:-$("$PY" -c "import torch
c = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
print('%d.%d' % c + ('a' if c == (9, 0) else ''))" 2>/dev/null || echo 9.0a)}
step build 90 env LLAMA_KERNELS_CUDA_ARCH="$ARCH" MAX_JOBS="${MAX_JOBS:-16}" \
  "$PY" setup.py build_ext --inplace

# pytest-xdist, where installed, spreads tests over 12 processes: Triton's JIT compiles dominate,
# not the GPU. The host-emulator tests are left to CI (CPU only, minutes of emulation); the GPU
# tests that compare the hardware with the emulator stay.
PARALLEL=()
"$PY" -c "import xdist" 2> /dev/null && PARALLEL=(-n 12)
PYTEST=("$PY" -m pytest -q -ra -p no:cacheprovider)
NO_EMULATOR=(--ignore=tests/test_cuda_emulator.py --ignore=tests/test_cuda_rows_emulated.py
             -k "not test_emulated_ and not cuda_emulated")

# Every kernel once, at the model's shapes, on every backend: the answer a cut-short run needs.
FAST=(tests/test_ops.py tests/test_cuda_attention.py tests/test_model.py)
step tests-fast 60 "${PYTEST[@]}" "${PARALLEL[@]}" -m "not slow" "${NO_EMULATOR[@]}" \
  --junitxml="$LOGS/junit-fast.xml" "${FAST[@]}"

# The benchmark: ceilings, every op x direction x implementation at the 7B shapes (attention
# against SDPA's backends). The model rows, then the packed / cached attention and the fused
# loss, are separate steps appending to the same record, so a slow one cannot lose the others.
step bench 90 "$PY" -m benchmarks --quick --no-plots --out "$LOGS/bench" \
  --ops rms_norm,add_rms_norm,swiglu,apply_rotary,flash_attention
step model-bench 75 "$PY" -m benchmarks --quick --append --no-plots --ops model \
  --out "$LOGS/bench"
step bench-new 75 "$PY" -m benchmarks --quick --append --no-plots --out "$LOGS/bench" \
  --ops flash_attention_varlen,flash_attention_with_kvcache,linear_cross_entropy

# The attention tuning sweep (candidates that compile without spills, ranked, cut to fit).
if [ -f benchmarks/tune.py ]; then
  step tune 45 "$PY" -m benchmarks.tune --budget-s 40 --out "$LOGS/tune"
else
  [ "$DRY_RUN" = 1 ] && echo "tune        (benchmarks/tune.py not present: no step)"
fi

# The rest of the suite: hostile inputs, numerics, fuzzing, determinism, reliability.
step tests 60 "${PYTEST[@]}" "${PARALLEL[@]}" -m "not slow" "${NO_EMULATOR[@]}" \
  --junitxml="$LOGS/junit.xml" "${FAST[@]/#/--ignore=}" tests

# compute-sanitizer on small shapes of the CUDA backend, attention included (each tool slows
# kernels by 10-100x).
if [ "$DRY_RUN" = 1 ] || command -v compute-sanitizer > /dev/null; then
  SMALL=(tests/test_ops.py -q -p no:cacheprovider
         -k "cuda and not 65536 and not 8191 and not 2048 and not 1025")
  step memcheck 20 compute-sanitizer --tool memcheck --error-exitcode 3 --target-processes all \
    "$PY" -m pytest "${SMALL[@]}"
  for tool in racecheck synccheck initcheck; do
    step "$tool" 15 compute-sanitizer --tool "$tool" --error-exitcode 3 \
      "$PY" -m pytest tests/test_ops.py -q -p no:cacheprovider \
      -k "cuda and (123 or 64 or halves or strided or attention)"
  done
else
  echo "compute-sanitizer: not found, skipped" | tee -a "$SUMMARY"
fi

# The slow ones last, one at a time: tensors past 2**31 elements need most of the GPU's memory.
step tests-slow 30 "${PYTEST[@]}" -m slow --junitxml="$LOGS/junit-slow.xml" tests

if [ "$DRY_RUN" = 1 ]; then
  echo "worst case: $PLANNED s of step limits against a budget of $BUDGET s (the last steps are"
  echo "cut or skipped first); OUTDIR gets summary.txt, results.json, report.md, tune.json,"
  echo "logs.tar.gz"
  exit 0
fi

# Reliability summary: fuzz / hostile / numerics / determinism / leak cases from the JUnit
# records, and the sanitizers' error counts.
"$PY" - "$LOGS" >> "$SUMMARY" 2>&1 <<'PY'
import glob, os, re, sys
import xml.etree.ElementTree as ET
logs = sys.argv[1]
files = ("test_fuzz", "test_hostile", "test_numerics", "test_determinism", "test_gpu_reliability")
counts = {f: [0, 0, 0] for f in files}  # tried, failed, skipped
for junit in sorted(glob.glob(os.path.join(logs, "junit*.xml"))):
    try:
        cases = list(ET.parse(junit).getroot().iter("testcase"))
    except (OSError, ET.ParseError) as e:
        print(f"{os.path.basename(junit)} unreadable: {e}")
        continue
    for case in cases:
        name = case.get("classname", "").split(".")[-1]
        if name in counts:
            c = counts[name]
            c[0] += 1
            c[1] += any(ch.tag in ("failure", "error") for ch in case)
            c[2] += any(ch.tag == "skipped" for ch in case)
for f, (tried, failed, skipped) in counts.items():
    print(f"{f}: {tried} cases, {failed} failed, {skipped} skipped")
for log in sorted(glob.glob(os.path.join(logs, "*check.log"))):
    text = open(log, errors="replace").read()
    found = re.findall(r"(ERROR SUMMARY: \d+ errors?|RACECHECK SUMMARY: .*)", text)
    print(f"{os.path.basename(log)}: {found[-1] if found else 'no summary line'}")
PY
{
  echo "== failures"
  grep -hE "^(FAILED|ERROR)" "$LOGS"/tests*.log | head -40
} >> "$SUMMARY"
pack
echo "== summary"
cat "$SUMMARY"
echo "total: $SECONDS s"
exit $FAILED
