// vmmpp_kv_capi.cpp: the C ABI of vmmpp_kv_capi.h over vmmpp::kv_cache. One type-erased cache
// per handle (kv_erased.hpp: configuration and layout chosen by name at run time, through the one
// list of each: vmmpp::named_configs, vmmpp/config_list.hpp, and vmmpp::kv_layouts,
// vmmpp/kv/layout_list.hpp; its instantiations are in kv_erased.cpp),
// DLPack exports through vmmpp/interop/dlpack.hpp with the cache as their keep-alive; prefix caches
// (vmmpp/prefix/prefix_cache.hpp) and their host tiers (vmmpp/tier/host_tier.hpp) over a cache handle.
#define VMMPP_KV_CAPI_BUILD
#include "vmmpp_kv_capi.h"

#include <dlfcn.h>

#include "kv_erased.hpp"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <new>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "vmmpp/config_list.hpp"
#include "vmmpp/kv/layout_list.hpp"
#include "vmmpp/kv/transfer.hpp"

namespace {

thread_local std::string last_error;
std::atomic<std::uint64_t> live_exports{0};

/// The type-erased cache, prefix cache and tier every handle holds (kv_erased.hpp).
using vmmpp::erased::cache_base;
using vmmpp::erased::prefix_base;
using vmmpp::erased::tier_base;

/// Runs `f`, turning every exception into a status and this thread's last error.
template <class F>
vmmpp_kv_status guarded(F&& f) noexcept {
    try {
        f();
        return VMMPP_KV_OK;
    } catch (const vmmpp::tier_full& e) {
        last_error = e.what();
        return VMMPP_KV_TIER_FULL;
    } catch (const vmmpp::out_of_sequence_slots& e) {
        last_error = e.what();
        return VMMPP_KV_OUT_OF_SEQUENCE_SLOTS;
    } catch (const vmmpp::out_of_blocks& e) {
        last_error = e.what();
        return VMMPP_KV_OUT_OF_BLOCKS;
    } catch (const vmmpp::over_quota& e) {
        last_error = e.what();
        return VMMPP_KV_OVER_QUOTA;
    } catch (const vmmpp::out_of_memory& e) {
        last_error = e.what();
        return VMMPP_KV_OUT_OF_MEMORY;
    } catch (const vmmpp::invalid_argument& e) {
        last_error = e.what();
        return VMMPP_KV_INVALID_ARGUMENT;
    } catch (const vmmpp::cuda_unavailable& e) {
        last_error = e.what();
        return VMMPP_KV_CUDA_UNAVAILABLE;
    } catch (const vmmpp::cuda_error& e) {
        last_error = e.what();
        return VMMPP_KV_CUDA_ERROR;
    } catch (const std::bad_alloc&) {
        last_error = "out of host memory (std::bad_alloc)";
        return VMMPP_KV_OUT_OF_MEMORY;
    } catch (const std::exception& e) {
        last_error = e.what();
        return VMMPP_KV_ERROR;
    } catch (...) {
        last_error = "unknown exception";
        return VMMPP_KV_ERROR;
    }
}

vmmpp::kv_part to_part(std::int32_t part) {
    if (part != 0 && part != 1) {
        throw vmmpp::invalid_argument("part " + std::to_string(part) + " is neither 0 (key) nor 1 (value)");
    }
    return static_cast<vmmpp::kv_part>(part);
}

void require(bool ok, const char* what) {
    if (!ok) {
        throw vmmpp::invalid_argument(what);
    }
}

/// Throws invalid_argument naming the first of `args` (name, whether it passed its check: not
/// null, or null where nothing is to be written) that failed: "<function>: argument <name> is null".
void require_args(const char* function, std::initializer_list<std::pair<const char*, bool>> args) {
    for (const auto& [name, ok] : args) {
        if (!ok) {
            throw vmmpp::invalid_argument(std::string(function) + ": argument " + name + " is null");
        }
    }
}

/// The storage of a small non-negative integer (at most 2048) in `type`, exactly.
void store_integer(std::byte* at, vmmpp::dtype type, unsigned value) {
    switch (type) {
    case vmmpp::dtype::f32: {
        const auto f = static_cast<float>(value);
        std::memcpy(at, &f, sizeof f);
        return;
    }
    case vmmpp::dtype::bf16: {  // the upper half of the float: exact below 256
        const auto f = static_cast<float>(value);
        std::uint32_t bits = 0;
        std::memcpy(&bits, &f, sizeof bits);
        const auto half = static_cast<std::uint16_t>(bits >> 16);
        std::memcpy(at, &half, sizeof half);
        return;
    }
    case vmmpp::dtype::f16: {
        std::uint16_t bits = 0;
        if (value != 0) {
            unsigned exponent = 0;
            while ((value >> (exponent + 1)) != 0) {
                ++exponent;
            }
            const unsigned mantissa = ((value << (10 - exponent)) & 0x3FFu);
            bits = static_cast<std::uint16_t>(((exponent + 15) << 10) | mantissa);
        }
        std::memcpy(at, &bits, sizeof bits);
        return;
    }
    case vmmpp::dtype::fp8_e4m3:
    case vmmpp::dtype::fp8_e5m2:
    case vmmpp::dtype::fp4_e2m1x2: break;
    }
    throw vmmpp::invalid_argument("the test pattern is written in f32, f16 or bf16 only");
}

} // namespace

struct vmmpp_kv {
    std::shared_ptr<cache_base> cache;
};

namespace {
/// `t` of kv's cache as a DLPack capsule (versioned or not). The keep-alive owns a reference to
/// the cache and counts the export until its deleter runs. The caller holds the cache's mutex.
void* export_tensor(vmmpp_kv& kv, const vmmpp::kv_tensor& t, bool versioned, bool managed_as_cuda) {
    const DLDevice device = kv.cache->dlpack_device(managed_as_cuda);
    live_exports.fetch_add(1);
    std::shared_ptr<const void> keep_alive(kv.cache.get(), [cache = kv.cache](const void*) noexcept {
        live_exports.fetch_sub(1);
    });
    if (versioned) {
        return vmmpp::to_dlpack_versioned(t, device, std::move(keep_alive));
    }
    return vmmpp::to_dlpack(t, device, std::move(keep_alive));
}

/// The C geometry as vmmpp's, validated; `who` names the call in the errors.
vmmpp::kv_geometry to_geometry(const vmmpp_kv_geometry& in, const char* who) {
    if (in.dtype < 0 || in.dtype > static_cast<int>(vmmpp::dtype::fp8_e5m2)) {
        throw vmmpp::invalid_argument(std::string(who) +
                                      ": dtype must be 0 (f32), 1 (f16), 2 (bf16), 3 (fp8_e4m3) or 4 (fp8_e5m2)");
    }
    vmmpp::kv_geometry g;
    g.layers = in.layers;
    g.kv_heads = in.kv_heads;
    g.head_dim = in.head_dim;
    g.type = static_cast<vmmpp::dtype>(in.dtype);
    g.block_tokens = in.block_tokens;
    g.max_blocks = in.max_blocks;
    g.max_tokens_per_sequence = in.max_tokens_per_sequence;
    g.validate();
    return g;
}
} // namespace

