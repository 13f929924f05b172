#!/usr/bin/env bash
# Instructions per meta-iteration of a `maml` benchmark worker, counted by valgrind: exact
# and repeatable where wall-clock time is not (on a shared VM the same binary's time moves by
# a third between launches). The worker runs at two iteration counts and the difference is
# divided by theirs, so the task data made before the timed region cancel out.
#
#   scripts/instructions-per-iteration.sh BINARY [WORKER ARGS...]
#   scripts/instructions-per-iteration.sh target/release/deps/maml-<hash> sine batched 1 25
#
# WORKER ARGS are the worker's name and its arguments before the iteration counts, then the
# ones after: for `sine` they are `sine batched|looped STEPS [TASKS]` (warmup 2, one thread).
# Counts miss cache and memory effects: use them to compare per-op overheads (MAML sine),
# not kernels on large tensors (the CNN), which paired timed runs compare better.
set -euo pipefail
if [ $# -lt 4 ] || [ "$2" != sine ]; then
  echo "usage: $0 BINARY sine batched|looped STEPS [TASKS]" >&2
  exit 2
fi
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
bin=$1 mode=$3 steps=$4 tasks=${5:-25}
count() {
  RAYON_NUM_THREADS=1 valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \
    "$bin" --worker sine "$mode" "$steps" "$1" 2 1 "$tasks" 2>&1 >/dev/null |
    awk '/I *refs/ { gsub(",", "", $NF); print $NF }'
}
low=$(count 20)
high=$(count 60)
echo "$(( (high - low) / 40 )) instructions per meta-iteration (sine $mode, $steps steps, $tasks tasks)"
