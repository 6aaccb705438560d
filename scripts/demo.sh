#!/usr/bin/env bash
# The main job on the embedded default: calibrate, fine-tune the lab model on a new skill (shift) with
# plain full fine-tuning, the strongest baseline (kl), FORA and FoLoRA as their papers describe them
# (lab_fora_paper, lab_folora_paper) and the winning composition (lab_fora_kl: FORA's full form with
# a high protected fraction plus a kl regulariser; docs/methods/ablations.md), all at the bench's
# 200 steps; evaluate each against the base (retention report), then compare them in one table and a
# learning-vs-forgetting plot.
# Usage: bash scripts/demo.sh [PPFT]   (about 3-4 minutes on 2 CPU cores once the lab is built)
set -euo pipefail
PPFT="${1:-ppft}"
cd "$(dirname "$0")/.."
OUT=runs/demo

"$PPFT" lab build --size tiny
"$PPFT" calibrate recipes/lab_fora.yaml --set calibration.dir=$OUT/calibration
METHODS="full kl fora_paper folora_paper fora_kl"
for method in $METHODS; do
  echo "== $method =="
  "$PPFT" train recipes/lab_$method.yaml --output-dir $OUT/$method --set output.overwrite=true \
    --set calibration.dir=$OUT/calibration --set training.max_steps=200
  "$PPFT" eval recipes/lab_$method.yaml --output-dir $OUT/$method
done
"$PPFT" compare $(for m in $METHODS; do echo $OUT/$m; done) --out $OUT
echo "Plot: $OUT/learning_vs_forgetting.png   Table: $OUT/comparison.md"