extern "C" {

const char* vmmpp_kv_last_error(void) { return last_error.c_str(); }

const char* vmmpp_kv_layout_names(void) {
    static const std::string names = vmmpp::type_names<vmmpp::kv_layouts>(",");
    return names.c_str();
}

const char* vmmpp_kv_config_names(void) {
    static const std::string names = vmmpp::type_names<vmmpp::named_configs>(",");
    return names.c_str();
}

const char* vmmpp_kv_process_budget_config_names(void) {
    static const std::string names = vmmpp::type_names<vmmpp::erased::budget_configs>(",");
    return names.c_str();
}

vmmpp_kv_status vmmpp_kv_create(const vmmpp_kv_geometry* geometry, const char* config, const char* layout, int device,
                                uint64_t budget_bytes, vmmpp_kv** out) {
    return vmmpp_kv_create_with_peers(geometry, config, layout, device, budget_bytes, nullptr, 0, out);
}

vmmpp_kv_status vmmpp_kv_create_with_peers(const vmmpp_kv_geometry* geometry, const char* config, const char* layout,
                                           int device, uint64_t budget_bytes, const int* peers, uint64_t n_peers,
                                           vmmpp_kv** out) {
    return guarded([&] {
        require_args("vmmpp_kv_create", {{"geometry", geometry != nullptr}, {"config", config != nullptr},
                                         {"layout", layout != nullptr}, {"out", out != nullptr},
                                         {"peers", peers != nullptr || n_peers == 0}});
        const vmmpp::kv_geometry g = to_geometry(*geometry, "vmmpp_kv_create");
        auto handle = std::make_unique<vmmpp_kv>();
        handle->cache = vmmpp::erased::make_cache(
            config, layout, g, {.device = device, .peers = std::vector<int>(peers, peers + n_peers)}, budget_bytes);
        *out = handle.release();
    });
}

void vmmpp_kv_destroy(vmmpp_kv* kv) { delete kv; }

vmmpp_kv_status vmmpp_kv_add_sequence(vmmpp_kv* kv, uint64_t* seq) {
    return guarded([&] {
        require_args("vmmpp_kv_add_sequence", {{"kv", kv != nullptr}, {"seq", seq != nullptr}});
        std::lock_guard lock(kv->cache->mutex);
        *seq = kv->cache->add_sequence();
    });
}

vmmpp_kv_status vmmpp_kv_append(vmmpp_kv* kv, uint64_t seq, uint64_t n_tokens, uint64_t* first) {
    return guarded([&] {
        require(kv != nullptr, "vmmpp_kv_append: null handle");
        std::lock_guard lock(kv->cache->mutex);
        const vmmpp::token_range r = kv->cache->append(seq, n_tokens);
        if (first != nullptr) {
            *first = r.first;
        }
    });
}

vmmpp_kv_status vmmpp_kv_fork(vmmpp_kv* kv, uint64_t seq, uint64_t* child) {
    return guarded([&] {
        require_args("vmmpp_kv_fork", {{"kv", kv != nullptr}, {"child", child != nullptr}});
        std::lock_guard lock(kv->cache->mutex);
        *child = kv->cache->fork(seq);
    });
}

vmmpp_kv_status vmmpp_kv_truncate(vmmpp_kv* kv, uint64_t seq, uint64_t n_tokens) {
    return vmmpp_kv_truncate_on_stream(kv, seq, n_tokens, nullptr);
}

vmmpp_kv_status vmmpp_kv_truncate_on_stream(vmmpp_kv* kv, uint64_t seq, uint64_t n_tokens, void* stream) {
    return guarded([&] {
        require(kv != nullptr, "vmmpp_kv_truncate: null handle");
        std::lock_guard lock(kv->cache->mutex);
        kv->cache->truncate(seq, n_tokens, static_cast<cudaStream_t>(stream));
    });
}

vmmpp_kv_status vmmpp_kv_free(vmmpp_kv* kv, uint64_t seq) { return vmmpp_kv_free_on_stream(kv, seq, nullptr); }

vmmpp_kv_status vmmpp_kv_free_on_stream(vmmpp_kv* kv, uint64_t seq, void* stream) {
    return guarded([&] {
        require(kv != nullptr, "vmmpp_kv_free: null handle");
        std::lock_guard lock(kv->cache->mutex);
        kv->cache->free(seq, static_cast<cudaStream_t>(stream));
    });
}

vmmpp_kv_status vmmpp_kv_tokens(vmmpp_kv* kv, uint64_t seq, uint64_t* n_tokens) {
    return guarded([&] {
        require_args("vmmpp_kv_tokens", {{"kv", kv != nullptr}, {"n_tokens", n_tokens != nullptr}});
        std::lock_guard lock(kv->cache->mutex);
        *n_tokens = kv->cache->tokens(seq);
    });
}

vmmpp_kv_status vmmpp_kv_stats_get(vmmpp_kv* kv, vmmpp_kv_stats* out) {
    return guarded([&] {
        require_args("vmmpp_kv_stats_get", {{"kv", kv != nullptr}, {"out", out != nullptr}});
        std::lock_guard lock(kv->cache->mutex);
        const vmmpp::erased::cache_counts s = kv->cache->stats();
        *out = vmmpp_kv_stats{s.reserved_bytes, s.committed_bytes, s.used_blocks,
                              s.free_blocks,    s.sequences,       s.cow_copies};
    });
}

vmmpp_kv_status vmmpp_kv_slot_mapping(vmmpp_kv* kv, uint64_t seq, uint64_t first, uint64_t count, int64_t* out) {
    return guarded([&] {
        require_args("vmmpp_kv_slot_mapping", {{"kv", kv != nullptr}, {"out", out != nullptr || count == 0}});
        std::lock_guard lock(kv->cache->mutex);
        kv->cache->slot_mapping(seq, first, std::span<std::int64_t>(out, count));
    });
}

vmmpp_kv_status vmmpp_kv_block_table(vmmpp_kv* kv, uint64_t seq, int32_t* out, uint64_t capacity, uint64_t* count) {
    return guarded([&] {
        require_args("vmmpp_kv_block_table", {{"kv", kv != nullptr}, {"count", count != nullptr},
                                              {"out", out != nullptr || capacity == 0}});
        std::lock_guard lock(kv->cache->mutex);
        const auto table = kv->cache->block_table(seq);
        *count = table.size();
        const std::size_t n = std::min<std::size_t>(table.size(), capacity);
        std::copy_n(table.begin(), n, out);
    });
}

vmmpp_kv_status vmmpp_kv_pack_block_tables(vmmpp_kv* kv, const uint64_t* seqs, uint64_t n_seqs,
                                           uint64_t max_blocks_per_seq, int32_t pad, int32_t* out) {
    return guarded([&] {
        require_args("vmmpp_kv_pack_block_tables",
                     {{"kv", kv != nullptr},
                      {"seqs", n_seqs == 0 || seqs != nullptr},
                      {"out", n_seqs == 0 || max_blocks_per_seq == 0 || out != nullptr}});
        // n_seqs * max_blocks_per_seq must not wrap before it sizes the caller's buffer.
        require(max_blocks_per_seq == 0 || n_seqs <= SIZE_MAX / max_blocks_per_seq,
                "vmmpp_kv_pack_block_tables: n_seqs x max_blocks_per_seq overflows");
        std::lock_guard lock(kv->cache->mutex);
        static_assert(sizeof(uint64_t) == sizeof(vmmpp::seq_id));
        kv->cache->pack_block_tables(std::span<const vmmpp::seq_id>(seqs, n_seqs), max_blocks_per_seq,
                                     std::span<std::int32_t>(out, n_seqs * max_blocks_per_seq), pad);
    });
}

vmmpp_kv_status vmmpp_kv_address(vmmpp_kv* kv, uint32_t layer, int32_t part, int32_t block, void** out) {
    return guarded([&] {
        require_args("vmmpp_kv_address", {{"kv", kv != nullptr}, {"out", out != nullptr}});
        std::lock_guard lock(kv->cache->mutex);
        *out = kv->cache->address(layer, to_part(part), block);
    });
}

vmmpp_kv_status vmmpp_kv_synchronize(vmmpp_kv* kv) {
    return guarded([&] {
        require(kv != nullptr, "vmmpp_kv_synchronize: null handle");
        std::lock_guard lock(kv->cache->mutex);
        kv->cache->synchronize();
    });
}

vmmpp_kv_status vmmpp_kv_trim(vmmpp_kv* kv, uint64_t* freed_bytes) {
    return guarded([&] {
        require(kv != nullptr, "vmmpp_kv_trim: null handle");
        std::lock_guard lock(kv->cache->mutex);
        const std::size_t freed = kv->cache->trim();
        if (freed_bytes != nullptr) {
            *freed_bytes = freed;
        }
    });
}

vmmpp_kv_status vmmpp_kv_dlpack_device(vmmpp_kv* kv, int managed_as_cuda, int32_t* device_type, int32_t* device_id) {
    return guarded([&] {
        require_args("vmmpp_kv_dlpack_device", {{"kv", kv != nullptr}, {"device_type", device_type != nullptr},
                                                {"device_id", device_id != nullptr}});
        const DLDevice d = kv->cache->dlpack_device(managed_as_cuda != 0);
        *device_type = static_cast<int32_t>(d.device_type);
        *device_id = d.device_id;
    });
}

vmmpp_kv_status vmmpp_kv_export(vmmpp_kv* kv, uint32_t layer, int32_t part, int versioned, int managed_as_cuda,
                                void** out) {
    return guarded([&] {
        require_args("vmmpp_kv_export", {{"kv", kv != nullptr}, {"out", out != nullptr}});
        std::lock_guard lock(kv->cache->mutex);
        const vmmpp::kv_tensor t = kv->cache->tensor(layer, to_part(part));
        *out = export_tensor(*kv, t, versioned != 0, managed_as_cuda != 0);
    });
}

vmmpp_kv_status vmmpp_kv_sequence_tensor(vmmpp_kv* kv, uint64_t seq, uint32_t layer, int32_t part, void** data,
                                         int64_t* shape, int64_t* strides) {
    return guarded([&] {
        require_args("vmmpp_kv_sequence_tensor", {{"kv", kv != nullptr}, {"data", data != nullptr},
                                                  {"shape", shape != nullptr}, {"strides", strides != nullptr}});
        std::lock_guard lock(kv->cache->mutex);
        const vmmpp::kv_tensor t = kv->cache->sequence_tensor(seq, layer, to_part(part));
        *data = t.data;
        std::copy(t.shape.begin(), t.shape.end(), shape);
        std::copy(t.strides.begin(), t.strides.end(), strides);
    });
}

vmmpp_kv_status vmmpp_kv_export_sequence(vmmpp_kv* kv, uint64_t seq, uint32_t layer, int32_t part, int versioned,
                                         int managed_as_cuda, void** out) {
    return guarded([&] {
        require_args("vmmpp_kv_export_sequence", {{"kv", kv != nullptr}, {"out", out != nullptr}});
        std::lock_guard lock(kv->cache->mutex);
        const vmmpp::kv_tensor t = kv->cache->sequence_tensor(seq, layer, to_part(part));
        *out = export_tensor(*kv, t, versioned != 0, managed_as_cuda != 0);
    });
}

void vmmpp_dlpack_release(void* managed, int versioned) {
    if (versioned != 0) {
        vmmpp::dlpack_deleter{}(static_cast<DLManagedTensorVersioned*>(managed));
    } else {
        vmmpp::dlpack_deleter{}(static_cast<DLManagedTensor*>(managed));
    }
}

const char* vmmpp_dlpack_capsule_name(int versioned) {
    return versioned != 0 ? vmmpp::dlpack_versioned_capsule_name : vmmpp::dlpack_capsule_name;
}

void vmmpp_dlpack_capsule_destructor(void* capsule) {
    // The Python C API of the running interpreter (what ctypes.pythonapi reaches too); the
    // destructor runs with the GIL held, while the capsule is being deallocated.
    using is_valid_fn = int (*)(void*, const char*);
    using get_pointer_fn = void* (*)(void*, const char*);
    struct python_api {
        is_valid_fn is_valid = nullptr;
        get_pointer_fn get_pointer = nullptr;
    };
    static const python_api api = [] {
        python_api a;
        a.is_valid = reinterpret_cast<is_valid_fn>(::dlsym(RTLD_DEFAULT, "PyCapsule_IsValid"));
        a.get_pointer = reinterpret_cast<get_pointer_fn>(::dlsym(RTLD_DEFAULT, "PyCapsule_GetPointer"));
        return a;
    }();
    if (capsule == nullptr || api.is_valid == nullptr || api.get_pointer == nullptr) {
        return;  // not in a Python process: nothing can own a capsule
    }
    // A consumer that took the tensor renamed the capsule ("used_dltensor") and owns the deleter.
    for (int versioned : {0, 1}) {
        const char* name = vmmpp_dlpack_capsule_name(versioned);
        if (api.is_valid(capsule, name) != 0) {
            vmmpp_dlpack_release(api.get_pointer(capsule, name), versioned);
            return;
        }
    }
}

uint64_t vmmpp_kv_live_exports(void) { return live_exports.load(); }

vmmpp_kv_status vmmpp_kv_write_test_pattern(vmmpp_kv* kv, uint64_t seq, uint64_t first, uint64_t count) {
    return guarded([&] {
        require(kv != nullptr, "vmmpp_kv_write_test_pattern: null handle");
        std::lock_guard lock(kv->cache->mutex);
        cache_base& c = *kv->cache;
        require(c.host_accessible(), "vmmpp_kv_write_test_pattern: the cache's memory is not host accessible");
        const vmmpp::kv_geometry& g = c.geometry();
        require(g.type == vmmpp::dtype::f32 || g.type == vmmpp::dtype::f16 || g.type == vmmpp::dtype::bf16,
                "vmmpp_kv_write_test_pattern: the pattern is written in f32, f16 or bf16 only");
        const std::size_t element = vmmpp::size_of(g.type);
        if (count > UINT64_MAX - first) {  // the loop's end would wrap and write nothing
            throw vmmpp::invalid_argument("vmmpp_kv_write_test_pattern: tokens [" + std::to_string(first) + ", +" +
                                          std::to_string(count) + ") end past 2^64");
        }
        for (std::uint64_t t = first; t < first + count; ++t) {
            std::int64_t slot = 0;
            c.slot_mapping(seq, t, std::span<std::int64_t>(&slot, 1));
            const auto block = static_cast<std::int32_t>(slot / g.block_tokens);
            const auto offset = static_cast<std::size_t>(slot % g.block_tokens);
            for (std::uint32_t layer = 0; layer < g.layers; ++layer) {
                for (unsigned part = 0; part < c.parts(); ++part) {
                    // Through the layout's strides: NHD, HND and packed rows alike.
                    const auto strides = c.tensor(layer, static_cast<vmmpp::kv_part>(part)).strides;
                    std::byte* row = c.address(layer, static_cast<vmmpp::kv_part>(part), block) +
                                     offset * static_cast<std::size_t>(strides[1]) * element;
                    for (std::uint32_t h = 0; h < g.kv_heads; ++h) {
                        for (std::uint32_t d = 0; d < g.head_dim; ++d) {
                            const auto value = static_cast<unsigned>(
                                (seq * 37 + t * 7 + std::uint64_t{layer} * 131 + part * 61 + std::uint64_t{h} * 17 +
                                 std::uint64_t{d} * 3) %
                                251);
                            store_integer(row + (std::size_t{h} * static_cast<std::size_t>(strides[2]) + d) * element,
                                          g.type, value);
                        }
                    }
                }
            }
        }
    });
}

} // extern "C"

