#!/usr/bin/env bash
# The main job on the embedded default: calibrate, fine-tune the lab model on a new skill with plain
# full fine-tuning, FORA (both forms), FoLoRA and the strongest baseline (kl), evaluate each against
# the base (retention report), then compare them in one table and a learning-vs-forgetting plot.
# Usage: bash scripts/demo.sh [PPFT]   (about 2-3 minutes on 2 CPU cores once the lab is built)
set -euo pipefail
PPFT="${1:-ppft}"
cd "$(dirname "$0")/.."
OUT=runs/demo

"$PPFT" lab build --size tiny
"$PPFT" calibrate recipes/lab_fora.yaml --set calibration.dir=$OUT/calibration
for method in full fora fora_full folora kl; do
  echo "== $method =="
  "$PPFT" train recipes/lab_$method.yaml --output-dir $OUT/$method --set output.overwrite=true \
    --set calibration.dir=$OUT/calibration
  "$PPFT" eval recipes/lab_$method.yaml --output-dir $OUT/$method
done
"$PPFT" compare $OUT/full $OUT/fora $OUT/fora_full $OUT/folora $OUT/kl --out $OUT
echo "Plot: $OUT/learning_vs_forgetting.png   Table: $OUT/comparison.md"
