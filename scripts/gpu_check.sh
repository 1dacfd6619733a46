#!/usr/bin/env bash
# GPU check of fusedrnn, for a fresh machine with one H100/H200, torch + CUDA toolkit installed
# and no internet. Stages, each under its own time limit, all inside one overall budget
# (default 450 s, GPU_CHECK_BUDGET_S to change):
#   env       nvidia-smi, nvcc, python and torch versions
#   build     the extension for sm_90 only, in place (pip install -e as the fallback)
#   inline    scripts/gpu_check_inline.py: every cell and dtype, forward and backward, against
#             the fp64 reference with SPEC section 4 tolerances; CUDA graph capture and replay
#   pytest    the CUDA tests (`pytest tests -k cuda`), when pytest and such tests exist
#   memcheck  a tiny run of the inline check under compute-sanitizer memcheck, when installed
#   bench     `python -m fusedrnn.bench --device cuda`, when that module exists
# Every log and JSON goes under $OUT (default ./gpu_check_out); summary.json lists each stage's
# status. Exits non-zero when the build or a correctness stage (inline, pytest, memcheck
# errors) fails; a stage skipped for lack of time or of a tool does not fail the check.
set -u -o pipefail

OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"

BUDGET_S="${GPU_CHECK_BUDGET_S:-450}"
DEADLINE=$((SECONDS + BUDGET_S))
FAILED=0
SUMMARY="$OUT/summary.tsv"
: > "$SUMMARY"

log() { echo "[gpu_check $(date +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$OUT/gpu_check.log"; }

# record NAME STATUS SECONDS DETAIL
record() {
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$SUMMARY"
  log "stage $1: $2 ($3 s) $4"
}

# stage NAME CAP_S CMD...: runs CMD with its output in $OUT/NAME.log, under the smaller of CAP_S
# and the time left. Sets STAGE_RC (124 on timeout, 200 when skipped for lack of time).
stage() {
  local name=$1 cap=$2
  shift 2
  local left=$((DEADLINE - SECONDS - 5))
  local limit=$((cap < left ? cap : left))
  if ((limit < 15)); then
    STAGE_RC=200
    STAGE_S=0
    log "stage $name: skipped, ${left} s left"
    return
  fi
  log "stage $name: limit ${limit} s: $*"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  STAGE_RC=$?
  STAGE_S=$((SECONDS - t0))
  echo "----- last lines of $name.log (rc $STAGE_RC) -----"
  tail -n 25 "$OUT/$name.log"
  echo "-----"
}

write_summary() {
  "$PY" - "$SUMMARY" "$OUT/summary.json" "$FAILED" "$SECONDS" <<'EOF' || true
import json, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
stages = [{"stage": r[0], "status": r[1], "seconds": int(r[2]), "detail": r[3]} for r in rows]
json.dump({"ok": sys.argv[3] == "0", "seconds": int(sys.argv[4]), "stages": stages},
          open(sys.argv[2], "w"), indent=1)
EOF
  log "overall: $([ "$FAILED" = 0 ] && echo PASS || echo FAIL); summary in $OUT/summary.json"
}

# ---- env ------------------------------------------------------------------------------------
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
if [ -n "${CUDA_HOME:-}" ]; then
  export PATH="$CUDA_HOME/bin:$PATH"
fi
{
  echo "== nvidia-smi"; timeout 30 nvidia-smi 2>&1
  echo "== nvcc"; timeout 30 nvcc --version 2>&1
  echo "== CUDA_HOME=${CUDA_HOME:-unset}"
  echo "== python"; "$PY" --version 2>&1
  echo "== torch"
  timeout 60 "$PY" -c "import torch; print(torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available(), torch.cuda.get_device_name() \
if torch.cuda.is_available() else '')" 2>&1
  echo "== modules"
  for m in setuptools wheel ninja pytest numpy triton; do
    "$PY" -c "import $m; print('$m', getattr($m, '__version__', '?'))" 2>&1 | tail -n 1
  done
  echo "== compute-sanitizer"; ls -l /usr/local/cuda/bin/compute-sanitizer 2>&1
  echo "== cpus: $(nproc)"
} > "$OUT/env.log" 2>&1
cat "$OUT/env.log"
record env ok "$SECONDS" "see env.log"

# ---- build ----------------------------------------------------------------------------------
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 FUSEDRNN_FORCE_CUDA=1
stage build 240 "$PY" setup.py build_ext --inplace
BUILD_RC=$STAGE_RC
BUILD_S=$STAGE_S
BUILD_HOW="setup.py build_ext --inplace"
if [ "$BUILD_RC" != 0 ]; then
  log "build_ext failed (rc $BUILD_RC); trying pip install -e"
  stage build_pip 200 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .
  BUILD_RC=$STAGE_RC
  BUILD_S=$((BUILD_S + STAGE_S))
  BUILD_HOW="pip install -e ."