// --- cross-process budgets (examples/serving: several engine processes, one budget) ---

extern "C" {

vmmpp_kv_status vmmpp_kv_create_in_process_budget(const vmmpp_kv_geometry* geometry, const char* config,
                                                  const char* layout, int device, const char* budget_name,
                                                  uint64_t global_limit_bytes, const char* model,
                                                  uint64_t model_limit_bytes, vmmpp_kv** out) {
    return guarded([&] {
        require_args("vmmpp_kv_create_in_process_budget", {{"geometry", geometry != nullptr},
                                                           {"config", config != nullptr}, {"layout", layout != nullptr},
                                                           {"budget_name", budget_name != nullptr},
                                                           {"model", model != nullptr}, {"out", out != nullptr}});
        const vmmpp::kv_geometry g = to_geometry(*geometry, "vmmpp_kv_create_in_process_budget");
        // The quota keeps the segment mapped in this process, so the budget handle may go.
        vmmpp::process_budget budget = vmmpp::process_budget::create_or_open(budget_name, global_limit_bytes);
        vmmpp::process_quota quota = budget.register_model(model, model_limit_bytes);
        auto handle = std::make_unique<vmmpp_kv>();
        handle->cache =
            vmmpp::erased::make_cache_in_process_budget(config, layout, g, {.device = device}, std::move(quota));
        *out = handle.release();
    });
}

vmmpp_kv_status vmmpp_kv_process_budget_stats(const char* budget_name, vmmpp_kv_budget_stats* out) {
    return guarded([&] {
        require_args("vmmpp_kv_process_budget_stats", {{"budget_name", budget_name != nullptr},
                                                       {"out", out != nullptr}});
        const vmmpp::process_budget_stats s = vmmpp::process_budget::open(budget_name).stats();
        out->limit = s.limit;
        out->committed = s.committed;
        out->peak = s.peak;
        out->denied = s.denied;
    });
}

vmmpp_kv_status vmmpp_kv_process_budget_remove(const char* budget_name, int* removed) {
    return guarded([&] {
        require_args("vmmpp_kv_process_budget_remove", {{"budget_name", budget_name != nullptr}});
        const bool r = vmmpp::process_budget::remove(budget_name);
        if (removed != nullptr) {
            *removed = r ? 1 : 0;
        }
    });
}

} // extern "C"

