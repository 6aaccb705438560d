#!/usr/bin/env bash
# The main job on the embedded default: calibrate, fine-tune the lab model on a new skill with plain
# full fine-tuning, FORA and FoLoRA, evaluate each against the base (retention report), then compare
# them in one table and a learning-vs-forgetting plot. Usage: bash scripts/demo.sh [PPFT]
set -euo pipefail
PPFT="${1:-ppft}"
cd "$(dirname "$0")/.."
OUT=runs/demo

"$PPFT" lab build --size tiny
"$PPFT" calibrate recipes/lab_fora.yaml --set calibration.dir=$OUT/calibration
for method in full fora folora; do
  echo "== $method =="
  "$PPFT" train recipes/lab_$method.yaml --output-dir $OUT/$method --set output.overwrite=true \
    --set calibration.dir=$OUT/calibration
  "$PPFT" eval recipes/lab_$method.yaml --output-dir $OUT/$method
done
"$PPFT" compare $OUT/full $OUT/fora $OUT/folora --out $OUT
echo "Plot: $OUT/learning_vs_forgetting.png   Table: $OUT/comparison.md"
