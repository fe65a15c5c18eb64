#!/usr/bin/env bash
# The whole GPU check of segfast in one call, inside a wall-time deadline (default 480 s)
# on a one-GPU machine with torch + triton and no package registry. benchmarks/README.md
# says how to run it on a lent GPU, what to carry there and how to commit what it writes.
#
#   bash benchmarks/gpu_suite.sh --out "$OUT"     # on the GPU machine
#   bash benchmarks/gpu_suite.sh --dry-run        # anywhere: the plan, and what it needs
#   bash benchmarks/gpu_suite.sh --help
#
# Every step runs under `timeout` with its own budget, cut to what is left of the total;
# a step skipped or cut short is logged with the reason, and the next step still runs.
# shellcheck disable=SC2317  # the step_<name> functions are called through a variable
set -euo pipefail

STEPS=(probe import tests-gpu compile kernel-bench models tests-rest report)
declare -A DEFAULT_BUDGET=(
  [probe]=45 [import]=60 [tests-gpu]=90 [compile]=45
  [kernel-bench]=60 [models]=240 [tests-rest]=120 [report]=20
)
declare -A MIN_S=(
  [probe]=5 [import]=10 [tests-gpu]=20 [compile]=15
  [kernel-bench]=20 [models]=60 [tests-rest]=20 [report]=1
)
declare -A ABOUT=(
  [probe]="GPU name, driver, nvidia-smi, Python/torch/triton versions, test plugins"
  [import]="install carried wheels (.whl/*.whl), make segfast importable, check import segfast, segfast.kernels"
  [tests-gpu]="GPU-marked tests of tests/kernels and tests/backends (bf16/fp16 on the chip)"
  [compile]="tests/kernels/test_compile_targets.py, only if the file exists"
  [kernel-bench]="pytest-benchmark kernel suites, most wanted first, cut by the budget"
  [models]="python -m segfast.bench.suite: zoo models x precisions x backends, most wanted first"
  [tests-rest]="the other tests of tests/kernels and tests/backends, on the GPU, if time is left"
  [report]="summary of every step (ran, cut short, skipped and why) and the files written"
)
CORE_STEPS=" probe import report "           # always run; --steps picks among the others
NEEDS_SEGFAST=" tests-gpu compile kernel-bench models tests-rest "