// --- moving blocks between caches and processes (examples/nixl_transfer) ---

struct vmmpp_imported_pages {
    vmmpp::imported_pages pages;
};

namespace {
/// Copies min(count, capacity) items of `items` to `out` and sets *count to how many there are.
template <class T, class U, class F>
void copy_out(const std::vector<T>& items, U* out, uint64_t capacity, uint64_t* count, F&& convert) {
    *count = items.size();
    const std::size_t n = std::min<std::size_t>(items.size(), capacity);
    for (std::size_t i = 0; i < n; ++i) {
        out[i] = convert(items[i]);
    }
}

std::vector<vmmpp::byte_range> to_ranges(const vmmpp_kv_range* in, uint64_t n) {
    std::vector<vmmpp::byte_range> out(n);
    for (uint64_t i = 0; i < n; ++i) {
        out[i] = {in[i].offset, in[i].bytes};
    }
    return out;
}
} // namespace

extern "C" {

vmmpp_kv_status vmmpp_kv_span(vmmpp_kv* kv, void** base, uint64_t* capacity, int32_t* device) {
    return guarded([&] {
        require_args("vmmpp_kv_span", {{"kv", kv != nullptr}, {"base", base != nullptr},
                                       {"capacity", capacity != nullptr}, {"device", device != nullptr}});
        *base = kv->cache->base();  // fixed for the cache's life: no lock
        *capacity = kv->cache->capacity();
        *device = kv->cache->device();
    });
}

vmmpp_kv_status vmmpp_kv_committed_extents(vmmpp_kv* kv, vmmpp_kv_extent* out, uint64_t capacity, uint64_t* count) {
    return guarded([&] {
        require_args("vmmpp_kv_committed_extents", {{"kv", kv != nullptr}, {"count", count != nullptr},
                                                    {"out", out != nullptr || capacity == 0}});
        std::lock_guard lock(kv->cache->mutex);
        copy_out(kv->cache->committed_extents(), out, capacity, count, [](const vmmpp::committed_extent& e) {
            return vmmpp_kv_extent{e.offset, e.bytes, e.commit};
        });
    });
}

vmmpp_kv_status vmmpp_kv_block_pieces(vmmpp_kv* kv, const int32_t* blocks, uint64_t n_blocks, vmmpp_kv_range* out,
                                      uint64_t capacity, uint64_t* count) {
    return guarded([&] {
        require_args("vmmpp_kv_block_pieces", {{"kv", kv != nullptr}, {"count", count != nullptr},
                                               {"blocks", blocks != nullptr || n_blocks == 0},
                                               {"out", out != nullptr || capacity == 0}});
        std::lock_guard lock(kv->cache->mutex);
        copy_out(kv->cache->block_pieces(std::span<const std::int32_t>(blocks, n_blocks)), out, capacity, count,
                 [](const vmmpp::byte_range& r) { return vmmpp_kv_range{r.offset, r.bytes}; });
    });
}

vmmpp_kv_status vmmpp_pair_pieces(const vmmpp_kv_range* local, uint64_t n_local, const vmmpp_kv_range* remote,
                                  uint64_t n_remote, vmmpp_kv_piece_pair* out, uint64_t capacity, uint64_t* count) {
    return guarded([&] {
        require_args("vmmpp_pair_pieces", {{"count", count != nullptr}, {"local", local != nullptr || n_local == 0},
                                           {"remote", remote != nullptr || n_remote == 0},
                                           {"out", out != nullptr || capacity == 0}});
        copy_out(vmmpp::pair_pieces(to_ranges(local, n_local), to_ranges(remote, n_remote)), out, capacity, count,
                 [](const vmmpp::piece_pair& p) {
                     return vmmpp_kv_piece_pair{p.local_offset, p.remote_offset, p.bytes};
                 });
    });
}

vmmpp_kv_status vmmpp_kv_copy_blocks(vmmpp_kv* src, const int32_t* src_blocks, vmmpp_kv* dst,
                                     const int32_t* dst_blocks, uint64_t n_blocks, void* stream) {
    return guarded([&] {
        require_args("vmmpp_kv_copy_blocks", {{"src", src != nullptr}, {"dst", dst != nullptr},
                                              {"src_blocks", src_blocks != nullptr || n_blocks == 0},
                                              {"dst_blocks", dst_blocks != nullptr || n_blocks == 0}});
        // Both caches' locks, in one order whatever the argument order (one lock if one cache).
        std::unique_lock first(std::less<>{}(src->cache.get(), dst->cache.get()) ? src->cache->mutex : dst->cache->mutex);
        std::unique_lock<std::mutex> second;
        if (src->cache != dst->cache) {
            second = std::unique_lock(std::less<>{}(src->cache.get(), dst->cache.get()) ? dst->cache->mutex
                                                                                        : src->cache->mutex);
        }
        src->cache->copy_blocks_to(std::span<const std::int32_t>(src_blocks, n_blocks), *dst->cache,
                                   std::span<const std::int32_t>(dst_blocks, n_blocks), static_cast<cudaStream_t>(stream));
    });
}

vmmpp_kv_status vmmpp_kv_send_shared_pages(vmmpp_kv* kv, int socket) {
    return guarded([&] {
        require(kv != nullptr, "vmmpp_kv_send_shared_pages: null handle");
        vmmpp::shared_pages_export pages;
        {
            std::lock_guard lock(kv->cache->mutex);
            pages = kv->cache->export_shared_pages();
        }
        // Sent without the cache's lock (and the pool's): the socket I/O waits for the peer, up
        // to the default timeout, and the engine's other calls on this cache must not wait with it.
        vmmpp::send_shared_pages(socket, pages);
    });
}

vmmpp_kv_status vmmpp_import_pages(int socket, int device, vmmpp_imported_pages** out) {
    return guarded([&] {
        require_args("vmmpp_import_pages", {{"out", out != nullptr}});
        *out = new vmmpp_imported_pages{vmmpp::imported_pages(socket, device)};
    });
}

vmmpp_kv_status vmmpp_imported_pages_span(vmmpp_imported_pages* pages, void** base, uint64_t* capacity,
                                          uint64_t* mapped_bytes) {
    return guarded([&] {
        require_args("vmmpp_imported_pages_span", {{"pages", pages != nullptr}, {"base", base != nullptr},
                                                   {"capacity", capacity != nullptr},
                                                   {"mapped_bytes", mapped_bytes != nullptr}});
        *base = pages->pages.base();
        *capacity = pages->pages.capacity();
        *mapped_bytes = pages->pages.mapped_bytes();
    });
}

void vmmpp_imported_pages_destroy(vmmpp_imported_pages* pages) { delete pages; }

vmmpp_kv_status vmmpp_copy_piece_pairs(void* local_base, const void* remote_base, const vmmpp_kv_piece_pair* pairs,
                                       uint64_t n_pairs, void* stream, int flags) {
    return guarded([&] {
        require_args("vmmpp_copy_piece_pairs", {{"local_base", local_base != nullptr},
                                                {"remote_base", remote_base != nullptr},
                                                {"pairs", pairs != nullptr || n_pairs == 0}});
        require((flags & ~VMMPP_COPY_ONE_BY_ONE) == 0, "vmmpp_copy_piece_pairs: unknown flags");
        auto* to = static_cast<std::byte*>(local_base);
        const auto* from = static_cast<const std::byte*>(remote_base);
        // The batch API refuses the legacy default stream (cudaErrorInvalidValue): copy one by one there.
        if (n_pairs > 1 && stream != nullptr && (flags & VMMPP_COPY_ONE_BY_ONE) == 0) {
            // One submission for the whole list: 3.2 us less per 2 MiB copy than one
            // cudaMemcpyAsync each between two H100s (docs/NIXL.md).
            std::vector<void*> dsts(n_pairs);
            std::vector<const void*> srcs(n_pairs);
            std::vector<std::size_t> sizes(n_pairs);
            for (uint64_t i = 0; i < n_pairs; ++i) {
                dsts[i] = to + pairs[i].local_offset;
                srcs[i] = from + pairs[i].remote_offset;
                sizes[i] = pairs[i].bytes;
            }
            vmmpp::detail::copy_batch_async(dsts, srcs, sizes, static_cast<cudaStream_t>(stream),
                                            "cudaMemcpyBatchAsync(vmmpp_copy_piece_pairs)");
            return;
        }
        for (uint64_t i = 0; i < n_pairs; ++i) {
            vmmpp::driver::check(::cudaMemcpyAsync(to + pairs[i].local_offset, from + pairs[i].remote_offset,
                                                   pairs[i].bytes, cudaMemcpyDefault, static_cast<cudaStream_t>(stream)),
                                 "cudaMemcpyAsync(vmmpp_copy_piece_pairs)");
        }
    });
}

} // extern "C"

