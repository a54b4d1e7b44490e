// vmmpp/vmmpp.hpp: everything a CUDA or C++ translation unit needs: the named configurations,
// the pool, the KV cache and block copies between caches. (The range-v3 views are in
// vmmpp/kv/views.hpp, for host code.)
#pragma once

#include "vmmpp/config.hpp"
#include "vmmpp/kv/cache.hpp"
#include "vmmpp/kv/transfer.hpp"
