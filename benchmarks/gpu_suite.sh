#!/usr/bin/env bash
# One call on a GPU machine (torch + triton, no network): GPU kernel tests without the
# interpreter, the kernel benchmarks, then `segfast bench` for every zoo model at its
# standard size in fp32 and fp16 on every available backend.
#   benchmarks/gpu_suite.sh [OUT_DIR]       (default benchmarks/results)
# Results: OUT_DIR/<gpu-name>.json (+ .md table), OUT_DIR/<gpu-name>-kernels.json,
# logs in OUT_DIR/logs/. Each step's failure is recorded and the next step still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results}"
mkdir -p "$OUT/logs"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
GPU=$("$PY" -c "import torch,re;print(re.sub(r'[^a-z0-9]+','-',torch.cuda.get_device_name().lower()).strip('-'))") || {
  echo "no CUDA GPU visible: nothing to do" >&2; exit 2; }
status=0
echo "== GPU kernel and backend tests ($GPU)"
"$PY" -m pytest tests/kernels tests/backends -q -x --timeout=900 -p no:cacheprovider \
  2>&1 | tee "$OUT/logs/$GPU-tests.log" || status=1
echo "== kernel benchmarks"
"$PY" -m pytest benchmarks -q --benchmark-only -k "not test_cpu and not test_gpu" \
  --benchmark-json="$OUT/$GPU-kernels.json" -p no:cacheprovider \
  2>&1 | tee "$OUT/logs/$GPU-kernel-bench.log" || status=1
echo "== model suite"
"$PY" -m segfast.bench.suite --out "$OUT" --cases standard ${SUITE_ARGS:-} \
  2>&1 | tee "$OUT/logs/$GPU-suite.log" || status=1
exit $status
