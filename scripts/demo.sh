#!/usr/bin/env bash
# The main job on the embedded default: calibrate, fine-tune the lab model on a new skill (shift) with
# plain full fine-tuning, the strongest baseline (kl), FORA and FoLoRA as their papers describe them
# (lab_fora_paper, lab_folora_paper), the winning composition (lab_fora_kl: FORA's full form with
# a high protected fraction plus a kl regulariser; docs/methods/ablations.md), the adapter pick
# (lab_fora_leak: FORA's LoRA form plus the leak regulariser) and FoLoRA as its paper describes it plus
# kl (lab_folora_kl: the goal with an r-8 adapter, ablations.md 14c), all at the same budget:
# 400 steps on one calibration of 1,024 model samples (kl at its best rate for that budget, 5e-4; each recipe's own rate otherwise);
# evaluate each against the base (retention report), then compare them in one table and a
# learning-vs-forgetting plot.
# Usage: bash scripts/demo.sh [PPFT]   (4m39s measured on 2 CPU cores with the lab already built, before lab_folora_kl
# joined, which adds about a minute; add ~2 min for the lab's build, more on a shared machine)
set -euo pipefail
PPFT="${1:-ppft}"
cd "$(dirname "$0")/.."
OUT=runs/demo

"$PPFT" lab build --size tiny
SAME=(--set calibration.dir=$OUT/calibration --set calibration.num_samples=1024)
"$PPFT" calibrate recipes/lab_fora.yaml "${SAME[@]}"
METHODS="full kl fora_paper folora_paper fora_kl fora_leak folora_kl"
for method in $METHODS; do
  echo "== $method =="
  extra=()
  [ "$method" = kl ] && extra=(--set training.lr=5.0e-4)
  "$PPFT" train recipes/lab_$method.yaml --output-dir $OUT/$method --set output.overwrite=true \
    "${SAME[@]}" --set training.max_steps=400 "${extra[@]}"
  "$PPFT" eval recipes/lab_$method.yaml --output-dir $OUT/$method "${SAME[@]}"
done
"$PPFT" compare $(for m in $METHODS; do echo $OUT/$m; done) --out $OUT
echo "Plot: $OUT/learning_vs_forgetting.png   Table: $OUT/comparison.md"
