#!/usr/bin/env bash
# Run ON the GPU machine, in the repository root, with .gpu/ carried (scripts/gpu_prepare.sh):
# the whole GPU checklist of notes/CUDA.md in one call. Logs and results go to $OUT (or
# ./gpu-out), and the bench results also to benches/results/.
#   device run: bash scripts/gpu_check.sh tests      (carry: [".gpu"]; a few minutes)
#   device run: bash scripts/gpu_check.sh bench      (gpu_bench.py --e2e; the longer part)
#   device run: bash scripts/gpu_check.sh all        (both, when one call's 10 minutes suffice)
# Steps keep going after a failure; the exit status is that of the first failed step.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME COMMAND...: runs it, its output into $OUT/NAME.log, remembers a failure
  local name=$1; shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}
what="${1:-all}"
case "$what" in tests|bench|all) ;; *) echo "usage: gpu_check.sh [tests|bench|all]"; exit 2 ;; esac
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/fq-site .gpu/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/fq-site  # the wheel built here, not the checkout's python/ (no _core)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/00-gpu.log"
step 01-available "$PY" -c "import ferroquant.cuda as c; print(c.available(), \
c.unavailable_reason(), c.device_name(0)); assert c.available()"
if [ "$what" != bench ]; then
  # every test that needs CUDA (the rest run in CI); -rs lists what skipped and why
  step 02-pytest "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py \
    tests/test_load.py::test_load_on_cuda
  if command -v compute-sanitizer >/dev/null; then
    step 03-sanitizer compute-sanitizer --tool memcheck "$PY" -m pytest -q \
      -p no:cacheprovider tests/test_cuda.py -k "odd_shapes or bad_inputs"
  fi
fi
if [ "$what" != tests ]; then
  step 04-bench "$PY" benches/gpu_bench.py --e2e --out "$OUT/gpu-bench.md"
  cp "$OUT/gpu-bench.md" "benches/results/gpu-$(date -u +%Y-%m-%d).md" 2>/dev/null || true
fi
exit $status
