#!/usr/bin/env bash
# Creates the vmmpp Conan package from this checkout and builds and runs its test_package,
# with nothing fetched from a remote: range-v3 comes from the system (see .ci/conan/profile),
# the CUDA toolkit from the machine.
#
# Conan's home defaults to build/conan-home in this checkout, so the user's cache is left alone;
# set CONAN_HOME to use another one.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CONAN_HOME="${CONAN_HOME:-$root/build/conan-home}"
mkdir -p "$CONAN_HOME"

if ! command -v conan >/dev/null 2>&1; then
  echo "conan-create.sh: conan is not installed (python3 -m pip install conan)" >&2
  exit 1
fi
conan --version

# The default profile, which .ci/conan/profile includes, describes this machine.
if ! conan profile path default >/dev/null 2>&1; then
  conan profile detect
fi

# --no-remote: resolve everything from the cache and the profile's platform_requires. The
# test_package is built under build/conan-test-package, and no CMakeUserPresets.json is written,
# so the work tree stays clean.
conan create "$root" -pr:a "$root/.ci/conan/profile" --build=missing --no-remote \
  -c tools.cmake.cmake_layout:test_folder="$root/build/conan-test-package" \
  -c tools.cmake.cmaketoolchain:user_presets=""