// --- prefix caching (vmmpp/prefix/prefix_cache.hpp) ---

struct vmmpp_kv_prefix {
    /// The cache: held, so the prefix cache's reference to it stays valid whatever the order of
    /// the destroys; its mutex serialises the prefix cache's calls with the cache's own.
    std::shared_ptr<cache_base> cache;
    /// Shared with a host tier over it (vmmpp_kv_tier), which refers to it until the tier goes:
    /// the prefix cache goes with the last of the two handles (its deleter, in create_prefix).
    std::shared_ptr<prefix_base> prefix;
    /// Events drained from the prefix cache and not yet handed out (a caller's buffer was short).
    std::vector<vmmpp::prefix_event> pending;
};

namespace {

std::span<const std::int32_t> token_span(const int32_t* tokens, uint64_t n_tokens) {
    return {tokens, static_cast<std::size_t>(n_tokens)};
}
std::span<const std::uint64_t> extra_span(const uint64_t* extra, uint64_t n_extra) {
    return {extra, static_cast<std::size_t>(n_extra)};
}

/// An eviction's outputs: *count, the first min(capacity, count) ids and keys, the freed bytes.
void eviction_out(const vmmpp::eviction_result& r, int32_t* blocks, vmmpp_kv_block_key* keys, uint64_t capacity,
                  uint64_t* count, uint64_t* freed_page_bytes) {
    const std::size_t n = std::min<std::size_t>(r.blocks.size(), capacity);
    if (blocks != nullptr) {
        std::copy_n(r.blocks.begin(), n, blocks);
    }
    if (keys != nullptr) {
        for (std::size_t i = 0; i < n; ++i) {
            keys[i] = vmmpp_kv_block_key{r.keys[i].hi, r.keys[i].lo};
        }
    }
    if (count != nullptr) {
        *count = r.blocks.size();
    }
    if (freed_page_bytes != nullptr) {
        *freed_page_bytes = r.freed_page_bytes;
    }
}

/// The checks every eviction call makes of its output arguments (the ids may be left out only
/// with capacity 0: a caller that gave room expects them).
void require_eviction_outputs(vmmpp_kv_prefix* prefix, const int32_t* blocks, uint64_t capacity, const char* function) {
    require_args(function, {{"prefix", prefix != nullptr}, {"blocks", blocks != nullptr || capacity == 0}});
}

vmmpp_kv_status create_prefix(vmmpp_kv* kv, uint64_t max_cached_bytes, int record_events, bool lend,
                              vmmpp_kv_prefix** out) {
    return guarded([&] {
        require_args("vmmpp_kv_prefix_create", {{"kv", kv != nullptr}, {"out", out != nullptr}});
        auto handle = std::make_unique<vmmpp_kv_prefix>();
        handle->cache = kv->cache;
        vmmpp::prefix_cache_options options;
        options.max_cached_bytes = static_cast<std::size_t>(max_cached_bytes);
        options.record_events = record_events != 0;
        try {
            handle->prefix = vmmpp::erased::make_prefix_cache(kv->cache, options, lend);
        } catch (const vmmpp::invalid_argument& e) {  // named after the call that was refused
            throw vmmpp::invalid_argument(std::string(lend ? "vmmpp_kv_prefix_create_lending: "
                                                           : "vmmpp_kv_prefix_create: ") +
                                          e.what());
        }
        *out = handle.release();
    });
}

} // namespace

