#!/usr/bin/env bash
# The MovieLens 100K study (docs/RESULTS.md): the CRMs, the LLM methods over seeds, the reclora
# ablations and the Few2Many curve, all with SmolLM2-135M; then the summary (bootstrap intervals,
# seed spread, the plot). Every run resumes where it stopped, and a finished run is skipped, so the
# script can be interrupted and rerun. Budget by environment (defaults: the CPU study):
#   DATA=../shared/data/ml-100k OUT=runs/ml100k TRAIN_SIZE=2000 EVAL_SIZE=3000 VALID_SIZE=500 \
#   SEEDS="0 1 2" CURVE_SIZES="500 1000" RECIPE_CURVE_SIZES=8000 DEVICE=cpu bash scripts/reproduce_ml100k.sh
# ONLY="reclora-seed1 ablation-k1" runs just those runs (in the script's order) and skips the summary.
# BF16=1 runs the LLM under bf16 autocast (the loss of a SmolLM2 batch agrees with float32 to 1e-3),
# BF16= float32. Unset, it is 1 on a GPU and on CPUs with native bf16 arithmetic (AVX512-BF16 or AMX:
# 2.5x faster than float32 there), else float32 (bf16 autocast ran 2.6x slower on an Ice Lake Xeon:
# benchmarks/results/cpu-bf16-*).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DATA=${DATA:-../shared/data/ml-100k}
OUT=${OUT:-runs/ml100k}
TRAIN_SIZE=${TRAIN_SIZE:-2000}
EVAL_SIZE=${EVAL_SIZE:-3000}
VALID_SIZE=${VALID_SIZE:-500}
SEEDS=${SEEDS:-0 1 2}
CURVE_SIZES=${CURVE_SIZES:-500 1000}
if [[ -z "${BF16+set}" ]]; then
  BF16=$("$PY" -c "import torch; from reclora_kernels.cpu_features import native_bf16
print(1 if (torch.cuda.is_available() and '${DEVICE:-}' != 'cpu') or native_bf16() else '')")
fi
# The tables' rows are the published recipe: its loss, adapted projections and gates are pinned, since
# the trainer's defaults became --loss yes-no-centered (RESULTS.md, issue 16 part 3), all seven
# projections (parts 11, 12) and, for reclora, gates without their input LayerNorm (part 16); a run's
# own options (and EXTRA) come later and win.
PUBLISHED=(--loss answer-ce --target-modules q_proj,v_proj --gate-input-norm layer)
COMMON=("${PUBLISHED[@]}" --dataset ml-100k --data-dir "$DATA" --llm smollm2-135m --eval-size "$EVAL_SIZE"
        --valid-size "$VALID_SIZE" ${DEVICE:+--device "$DEVICE"} ${BF16:+--bf16} ${EXTRA:-})

train() {  # train NAME OPTIONS...: one run into $OUT/NAME, skipped when it has finished
  local name=$1; shift
  if [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]]; then return; fi
  if [[ -f "$OUT/$name/results.json" ]]; then echo "== $name: done"; return; fi
  echo "== $name"
  "$PY" -m reclora.train "${COMMON[@]}" --out "$OUT/$name" --resume "$@"
}

for crm in din sim gru4rec sasrec; do train "$crm" --method "$crm" --seed 0; done
train zero-shot --method zero-shot
for seed in $SEEDS; do
  for method in lora rella reclora; do
    train "$method-seed$seed" --method "$method" --train-size "$TRAIN_SIZE" --seed "$seed"
  done
done
# Issue 16's recipe: the trainer's defaults (--loss yes-no-centered), the same seeds and samples as
# the published rows above, which stay beside them (RESULTS.md, "Issue 16, part 4")
RECIPE=(--loss yes-no-centered)
for seed in $SEEDS; do
  for method in lora reclora rella; do
    train "recipe-$method-seed$seed" --method "$method" --train-size "$TRAIN_SIZE" --seed "$seed" "${RECIPE[@]}"
  done
done
# The recipe with the CRM's logit added to the readout (--crm-residual, RESULTS.md "Issue 16, part 5"):
# reclora over seeds, each paired with recipe-reclora-seedS; lora at seed 0 (the residual without gates)
for seed in $SEEDS; do
  train "residual-reclora-seed$seed" --method reclora --train-size "$TRAIN_SIZE" --seed "$seed" --crm-residual "${RECIPE[@]}"
