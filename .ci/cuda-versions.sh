#!/usr/bin/env bash
# vmmpp against the CUDA toolkits engines build with besides the machine's own (13.0): the
# newest CUDA 13.x and CUDA 12.9 (PyTorch and vLLM ship wheels for both majors). For each, it
# installs the toolkit's PyPI wheels into a cache directory (never system-wide), then builds
#   - the header check (tests/headers): every public header alone, with g++ and with nvcc;
#   - the packaging tests (tests/consumers): consumer.cpp and consumer.cu through find_package
#     (+ pkg-config), add_subdirectory and FetchContent, each built and run.
# Both as projects of their own, configured against that toolkit (CUDAToolkit_ROOT, and
# CMAKE_CUDA_COMPILER for its nvcc).
#
# CUDA 12.9: NVIDIA's CUDA 12 wheels carry the headers (cuda.h, cuda_runtime_api.h, crt/, CCCL),
# the runtime (libcudart.so.12), ptxas and libNVVM, but not the nvcc compiler driver and its front
# end (nvcc, cudafe++, cicc): nvidia-cuda-nvcc-cu12 is ptxas and libNVVM only. So for 12.9 the
# checks are the C++ halves: every header with g++ against the 12.9 headers, and consumer.cpp
# through every delivery path, linked with and run on the 12.9 runtime. No nvcc 12.9 runs here.
#
# The newest 13.x is checked with the newest CMake 4.x from PyPI as well (the main suite runs the
# system's CMake 3.25): vmmpp::vmmpp asks for C++20 in CUDA one way on CMake 3.25 and another on
# 3.26 and later (cmake/vmmppCudaDialect.cmake), and each way is built here or there.
#
# The toolkits stay in build/cuda-toolkits (VMMPP_CUDA_CACHE to put them elsewhere); a second run
# reuses them. Builds go to build/cuda-<version>/ (VMMPP_CUDA_BUILD for another folder than build).
# Takes a few minutes on 2 cores.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${VMMPP_CUDA_CACHE:-$root/build/cuda-toolkits}"
builds="${VMMPP_CUDA_BUILD:-$root/build}"
jobs="${VMMPP_JOBS:-$(nproc)}"

# The exact wheels. Bump CUDA13_* (and CMAKE4) when a newer 13.x (CMake 4.x) is out.
CUDA12_VERSION=12.9.79
CUDA12_WHEELS=(nvidia-cuda-runtime-cu12==12.9.79 nvidia-cuda-nvcc-cu12==12.9.86 nvidia-cuda-cccl-cu12==12.9.27)
CUDA13_VERSION=13.5.37
CUDA13_WHEELS=(nvidia-cuda-nvcc==13.5.37 nvidia-cuda-crt==13.5.37 nvidia-nvvm==13.5.37
               nvidia-cuda-runtime==13.5.37 nvidia-cuda-cccl==13.3.5.0.6)
CMAKE4=cmake==4.4.5

start=$SECONDS
say() { printf '\n---- cuda-versions: %s (at %ds)\n' "$*" "$((SECONDS - start))"; }

