// vmmpp/vmmpp.hpp: everything a CUDA or C++ translation unit needs: the named configurations,
// the pool, the KV cache, prefix caching beside it, its host tier, and block copies between caches. (The range-v3 views are in
// vmmpp/kv/views.hpp, for host code.)
#pragma once

// One line instead of a hundred errors when a translation unit is not C++20, as an nvcc one is by
// default (C++17). vmmpp::vmmpp (CMake) and vmmpp.pc (pkg-config) ask for C++20; README,
// "Using it in a project", says when CMake 3.25 passes another -std for CUDA after it.
#if __cplusplus < 202002L
#error "vmmpp needs C++20 (-std=c++20); nvcc compiles C++17 unless told otherwise"
#endif

#include "vmmpp/config.hpp"
#include "vmmpp/kv/cache.hpp"
#include "vmmpp/kv/transfer.hpp"
#include "vmmpp/prefix/prefix_cache.hpp"
#include "vmmpp/stats.hpp"
#include "vmmpp/tier/host_tier.hpp"