done
train residual-lora-seed0 --method lora --train-size "$TRAIN_SIZE" --crm-residual "${RECIPE[@]}"
# ... with the CRM trained without the LLM's subset (--crm-holdout: on its own training samples SIM
# looks far better than on new data); sim-holdout-seed0 is that CRM alone, to pair with
train sim-holdout-seed0 --method sim --crm-holdout --train-size "$TRAIN_SIZE" --seed 0
train residual-reclora-holdout-seed0 --method reclora --crm-holdout --train-size "$TRAIN_SIZE" --crm-residual "${RECIPE[@]}"
train residual-lora-holdout-seed0 --method lora --crm-holdout --train-size "$TRAIN_SIZE" --crm-residual "${RECIPE[@]}"
# ... with the CRM trained without any sample of the LLM subset's users (--crm-holdout-users: the
# held-out CRM above still scores 0.806 on the LLM's samples, against 0.750 on validation, whose users
# are mostly new to it); sim-holdout-users-seed0 is that CRM alone, to pair with
train sim-holdout-users-seed0 --method sim --crm-holdout-users --train-size "$TRAIN_SIZE" --seed 0
train residual-reclora-holdout-users-seed0 --method reclora --crm-holdout-users --train-size "$TRAIN_SIZE" \
  --crm-residual "${RECIPE[@]}"
# ... and with the strongest CRM, SASRec, as the gates' source and in the readout (paired with sasrec)
train residual-reclora-sasrec-seed0 --method reclora --crm sasrec --train-size "$TRAIN_SIZE" --crm-residual "${RECIPE[@]}"
# The recipe with twice the optimizer steps (batch 8: the same samples, the same compute), paired
# with recipe-lora-seedS: lora's validation AUC was still rising when its one epoch of 125 steps ended
train steps-lora-seed0 --method lora --train-size "$TRAIN_SIZE" --batch-size 8 "${RECIPE[@]}"
# The CRM weighed into the readout after training (--crm-fusion, RESULTS.md "Issue 16, part 8"): the
# LLM trains alone (fusion-METHOD-seedS's is recipe-METHOD-seedS's), then w in sigmoid(w m + (1 - w) c) is
# chosen on validation; predictions.npz keeps the LLM alone (llm_prob) beside the fusion
for seed in $SEEDS; do
  train "fusion-lora-seed$seed" --method lora --train-size "$TRAIN_SIZE" --seed "$seed" --crm-fusion "${RECIPE[@]}"
done
for seed in $SEEDS; do  # seeds 1, 2: the bases of fusion-allproj-reclora-seedS
  train "fusion-reclora-seed$seed" --method reclora --train-size "$TRAIN_SIZE" --seed "$seed" --crm-fusion "${RECIPE[@]}"
done
# ... and more epochs at batch 16 (lr decayed over all of them, the best validated epoch kept), each
# paired with its one-epoch row above: lora's validation AUC was still rising when one epoch ended.
# lora's (q and v) over the seeds: at seed 0 it ties lora's default (all seven projections, one epoch)
# on validation and is above it on test (RESULTS.md part 20), so it is paired with that too
for seed in $SEEDS; do
  train "fusion-epochs3-lora-seed$seed" --method lora --train-size "$TRAIN_SIZE" --seed "$seed" --epochs 3 --crm-fusion "${RECIPE[@]}"
done
train fusion-epochs3-reclora-seed0 --method reclora --train-size "$TRAIN_SIZE" --epochs 3 --crm-fusion "${RECIPE[@]}"
# The issue's other hypotheses, each one change from fusion-METHOD-seed0 and paired with it (the LLM
# alone and the fused readout): all seven projections adapted, rank 16 (the same scaling, alpha / r =
# 2), the stars written "rated 4 of 5", a shorter prompt (5 history items instead of 10: about half
# the tokens and the time of a step; also at seeds 1 and 2, paired with fusion-lora-seedS), batch 8
# (twice the optimizer steps for the same samples), the gates' own learning rate (3x the LoRAs') and
# the gates without their input LayerNorm (they read the CRM's representation as it is)
ALL_PROJECTIONS=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj  # lora's default since part 11
for seed in $SEEDS; do  # +0.026 for lora's LLM alone over these seeds (RESULTS.md parts 10, 11): its default now
  train "fusion-allproj-lora-seed$seed" --method lora --train-size "$TRAIN_SIZE" --seed "$seed" --target-modules "$ALL_PROJECTIONS" --crm-fusion "${RECIPE[@]}"
