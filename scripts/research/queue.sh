#!/usr/bin/env bash
# Run bench cells one label at a time: queue.sh LOG RECIPE:LABEL [RECIPE:LABEL ...]
# (finished cells are skipped by `ppft bench`, so a queue can be re-run after an interruption).
# Set WAIT_FOR=<path> to start only once that path exists (e.g. a shared calibration folder).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
log=$1; shift
while [ -n "${WAIT_FOR:-}" ] && [ ! -e "$WAIT_FOR/manifest.json" ]; do sleep 10; done
for item in "$@"; do
  echo "== $(date +%T) $item" >>"$log"
  /work/main/.venv/bin/ppft bench "${item%%:*}" --only "${item##*:}" >>"$log" 2>&1 || echo "!! failed $item" >>"$log"
done
echo "== $(date +%T) queue done" >>"$log"