extern "C" {

vmmpp_kv_status vmmpp_kv_prefix_create(vmmpp_kv* kv, uint64_t max_cached_bytes, int record_events,
                                       vmmpp_kv_prefix** out) {
    return create_prefix(kv, max_cached_bytes, record_events, false, out);
}

vmmpp_kv_status vmmpp_kv_prefix_create_lending(vmmpp_kv* kv, uint64_t max_cached_bytes, int record_events,
                                               vmmpp_kv_prefix** out) {
    return create_prefix(kv, max_cached_bytes, record_events, true, out);
}

vmmpp_kv_status vmmpp_kv_prefix_lending_stats_get(vmmpp_kv_prefix* prefix, vmmpp_kv_prefix_lending_stats* out) {
    return guarded([&] {
        require_args("vmmpp_kv_prefix_lending_stats_get", {{"prefix", prefix != nullptr}, {"out", out != nullptr}});
        const vmmpp::lending_stats s = prefix->prefix->lending_stats();  // atomics: no lock needed
        out->lends = s.lends;
        out->lent_blocks = s.lent_blocks;
        out->lent_bytes = s.lent_bytes;
        out->busy = s.busy;
    });
}

void vmmpp_kv_prefix_destroy(vmmpp_kv_prefix* prefix) {
    // The handle's references to the prefix cache and the cache: the prefix cache goes now
    // unless a tier holds it (then with the tier), stopping lending first.
    delete prefix;
}

vmmpp_kv_status vmmpp_kv_prefix_publish(vmmpp_kv_prefix* prefix, uint64_t seq, const int32_t* tokens,
                                        uint64_t n_tokens, const uint64_t* extra, uint64_t n_extra,
                                        uint64_t* registered) {
    return guarded([&] {
        require_args("vmmpp_kv_prefix_publish", {{"prefix", prefix != nullptr},
                                                 {"tokens", tokens != nullptr || n_tokens == 0},
                                                 {"extra", extra != nullptr || n_extra == 0}});
        std::lock_guard lock(prefix->cache->mutex);
        const std::size_t n = prefix->prefix->publish(seq, token_span(tokens, n_tokens), extra_span(extra, n_extra));
        if (registered != nullptr) {
            *registered = n;
        }
    });
}

vmmpp_kv_status vmmpp_kv_prefix_lookup(vmmpp_kv_prefix* prefix, const int32_t* tokens, uint64_t n_tokens,
                                       const uint64_t* extra, uint64_t n_extra, uint64_t* cached_tokens) {
    return guarded([&] {
        require_args("vmmpp_kv_prefix_lookup", {{"prefix", prefix != nullptr},
                                                {"cached_tokens", cached_tokens != nullptr},
                                                {"tokens", tokens != nullptr || n_tokens == 0},
                                                {"extra", extra != nullptr || n_extra == 0}});
        std::lock_guard lock(prefix->cache->mutex);
        *cached_tokens = prefix->prefix->lookup(token_span(tokens, n_tokens), extra_span(extra, n_extra));
    });
}

vmmpp_kv_status vmmpp_kv_prefix_attach(vmmpp_kv_prefix* prefix, const int32_t* tokens, uint64_t n_tokens,
                                       const uint64_t* extra, uint64_t n_extra, uint64_t* seq,
                                       uint64_t* cached_tokens) {
    return vmmpp_kv_prefix_attach_on_stream(prefix, tokens, n_tokens, extra, n_extra, nullptr, seq, cached_tokens);
}

vmmpp_kv_status vmmpp_kv_prefix_attach_on_stream(vmmpp_kv_prefix* prefix, const int32_t* tokens, uint64_t n_tokens,
                                                 const uint64_t* extra, uint64_t n_extra, void* stream, uint64_t* seq,
                                                 uint64_t* cached_tokens) {
    return guarded([&] {
        require_args("vmmpp_kv_prefix_attach", {{"prefix", prefix != nullptr}, {"seq", seq != nullptr},
                                                {"cached_tokens", cached_tokens != nullptr},
                                                {"tokens", tokens != nullptr || n_tokens == 0},
                                                {"extra", extra != nullptr || n_extra == 0}});
        std::lock_guard lock(prefix->cache->mutex);
        const vmmpp::attached_sequence a = prefix->prefix->attach(
            token_span(tokens, n_tokens), extra_span(extra, n_extra), static_cast<cudaStream_t>(stream));
        *seq = a.seq;
        *cached_tokens = a.cached_tokens;
    });
}

vmmpp_kv_status vmmpp_kv_prefix_append(vmmpp_kv_prefix* prefix, uint64_t seq, uint64_t n_tokens, uint64_t* first) {
    return guarded([&] {
        require(prefix != nullptr, "vmmpp_kv_prefix_append: null handle");
        std::lock_guard lock(prefix->cache->mutex);
        const vmmpp::token_range r = prefix->prefix->append(seq, n_tokens, nullptr, false);
        if (first != nullptr) {
            *first = r.first;
        }
    });
}

vmmpp_kv_status vmmpp_kv_prefix_append_on_stream(vmmpp_kv_prefix* prefix, uint64_t seq, uint64_t n_tokens,
                                                 void* stream, uint64_t* first) {
    return guarded([&] {
        require(prefix != nullptr, "vmmpp_kv_prefix_append_on_stream: null handle");
        std::lock_guard lock(prefix->cache->mutex);
        const vmmpp::token_range r =
            prefix->prefix->append(seq, n_tokens, static_cast<cudaStream_t>(stream), true);
        if (first != nullptr) {
            *first = r.first;
        }
    });
}

vmmpp_kv_status vmmpp_kv_prefix_free(vmmpp_kv_prefix* prefix, uint64_t seq) {
    return vmmpp_kv_prefix_free_on_stream(prefix, seq, nullptr);
}

vmmpp_kv_status vmmpp_kv_prefix_free_on_stream(vmmpp_kv_prefix* prefix, uint64_t seq, void* stream) {
    return guarded([&] {
        require(prefix != nullptr, "vmmpp_kv_prefix_free: null handle");
        std::lock_guard lock(prefix->cache->mutex);
        prefix->prefix->free(seq, static_cast<cudaStream_t>(stream));
    });
}

vmmpp_kv_status vmmpp_kv_prefix_evict(vmmpp_kv_prefix* prefix, uint64_t n_blocks, int32_t* blocks,
                                      vmmpp_kv_block_key* keys, uint64_t capacity, uint64_t* count,
                                      uint64_t* freed_page_bytes) {
    return guarded([&] {
        require_eviction_outputs(prefix, blocks, capacity, "vmmpp_kv_prefix_evict");
        std::lock_guard lock(prefix->cache->mutex);
        eviction_out(prefix->prefix->evict(static_cast<std::size_t>(n_blocks)), blocks, keys, capacity, count,
                     freed_page_bytes);
    });
}

vmmpp_kv_status vmmpp_kv_prefix_evict_bytes(vmmpp_kv_prefix* prefix, uint64_t bytes, int32_t* blocks,
                                            vmmpp_kv_block_key* keys, uint64_t capacity, uint64_t* count,
                                            uint64_t* freed_page_bytes) {
    return guarded([&] {
        require_eviction_outputs(prefix, blocks, capacity, "vmmpp_kv_prefix_evict_bytes");
        std::lock_guard lock(prefix->cache->mutex);
        eviction_out(prefix->prefix->evict_bytes(static_cast<std::size_t>(bytes)), blocks, keys, capacity, count,
                     freed_page_bytes);
    });
}

vmmpp_kv_status vmmpp_kv_prefix_clear(vmmpp_kv_prefix* prefix, int32_t* blocks, vmmpp_kv_block_key* keys,
                                      uint64_t capacity, uint64_t* count, uint64_t* freed_page_bytes) {
    return guarded([&] {
        require_eviction_outputs(prefix, blocks, capacity, "vmmpp_kv_prefix_clear");
        std::lock_guard lock(prefix->cache->mutex);
        eviction_out(prefix->prefix->clear(), blocks, keys, capacity, count, freed_page_bytes);
    });
}

vmmpp_kv_status vmmpp_kv_prefix_stats_get(vmmpp_kv_prefix* prefix, vmmpp_kv_prefix_stats* out) {
    return guarded([&] {
        require_args("vmmpp_kv_prefix_stats_get", {{"prefix", prefix != nullptr}, {"out", out != nullptr}});
        std::lock_guard lock(prefix->cache->mutex);
        const vmmpp::prefix_cache_stats s = prefix->prefix->stats();
        out->hits = s.hits;
        out->misses = s.misses;
        out->evictions = s.evictions;
        out->cached_blocks = s.cached_blocks;
        out->cached_bytes = s.cached_bytes;
        out->evictable_blocks = s.evictable_blocks;
        out->evictable_bytes = s.evictable_bytes;
        out->committed_bytes = s.committed_bytes;
        out->packed_floor_bytes = s.packed_floor_bytes;
        out->idle_footprint_ratio = s.idle_footprint_ratio;
        out->block_bytes = prefix->prefix->block_bytes();
    });
}

vmmpp_kv_status vmmpp_kv_prefix_drain_events(vmmpp_kv_prefix* prefix, vmmpp_kv_prefix_event* out, uint64_t capacity,
                                             uint64_t* count, uint64_t* left) {
    return guarded([&] {
        require_args("vmmpp_kv_prefix_drain_events", {{"prefix", prefix != nullptr}, {"count", count != nullptr},
                                                      {"out", out != nullptr || capacity == 0}});
        std::lock_guard lock(prefix->cache->mutex);
        std::vector<vmmpp::prefix_event>& pending = prefix->pending;
        std::vector<vmmpp::prefix_event> fresh = prefix->prefix->drain_events();
        if (pending.empty()) {
            pending = std::move(fresh);
        } else {
            pending.insert(pending.end(), fresh.begin(), fresh.end());  // may throw: those events are lost
        }
        const std::size_t n = std::min<std::size_t>(pending.size(), capacity);
        for (std::size_t i = 0; i < n; ++i) {
            const vmmpp::prefix_event& e = pending[i];
            out[i] = vmmpp_kv_prefix_event{e.kind == vmmpp::prefix_event_kind::stored ? VMMPP_KV_PREFIX_STORED
                                                                                      : VMMPP_KV_PREFIX_REMOVED,
                                           e.block, e.key.hi, e.key.lo, e.parent.hi, e.parent.lo};
        }
        pending.erase(pending.begin(), pending.begin() + static_cast<std::ptrdiff_t>(n));
        *count = n;
        if (left != nullptr) {
            *left = pending.size();
        }
    });
}

} // extern "C"