usage() {
  cat <<'EOF'
Usage: bash benchmarks/gpu_suite.sh [--out DIR] [--steps LIST] [--dry-run] [--cpu-ok] [--help]

Runs on a GPU machine, in this order, each step under `timeout` within its budget and
within what is left of the total deadline (a step with too little time left is skipped,
one that hits its limit is stopped with SIGINT, then SIGKILL 10 s later; both are logged):
  probe         GPU name, driver, nvidia-smi, Python/torch/triton versions, test plugins
  import        install .whl/*.whl (if carried) into a temp dir on PYTHONPATH; make
                segfast importable (pip install --no-index --no-build-isolation -e .,
                else a symlink shim); check `import segfast, segfast.kernels`
  tests-gpu     pytest -m gpu tests/kernels tests/backends (without tests/backends/cpu)
  compile       pytest tests/kernels/test_compile_targets.py (skipped if absent)
  kernel-bench  pytest benchmarks/bench_<op>.py --benchmark-only -> DIR/<gpu>-kernels.json
  models        python -m segfast.bench.suite -> DIR/<gpu>.json and DIR/<gpu>.md
  tests-rest    pytest -m "not gpu" tests/kernels tests/backends, if time is left
  report        summary of every step; DIR/logs/<gpu>-gpu-suite.log holds all output

Options:
  --out DIR     where results and the log go (default benchmarks/results)
  --steps LIST  comma-separated steps to run among tests-gpu, compile, kernel-bench,
                models, tests-rest (probe, import and report always run)
  --dry-run     print the steps, budgets and commands, check the files and Python
                modules they need (no GPU needed), and exit: 0 when all are there
  --cpu-ok      run even without a CUDA GPU (tests of this script only)
  -h, --help    this text

Environment (seconds unless said):
  GPU_SUITE_TOTAL_S=480       total deadline        GPU_SUITE_RESERVE_S=20  kept for report
  GPU_SUITE_BUDGET_<STEP>     a step's budget, STEP upper-cased with - as _ (e.g.
                              GPU_SUITE_BUDGET_KERNEL_BENCH=60); defaults in --dry-run
  GPU_SUITE_WORKERS=8         pytest-xdist workers of the test steps (1: none)
  GPU_SUITE_TEST_TIMEOUT=120  per-test limit (pytest-timeout, where installed)
  GPU_SUITE_KERNEL_FILES      kernel suites in order (default conv2d,head,conv_transpose2d,
                              pool,resize,preprocess,overlay,qconv2d)   GPU_SUITE_KERNEL_K  pytest -k
  GPU_SUITE_CASESET=standard  segfast.bench.suite --cases
  GPU_SUITE_CASES             its --only, in order (default: every 512-class case, then
                              the 1024x2048 ones; empty with a non-standard caseset)
  GPU_SUITE_PRECISIONS=fp16,fp32   GPU_SUITE_BACKENDS=eager,eager_cl,torch,triton,inductor
  GPU_SUITE_SUITE_ARGS        extra arguments of segfast.bench.suite (e.g. "--iters 20")
  GPU_SUITE_RESUME=0          1: start from benchmarks/results/<gpu>.json (committed by an
                              earlier call) and skip the model runs already in it
  GPU_SUITE_IMPORT=auto       auto: segfast as installed, else an offline editable
                              install, else the shim; shim: the symlink shim at once
  PYTHON=python3              the Python with torch and triton

Exit status: 0 when no step failed (cut and skipped steps are logged, not failures),
1 when a step failed, 2 without a CUDA GPU, 64 on a usage error.
EOF
}

die_usage() { printf 'gpu_suite: %s (try --help)\n' "$1" >&2; exit 64; }

# ---------------------------------------------------------------- arguments
OUT_DIR=""
DRY_RUN=0
CPU_OK=0
ONLY_STEPS=""
while (($#)); do
  case $1 in
    --out) (($# >= 2)) || die_usage "--out needs a directory"; OUT_DIR=$2 OUT_SET=1; shift 2 ;;
    --out=*) OUT_DIR=${1#--out=} OUT_SET=1; shift ;;
    --steps) (($# >= 2)) || die_usage "--steps needs a list"; ONLY_STEPS=$2; shift 2 ;;
    --steps=*) ONLY_STEPS=${1#--steps=}; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --cpu-ok) CPU_OK=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die_usage "unknown argument: $1" ;;
  esac
done
if [[ ${OUT_SET:-0} == 1 && -z $OUT_DIR ]]; then die_usage "--out needs a directory"; fi
if [[ -n $ONLY_STEPS ]]; then
  IFS=, read -r -a _picked <<<"$ONLY_STEPS"
  for s in "${_picked[@]}"; do
    [[ " ${STEPS[*]} " == *" $s "* ]] || die_usage "--steps: unknown step '$s'"
  done
fi

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
env_uint() {  # env_uint NAME DEFAULT: the variable's value, checked to be a whole number
  local v=${!1:-$2}
  is_uint "$v" || die_usage "$1 must be a whole number of seconds, got '$v'"
  printf '%s' "$v"
}
TOTAL_S=$(env_uint GPU_SUITE_TOTAL_S 480)
RESERVE_S=$(env_uint GPU_SUITE_RESERVE_S 20)
WORKERS=$(env_uint GPU_SUITE_WORKERS 8)
TEST_TIMEOUT=$(env_uint GPU_SUITE_TEST_TIMEOUT 120)
KILL_GRACE=10
declare -A BUDGET
for s in "${STEPS[@]}"; do
  var="GPU_SUITE_BUDGET_$(tr 'a-z-' 'A-Z_' <<<"$s")"
  BUDGET[$s]=$(env_uint "$var" "${DEFAULT_BUDGET[$s]}")
done
PY=${PYTHON:-python3}
KERNEL_FILES=${GPU_SUITE_KERNEL_FILES:-conv2d,head,conv_transpose2d,pool,resize,preprocess,overlay,qconv2d}
KERNEL_K=${GPU_SUITE_KERNEL_K:-}
CASESET=${GPU_SUITE_CASESET:-standard}
if [[ $CASESET == standard ]]; then
  _default_cases=unet-512,deeplabv3plus_mobilenetv2-512,deeplabv3plus_resnet50-512,fcn8s-512
  _default_cases+=,pspnet-512,fcn_resnet50-512,segnet-360x480,dcgan-b64
  _default_cases+=,lraspp_mobilenetv3-512,unet_efficientnet_b0-512,fpn_groupnorm-512
  _default_cases+=,deeplabv3_mobilenetv3-512
  _default_cases+=,deeplabv3plus_mobilenetv2-1024x2048,deeplabv3plus_resnet50-1024x2048
  _default_cases+=,fcn8s-1024x2048,pspnet-1024x2048,fcn_resnet50-1024x2048
else
  _default_cases=""
fi
CASES=${GPU_SUITE_CASES-$_default_cases}
PRECISIONS=${GPU_SUITE_PRECISIONS:-fp16,fp32}
BACKENDS=${GPU_SUITE_BACKENDS:-eager,eager_cl,torch,triton,inductor}
read -r -a SUITE_EXTRA <<<"${GPU_SUITE_SUITE_ARGS:-}"
COMPILE_TEST=tests/kernels/test_compile_targets.py
IMPORT_MODE=${GPU_SUITE_IMPORT:-auto}
RESUME=${GPU_SUITE_RESUME:-0}
[[ $RESUME == 0 || $RESUME == 1 ]] || die_usage "GPU_SUITE_RESUME is 0 or 1"
[[ $IMPORT_MODE == auto || $IMPORT_MODE == shim ]] || die_usage "GPU_SUITE_IMPORT is auto or shim"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z $OUT_DIR ]]; then
  OUT_DIR=benchmarks/results  # in the repository
elif [[ $DRY_RUN == 0 && $OUT_DIR != /* ]]; then
  OUT_DIR="$PWD/$OUT_DIR"  # relative to where the script was called from
fi
cd "$REPO"
export PYTHONUNBUFFERED=1 COLUMNS=${COLUMNS:-200}
unset TRITON_INTERPRET

# ---------------------------------------------------------------- commands
# Each cmd_<step> fills CMD, the command the step runs (the dry run prints it).
has_module() { "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('$1') is None)" 2>/dev/null; }
HAVE_XDIST=""
HAVE_TIMEOUT=""
probe_plugins() {
  HAVE_XDIST=0 HAVE_TIMEOUT=0
  if has_module xdist; then HAVE_XDIST=1; fi
  if has_module pytest_timeout; then HAVE_TIMEOUT=1; fi
}
pytest_base() {  # pytest_base -q|-v
  CMD=("$PY" -m pytest "$1" -rfE -p no:cacheprovider)
  if [[ $HAVE_TIMEOUT == 1 ]]; then CMD+=("--timeout=$TEST_TIMEOUT"); fi
}
TEST_DIRS=(tests/kernels tests/backends --ignore=tests/backends/cpu)
cmd_tests() {  # cmd_tests MARKER (-v: every result is in the log even if the step is cut)
  pytest_base -v
  if [[ $HAVE_XDIST == 1 ]] && ((WORKERS > 1)); then CMD+=(-n "$WORKERS"); fi
  CMD+=(-m "$1" "${TEST_DIRS[@]}")
}
cmd_compile() { pytest_base -v; CMD+=("$COMPILE_TEST"); }
kernel_paths() {
  KPATHS=()
  local f
  IFS=, read -r -a _kf <<<"$KERNEL_FILES"
  for f in "${_kf[@]}"; do KPATHS+=("benchmarks/bench_${f}.py"); done
}
cmd_kernel_bench() {  # cmd_kernel_bench JSON
  kernel_paths
  pytest_base -q
  CMD+=(--benchmark-only "--benchmark-json=$1" "--benchmark-columns=min,median,rounds")
  if [[ -n $KERNEL_K ]]; then CMD+=(-k "$KERNEL_K"); fi
  local p
  for p in "${KPATHS[@]}"; do [[ -f $p ]] && CMD+=("$p"); done
  return 0
}
cmd_models() {  # cmd_models TIME_BUDGET
  CMD=("$PY" -m segfast.bench.suite --out "$OUT_DIR" --cases "$CASESET")
  if [[ -n $CASES ]]; then CMD+=(--only "$CASES"); fi
  CMD+=(--precisions "$PRECISIONS" --backends "$BACKENDS" --time-budget "$1")
  if [[ $RESUME == 1 ]]; then CMD+=(--skip-done); fi
  if ((${#SUITE_EXTRA[@]})); then CMD+=("${SUITE_EXTRA[@]}"); fi
}
show() {  # a command line as one would type it
  local a out=""
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+="$a "; else out+="'${a//\'/\'\\\'\'}' "; fi
  done
  printf '%s' "${out% }"
}

# ---------------------------------------------------------------- dry run
if ((DRY_RUN)); then
  probe_plugins
  echo "gpu_suite dry run: total deadline ${TOTAL_S}s, ${RESERVE_S}s of it kept for the report;"
  echo "a step gets min(its budget, time left) and is skipped with less than its minimum."
  echo "output: $OUT_DIR/<gpu>.json, <gpu>.md, <gpu>-kernels.json, logs/<gpu>-gpu-suite.log"
  n=0 worst=0
  for s in "${STEPS[@]}"; do
    n=$((n + 1))
    case $s in
      probe) c="$PY - (torch.cuda, versions); nvidia-smi" ;;
      import) c="pip install --no-index --no-deps --target \$TMP/site .whl/*.whl; pip install --no-index --no-deps --no-build-isolation -e . (else a symlink shim); $PY -c 'import segfast, segfast.kernels'" ;;
      tests-gpu) cmd_tests gpu; c=$(show "${CMD[@]}") ;;
      compile) cmd_compile; c=$(show "${CMD[@]}") ;;
      kernel-bench) cmd_kernel_bench "$OUT_DIR/<gpu>-kernels.json"; c=$(show "${CMD[@]}") ;;
      models) cmd_models "<time left - 10>"; c=$(show "${CMD[@]}") ;;
      tests-rest) cmd_tests "not gpu"; c=$(show "${CMD[@]}") ;;
      report) c="summary table; files under $OUT_DIR" ;;
    esac
    sel=""
    if [[ -n $ONLY_STEPS && $CORE_STEPS != *" $s "* && ",$ONLY_STEPS," != *",$s,"* ]]; then
      sel=" (not selected by --steps)"
    else
      worst=$((worst + ${BUDGET[$s]}))
    fi
    printf 'step %d %s budget=%ss min=%ss%s: %s\n' "$n" "$s" "${BUDGET[$s]}" "${MIN_S[$s]}" "$sel" "${ABOUT[$s]}"
    printf '    $ %s\n' "$c"
  done
  echo "sum of the selected budgets: ${worst}s; the deadline caps the run at ${TOTAL_S}s (+${KILL_GRACE}s kill grace at most)"
  echo "checks:"
  bad=0
  check() {  # check ok|absent|MISSING TEXT (MISSING fails the dry run)
    printf '  %-7s %s\n' "$1" "$2"
    if [[ $1 == MISSING ]]; then bad=1; fi
    return 0
  }
  for f in tests/kernels tests/backends tests/conftest.py segfast/bench/suite.py \
    segfast/bench/readme.py kernels pyproject.toml; do
    if [[ -e $f ]]; then check ok "file $f"; else check MISSING "file $f"; fi
  done
  kernel_paths
  for f in "${KPATHS[@]}"; do
    if [[ -f $f ]]; then check ok "file $f"; else check MISSING "file $f (GPU_SUITE_KERNEL_FILES)"; fi
  done
  if [[ -f $COMPILE_TEST ]]; then
    check ok "file $COMPILE_TEST"
  else
    check absent "file $COMPILE_TEST: the compile step will be skipped"
  fi
  if ! command -v "$PY" >/dev/null 2>&1; then
    check MISSING "python: $PY (set PYTHON)"
  else
    cmd_models 100
    # one Python process checks every module and lets segfast.bench.suite check its arguments
    while read -r status text; do check "$status" "$text"; done < <(
      "$PY" - "${CMD[@]:3}" <<'EOF' 2>&1 || echo "MISSING the module check itself failed"
import contextlib, importlib.util, io, sys

def found(name):
    try:
        return importlib.util.find_spec(name) is not None
    except Exception:  # a parent package that fails to import
        return False

for m in ("torch", "triton", "pytest", "pytest_benchmark", "segfast", "segfast.kernels",
          "segfast.bench.suite"):
    print("ok" if found(m) else "MISSING", "module", m)
carry = "optional here; carry its wheel, see benchmarks/README.md"
for m, why in (("xdist", "tests run in one process"), ("pytest_timeout", "no per-test limit"),
               ("av", carry), ("onnxruntime", carry)):
    print(f"ok module {m}" if found(m) else f"absent module {m}: {why}")
if found("segfast.bench.suite"):
    from segfast.bench import suite

    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            rc = suite.main([*sys.argv[1:], "--dry-run"])
    except SystemExit as exc:
        rc = exc.code
    lines = buf.getvalue().splitlines()
    if rc == 0:
        runs = sum(line.startswith("would run") for line in lines)
        print(f"ok segfast.bench.suite accepts the case list: {runs} runs planned")
    else:
        print("MISSING segfast.bench.suite rejects its arguments:", lines[-1] if lines else rc)
EOF
    )
  fi
  for t in timeout tee; do
    if command -v "$t" >/dev/null 2>&1; then check ok "command $t"; else check MISSING "command $t"; fi
  done
  if ((bad)); then echo "dry run: something the steps need is missing"; exit 1; fi
  echo "dry run ok: ${#STEPS[@]} steps"
  exit 0
fi

# ---------------------------------------------------------------- the run
mkdir -p "$OUT_DIR/logs"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/logs/gpu-suite.log"
: >"$LOG"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-suite.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)

log() { printf '[gpu_suite %3ds] %s\n' "$SECONDS" "$*" | tee -a "$LOG"; }

# A shell without job control starts background commands with SIGINT ignored, and so
# would their children: then the SIGINT of `timeout` would not let pytest and the suite
# save what they have. RESET_INT gives the command the default SIGINT again.
if env --default-signal=INT true 2>/dev/null; then
  RESET_INT=(env --default-signal=INT)
else
  RESET_INT=("$PY" -c 'import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
os.execvp(sys.argv[1], sys.argv[1:])')
fi

# timed SECONDS CMD...: run CMD with a limit, its output to stdout, the log and
# $WORK/last.out; returns CMD's status (124: stopped at the limit).
timed() {
  local secs=$1 rc=0
  shift
  if ((secs <= 0)); then return 124; fi
  : >"$WORK/last.out"
  set +e
  timeout -s INT -k "$KILL_GRACE" "$secs" "${RESET_INT[@]}" "$@" 2>&1 | tee -a "$LOG" "$WORK/last.out"
  rc=${PIPESTATUS[0]}
  set -e
  return "$rc"
}
step_left() { echo $((STEP_LIMIT - (SECONDS - STEP_T0))); }
last_pytest_line() {
  grep -E '(passed|failed|error|skipped|deselected|no tests ran)' "$WORK/last.out" 2>/dev/null |
    grep -E ' in [0-9.]+s' | tail -n 1 | sed -E 's/^=+ //; s/ =+$//' || true
}

GPU_SLUG=""
NOTE=""
step_probe() {
  local rc=0
  timed "$(step_left)" "$PY" - <<'EOF' || rc=$?
import importlib.metadata as md
import platform
import re
import sys

print(f"python {sys.version.split()[0]} at {sys.executable}; {platform.platform()}")
import torch

print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU 0 of {torch.cuda.device_count()}: {p.name}, sm_{p.major}{p.minor}, "
          f"{p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
else:
    print("torch sees no CUDA GPU")
name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
print("GPU_SLUG=" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))
for name in ("triton", "numpy", "pytest", "pytest-xdist", "pytest-timeout", "pytest-benchmark",
             "onnx", "onnxruntime", "onnxscript", "av", "setuptools", "safetensors", "segfast"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name}: not installed")
EOF
  GPU_SLUG=$(sed -n 's/^GPU_SLUG=//p' "$WORK/last.out" | tail -n 1)
  if command -v nvidia-smi >/dev/null 2>&1; then
    timed "$(step_left)" nvidia-smi || rc=$?
    timed "$(step_left)" nvidia-smi --format=csv \
      --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu || true
  else
    log "nvidia-smi: not on PATH"
  fi
  probe_plugins
  log "pytest plugins: xdist=$HAVE_XDIST pytest-timeout=$HAVE_TIMEOUT"
  return "$rc"
}

SEGFAST_OK=0
import_check() {  # import segfast from this tree, as the steps do (from the repository root)
  timed "$(step_left)" "$PY" -c "
import os, sys, segfast, segfast.kernels
root = os.path.realpath(sys.argv[1])
where = os.path.realpath(segfast.kernels.__file__)
print('import check: segfast', segfast.__file__, '| segfast.kernels', segfast.kernels.__file__)
sys.exit(0 if where.startswith(root + os.sep) else 'segfast.kernels is not this tree: ' + where)
" "$REPO"
}
make_shim() {  # $WORK/shim/segfast: links to segfast/*, kernels/ and csrc/ where pyproject maps them
  local s="$WORK/shim/segfast" f
  mkdir -p "$s/edge"
  for f in "$REPO"/segfast/*; do [[ $(basename "$f") == edge ]] || ln -s "$f" "$s/"; done
  for f in "$REPO"/segfast/edge/*; do ln -s "$f" "$s/edge/"; done
  ln -s "$REPO/kernels" "$s/kernels"
  ln -s "$REPO/csrc" "$s/edge/csrc"
  export PYTHONPATH="$WORK/shim${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
  NOTE="segfast through a symlink shim (PYTHONSAFEPATH=1)"
}
step_import() {
  local wheels=("$REPO"/.whl/*.whl) rc=0
  if [[ -e ${wheels[0]} ]]; then
    log "installing ${#wheels[@]} carried wheel(s) into $WORK/site: ${wheels[*]##*/}"
    timed "$(step_left)" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$WORK/site" "${wheels[@]}" || log "wheel install failed (going on)"
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    log "no .whl/*.whl carried"
  fi
  if [[ $IMPORT_MODE == shim ]]; then
    log "GPU_SUITE_IMPORT=shim: a symlink shim on PYTHONPATH"
    make_shim
  elif import_check; then
    SEGFAST_OK=1 NOTE="segfast already importable"
    return 0
  else
    log "segfast is not importable as is: pip install --no-index --no-deps --no-build-isolation -e ."
    if timed "$(step_left)" "$PY" -m pip install -q --no-index --no-deps --no-build-isolation \
      --no-cache-dir -e "$REPO"; then
      NOTE="segfast installed editable, offline"
    else
      log "the editable install failed: a symlink shim on PYTHONPATH instead"
      make_shim
    fi
  fi
  import_check || rc=$?
  if ((rc == 0)); then SEGFAST_OK=1; fi
  if ((rc != 0 && rc != 124)) && [[ $NOTE == *editable* ]]; then
    log "segfast does not import after the editable install: the symlink shim instead"
    make_shim
    rc=0
    import_check || rc=$?
    if ((rc == 0)); then SEGFAST_OK=1; fi
  fi
  if ((rc != 0)); then NOTE="segfast could not be imported (tried: ${NOTE:-as installed})"; fi
  return "$rc"
}

