#!/usr/bin/env bash
# Type-checks the `nccl` feature (distributed::NcclCommunicator) on a machine WITHOUT a CUDA
# toolkit: a stand-in `nvcc` answers the build scripts of cudarc and candle-kernels (version
# 12.8, empty PTX and objects), so `cargo check` gets to our code. Nothing it builds can run
# on a GPU; on a machine with CUDA and NCCL run `cargo check --features nccl` (or build) instead.
# `CARGO_SUBCOMMAND=clippy scripts/check-nccl.sh -- -D warnings` lints the same code.
set -euo pipefail
cd "$(dirname "$0")/.."
stub="$PWD/target/stub-nvcc/bin"
mkdir -p "$stub"
cat > "$stub/nvcc" <<'STUB'
#!/usr/bin/env bash
# Stand-in nvcc for type-checking only: answers --version and writes empty outputs.
out=""; dir=""; ptx=0; lib=0; src=""
while [ $# -gt 0 ]; do
  case "$1" in
    --version) printf 'nvcc: NVIDIA (R) Cuda compiler driver\nCopyright (c) stand-in\nBuilt on stand-in\nCuda compilation tools, release 12.8, V12.8.93\nBuild stand-in\n'; exit 0 ;;
    --list-gpu-code) echo sm_90; exit 0 ;;
    -o) out="$2"; shift ;;
    --output-directory) dir="$2"; shift ;;
    --ptx) ptx=1 ;;
    --lib) lib=1 ;;
    *.cu) src="$1" ;;
  esac
  shift
done
if [ "$lib" = 1 ]; then ar rcs "$out"; exit 0; fi
if [ "$ptx" = 1 ]; then name="$(basename "${src%.cu}").ptx"; : > "${dir:-.}/$name"; exit 0; fi
[ -n "$out" ] && : > "$out"
exit 0
STUB
chmod +x "$stub/nvcc"
PATH="$stub:$PATH" NVCC="$stub/nvcc" CUDA_COMPUTE_CAP=90 CARGO_TARGET_DIR=target/nccl-check \
  cargo "${CARGO_SUBCOMMAND:-check}" -p candle-higher-runtime --features nccl,mpi "$@"
