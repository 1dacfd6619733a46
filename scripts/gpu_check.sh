#!/usr/bin/env bash
# GPU check of fusedrnn: one command on a fresh machine with one H100/H200, torch + the CUDA
# toolkit installed and no network. Finishes inside GPU_CHECK_BUDGET_S (default 450 s) plus a
# few seconds to pack up, and prints its summary table last.
#
#   OUT=/path/to/out bash scripts/gpu_check.sh             the GPU check
#   OUT=/path/to/out bash scripts/gpu_check.sh --dry-run   every stage on the CPU (no GPU needed)
#
# Stages, in order, each under its own time limit (`timeout`), the smaller of its cap and what
# the budget leaves after a reserve for the stages still to come, so that a hang in one still
# leaves the others their time and results:
#   env             nvidia-smi, nvcc, python, torch and the optional modules present
#   build           the extension for sm_90 only (the GPU's own capability if it is not 9.0),
#                   without debug information,
#                   in place; reused instead when a build of the same stamp is at hand (below)
#   inline          scripts/gpu_check_inline.py: every cell, layout and dtype, forward and
#                   backward, against the fp64 reference, each case and dtype on its own; grid
#                   stride; CUDA graph capture and replay
#   pytest          the CUDA tests (`pytest tests -k cuda`), per-test outcome from junit XML or,
#                   when stopped, from the -v log (which names the test that was running)
#   bench_float32   python -m fusedrnn.bench --no-compile: LSTM, GRU, peephole and WM LSTM at
#   bench_bfloat16  T,B,I,H = 100,64,512,512 (fastrnns) and 100,8,512,512, fwd and fwd+bwd,
#                   against torch.nn (LSTM, GRU) and the eager loop; TF32 off on both sides
#   memcheck        the tiny inline check under compute-sanitizer memcheck
#   bench_compiled  only when >= GPU_CHECK_COMPILE_MIN_S (120) are left: LSTM and GRU at the
#                   fastrnns shape in fp32 with the torch.compile step-loop baseline
#   plot            bench/speedups.png: fp32 and bf16 side by side (needs matplotlib)
# A stage stopped by its limit is "timeout" (a correctness stage's timeout fails the check);
# the benchmark keeps the rows it measured (results.json is rewritten after every case).
#
# $OUT (default ./gpu_check_out) ends up with at most 8 files, at most one folder deep:
#   summary.json  summary.txt  logs.tar.gz (every log and JSON of every stage)
#   fusedrnn_C.<stamp>.so      the built extension, debug info stripped
#   bench/results_float32.json  bench/results_bfloat16.json  bench/results_compiled.json
#   bench/speedups.png
# They are refreshed after every stage, so a kill of the whole script still leaves the
# summary of the stages that ended. Exit status 0 when no stage failed, 1 otherwise, 2 on a
# bad argument.
#
# Reusing a build (a second call skips the build): the stamp is a hash of csrc/, setup.py,
# the torch / CUDA / Python versions and the target (cuda:<arch> or cpu). The build is skipped
#   - when GPU_CHECK_PREBUILT names a fusedrnn_C.<stamp>.so (as a previous call returned it)
#     whose stamp is the current one: it is installed as fusedrnn/_C<ext suffix>;
#   - when fusedrnn/_C<ext suffix> exists and build/gpu_check.stamp (written by this script's
#     build) holds the current stamp;
#   - in a dry run only, when the in-tree extension imports with its CPU ops (the test suite's
#     own build; not compared with the sources, and the summary says so).
#   GPU_CHECK_REBUILD=1 always builds. A stamp that differs is logged and the build runs.
#
# Environment: OUT, PYTHON (default python3), GPU_CHECK_BUDGET_S, GPU_CHECK_PREBUILT,
# GPU_CHECK_REBUILD, GPU_CHECK_COMPILE_MIN_S, GPU_CHECK_CAP_<stage> (that stage's cap in s),
# TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default: the CPU count), CUDA_HOME.
set -u -o pipefail

DRY_RUN=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,/^set -u/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
               exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (expected --dry-run or --help)" >&2
       exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# a relative GPU_CHECK_PREBUILT is relative to where the script was started