step_tests_gpu() {
  local rc=0
  cmd_tests gpu
  timed "$(step_left)" "${CMD[@]}" || rc=$?
  NOTE=$(last_pytest_line)
  return "$rc"
}
step_tests_rest() {
  local rc=0
  cmd_tests "not gpu"
  timed "$(step_left)" "${CMD[@]}" || rc=$?
  NOTE=$(last_pytest_line)
  return "$rc"
}
step_compile() {
  local rc=0
  if [[ ! -f $COMPILE_TEST ]]; then
    NOTE="$COMPILE_TEST is not in this tree"
    return 3
  fi
  cmd_compile
  timed "$(step_left)" "${CMD[@]}" || rc=$?
  NOTE=$(last_pytest_line)
  return "$rc"
}
kernel_table() {  # compact segfast-vs-baseline table from a pytest-benchmark JSON
  "$PY" - "$1" <<'EOF'
import json, sys
from collections import defaultdict

data = json.load(open(sys.argv[1]))
groups = defaultdict(dict)
for b in data.get("benchmarks", []):
    params = dict(b.get("params") or {})
    impl = params.pop("impl", "?")
    case = ",".join(str(v) for v in params.values())
    groups[f"{b['name'].split('[')[0].removeprefix('test_')}[{case}]"][impl] = b.get("extra_info", {})
print(f"{len(data.get('benchmarks', []))} kernel benchmarks (do_bench median ms):")
print(f"{'benchmark':58} {'segfast':>9} {'baseline':>9} {'speedup':>7} {'GB/s':>7} {'TFLOP/s':>7}")
for g, impls in groups.items():
    s = impls.get("segfast", {})
    base = next((v for k, v in impls.items() if k != "segfast"), {})
    ms, bms = s.get("ms"), base.get("ms")
    sp = f"{bms / ms:.2f}x" if ms and bms else "-"
    f = lambda v, d=3: f"{v:.{d}f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
    print(f"{g[:58]:58} {f(ms):>9} {f(bms):>9} {sp:>7} {f(s.get('gb_per_s'), 0):>7} "
          f"{f(s.get('tflop_per_s'), 1):>7}")
EOF
}
step_kernel_bench() {
  local rc=0 json="$OUT_DIR/$GPU_SLUG-kernels.json"
  cmd_kernel_bench "$json"
  if [[ ${CMD[-1]} != *.py ]]; then
    NOTE="none of GPU_SUITE_KERNEL_FILES ($KERNEL_FILES) is in benchmarks/"
    return 3
  fi
  timed "$(step_left)" "${CMD[@]}" || rc=$?
  NOTE=$(last_pytest_line)
  if [[ -s $json ]]; then
    kernel_table "$json" 2>&1 | tee -a "$LOG" || true
  else
    NOTE+=" (no JSON written)"
  fi
  return "$rc"
}
step_models() {
  local rc=0 left seed="$REPO/benchmarks/results/$GPU_SLUG.json"
  if [[ $RESUME == 1 && ! -e $OUT_DIR/$GPU_SLUG.json && -f $seed ]]; then
    log "GPU_SUITE_RESUME=1: continuing $seed (runs already in it are skipped)"
    cp "$seed" "$OUT_DIR/"
  fi
  left=$(step_left)
  cmd_models $((left > 20 ? left - 10 : left))
  timed "$left" "${CMD[@]}" || rc=$?
  NOTE="$(grep -c '^== ' "$WORK/last.out" || true) model runs started"
  local sk
  sk=$(grep -E '^skipped for the time budget' "$WORK/last.out" | tail -n 1 || true)
  if [[ -n $sk ]]; then
    NOTE+="; ${sk%%:*}"
    log "models: $sk"
  fi
  return "$rc"
}