done
# three epochs (+0.029 for lora's LLM alone with q, v at seed 0, part 19) with all seven, paired with the
# above: at seed 0 lower on validation than one epoch (0.685 against 0.701, part 20), so not over seeds
train fusion-allproj-epochs3-lora-seed0 --method lora --train-size "$TRAIN_SIZE" --target-modules "$ALL_PROJECTIONS" \
  --epochs 3 --crm-fusion "${RECIPE[@]}"
for seed in $SEEDS; do  # seed 0: +0.0075 for the LLM alone, 0.004 below its CRM (RESULTS.md part 12)
  train "fusion-allproj-reclora-seed$seed" --method reclora --train-size "$TRAIN_SIZE" --seed "$seed" --target-modules "$ALL_PROJECTIONS" --crm-fusion "${RECIPE[@]}"
done
# ... and rella, each paired with recipe-rella-seedS (rella has no fused rows); its default since part 18
for seed in $SEEDS; do
  train "recipe-allproj-rella-seed$seed" --method rella --train-size "$TRAIN_SIZE" --seed "$seed" \
    --target-modules "$ALL_PROJECTIONS" "${RECIPE[@]}"
done
train fusion-rank16-lora-seed0 --method lora --train-size "$TRAIN_SIZE" --rank 16 --lora-alpha 32 --crm-fusion "${RECIPE[@]}"
train fusion-outof5-lora-seed0 --method lora --train-size "$TRAIN_SIZE" --rating-format out-of-5 --crm-fusion "${RECIPE[@]}"
for seed in $SEEDS; do
  train "fusion-kshort5-lora-seed$seed" --method lora --train-size "$TRAIN_SIZE" --seed "$seed" --k-short 5 --crm-fusion "${RECIPE[@]}"
done
train fusion-batch8-lora-seed0 --method lora --train-size "$TRAIN_SIZE" --batch-size 8 --crm-fusion "${RECIPE[@]}"
train fusion-gatelr3x-reclora-seed0 --method reclora --train-size "$TRAIN_SIZE" --gate-lr 3e-3 --crm-fusion "${RECIPE[@]}"
train fusion-gatenone-reclora-seed0 --method reclora --train-size "$TRAIN_SIZE" --gate-input-norm none --crm-fusion "${RECIPE[@]}"
for seed in $SEEDS; do  # seed 0 with q, v: +0.0120 for the LLM alone, a tie with its CRM (RESULTS.md part 15);
  # with reclora's default projections, each paired with fusion-allproj-reclora-seedS: +0.0071 over the
  # seeds, validation higher at each, so reclora's default since part 16 (these rows are its recipe rows)
  train "fusion-allproj-gatenone-reclora-seed$seed" --method reclora --train-size "$TRAIN_SIZE" --seed "$seed" \
    --target-modules "$ALL_PROJECTIONS" --gate-input-norm none --crm-fusion "${RECIPE[@]}"
done
# The CRM table under the recipe (issue 16, part 3 of the issue): reclora with each CRM as its gates'
# source and with the uniform gate (every alpha 1/K: no personalization), each paired with
# recipe-reclora-seed0 (SIM's gates) and with its CRM alone
train recipe-reclora-uniform-seed0 --method reclora --gate-input uniform --train-size "$TRAIN_SIZE" "${RECIPE[@]}"
for crm in sasrec gru4rec din; do
  train "recipe-reclora-$crm-seed0" --method reclora --crm "$crm" --train-size "$TRAIN_SIZE" "${RECIPE[@]}"
