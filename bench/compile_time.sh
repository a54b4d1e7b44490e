#!/usr/bin/env bash
# bench/compile_time.sh: what each named configuration costs at compile time. One translation
# unit per configuration includes vmmpp/config.hpp and explicitly instantiates
# vmmpp::elastic_pool<Config> (every member function); a baseline unit only includes the header.
# Each is compiled VMMPP_COMPILE_RUNS times (default 3) with g++ -std=c++20 and the fastest run
# is kept, since compile times only get noisier, never faster by chance.
#
# Why: vmmpp is header-only and policy-based, so every engine pays this per translation unit
# that names a pool; a policy combination must not blow it up.
#
# Usage: bench/compile_time.sh [output.md]   (the markdown table also goes to stdout)
# Environment: CXX (default g++), CXXFLAGS (default -O2), VMMPP_COMPILE_RUNS, CUDA_HOME.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-}"
cxx="${CXX:-g++}"
cxxflags="${CXXFLAGS:--O2}"
read -ra flags <<< "$cxxflags"
runs="${VMMPP_COMPILE_RUNS:-3}"
cuda_include="${CUDA_HOME:-/usr/local/cuda}/include"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# name|configuration type (empty: the baseline, no instantiation)
configs=(
  "include only|"
  "host_config|vmmpp::host_config"
  "static_config|vmmpp::static_config"
  "elastic_config|vmmpp::elastic_config"
  "gh200_config|vmmpp::gh200_config"
  "vmm_chunked16|vmmpp::pool_config<vmmpp::vmm, vmmpp::chunked<16>, vmmpp::unlimited>"
)

compile() { "$cxx" -std=c++20 "${flags[@]}" -I"$root/include" -I"$cuda_include" -c "$1" -o "$work/out.o"; }

# Seconds (wall) of one compile of $1, in bash's TIMEFORMAT.
compile_seconds() {
  local TIMEFORMAT=%R
  { time compile "$1" 2> /dev/null; } 2>&1
}

table="| configuration | fastest of ${runs} (s) | all runs (s) | over include only (s) |
| --- | ---: | --- | ---: |"
baseline=""
for entry in "${configs[@]}"; do
  name="${entry%%|*}"
  type="${entry#*|}"
  tu="$work/tu.cpp"
  echo '#include "vmmpp/config.hpp"' > "$tu"
  if [[ -n "$type" ]]; then
    echo "template class vmmpp::elastic_pool<$type>;" >> "$tu"
  fi
  # Fail loudly (with the compiler's message) rather than time an error.
  compile "$tu"
  times=()
  for ((i = 0; i < runs; i++)); do
    times+=("$(compile_seconds "$tu")")
  done
  fastest="$(printf '%s\n' "${times[@]}" | sort -g | head -n1)"
  [[ -z "$baseline" ]] && baseline="$fastest"
  delta="$(awk -v a="$fastest" -v b="$baseline" 'BEGIN { printf "%+.2f", a - b }')"
  table+="
| $name | $fastest | ${times[*]} | $delta |"
done

header="Compile time of one translation unit per configuration: \`$cxx -std=c++20 $cxxflags -c\`
($("$cxx" --version | head -n1); $(nproc) cores; $(date +%F))."
printf '%s\n\n%s\n' "$header" "$table"
if [[ -n "$out" ]]; then
  printf '%s\n\n%s\n' "$header" "$table" > "$out"
fi
