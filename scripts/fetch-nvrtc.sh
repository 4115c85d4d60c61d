#!/usr/bin/env bash
# Fetches NVRTC, the CUDA run-time compiler (a pip wheel, pinned and checked by sha256), into
# .cache/nvrtc/ and prints the folder that holds libnvrtc.so.13. With it on LD_LIBRARY_PATH, a
# machine without a GPU compiles every CUDA kernel (the test `every_kernel_compiles_with_nvrtc`).
# Usage: export LD_LIBRARY_PATH="$(scripts/fetch-nvrtc.sh)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/scripts/lib/sha256.sh"
PACKAGE="nvidia-cuda-nvrtc==13.0.48"
WHEEL="nvidia_cuda_nvrtc-13.0.48-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl"
SHA256="87e13d186905a35e7c04ad553a2abded0fba22f93b43d02e5da6f6cf73fb4d0a"
cache="$root/.cache/nvrtc"
lib="$cache/nvidia/cu13/lib"
if [ ! -f "$lib/libnvrtc.so.13" ]; then
  mkdir -p "$cache"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_12_x86_64 --python-version 3.12 \
    "$PACKAGE" -d "$cache" >&2
  check_sha256 "$cache/$WHEEL" "$SHA256"
  python3 -m zipfile -e "$cache/$WHEEL" "$cache"
fi
echo "$lib"