done
# The recipe's Few2Many curve beyond the main budget (issue 16: "a larger budget your CPU time
# allows"): lora (all seven projections, its default since part 11) and reclora at seed 0, fused
# like the rows they continue (fusion-allproj-lora-seed0, fusion-reclora-seed0 at 2,000), so
# each gives the LLM alone and its fusion with the CRM; with --compile (1.4x to 1.8x a training step on
# an AMX Xeon, benchmarks/README.md), which leaves the results as they are to float rounding
for size in ${RECIPE_CURVE_SIZES:-8000}; do
  train "recipe-curve-lora-$size" --method lora --train-size "$size" --target-modules "$ALL_PROJECTIONS" --crm-fusion \
    --compile "${RECIPE[@]}"
  train "recipe-curve-reclora-$size" --method reclora --train-size "$size" --crm-fusion --compile "${RECIPE[@]}"
  # reclora's default projections since part 12, over the seeds (each paired with fusion-allproj-reclora-seedS)
  for seed in $SEEDS; do
    train "recipe-curve-allproj-reclora-$size$([[ $seed == 0 ]] || echo "-seed$seed")" --method reclora --seed "$seed" \
      --train-size "$size" --target-modules "$ALL_PROJECTIONS" --crm-fusion --compile "${RECIPE[@]}"
  done
  # ... with the best CRM of these samples (SASRec) feeding the gates and inside the fusion
  train "recipe-curve-allproj-reclora-sasrec-$size" --method reclora --crm sasrec --train-size "$size" \
    --target-modules "$ALL_PROJECTIONS" --crm-fusion --compile "${RECIPE[@]}"
done
# Ablations of reclora (seed 0, the main budget)
train ablation-k1 --method reclora --num-loras 1 --train-size "$TRAIN_SIZE"
train ablation-mix-output --method reclora --mix output --train-size "$TRAIN_SIZE"
train ablation-user-gate --method reclora --gate-input user-embedding --train-size "$TRAIN_SIZE"
train ablation-crm-recent60 --method reclora --crm din --train-size "$TRAIN_SIZE"
train ablation-uniform-gate --method reclora --gate-input uniform --train-size "$TRAIN_SIZE"
# The sequential CRMs as the gates' source (each paired with reclora-seed0, which reads SIM)
for crm in gru4rec sasrec; do train "ablation-crm-$crm" --method reclora --crm "$crm" --train-size "$TRAIN_SIZE"; done
# Attempts at closing reclora's gap to the CRMs (docs/RESULTS.md, "What we tried")
train attempt-reclora-recent-prompt --method reclora --prompt-history recent --train-size "$TRAIN_SIZE"
for seed in $SEEDS; do  # the sharper gate over seeds: each paired with reclora-seedS
  train "attempt-reclora-t1-seed$seed" --method reclora --temperature 1 --train-size "$TRAIN_SIZE" --seed "$seed"
done
train attempt-reclora-t1-recent-prompt --method reclora --temperature 1 --prompt-history recent --train-size "$TRAIN_SIZE"
train attempt-reclora-t05 --method reclora --temperature 0.5 --train-size "$TRAIN_SIZE"  # sharper still
# The Few2Many curve: lora and reclora on smaller training subsets (the main budget is the last point)
for size in $CURVE_SIZES; do
  for method in lora reclora; do train "curve-$method-$size" --method "$method" --train-size "$size"; done
done
# Issue 16's screening (docs/RESULTS.md, parts 1 and 2): seed 1, 1,000 test samples, two validations
# an epoch, each attempt paired with lora-s1-base. Part 1's lora rows ran before the float32 answer
# projection; with today's code lora-s1-base is part 2's "float32 projection" row.
SCREEN_OUT=${SCREEN_OUT:-runs/screen}
screen() {  # screen NAME OPTIONS...
  local name=$1; shift
  if [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]]; then return; fi
  if [[ -f "$SCREEN_OUT/$name/results.json" ]]; then echo "== $name: done"; return; fi
  echo "== $name"
  "$PY" -m reclora.train "${PUBLISHED[@]}" --dataset ml-100k --data-dir "$DATA" --llm smollm2-135m --eval-size 1000 \
    --valid-size "$VALID_SIZE" --evals-per-epoch 2 --patience 2 --seed 1 ${DEVICE:+--device "$DEVICE"} \
    ${BF16:+--bf16} --out "$SCREEN_OUT/$name" --resume "$@"
}
screen lora-s1-base --method lora --train-size "$TRAIN_SIZE"
screen lora-s1-yesno --method lora --train-size "$TRAIN_SIZE" --loss yes-no
screen lora-s1-lr3e-4 --method lora --train-size "$TRAIN_SIZE" --lr 3e-4 --warmup-steps 12
screen reclora-s1-fp32head --method reclora --train-size "$TRAIN_SIZE"
screen sim-s1 --method sim
# Part 3: the loss that damps the batch-mean margin's gradient, and plain yes-no with today's readout
screen lora-s1-centered --method lora --train-size "$TRAIN_SIZE" --loss yes-no-centered
screen lora-s1-yesno-fp32head --method lora --train-size "$TRAIN_SIZE" --loss yes-no
screen reclora-s1-centered --method reclora --train-size "$TRAIN_SIZE" --loss yes-no-centered
[[ -n "${ONLY:-}" ]] && exit 0
"$PY" -m reclora.analysis.attempts "$SCREEN_OUT" --base lora-s1-base --json docs/results/ml100k-screen.json \
  --plot docs/results/ml100k-screen-curves.png
