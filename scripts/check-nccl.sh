#!/usr/bin/env bash
# Type-checks the `nccl` feature (distributed::NcclCommunicator) on a machine without a GPU.
#
# Default: a stand-in `nvcc` answers the build scripts of cudarc and candle-kernels (version
# 12.8, empty PTX and objects), so `cargo check` gets to our code; needs no download.
#
# `--pypi-toolkit`: a real CUDA toolkit assembled from NVIDIA's wheels on PyPI into
# target/cuda-pypi (downloaded once, reused after), so candle-kernels' .cu files really go
# through nvcc (PTX, and the static MoE/GGUF kernel library). PyPI's cu12 nvcc wheels carry
# only ptxas and libnvvm (no nvcc driver, no cicc), so this is CUDA 13.2 (a version cudarc 0.19
# knows; its nvcc, nvvm, crt, runtime and cccl wheels are all 13.2.86). No GPU, libcuda,
# cuBLAS or NCCL is needed: `check` does not link.
#
# Nothing either mode builds has run on a GPU. Lint with
# `CARGO_SUBCOMMAND=clippy scripts/check-nccl.sh [--pypi-toolkit] -- -D warnings`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --pypi-toolkit ]; then
  shift
  root="$PWD/target/cuda-pypi"
  cuda="$root/nvidia/cu13"
  if [ ! -x "$cuda/nvvm/bin/cicc" ]; then
    # nvcc driver + cudafe++/ptxas/fatbinary, cicc + libdevice, crt headers, runtime headers
    # (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h), CCCL (cuda/std, nv/target): one prefix.
    ${PIP:-python3 -m pip} download --no-deps -d "$root/wheels" nvidia-cuda-nvcc==13.2.86 \
      nvidia-nvvm==13.2.86 nvidia-cuda-crt==13.2.86 nvidia-cuda-runtime==13.2.86 \
      nvidia-cuda-cccl==13.2.86
    for wheel in "$root"/wheels/*.whl; do python3 -m zipfile -e "$wheel" "$root"; done
    chmod +x "$cuda"/bin/* "$cuda"/nvvm/bin/*  # zip extraction drops the executable bits
  fi
  export PATH="$cuda/bin:$PATH" NVCC="$cuda/bin/nvcc" CUDA_HOME="$cuda"
  export CARGO_TARGET_DIR=target/nccl-real
else
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
  export PATH="$stub:$PATH" NVCC="$stub/nvcc" CARGO_TARGET_DIR=target/nccl-check
fi
# No GPU to ask: compile for sm_90 (Hopper).
CUDA_COMPUTE_CAP=90 cargo "${CARGO_SUBCOMMAND:-check}" -p candle-higher-runtime --features nccl,mpi "$@"