declare -A STATUS TOOK WHY
record() { STATUS[$1]=$2; TOOK[$1]=$3; WHY[$1]=$4; }
selected() { [[ -z $ONLY_STEPS || $CORE_STEPS == *" $1 "* || ",$ONLY_STEPS," == *",$1,"* ]]; }
BLOCK=""  # why the steps that need segfast cannot run
run_step() {
  local s=$1 fn avail allowed rc=0 took
  fn="step_${s//-/_}"
  if ! selected "$s"; then
    record "$s" "not selected" 0 "--steps $ONLY_STEPS"
    log "SKIP $s: not selected (--steps $ONLY_STEPS)"
    return 0
  fi
  if [[ -n $BLOCK && $NEEDS_SEGFAST == *" $s "* ]]; then
    record "$s" skipped 0 "$BLOCK"
    log "SKIP $s: $BLOCK"
    return 0
  fi
  if [[ $s == report ]]; then
    avail=$((TOTAL_S - SECONDS))
  else
    avail=$((TOTAL_S - RESERVE_S - SECONDS))
  fi
  local budget=${BUDGET[$s]} min=${MIN_S[$s]}
  allowed=$((budget < avail ? budget : avail))
  if ((allowed < min)); then
    record "$s" skipped 0 "${avail}s left before the deadline, needs at least ${MIN_S[$s]}s (budget ${BUDGET[$s]}s)"
    log "SKIP $s: ${WHY[$s]}"
    return 0
  fi
  log "== $s: up to ${allowed}s (budget ${BUDGET[$s]}s, ${avail}s left) — ${ABOUT[$s]}"
  STEP_T0=$SECONDS STEP_LIMIT=$allowed NOTE=""
  "$fn" || rc=$?
  took=$((SECONDS - STEP_T0))
  case $rc in
    0) record "$s" ok "$took" "$NOTE" ;;
    3) record "$s" skipped "$took" "$NOTE"; log "SKIP $s: $NOTE" ;;
    124 | 137)
      record "$s" "cut short" "$took" "stopped at its ${allowed}s limit (budget ${BUDGET[$s]}s, ${avail}s were left)${NOTE:+; $NOTE}"
      log "CUT $s after ${took}s: ${WHY[$s]}" ;;
    *) record "$s" failed "$took" "exit status $rc${NOTE:+; $NOTE}"; log "FAIL $s: ${WHY[$s]}" ;;
  esac
  return 0
}