# The gates of every reclora run (gates.json: are the mixes personalized or collapsed?)
for dir in "$OUT"/reclora-seed* "$OUT"/ablation-* "$OUT"/attempt-* "$OUT"/curve-reclora-*; do
  if [[ -f "$dir/results.json" && ! -f "$dir/gates.json" ]]; then "$PY" -m reclora.analysis.gates "$dir"; fi
done
# What the untuned LLM offers: a linear probe on its last hidden state (lora's prompt and subsets),
# and how much the prompts' margin gradients share at the start of tuning
"$PY" -m reclora.analysis.probe --data-dir "$DATA" --train-size "$TRAIN_SIZE" --valid-size "$VALID_SIZE" \
  --eval-size 1000 --seed 1 ${BF16:+--bf16} --json docs/results/ml100k-probe.json
"$PY" -m reclora.analysis.margin_gradients --data-dir "$DATA" --samples 16 --seed 1 ${BF16:+--bf16} \
  --json docs/results/ml100k-margin-gradients.json
# The bar the prompt sets without any model: the AUC of its mean star rating (recent and semantic history)
# (and paired with the LLM-only runs on the same test samples: does the LLM read its prompt?)
"$PY" -m reclora.analysis.prompt_baseline --data-dir "$DATA" --eval-size "$EVAL_SIZE" --json docs/results/ml100k-prompt-baseline.json \
  $(for dir in "$OUT"/lora-seed* "$OUT"/recipe-lora-seed*; do [[ -f "$dir/results.json" ]] && echo --against "$dir"; done)
# ... and the screening runs paired with it on their 1,000 test samples
"$PY" -m reclora.analysis.prompt_baseline --data-dir "$DATA" --eval-size 1000 --json docs/results/ml100k-screen-prompt-baseline.json \
  $(for run in lora-s1-base lora-s1-centered lora-s1-yesno-fp32head reclora-s1-fp32head reclora-s1-centered; do
      echo --against "$SCREEN_OUT/$run"; done)
"$PY" -m reclora.analysis.study "$OUT" --json docs/results/ml100k.json --plot docs/results/ml100k-few2many.png
# The recipe's Few2Many curve (issue 16): the LLM alone against its training-subset size, over the
# seeds at each size, beside the published recipe's curve (from the summary just written) and the
# CRM inside the runs
"$PY" -m reclora.analysis.few2many "$OUT" \
  --curve "reclora, all seven, no gate LayerNorm (its default)" "fusion-allproj-gatenone-reclora-seed*" \
  --curve "reclora, all seven, gate LayerNorm" "fusion-allproj-reclora-seed*" "recipe-curve-allproj-reclora-[0-9]*" \
  --curve "reclora, q and v" "fusion-reclora-seed*" "recipe-curve-reclora-[0-9]*" \
  --curve "lora, all seven projections" "fusion-allproj-lora-seed*" "recipe-curve-lora-[0-9]*" \
  --curve "reclora, all seven, SASRec's gates" "recipe-curve-allproj-reclora-sasrec-*" \
  --readout "lora, all seven projections" \
  --published docs/results/ml100k.json --json docs/results/ml100k-few2many-recipe.json \
  --plot docs/results/ml100k-few2many-recipe.png
