#!/usr/bin/env bash
# The project's one GPU check: build for the local GPU, run the whole test suite on it, run
# compute-sanitizer over the CUDA kernels, run the quick benchmark; logs and JSON into OUTDIR.
#
#   scripts/gpu_check.sh OUTDIR
#
# For a GPU machine with no network whose python already has torch, triton, nvcc and pytest.
# Every step runs even if an earlier one failed, in the order of what a short GPU lease most
# needs (build, tests, benchmark, sanitizers, the slow >2**31-element tests); OUTDIR/summary.txt
# lists each step's status and time, and the script exits non-zero if any step failed. Budget: under 8 minutes on one
# H100 with 16 cores; GPU_CHECK_BUDGET_S (default 480) caps the whole run: each step's time
# limit is cut to what is left, and a step with under 20 s left is skipped.
set -u -o pipefail

OUT=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0

BUDGET=${GPU_CHECK_BUDGET_S:-480}

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to OUT/NAME.log, record status and time
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "$name: SKIPPED (time budget spent)" | tee -a "$SUMMARY"
    FAILED=1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS
  echo "== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local line="$name: $([ $rc -eq 0 ] && echo ok || echo "FAILED (rc=$rc)") in $((SECONDS - start)) s"
  echo "$line" | tee -a "$SUMMARY"
  tail -n 5 "$OUT/$name.log"
  [ $rc -eq 0 ] || FAILED=1
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: ${LLAMA_KERNELS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

# Build for this GPU only, in place (no network: no dependency resolution, no isolation).
ARCH=${LLAMA_KERNELS_CUDA_ARCH:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
step build 240 env LLAMA_KERNELS_CUDA_ARCH="$ARCH" MAX_JOBS="${MAX_JOBS:-16}" \
  "$PY" setup.py build_ext --inplace

# Every test, on the GPU (Triton compiled, not interpreted; CUDA kernels run). pytest-xdist,
# where installed, spreads them over 12 processes: Triton's JIT compiles dominate, not the GPU.
# The host-emulator tests are left to CI (CPU only, minutes of emulation); the GPU tests that
# compare the hardware with the emulator stay.
PARALLEL=()
"$PY" -c "import xdist" 2> /dev/null && PARALLEL=(-n 12)
NO_EMULATOR=(--ignore=tests/test_cuda_emulator.py --ignore=tests/test_cuda_rows_emulated.py
             -k "not test_emulated_ and not cuda_emulated")
step tests 300 "$PY" -m pytest tests -q -ra -p no:cacheprovider "${PARALLEL[@]}" \
  -m "not slow" "${NO_EMULATOR[@]}" --junitxml="$OUT/junit.xml"

# The quick benchmark: ceilings, every op x direction x implementation at the 7B shapes, then
# the model benchmark.
step bench 240 "$PY" -m benchmarks --quick --out "$OUT/bench"

# compute-sanitizer on a small subset of the CUDA-backend tests (memcheck, then racecheck,
# initcheck and synccheck on the smallest shapes: each tool slows kernels by 10-100x).
if command -v compute-sanitizer > /dev/null; then
  SAN_TESTS=(tests/test_ops.py -q -p no:cacheprovider -k "cuda and not 65536 and not 8191 and not 2048 and not 1025")
  step memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 3 --target-processes all \
    "$PY" -m pytest "${SAN_TESTS[@]}"
  step racecheck 60 compute-sanitizer --tool racecheck --error-exitcode 3 \
    "$PY" -m pytest tests/test_ops.py -q -p no:cacheprovider -k "cuda and (123 or 64 or halves or strided)"
  step initcheck 60 compute-sanitizer --tool initcheck --error-exitcode 3 \
    "$PY" -m pytest tests/test_ops.py -q -p no:cacheprovider -k "cuda and (123 or 64 or halves or strided)"
  step synccheck 60 compute-sanitizer --tool synccheck --error-exitcode 3 \
    "$PY" -m pytest tests/test_ops.py -q -p no:cacheprovider -k "cuda and (123 or 64 or halves or strided)"
else
  echo "compute-sanitizer: not found, skipped" | tee -a "$SUMMARY"
fi

# The slow ones last, one at a time: tensors past 2**31 elements need most of the GPU's memory.
step tests-slow 180 "$PY" -m pytest tests -q -ra -p no:cacheprovider -m slow \
  --junitxml="$OUT/junit-slow.xml"

# Reliability summary: fuzz / hostile / numerics / determinism / leak cases from the junit
# record, and the sanitizers' error counts.
"$PY" - "$OUT" > "$OUT/reliability.txt" 2>&1 <<'PY'
import glob, os, re, sys
import xml.etree.ElementTree as ET
out = sys.argv[1]
files = ("test_fuzz", "test_hostile", "test_numerics", "test_determinism", "test_gpu_reliability")
counts = {f: [0, 0, 0] for f in files}  # tried, failed, skipped
for junit in sorted(glob.glob(os.path.join(out, "junit*.xml"))):
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
for log in sorted(glob.glob(os.path.join(out, "*check.log"))):
    text = open(log, errors="replace").read()
    found = re.findall(r"(ERROR SUMMARY: \d+ errors?|RACECHECK SUMMARY: .*)", text)
    print(f"{os.path.basename(log)}: {found[-1] if found else 'no summary line'}")
PY
cat "$OUT/reliability.txt"

echo "== failures"
grep -hE "^(FAILED|ERROR)" "$OUT"/tests*.log | head -40
echo "== summary"
cat "$SUMMARY"
exit $FAILED