if [ -n "${GPU_CHECK_PREBUILT:-}" ] && [[ $GPU_CHECK_PREBUILT != /* ]]; then
  GPU_CHECK_PREBUILT="$PWD/$GPU_CHECK_PREBUILT"
fi
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
cd "$REPO" || exit 2
PY="${PYTHON:-python3}"
if ! command -v "$PY" > /dev/null 2>&1; then
  echo "gpu_check.sh: PYTHON=$PY: no such command (set PYTHON to a Python with torch)" >&2
  exit 2
fi
BUDGET_S="${GPU_CHECK_BUDGET_S:-450}"
COMPILE_MIN_S="${GPU_CHECK_COMPILE_MIN_S:-120}"
for v in BUDGET_S COMPILE_MIN_S; do
  if ! [[ ${!v} =~ ^[0-9]+$ ]]; then
    echo "gpu_check.sh: $v must be a whole number of seconds, got '${!v}'" >&2
    exit 2
  fi
done
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# a test of this script may itself run under pytest: the nested pytest must not run it again
export GPU_CHECK_NESTED=1
export PYTHONUNBUFFERED=1
REPORT="$REPO/scripts/gpu_check_report.py"
FINALIZE_S=15   # kept back from the budget for packing up
DEADLINE=$((SECONDS + BUDGET_S - FINALIZE_S))
MIN_STAGE_S=10  # a stage that would get less is skipped
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")" || exit 2
LOGS="$WORK/logs"
mkdir -p "$LOGS"
STAGES_TSV="$LOGS/stages.tsv"
: > "$STAGES_TSV"
# our own files of an earlier run in $OUT go; anything else there is left (and counted)
rm -f "$OUT"/summary.json "$OUT"/summary.txt "$OUT"/logs.tar.gz "$OUT"/fusedrnn_C.*.so
rm -rf "$OUT/bench"
FAILED=0
STOPPED=""
STAGE_PID=""
CURRENT=""
if ((DRY_RUN)); then DEV=cpu; else DEV=cuda; fi

say() { echo "[gpu_check +${SECONDS}s] $*" | tee -a "$LOGS/gpu_check.log"; }

# record NAME STATUS SECONDS LIMIT RC DETAIL (FAIL fails the check)
record() {
  local detail=${6//$'\t'/ }
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${detail//$'\n'/ }" \
    >> "$STAGES_TSV"
  [ "$2" = FAIL ] && FAILED=1
  say "stage $1: $2 (${3}s) $6"
}

# cap NAME DEFAULT: the stage's cap, GPU_CHECK_CAP_<NAME> when set
cap() {
  local var="GPU_CHECK_CAP_$1"
  local v="${!var:-$2}"
  [[ $v =~ ^[0-9]+$ ]] || { say "ignoring $var='$v' (not a whole number)"; v=$2; }
  echo "$v"
}

# run_stage NAME CAP RESERVE SIGNAL CMD...: CMD with its output in $LOGS/NAME.log under the
# smaller of CAP and the time left minus RESERVE (the least the later stages need); SIGNAL
# first, KILL 15 s later. Sets STAGE_RC (124 on timeout, 200 when skipped for lack of time),
# STAGE_S, STAGE_LIMIT. Runs in the background and waits, so that a signal to this script is
# handled at once (on_signal stops the stage).
run_stage() {
  local name=$1 cap=$2 reserve=$3 sig=$4
  shift 4
  local limit=$((DEADLINE - SECONDS - reserve))
  ((cap < limit)) && limit=$cap
  STAGE_LIMIT=$limit
  STAGE_S=0
  if ((limit < MIN_STAGE_S)); then
    STAGE_RC=200
    return
  fi
  say "stage $name: up to ${limit}s: $*"
  CURRENT=$name
  local t0=$SECONDS
  timeout -s "$sig" -k 15 "$limit" "$@" > "$LOGS/$name.log" 2>&1 < /dev/null &
  STAGE_PID=$!
  wait "$STAGE_PID"
  STAGE_RC=$?
  STAGE_PID=""
  CURRENT=""
  STAGE_S=$((SECONDS - t0))
  if ((STAGE_RC != 0)); then
    echo "----- last lines of $name.log (rc $STAGE_RC) -----"
    tail -n 6 "$LOGS/$name.log" | cut -c1-300
    echo "-----"
  fi
}

# publish [final]: copies the results into $OUT, packs the logs, writes summary.json/txt there
# (and prints summary.txt when final)
publish() {
  local final=${1:-0}
  mkdir -p "$OUT/bench"
  local run
  for run in float32 bfloat16 compiled; do
    if [ -f "$LOGS/bench_$run/results.json" ]; then
      cp "$LOGS/bench_$run/results.json" "$OUT/bench/results_$run.json.tmp" &&
        mv -f "$OUT/bench/results_$run.json.tmp" "$OUT/bench/results_$run.json"
    fi
  done
  [ -f "$WORK/speedups.png" ] && cp "$WORK/speedups.png" "$OUT/bench/speedups.png"
  rmdir "$OUT/bench" 2> /dev/null
  timeout 60 tar -czf "$OUT/logs.tar.gz.tmp" -C "$WORK" logs 2> /dev/null &&
    mv -f "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
  rm -f "$OUT/logs.tar.gz.tmp"
  local args=(summary --work "$WORK" --out "$OUT" --dry-run "$DRY_RUN" --final "$final"
              --stopped "$STOPPED" --seconds "$SECONDS" --budget "$BUDGET_S")
  ((final)) && args+=(--print)
  if ! timeout 60 "$PY" "$REPORT" "${args[@]}" 2>> "$LOGS/gpu_check.log" && ((final)); then
    # the report helper itself failed: the stage table as it is, so that something is printed
    echo "gpu_check: writing the summary failed (see gpu_check.log); the stage table:"
    tee "$OUT/summary.txt" < "$STAGES_TSV"
    echo "overall: $([ "$FAILED" = 0 ] && echo PASS || echo FAIL)"
  fi
}

finish() {
  trap - EXIT
  trap '' TERM INT  # packing up takes seconds: let it end
  if [ -n "$STOPPED" ]; then
    say "stopped by $STOPPED"
    FAILED=1
  fi
  publish 1
  rm -rf "$WORK"
  if ((FAILED)); then exit 1; fi
  # the layout is part of the contract: summary.json says whether it held
  if ! "$PY" -c "import json, sys; sys.exit(0 if json.load(open('$OUT/summary.json'))['ok'] \
else 1)" 2> /dev/null; then
    exit 1
  fi
  exit 0
}

on_signal() {
  STOPPED=$1
  if [ -n "$STAGE_PID" ]; then
    kill -TERM "$STAGE_PID" 2> /dev/null
    wait "$STAGE_PID" 2> /dev/null
    record "$CURRENT" interrupted 0 0 143 "stopped by $1 while running ($CURRENT.log)"
  fi
  finish
}
trap 'on_signal SIGTERM' TERM
trap 'on_signal SIGINT' INT
trap finish EXIT

# skip_rest REASON: every stage not yet recorded is recorded as skipped
skip_rest() {
  local s
  for s in inline pytest bench_float32 bench_bfloat16 memcheck bench_compiled plot; do
    grep -q "^$s"$'\t' "$STAGES_TSV" || record "$s" skipped 0 0 - "$1"
  done
}

# ---- env --------------------------------------------------------------------------------------
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
if [ -n "${CUDA_HOME:-}" ]; then
  export PATH="$CUDA_HOME/bin:$PATH"
fi
say "fusedrnn GPU check$( ((DRY_RUN)) && echo ' (dry run on the CPU)'): budget ${BUDGET_S}s, \
OUT=$OUT"
T0=$SECONDS
{
  echo "== nvidia-smi"; timeout 20 nvidia-smi 2>&1 || echo "(nvidia-smi failed or missing)"
  echo "== nvcc"; timeout 20 nvcc --version 2>&1 || echo "(nvcc failed or missing)"
  echo "== CUDA_HOME=${CUDA_HOME:-unset}"
  echo "== $PY"; "$PY" --version 2>&1
  echo "== cpus: $(nproc)"
  echo "== compute-sanitizer"; command -v compute-sanitizer 2>&1 || echo "(not found)"
} > "$LOGS/env.log" 2>&1
timeout 60 "$PY" - "$LOGS/env.json" >> "$LOGS/env.log" 2>&1 <<'EOF'
import importlib.util, json, os, platform, subprocess, sys
import torch
cuda = torch.cuda.is_available()
env = {"python": platform.python_version(), "torch": torch.__version__,
       "cuda": torch.version.cuda, "cuda_available": cuda,
       "device_name": torch.cuda.get_device_name() if cuda else "CPU only",
       "capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
       "cpus": os.cpu_count(),
       "modules": {m: importlib.util.find_spec(m) is not None
                   for m in ("pytest", "ninja", "numpy", "tqdm", "matplotlib", "triton")}}
try:
    env["git"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
except Exception:
    env["git"] = None
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env))
EOF
ENV_RC=$?
ENV_LINE=$("$PY" -c "import json; e = json.load(open('$LOGS/env.json')); print(e['device_name'], \
'| torch', e['torch'], '| CUDA', e['cuda'], '| capability', e['capability'], '| optional \
modules missing:', ','.join(k for k, v in e['modules'].items() if not v) or 'none')" \
2> /dev/null || echo "env.json missing")
CAPABILITY=$("$PY" -c "import json; print(json.load(open('$LOGS/env.json'))['capability'] or '')" \
2> /dev/null)
if ((ENV_RC != 0)); then
  record env FAIL $((SECONDS - T0)) 60 "$ENV_RC" "python/torch environment probe failed (env.log)"
elif ((!DRY_RUN)) && [ -z "$CAPABILITY" ]; then
  record env FAIL $((SECONDS - T0)) 60 0 "no GPU visible to torch: $ENV_LINE"
else
  record env ok $((SECONDS - T0)) 60 0 "$ENV_LINE"
fi
publish 0

# ---- build ------------------------------------------------------------------------------------
if ((DRY_RUN)); then
  MODE=cpu
  export FUSEDRNN_SKIP_CUDA=1
else
  ARCH="${TORCH_CUDA_ARCH_LIST:-9.0}"
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && [ -n "$CAPABILITY" ] && [ "$CAPABILITY" != 9.0 ]; then
    say "the GPU has capability $CAPABILITY, not 9.0: building for $CAPABILITY"
    ARCH=$CAPABILITY
  fi
  MODE="cuda:$ARCH"
  export TORCH_CUDA_ARCH_LIST="$ARCH" FUSEDRNN_FORCE_CUDA=1
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
SO_SUFFIX=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
SO_TREE="fusedrnn/_C$SO_SUFFIX"
STAMP_FILE=build/gpu_check.stamp
STAMP=$(timeout 60 "$PY" "$REPORT" stamp --repo "$REPO" --mode "$MODE" 2>> "$LOGS/env.log")
[ -n "$STAMP" ] || STAMP=unknown

# verify_ext: the extension imports with the fused ops of $DEV (build_info.json in the logs)
verify_ext() {
  timeout 60 "$PY" - "$DEV" "$LOGS/build_info.json" > "$LOGS/build_verify.log" 2>&1 <<'EOF'
import json, sys
import fusedrnn
info = fusedrnn.build_info()
info["file"] = getattr(sys.modules.get("fusedrnn._C"), "__file__", None)
json.dump(info, open(sys.argv[2], "w"), indent=1)
print(json.dumps(info))
ok = info["backend"] == "fused" and info[sys.argv[1]]
sys.exit(0 if ok else f"the extension lacks the fused {sys.argv[1]} ops: {info}")
EOF
}

# install_so SRC: SRC becomes fusedrnn/_C<suffix> through a rename (a process that has the old
# file loaded keeps its copy)
install_so() {
  cp "$1" "$SO_TREE.tmp" && mv -f "$SO_TREE.tmp" "$SO_TREE"
}

BUILD_HOW=""
BUILD_NOTE=""
T0=$SECONDS
if [ -n "${GPU_CHECK_PREBUILT:-}" ] && [ "${GPU_CHECK_REBUILD:-0}" != 1 ]; then
  PRE_STAMP=$(basename "$GPU_CHECK_PREBUILT" | sed -n 's/^fusedrnn_C\.\([0-9a-f]\{16\}\)\.so$/\1/p')
  if [ ! -f "$GPU_CHECK_PREBUILT" ]; then
    BUILD_NOTE="GPU_CHECK_PREBUILT=$GPU_CHECK_PREBUILT: no such file; "
  elif [ -z "$PRE_STAMP" ]; then
    BUILD_NOTE="GPU_CHECK_PREBUILT: expected a file named fusedrnn_C.<16 hex digits>.so, got \
$(basename "$GPU_CHECK_PREBUILT"); "
  elif [ "$PRE_STAMP" != "$STAMP" ]; then
    BUILD_NOTE="GPU_CHECK_PREBUILT stamp $PRE_STAMP differs from the current $STAMP (other \
sources, torch or target); "
  elif install_so "$GPU_CHECK_PREBUILT" && verify_ext; then
    mkdir -p build && echo "$STAMP" > "$STAMP_FILE"
    BUILD_HOW="reused GPU_CHECK_PREBUILT $(basename "$GPU_CHECK_PREBUILT") (same stamp)"
  else
    BUILD_NOTE="GPU_CHECK_PREBUILT did not import with the $DEV ops (build_verify.log); "
  fi
  [ -n "$BUILD_NOTE" ] && say "$BUILD_NOTE rebuilding"
fi
if [ -z "$BUILD_HOW" ] && [ "${GPU_CHECK_REBUILD:-0}" != 1 ] && [ -f "$SO_TREE" ] &&
   [ "$(cat "$STAMP_FILE" 2> /dev/null)" = "$STAMP" ] && verify_ext; then
  BUILD_HOW="reused the in-tree build of the same stamp"
fi
if [ -z "$BUILD_HOW" ] && ((DRY_RUN)) && [ "${GPU_CHECK_REBUILD:-0}" != 1 ] && [ -f "$SO_TREE" ] &&
   verify_ext; then
  BUILD_HOW="not rebuilt (dry run): the in-tree extension imports with its CPU ops; not \
compared with the sources"
  STAMP=unverified
fi
BUILD_RC=0
if [ -n "$BUILD_HOW" ]; then
  BUILD_S=$((SECONDS - T0))
  BUILD_LIMIT=0
else
  # reserve: inline 40, pytest 30, two benchmarks 40 each, memcheck 20
  # without debug information (-g0 after the interpreter's -g): less to compile and write, and
  # the returned extension is stripped of it anyway
  run_stage build "$(cap build 270)" 170 TERM env CFLAGS="${CFLAGS:+$CFLAGS }-g0" \
    "$PY" setup.py build_ext --inplace
  BUILD_RC=$STAGE_RC
  BUILD_S=$STAGE_S
  BUILD_LIMIT=$STAGE_LIMIT
  BUILD_HOW="built ($MODE, MAX_JOBS=$MAX_JOBS)"
  if ((BUILD_RC == 0)); then
    mkdir -p build && echo "$STAMP" > "$STAMP_FILE"
    verify_ext || BUILD_RC=$?
  fi
fi
# the C++ standard and CUDA targets the compilers were given (from the build log)
STD=$(grep -o -- '-std=c++[0-9a-z]*' "$LOGS/build.log" 2> /dev/null | sort -u | tr '\n' ' ')
GENCODE=$(grep -o -- 'code=sm_[0-9a-z]*' "$LOGS/build.log" 2> /dev/null | sort -u | tr '\n' ' ')
SO_OUT=""
if ((BUILD_RC == 0)) && [ -f "$SO_TREE" ]; then
  SO_OUT="fusedrnn_C.$STAMP.so"
  if command -v strip > /dev/null 2>&1 &&
     strip --strip-debug -o "$OUT/$SO_OUT.tmp" "$SO_TREE" 2> /dev/null; then :
  else
    cp "$SO_TREE" "$OUT/$SO_OUT.tmp"
  fi
  mv -f "$OUT/$SO_OUT.tmp" "$OUT/$SO_OUT"
fi
"$PY" - "$LOGS/build.json" "$BUILD_HOW" "$BUILD_NOTE" "$MODE" "$STAMP" "$SO_OUT" "$STD" \
  "$GENCODE" "$BUILD_RC" <<'EOF'
import json, sys
path, how, note, mode, stamp, so, std, gencode, rc = sys.argv[1:]
json.dump({"how": how, "note": note or None, "mode": mode, "stamp": stamp,
           "returned_so": so or None, "std_flags": std.split(), "cuda_targets": gencode.split(),
           "rc": int(rc)}, open(path, "w"), indent=1)
EOF
DETAIL="$BUILD_NOTE$BUILD_HOW${STD:+; $STD}${GENCODE:+; $GENCODE}${SO_OUT:+; returns $SO_OUT}"
# the first compiler error, else the import check's last line
WHY=$(grep -m1 -E 'error[: ]' "$LOGS/build.log" 2> /dev/null | cut -c1-240)
[ -z "$WHY" ] && WHY=$(tail -n 1 "$LOGS/build_verify.log" 2> /dev/null | cut -c1-240)
case $BUILD_RC in
  0) if [[ $BUILD_HOW == built* ]]; then ST=ok; else ST=reused; fi
     record build "$ST" "$BUILD_S" "$BUILD_LIMIT" 0 "$DETAIL" ;;
  124|137) record build FAIL "$BUILD_S" "$BUILD_LIMIT" "$BUILD_RC" \
             "timed out (build.log)${STD:+; $STD}" ;;
  200) record build FAIL 0 "$BUILD_LIMIT" 200 "no time left to build" ;;
  *) record build FAIL "$BUILD_S" "$BUILD_LIMIT" "$BUILD_RC" \
       "rc $BUILD_RC${STD:+; $STD}: $WHY (build.log, build_verify.log)" ;;
esac
if ((BUILD_RC != 0)); then
  skip_rest "the build failed"
  exit 1  # the EXIT trap publishes and prints the summary
fi
publish 0

# ---- inline correctness check -------------------------------------------------------------------
run_stage inline "$(cap inline 150)" 130 TERM \
  "$PY" scripts/gpu_check_inline.py --device "$DEV" --out "$LOGS/inline.json"
INLINE=$("$PY" -c "import json; d = json.load(open('$LOGS/inline.json')); print(d['cases'], \
'cases x dtypes,', d['checks'], 'tensor checks,', len(d['failures']), 'failures', \
'' if d['complete'] else '(stopped before the end)')" 2> /dev/null || echo "no inline.json")
case $STAGE_RC in
  0) record inline ok "$STAGE_S" "$STAGE_LIMIT" 0 "$INLINE" ;;
  124|137) record inline FAIL "$STAGE_S" "$STAGE_LIMIT" "$STAGE_RC" "timed out: $INLINE" ;;
  200) record inline FAIL 0 "$STAGE_LIMIT" 200 "no time left" ;;
  *) record inline FAIL "$STAGE_S" "$STAGE_LIMIT" "$STAGE_RC" "rc $STAGE_RC: $INLINE" ;;
esac
publish 0

# ---- pytest: the CUDA tests -----------------------------------------------------------------------
if ! "$PY" -c "import pytest" > /dev/null 2>&1; then
  record pytest skipped 0 0 - "pytest not installed"
else
  # SIGINT first: pytest then ends the session and still writes the junit XML
  run_stage pytest "$(cap pytest 150)" 100 INT "$PY" -m pytest tests -k cuda -v -rfEs \
    -p no:cacheprovider --junitxml "$LOGS/pytest.xml" -o faulthandler_timeout=90 \
    --durations=10
  PYT=$("$PY" - "$REPO/scripts" "$LOGS/pytest.xml" "$LOGS/pytest.log" 2> /dev/null <<'EOF'
import sys
sys.path.insert(0, sys.argv[1])
from gpu_check_report import pytest_section
s = pytest_section(sys.argv[2], sys.argv[3]) or {}
text = "{} passed, {} failed, {} errors, {} skipped".format(
    s.get("passed"), s.get("failed"), s.get("errors"), s.get("skipped"))
if s.get("unfinished"):
    text += "; running when stopped: " + ", ".join(s["unfinished"])
print(text)
if not s.get("passed") and not s.get("failed") and not s.get("errors"):
    sys.exit(3)  # nothing ran: every test skipped
EOF
  )
  NOTHING_RAN=$?
  case $STAGE_RC in
    0) if ((!DRY_RUN)) && ((NOTHING_RAN == 3)); then
         record pytest FAIL "$STAGE_S" "$STAGE_LIMIT" 0 "every CUDA test skipped on the GPU: $PYT"
       else
         record pytest ok "$STAGE_S" "$STAGE_LIMIT" 0 \
           "$PYT$( ((DRY_RUN)) && echo ' (dry run: the CUDA tests skip without a GPU)')"
       fi ;;
    5) record pytest skipped "$STAGE_S" "$STAGE_LIMIT" 5 "no CUDA tests collected" ;;
    124|137) record pytest FAIL "$STAGE_S" "$STAGE_LIMIT" "$STAGE_RC" "timed out: $PYT" ;;
    200) record pytest skipped 0 "$STAGE_LIMIT" 200 "no time left" ;;
    *) record pytest FAIL "$STAGE_S" "$STAGE_LIMIT" "$STAGE_RC" "rc $STAGE_RC: $PYT" ;;
  esac
fi
publish 0

# ---- benchmark --------------------------------------------------------------------------------------
if ((DRY_RUN)); then
  # one tiny shape (the GPU run has two): every code path, in seconds
  # (one thread: a CPU run's default, one thread and every core, would write a folder per count)
  BENCH_DEV=(--device cpu --shapes "4,4,8,8" --repeats 2 --threads 1)
  COMPILE_ARGS=(--compile-backend eager)  # the compiled-loop path without code generation
else
  BENCH_DEV=(--device cuda --shapes "100,64,512,512;100,8,512,512")
  COMPILE_ARGS=()
fi
# bench_run NAME CAP RESERVE ARGS...: one benchmark run into $LOGS/bench_NAME
bench_run() {
  local name=$1 cap=$2 reserve=$3
  shift 3
  run_stage "bench_$name" "$cap" "$reserve" TERM "$PY" -m fusedrnn.bench "$@" \
    --out "$LOGS/bench_$name"
  local rows
  rows=$("$PY" -c "import json; d = json.load(open('$LOGS/bench_$name/results.json')); \
print(len(d['results']), 'rows,', d.get('cases_done'), 'of', d.get('cases_total'), 'cases,', \
'TF32', 'on' if d['settings'].get('tf32') else 'off')" 2> /dev/null || echo "no results.json")
  case $STAGE_RC in
    0) record "bench_$name" ok "$STAGE_S" "$STAGE_LIMIT" 0 "$rows" ;;
    1) record "bench_$name" FAIL "$STAGE_S" "$STAGE_LIMIT" 1 "measurements failed: $rows" ;;
    124|137|143) record "bench_$name" timeout "$STAGE_S" "$STAGE_LIMIT" "$STAGE_RC" \
                   "stopped by its limit, partial results kept: $rows" ;;
    200) record "bench_$name" skipped 0 "$STAGE_LIMIT" 200 "no time left" ;;
    *) record "bench_$name" error "$STAGE_S" "$STAGE_LIMIT" "$STAGE_RC" "rc $STAGE_RC: $rows" ;;
  esac
  publish 0
}
# reserves: the bf16 run and memcheck
bench_run float32 "$(cap bench_float32 100)" 60 "${BENCH_DEV[@]}" --dtype float32 --cells all \
  --no-compile
bench_run bfloat16 "$(cap bench_bfloat16 100)" 20 "${BENCH_DEV[@]}" --dtype bfloat16 --cells all \
  --no-compile

# ---- compute-sanitizer memcheck on the tiny cases ---------------------------------------------------
if ((DRY_RUN)); then
  run_stage memcheck "$(cap memcheck 120)" 0 TERM "$PY" scripts/gpu_check_inline.py --tiny \
    --device cpu --out "$LOGS/memcheck_inline.json"
  case $STAGE_RC in
    0) record memcheck ok "$STAGE_S" "$STAGE_LIMIT" 0 \
         "dry run: the tiny inline check on the CPU, without compute-sanitizer" ;;
    200) record memcheck skipped 0 "$STAGE_LIMIT" 200 "no time left" ;;
    *) record memcheck FAIL "$STAGE_S" "$STAGE_LIMIT" "$STAGE_RC" "rc $STAGE_RC (memcheck.log)" ;;
  esac
else
  SANITIZER="$(command -v compute-sanitizer || true)"
  [ -z "$SANITIZER" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] &&
    SANITIZER=/usr/local/cuda/bin/compute-sanitizer
  if [ -z "$SANITIZER" ]; then
    record memcheck skipped 0 0 - "compute-sanitizer not found"
  else
    # without the caching allocator every tensor is its own allocation, so that memcheck sees
    # an out-of-bounds access even where it would land inside a cached block
    run_stage memcheck "$(cap memcheck 120)" 0 TERM env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$SANITIZER" --tool memcheck --error-exitcode 99 --leak-check no \
      "$PY" scripts/gpu_check_inline.py --tiny --out "$LOGS/memcheck_inline.json"
    if grep -Eq "ERROR SUMMARY: [1-9]" "$LOGS/memcheck.log" || [ "$STAGE_RC" = 99 ]; then
      record memcheck FAIL "$STAGE_S" "$STAGE_LIMIT" "$STAGE_RC" \
        "$(grep -m1 -E 'ERROR SUMMARY' "$LOGS/memcheck.log") (memcheck.log)"
    elif grep -q "correctness checks failed" "$LOGS/memcheck.log"; then
      record memcheck FAIL "$STAGE_S" "$STAGE_LIMIT" "$STAGE_RC" \
        "the tiny check failed under the sanitizer (memcheck.log)"
    else
      case $STAGE_RC in
        0) record memcheck ok "$STAGE_S" "$STAGE_LIMIT" 0 "no memcheck errors" ;;
        124|137) record memcheck timeout "$STAGE_S" "$STAGE_LIMIT" "$STAGE_RC" \
                   "inconclusive: stopped by its limit before the end" ;;
        200) record memcheck skipped 0 "$STAGE_LIMIT" 200 "no time left" ;;
        # the tool itself failed (no memcheck errors, no failed check): reported, not a failure
        *) record memcheck error "$STAGE_S" "$STAGE_LIMIT" "$STAGE_RC" \
             "rc $STAGE_RC, no memcheck errors (memcheck.log)" ;;
      esac
    fi
  fi
fi
publish 0

# ---- the torch.compile baseline, when time is left -------------------------------------------------
LEFT=$((DEADLINE - SECONDS))
if ((LEFT >= COMPILE_MIN_S)); then
  if ((DRY_RUN)); then
    COMPILED_SHAPE=(--shapes "4,4,8,8" --repeats 2 --threads 1)
  else
    COMPILED_SHAPE=(--fastrnns)
  fi
  bench_run compiled "$(cap bench_compiled 600)" 0 --device "$DEV" "${COMPILED_SHAPE[@]}" \
    --dtype float32 --cells lstm,gru --no-memory ${COMPILE_ARGS[@]+"${COMPILE_ARGS[@]}"}
else
  record bench_compiled skipped 0 0 - "${LEFT}s left, less than GPU_CHECK_COMPILE_MIN_S=$COMPILE_MIN_S"
fi

# ---- plot: fp32 and bf16 side by side ------------------------------------------------------------------
PLOT_IN=()
for run in float32 bfloat16; do
  [ -f "$LOGS/bench_$run/results.json" ] && PLOT_IN+=("$LOGS/bench_$run/results.json")
done
if ((${#PLOT_IN[@]} == 0)); then
  record plot skipped 0 0 - "no benchmark results"
elif ! "$PY" -c "import matplotlib" > /dev/null 2>&1; then
  record plot skipped 0 0 - "matplotlib not installed (results.json has every number)"
else
  run_stage plot "$(cap plot 60)" 0 TERM "$PY" -m fusedrnn.bench.plot "${PLOT_IN[@]}" \
    --out "$WORK/speedups.png"
  case $STAGE_RC in
    0) record plot ok "$STAGE_S" "$STAGE_LIMIT" 0 "bench/speedups.png" ;;
    200) record plot skipped 0 "$STAGE_LIMIT" 200 "no time left" ;;
    *) record plot error "$STAGE_S" "$STAGE_LIMIT" "$STAGE_RC" "rc $STAGE_RC (plot.log)" ;;
  esac
fi

exit "$FAILED"  # the EXIT trap publishes and prints the summary