fi
if [ "$BUILD_RC" = 0 ]; then
  timeout 60 "$PY" -c "
import json, fusedrnn
info = fusedrnn.build_info()
print(json.dumps(info))
assert info['backend'] == 'fused' and info['cuda'], info
" > "$OUT/build_info.json" 2> "$OUT/build_info.err" || BUILD_RC=$?
  cat "$OUT/build_info.json" "$OUT/build_info.err"
fi
if [ "$BUILD_RC" != 0 ]; then
  record build FAIL "$BUILD_S" "$BUILD_HOW rc $BUILD_RC (build.log, build_info.err)"
  FAILED=1
  write_summary
  exit 1
fi
record build ok "$BUILD_S" "$BUILD_HOW"

# ---- inline correctness check ----------------------------------------------------------------
stage inline 120 "$PY" scripts/gpu_check_inline.py --out "$OUT/inline.json"
case $STAGE_RC in
  0) record inline ok "$STAGE_S" "inline.json" ;;
  200) record inline FAIL 0 "no time left"; FAILED=1 ;;
  *) record inline FAIL "$STAGE_S" "rc $STAGE_RC (inline.log)"; FAILED=1 ;;
esac

# ---- pytest CUDA tests ----------------------------------------------------------------------
if ! "$PY" -c "import pytest" > /dev/null 2>&1; then
  record pytest skipped 0 "pytest not installed"
elif [ ! -d tests ]; then
  record pytest skipped 0 "no tests directory"
else
  stage pytest 180 "$PY" -m pytest tests -q -k cuda -p no:cacheprovider -rfEs \
    --junitxml "$OUT/pytest.xml"
  case $STAGE_RC in
    0) record pytest ok "$STAGE_S" "pytest.log, pytest.xml" ;;
    5) record pytest skipped "$STAGE_S" "no CUDA tests collected" ;;
    124|137) record pytest FAIL "$STAGE_S" "timed out (pytest.log)"; FAILED=1 ;;
    200) record pytest skipped 0 "no time left" ;;
    *) record pytest FAIL "$STAGE_S" "rc $STAGE_RC (pytest.log)"; FAILED=1 ;;
  esac
fi

# ---- compute-sanitizer memcheck on a tiny case ------------------------------------------------
SANITIZER=/usr/local/cuda/bin/compute-sanitizer
[ -x "$SANITIZER" ] || SANITIZER="$(command -v compute-sanitizer || true)"
if [ -z "$SANITIZER" ] || [ ! -x "$SANITIZER" ]; then
  record memcheck skipped 0 "compute-sanitizer not found"
else
  # without the caching allocator every tensor is its own allocation, so that memcheck sees
  # an out-of-bounds access even where it would land inside a cached block
  stage memcheck 120 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck \
    --error-exitcode 99 --leak-check no "$PY" scripts/gpu_check_inline.py --tiny \
    --out "$OUT/memcheck_inline.json"
  if grep -Eq "ERROR SUMMARY: [1-9]" "$OUT/memcheck.log" || [ "$STAGE_RC" = 99 ]; then
    record memcheck FAIL "$STAGE_S" "memcheck errors (memcheck.log)"
    FAILED=1
  elif grep -q "cuda correctness checks failed" "$OUT/memcheck.log"; then
    record memcheck FAIL "$STAGE_S" "the tiny check failed under the sanitizer (memcheck.log)"
    FAILED=1
  else
    case $STAGE_RC in
      0) record memcheck ok "$STAGE_S" "memcheck.log" ;;
      124|137) record memcheck inconclusive "$STAGE_S" "timed out before the end" ;;
      200) record memcheck skipped 0 "no time left" ;;
      # the tool itself failed (no memcheck errors, no failed check): reported, not a failure
      *) record memcheck error "$STAGE_S" "rc $STAGE_RC, no memcheck errors (memcheck.log)" ;;
    esac
  fi
fi

# ---- benchmark --------------------------------------------------------------------------------
if "$PY" -c "import importlib.util, sys; \
sys.exit(0 if importlib.util.find_spec('fusedrnn.bench') else 1)" > /dev/null 2>&1; then
  mkdir -p "$OUT/bench"
  stage bench 600 "$PY" -m fusedrnn.bench --device cuda --out "$OUT/bench"
  case $STAGE_RC in
    0) record bench ok "$STAGE_S" "bench/" ;;
    124|137) record bench timeout "$STAGE_S" "partial results in bench/" ;;
    200) record bench skipped 0 "no time left" ;;
    *) record bench error "$STAGE_S" "rc $STAGE_RC (bench.log)" ;;
  esac
else
  record bench skipped 0 "no fusedrnn.bench module"
fi

write_summary
exit "$FAILED"
