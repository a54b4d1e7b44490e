#!/usr/bin/env bash
# The README's front door, on a fresh clone of this checkout (committed files only, as a new user
# gets them), so that its lines stay true:
#   1. `bash scripts/quickstart` (README, "Two commands")
#   2. `cmake --install build/release --prefix <prefix>` right after it ("Using it in a project")
#   3. a consumer with `find_package(vmmpp CONFIG REQUIRED)` and `vmmpp::vmmpp` against that
#      prefix, built and run (tests/consumers/consumer.cpp, C++ only: the packaging tests in
#      scripts/test cover the CUDA consumer and pkg-config)
#   4. from the release preset, the C ABI library vmmpp_kv_capi (every config, layout, the prefix
#      cache and the host tier instantiated) and test_runtime_limits (where GCC 12 once warned), at
#      -O2 with -Werror: warnings the Debug and sanitizer presets never see, such as GCC's
#      -Wmaybe-uninitialized (docs/RELIABILITY.md). Not the whole preset: its tests, benchmarks
#      and examples are the dev preset's, already built by scripts/test, and on CI's 2 cores
#      building them again took half an hour (CI's 90 minutes ran out on it, 2026-12-07).
# Everything is made under a temporary directory, removed at the end.
set -euo pipefail
src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
jobs="${VMMPP_JOBS:-$(nproc)}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

git clone -q --no-hardlinks "$src" "$work/vmmpp"
cd "$work/vmmpp"

VMMPP_JOBS="$jobs" bash scripts/quickstart

prefix="$work/prefix"
cmake --install build/release --prefix "$prefix"
"$prefix/bin/vmmpp-budget" --help >/dev/null

cmake -S tests/consumers/find_package -B "$work/consumer" -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_PREFIX_PATH="$prefix" -DVMMPP_CONSUMER_CUDA=OFF
cmake --build "$work/consumer" -j "$jobs"
out="$("$work/consumer/vmmpp_consumer")"
if [[ "$out" != OK* ]]; then
  printf 'readme-install.sh: the find_package consumer printed:\n%s\n' "$out" >&2
  exit 1
fi
echo "find_package consumer against the installed prefix: OK"

cmake --build --preset release --target vmmpp_kv_capi test_runtime_limits -j "$jobs"
echo "release preset: vmmpp_kv_capi and test_runtime_limits built"
