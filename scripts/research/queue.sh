#!/usr/bin/env bash
# Run bench labels one at a time from a queue file: queue.sh LOG QUEUE_FILE
# Each line of QUEUE_FILE is RECIPE:LABEL; the first line is taken (removed) before it runs, so the
# file can be edited while the queue works. Finished cells are skipped by `ppft bench`, so a queue
# can be re-run after an interruption. WAIT_PID=<pid>: start once that process has exited.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
log=$1 queue=$2
while [ -n "${WAIT_PID:-}" ] && kill -0 "$WAIT_PID" 2>/dev/null; do sleep 5; done
while item=$(head -n 1 "$queue") && [ -n "$item" ]; do
  sed -i 1d "$queue"
  echo "== $(date +%T) $item" >>"$log"
  /work/main/.venv/bin/ppft bench "${item%%:*}" --only "${item##*:}" >>"$log" 2>&1 || echo "!! failed $item" >>"$log"
done
echo "== $(date +%T) queue done" >>"$log"