# Issue 16's hypotheses table (RESULTS.md): each attempt against its base run, paired on the same test
# samples at each seed both have finished, with the validation AUCs the decision read
pair() {  # pair SUMMARY CHANGED BASE [CHANGED BASE ...]: the pairs both of whose runs have finished,
          # into docs/results/ml100k-SUMMARY.json
  local summary=$1 args=()
  shift
  while (($#)); do
    if [[ -f "$OUT/$1/results.json" && -f "$OUT/$2/results.json" ]]; then args+=(--pair "$1" "$2"); fi
    shift 2
  done
  if ((${#args[@]})); then
    "$PY" -m reclora.analysis.paired_seeds "$OUT" "${args[@]}" --json "docs/results/ml100k-$summary.json"
  fi
}
pairs() {  # pairs SUMMARY CHANGED BASE: CHANGED-seedS against BASE-seedS over the seeds
  local summary=$1 changed=$2 base=$3 names=() seed
  for seed in $SEEDS; do names+=("$changed-seed$seed" "$base-seed$seed"); done
  pair "$summary" "${names[@]}"
}
pairs allproj-lora fusion-allproj-lora fusion-lora
pairs allproj-reclora fusion-allproj-reclora fusion-reclora
pairs allproj-rella recipe-allproj-rella recipe-rella
pairs allproj-gatenone-reclora fusion-allproj-gatenone-reclora fusion-allproj-reclora
pairs gatenone-reclora fusion-gatenone-reclora fusion-reclora
pairs gatelr3x-reclora fusion-gatelr3x-reclora fusion-reclora
pairs epochs3-lora fusion-epochs3-lora fusion-lora
pairs epochs3-lora-against-allproj fusion-epochs3-lora fusion-allproj-lora
pairs allproj-epochs3-lora fusion-allproj-epochs3-lora fusion-allproj-lora
pairs epochs3-reclora fusion-epochs3-reclora fusion-reclora
pairs rank16-lora fusion-rank16-lora fusion-lora
pairs batch8-lora fusion-batch8-lora fusion-lora
pairs outof5-lora fusion-outof5-lora fusion-lora
pairs kshort5-lora fusion-kshort5-lora fusion-lora
# ... and the two defaults against each other: reclora's gated LLM against lora's, each with its own fusion
pairs reclora-against-lora fusion-allproj-gatenone-reclora fusion-allproj-lora
# The recipe's Few2Many rows beyond the main budget, each against the run it continues (and SASRec's
# gates against SIM's), paired on the same test samples
for size in ${RECIPE_CURVE_SIZES:-8000}; do
  pair "curve-lora-$size" "recipe-curve-lora-$size" fusion-allproj-lora-seed0
  pair "curve-reclora-$size" "recipe-curve-reclora-$size" fusion-reclora-seed0
  pair "curve-allproj-reclora-$size" "recipe-curve-allproj-reclora-$size" fusion-allproj-reclora-seed0
  pair "curve-allproj-reclora-sasrec-$size" "recipe-curve-allproj-reclora-sasrec-$size" "recipe-curve-allproj-reclora-$size"
  names=()
  for seed in $SEEDS; do
    names+=("recipe-curve-allproj-reclora-$size$([[ $seed == 0 ]] || echo "-seed$seed")" "fusion-allproj-reclora-seed$seed")
  done
  pair "curve-allproj-reclora-$size-seeds" "${names[@]}"
done
# ... and the learning curves of the three-epoch runs beside their one-epoch bases (a validation after
# each epoch: was a run still learning when it stopped?)
for method in lora reclora; do
  runs=()
  for run in "$OUT"/fusion-*epochs3-"$method"-seed*; do
    run=$(basename "$run")
    [[ -f "$OUT/$run/results.json" ]] && runs+=("$run")
    [[ -f "$OUT/${run/epochs3-/}/results.json" ]] && runs+=("${run/epochs3-/}")
  done
  if ((${#runs[@]})) && [[ -f "$OUT/fusion-$method-seed0/results.json" ]]; then
    "$PY" -m reclora.analysis.attempts "$OUT" --base "fusion-$method-seed0" --runs "${runs[@]}" \
      --plot "docs/results/ml100k-epochs3-$method-curves.png" > /dev/null
  fi
done