// --- the host tier (vmmpp/tier/host_tier.hpp) ---

struct vmmpp_kv_tier {
    /// Its mutex serialises the tier's calls with the cache's and the prefix cache's (the prefix
    /// cache calls the tier from its evictions).
    std::shared_ptr<cache_base> cache;
    /// Holds the prefix cache it refers to (make_host_tier's deleter drops it after the tier).
    std::shared_ptr<tier_base> tier;
};

extern "C" {

vmmpp_kv_status vmmpp_kv_tier_create(vmmpp_kv_prefix* prefix, uint64_t max_blocks, void* stream,
                                     vmmpp_kv_tier** out) {
    return guarded([&] {
        require_args("vmmpp_kv_tier_create", {{"prefix", prefix != nullptr}, {"out", out != nullptr}});
        auto handle = std::make_unique<vmmpp_kv_tier>();
        handle->cache = prefix->cache;
        try {
            handle->tier = vmmpp::erased::make_host_tier(prefix->cache, prefix->prefix,
                                                         static_cast<std::size_t>(max_blocks),
                                                         static_cast<cudaStream_t>(stream));
        } catch (const vmmpp::invalid_argument& e) {  // named after the call that was refused
            throw vmmpp::invalid_argument(std::string("vmmpp_kv_tier_create: ") + e.what());
        }
        *out = handle.release();
    });
}

void vmmpp_kv_tier_destroy(vmmpp_kv_tier* tier) {
    // The tier goes under the cache's mutex (make_host_tier's deleter), then its prefix cache
    // reference (that one's deleter takes the mutex too).
    delete tier;
}

vmmpp_kv_status vmmpp_kv_tier_attach(vmmpp_kv_tier* tier, const int32_t* tokens, uint64_t n_tokens,
                                     const uint64_t* extra, uint64_t n_extra, void* stream, uint64_t* seq,
                                     uint64_t* cached_tokens, uint64_t* host_tokens) {
    return guarded([&] {
        require_args("vmmpp_kv_tier_attach", {{"tier", tier != nullptr}, {"seq", seq != nullptr},
                                              {"cached_tokens", cached_tokens != nullptr},
                                              {"tokens", tokens != nullptr || n_tokens == 0},
                                              {"extra", extra != nullptr || n_extra == 0}});
        std::lock_guard lock(tier->cache->mutex);
        const vmmpp::tiered_sequence a = tier->tier->attach(token_span(tokens, n_tokens), extra_span(extra, n_extra),
                                                            static_cast<cudaStream_t>(stream));
        *seq = a.seq;
        *cached_tokens = a.cached_tokens;
        if (host_tokens != nullptr) {
            *host_tokens = a.host_tokens;
        }
    });
}

vmmpp_kv_status vmmpp_kv_tier_lookup(vmmpp_kv_tier* tier, const int32_t* tokens, uint64_t n_tokens,
                                     const uint64_t* extra, uint64_t n_extra, uint64_t* gpu_tokens,
                                     uint64_t* host_tokens) {
    return guarded([&] {
        require_args("vmmpp_kv_tier_lookup", {{"tier", tier != nullptr}, {"gpu_tokens", gpu_tokens != nullptr},
                                              {"host_tokens", host_tokens != nullptr},
                                              {"tokens", tokens != nullptr || n_tokens == 0},
                                              {"extra", extra != nullptr || n_extra == 0}});
        std::lock_guard lock(tier->cache->mutex);
        const auto [gpu, host] = tier->tier->lookup(token_span(tokens, n_tokens), extra_span(extra, n_extra));
        *gpu_tokens = gpu;
        *host_tokens = host;
    });
}

vmmpp_kv_status vmmpp_kv_tier_swap_out(vmmpp_kv_tier* tier, uint64_t seq, void* stream, uint64_t* id) {
    return guarded([&] {
        require_args("vmmpp_kv_tier_swap_out", {{"tier", tier != nullptr}, {"id", id != nullptr}});
        std::lock_guard lock(tier->cache->mutex);
        *id = tier->tier->swap_out(seq, static_cast<cudaStream_t>(stream));
    });
}

vmmpp_kv_status vmmpp_kv_tier_swap_in(vmmpp_kv_tier* tier, uint64_t id, void* stream, uint64_t* seq) {
    return guarded([&] {
        require_args("vmmpp_kv_tier_swap_in", {{"tier", tier != nullptr}, {"seq", seq != nullptr}});
        std::lock_guard lock(tier->cache->mutex);
        *seq = tier->tier->swap_in(id, static_cast<cudaStream_t>(stream));
    });
}

vmmpp_kv_status vmmpp_kv_tier_drop_swapped(vmmpp_kv_tier* tier, uint64_t id) {
    return guarded([&] {
        require(tier != nullptr, "vmmpp_kv_tier_drop_swapped: null handle");
        std::lock_guard lock(tier->cache->mutex);
        tier->tier->drop_swapped(id);
    });
}

vmmpp_kv_status vmmpp_kv_tier_swapped_tokens(vmmpp_kv_tier* tier, uint64_t id, uint64_t* n_tokens) {
    return guarded([&] {
        require_args("vmmpp_kv_tier_swapped_tokens", {{"tier", tier != nullptr}, {"n_tokens", n_tokens != nullptr}});
        std::lock_guard lock(tier->cache->mutex);
        *n_tokens = tier->tier->swapped_tokens(id);
    });
}

vmmpp_kv_status vmmpp_kv_tier_store_ahead(vmmpp_kv_tier* tier, uint64_t max_blocks, uint64_t* stored) {
    return guarded([&] {
        require_args("vmmpp_kv_tier_store_ahead", {{"tier", tier != nullptr}, {"stored", stored != nullptr}});
        std::lock_guard lock(tier->cache->mutex);
        *stored = tier->tier->store_ahead(static_cast<std::size_t>(max_blocks));
    });
}

vmmpp_kv_status vmmpp_kv_tier_synchronize(vmmpp_kv_tier* tier) {
    return guarded([&] {
        require(tier != nullptr, "vmmpp_kv_tier_synchronize: null handle");
        std::lock_guard lock(tier->cache->mutex);
        tier->tier->synchronize();
    });
}

vmmpp_kv_status vmmpp_kv_tier_idle(vmmpp_kv_tier* tier, int* idle) {
    return guarded([&] {
        require_args("vmmpp_kv_tier_idle", {{"tier", tier != nullptr}, {"idle", idle != nullptr}});
        std::lock_guard lock(tier->cache->mutex);
        *idle = tier->tier->idle() ? 1 : 0;
    });
}

vmmpp_kv_status vmmpp_kv_tier_stream_waits_for_copies(vmmpp_kv_tier* tier, void* stream) {
    return guarded([&] {
        require(tier != nullptr, "vmmpp_kv_tier_stream_waits_for_copies: null handle");
        std::lock_guard lock(tier->cache->mutex);
        tier->tier->stream_waits_for_copies(static_cast<cudaStream_t>(stream));
    });
}

vmmpp_kv_status vmmpp_kv_tier_stats_get(vmmpp_kv_tier* tier, vmmpp_kv_tier_stats* out) {
    return guarded([&] {
        require_args("vmmpp_kv_tier_stats_get", {{"tier", tier != nullptr}, {"out", out != nullptr}});
        std::lock_guard lock(tier->cache->mutex);
        const vmmpp::host_tier_stats s = tier->tier->stats();
        out->offloaded_blocks = s.offloaded_blocks;
        out->stored_ahead_blocks = s.stored_ahead_blocks;
        out->dropped_blocks = s.dropped_blocks;
        out->loaded_blocks = s.loaded_blocks;
        out->host_hits = s.host_hits;
        out->evicted_blocks = s.evicted_blocks;
        out->swapped_out = s.swapped_out;
        out->swapped_in = s.swapped_in;
        out->bytes_to_host = s.bytes_to_host;
        out->bytes_to_device = s.bytes_to_device;
        out->keyed_blocks = s.keyed_blocks;
        out->swapped_blocks = s.swapped_blocks;
        out->free_blocks = s.free_blocks;
        out->max_blocks = s.max_blocks;
    });
}

} // extern "C"