step_report() {
  local f
  {
    echo
    echo "gpu_suite summary: ${GPU_SLUG:-no GPU}, started $STARTED, ${SECONDS}s of ${TOTAL_S}s"
    printf '%-13s %-12s %6s  %s\n' step status seconds "note"
    for f in "${STEPS[@]}"; do
      [[ $f == report ]] && continue
      printf '%-13s %-12s %6s  %s\n' "$f" "${STATUS[$f]:-?}" "${TOOK[$f]:-0}" "${WHY[$f]:-}"
    done
    echo "files in $OUT_DIR written by this run:"
    find "$OUT_DIR" -type f -newer "$WORK/started" -printf '  %P (%s bytes)\n' | sort
  } | tee -a "$LOG"
}

: >"$WORK/started"
log "gpu_suite: deadline ${TOTAL_S}s (${RESERVE_S}s kept for the report), out $OUT_DIR, python $PY"
run_step probe
if [[ -n $GPU_SLUG ]]; then
  mv "$LOG" "$OUT_DIR/logs/$GPU_SLUG-gpu-suite.log"
  LOG="$OUT_DIR/logs/$GPU_SLUG-gpu-suite.log"
elif [[ ${STATUS[probe]} != ok ]]; then
  BLOCK="the probe did not finish (${STATUS[probe]}), so no GPU was found"
  log "$BLOCK"
elif ((CPU_OK)); then
  GPU_SLUG=cpu
  log "no CUDA GPU: going on (--cpu-ok); the tests run under Triton's interpreter"
else
  BLOCK="no CUDA GPU visible to torch"
  log "no CUDA GPU visible to torch: nothing to measure"
fi
if [[ -z $BLOCK ]]; then
  run_step import
  if ((!SEGFAST_OK)); then BLOCK="segfast could not be imported (see the import step)"; fi
else
  record import skipped 0 "$BLOCK"
fi
for s in tests-gpu compile kernel-bench models tests-rest; do run_step "$s"; done
run_step report
failed=0
for s in "${STEPS[@]}"; do
  if [[ ${STATUS[$s]:-} == failed ]]; then failed=1; fi
done
if [[ $BLOCK == "no CUDA GPU"* ]]; then exit 2; fi
exit "$failed"