# pip_target <dir> <requirement>...: the wheels, installed into <dir> once (a stamp records what).
pip_target() {
  local dir="$1"
  shift
  if [ -f "$dir/.installed" ] && [ "$(cat "$dir/.installed")" = "$*" ]; then
    return
  fi
  rm -rf "$dir"
  # (Debian's own python3 may refuse any pip install, PEP 668; --target touches nothing of it.)
  # Its output goes to stderr: the toolkit functions answer on stdout.
  local pip=(python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$dir")
  PIP_ROOT_USER_ACTION=ignore "${pip[@]}" "$@" >&2 ||
    PIP_ROOT_USER_ACTION=ignore "${pip[@]}" --break-system-packages "$@" >&2
  echo "$*" > "$dir/.installed"
}

# CUDA 13 wheels lay out one toolkit tree, nvidia/cu13 (bin/nvcc, include, lib, nvvm), but ship
# libcudart.so.13 alone: FindCUDAToolkit looks for libcudart.so.
toolkit13() {
  local dir="$cache/cuda-$CUDA13_VERSION"
  pip_target "$dir" "${CUDA13_WHEELS[@]}"
  local tk="$dir/nvidia/cu13"
  ln -sfn libcudart.so.13 "$tk/lib/libcudart.so"
  echo "$tk"
}

# CUDA 12 wheels each have a tree of their own (nvidia/cuda_runtime, cuda_nvcc, cuda_cccl): they
# are joined, by symbolic links, into the layout a toolkit has (include, lib64, bin, nvvm). With
# no nvcc, FindCUDAToolkit takes the version from version.txt at the root.
toolkit12() {
  local dir="$cache/cuda-$CUDA12_VERSION"
  pip_target "$dir/wheels" "${CUDA12_WHEELS[@]}"
  local w="$dir/wheels/nvidia" tk="$dir/toolkit"
  rm -rf "$tk"
  mkdir -p "$tk/include" "$tk/lib64" "$tk/bin"
  local part entry
  for part in cuda_runtime cuda_nvcc cuda_cccl; do
    for entry in "$w/$part/include/"*; do
      case "$(basename "$entry")" in __init__.py | __pycache__) continue ;; esac
      ln -s "$entry" "$tk/include/"
    done
  done
  ln -s "$w"/cuda_runtime/lib/* "$tk/lib64/"
  ln -s libcudart.so.12 "$tk/lib64/libcudart.so"
  ln -s "$w/cuda_nvcc/bin/ptxas" "$tk/bin/"
  ln -s "$w/cuda_nvcc/nvvm" "$tk/nvvm"
  echo "CUDA Version $CUDA12_VERSION" > "$tk/version.txt"
  echo "$tk"
}

# check <cuda version> <cmake> <toolkit root> [nvcc]: the header check and the packaging tests
# against that toolkit; without nvcc, their C++ halves.
check() {
  local version="$1" cmake="$2" tk="$3" nvcc="${4:-}"
  local build="$builds/cuda-$version"
  local ctest="${cmake%cmake}ctest"
  local cudart_version
  cudart_version="$(echo "$version" | awk -F. '{ print $1 * 1000 + $2 * 10 }')"
  local args=(-DCMAKE_BUILD_TYPE=Release "-DCUDAToolkit_ROOT=$tk" "-DVMMPP_EXPECT_CUDART_VERSION=$cudart_version")
  local with_cuda=ON
  if [ -n "$nvcc" ]; then
    args+=("-DCMAKE_CUDA_COMPILER=$nvcc")
  else
    with_cuda=OFF
  fi
  say "CUDA $version, $("$cmake" --version | head -n 1): header check"
  rm -rf "$build"
  "$cmake" -S "$root/tests/headers" -B "$build/headers" "${args[@]}" "-DVMMPP_HEADER_CHECK_CUDA=$with_cuda"
  "$cmake" --build "$build/headers" -j "$jobs"
  say "CUDA $version: packaging tests"
  "$cmake" -S "$root/tests/consumers" -B "$build/consumers" "${args[@]}" "-DVMMPP_CONSUMER_CUDA=$with_cuda"
  "$ctest" --test-dir "$build/consumers" --output-on-failure
}

say "installing the toolkits (PyPI wheels) into $cache"
mkdir -p "$cache"
tk13="$(toolkit13)"
tk12="$(toolkit12)"
pip_target "$cache/$CMAKE4" "$CMAKE4"
cmake4="$cache/$CMAKE4/cmake/data/bin/cmake"
"$tk13/bin/nvcc" --version | tail -n 1

check "$CUDA13_VERSION" "$cmake4" "$tk13" "$tk13/bin/nvcc"
check "$CUDA12_VERSION" "$(command -v cmake)" "$tk12"

say "passed: CUDA $CUDA13_VERSION (nvcc and g++) and CUDA $CUDA12_VERSION (g++; no nvcc 12.9 on PyPI)"
