#!/usr/bin/env bash
# The CUDA check, in one command, for a machine with the CUDA toolkit (nvcc) and a GPU:
#   scripts/gpu-check.sh            build with --features cuda, run on cuda:0
#   scripts/gpu-check.sh --metal    build with --features metal, run on metal:0 (macOS)
#   scripts/gpu-check.sh --dry-run  the same steps on the CPU without the feature
# Steps: one release build of the tests, examples and benchmarks (timed); the golden-vector
# and finite-difference suites on the device (their helpers create tensors where
# CANDLE_HIGHER_DEVICE says, in f64, or in f32 on Metal, which has no f64), and again in
# f32 (CANDLE_HIGHER_TEST_DTYPE=f32, with the f32 tolerances of tests/integration/common.rs);
# the whole integration suite on the device (every test module creates its tensors on
# common::device(); in f64, so not on Metal); the whole
# integration suite on the CPU through candle's kernels (the ones a GPU takes); maml_sine; the
# maml benchmark (quick, no Python anchors). Everything is written to one file,
# target/gpu-check/summary.txt, with each step's log beside it. The build cache stays in
# target/, so a second run only rebuilds what changed.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--dry-run" ]]; then
    features=()
    export CANDLE_HIGHER_DEVICE=cpu
elif [[ "${1:-}" == "--metal" ]]; then
    features=(--features metal)
    export CANDLE_HIGHER_DEVICE=${CANDLE_HIGHER_DEVICE:-metal:0}
else
    features=(--features cuda)
    export CANDLE_HIGHER_DEVICE=${CANDLE_HIGHER_DEVICE:-cuda:0}
    # candle's kernels are built for this GPU's compute capability unless told otherwise.
    if [[ -z "${CUDA_COMPUTE_CAP:-}" ]] && command -v nvidia-smi >/dev/null; then
        CUDA_COMPUTE_CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
        export CUDA_COMPUTE_CAP
    fi
fi
out=target/gpu-check
mkdir -p "$out"
summary="$out/summary.txt"
echo "gpu-check $(date -u +%FT%TZ) device=$CANDLE_HIGHER_DEVICE features=${features[*]:-none} commit=$(git rev-parse --short HEAD 2>/dev/null)" >"$summary"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >>"$summary"

failed=0
step() {
    local name=$1
    shift
    local start=$SECONDS
    if "$@" >"$out/$name.log" 2>&1; then
        echo "PASS $name ($((SECONDS - start)) s)" >>"$summary"
    else
        echo "FAIL $name ($((SECONDS - start)) s): see $out/$name.log" >>"$summary"
        failed=1
    fi
    tail -n 3 "$out/$name.log" | sed 's/^/    /' >>"$summary"
}

step build cargo build --release "${features[@]}" --tests --examples --benches
step golden_and_fd cargo test --release "${features[@]}" --test integration -- golden optim_fd ops_
step golden_and_fd_f32 env CANDLE_HIGHER_TEST_DTYPE=f32 \
    cargo test --release "${features[@]}" --test integration -- golden optim_fd ops_
if [[ "$CANDLE_HIGHER_DEVICE" != metal* ]]; then
    step suite_on_device cargo test --release "${features[@]}" --test integration
fi
step suite_candle_kernels env CANDLE_HIGHER_DEVICE=cpu CANDLE_HIGHER_KERNELS=candle \
    cargo test --release "${features[@]}" --test integration
step maml_sine cargo run --release "${features[@]}" --example maml_sine -- --iters 200
step bench cargo bench "${features[@]}" --bench maml -- --quick --no-anchor
if [[ -f target/bench-results/maml.json ]]; then
    cp target/bench-results/maml.json "$out/maml.json"
fi
cat "$summary"
exit $failed
