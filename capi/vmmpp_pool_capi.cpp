// vmmpp_pool_capi.cpp: the C ABI of vmmpp_pool_capi.h over vmmpp::elastic_pool and vmmpp::budget.
// One type-erased pool per handle: the backing chosen by name ("host", "vmm"), page-granular
// growth (candle-cuda-vmm maps and unmaps page by page, and so does this), the quota unlimited or
// a model's share of a budget. Its own translation unit, so the pools compile apart from the
// KV cache's instantiations in vmmpp_kv_capi.cpp.
#define VMMPP_KV_CAPI_BUILD
#include "vmmpp_pool_capi.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <new>
#include <span>
#include <string>
#include <string_view>
#include <utility>

#include "vmmpp/config.hpp"
#include "vmmpp/driver/device.hpp"

namespace {

thread_local std::string last_error;
/// The numbers of this thread's last over_quota, kept beside the message so that bindings can
/// hand them out typed rather than parse the text.
struct over_quota_record {
    bool set = false;
    std::string which;
    std::uint64_t requested = 0;
    std::uint64_t in_use = 0;
    std::uint64_t limit = 0;
};
thread_local over_quota_record last_over_quota;

/// Runs `f`, turning every exception into a status and this thread's last error (the mapping of
/// vmmpp_kv_capi.cpp's guarded, which keeps its own last error).
template <class F>
vmmpp_kv_status guarded(F&& f) noexcept {
    try {
        f();
        return VMMPP_KV_OK;
    } catch (const vmmpp::over_quota& e) {
        last_error = e.what();
        try {
            last_over_quota = {true, e.which(), e.requested(), e.in_use(), e.limit()};
        } catch (...) {
            last_over_quota.set = false;  // no memory for the name: the message still says it
        }
        return VMMPP_KV_OVER_QUOTA;
    } catch (const vmmpp::out_of_memory& e) {
        last_error = e.what();
        last_over_quota.set = false;
        return VMMPP_KV_OUT_OF_MEMORY;
    } catch (const vmmpp::invalid_argument& e) {
        last_error = e.what();
        last_over_quota.set = false;
        return VMMPP_KV_INVALID_ARGUMENT;
    } catch (const vmmpp::cuda_unavailable& e) {
        last_error = e.what();
        last_over_quota.set = false;
        return VMMPP_KV_CUDA_UNAVAILABLE;
    } catch (const vmmpp::cuda_error& e) {
        last_error = e.what();
        last_over_quota.set = false;
        return VMMPP_KV_CUDA_ERROR;
    } catch (const std::bad_alloc&) {
        last_error = "out of host memory (std::bad_alloc)";
        last_over_quota.set = false;
        return VMMPP_KV_OUT_OF_MEMORY;
    } catch (const std::exception& e) {
        last_error = e.what();
        last_over_quota.set = false;
        return VMMPP_KV_ERROR;
    } catch (...) {
        last_error = "unknown exception";
        last_over_quota.set = false;
        return VMMPP_KV_ERROR;
    }
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

/// What the C ABI needs of a pool, whatever its backing and quota.
class pool_base {
public:
    virtual ~pool_base() = default;
    virtual void ensure_committed(std::size_t offset, std::size_t bytes) = 0;
    virtual void release(std::size_t offset, std::size_t bytes) = 0;
    virtual bool is_committed(std::size_t offset, std::size_t bytes) const = 0;
    virtual std::byte* base() const noexcept = 0;
    virtual std::size_t capacity() const noexcept = 0;
    virtual std::size_t page_bytes() const noexcept = 0;
    virtual int device() const noexcept = 0;
    virtual vmmpp::pool_stats stats() const = 0;
};

template <class Config>
class pool_impl final : public pool_base {
public:
    pool_impl(std::size_t capacity, typename Config::backing_type::options options, typename Config::quota_type quota)
        : pool_(capacity, std::move(options), vmmpp::page_granular{}, std::move(quota)) {}

    void ensure_committed(std::size_t offset, std::size_t bytes) override {
        // Charged for the whole range first (as kv_cache::append does): a refusal then names
        // everything the call needed, and comes before any page is committed and rolled back.
        const vmmpp::byte_range range{offset, bytes};
        const auto charge = pool_.prepay(std::span<const vmmpp::byte_range>(&range, 1));
        pool_.ensure_committed(offset, bytes);
    }
    void release(std::size_t offset, std::size_t bytes) override { pool_.release(offset, bytes); }
    bool is_committed(std::size_t offset, std::size_t bytes) const override {
        return pool_.is_committed(offset, bytes);
    }
    std::byte* base() const noexcept override { return pool_.base(); }
    std::size_t capacity() const noexcept override { return pool_.capacity(); }
    std::size_t page_bytes() const noexcept override { return pool_.page_bytes(); }
    int device() const noexcept override { return pool_.device(); }
    vmmpp::pool_stats stats() const override { return pool_.stats(); }

private:
    vmmpp::elastic_pool<Config> pool_;
};

constexpr const char* backing_names = "host,vmm";

/// A pool over backing `backing` charged to `quota` (vmmpp::unlimited or vmmpp::shared_budget).
template <class Quota>
std::unique_ptr<pool_base> make_pool(std::string_view backing, std::uint64_t capacity, std::uint64_t page_bytes,
                                     int device, Quota quota) {
    require(capacity != 0, "a pool's capacity must not be zero");
    const auto round_up = [&](std::size_t page) {
        if (capacity > SIZE_MAX - (page - 1)) {
            throw vmmpp::invalid_argument("capacity " + std::to_string(capacity) + " bytes is too large");
        }
        return static_cast<std::size_t>((capacity + page - 1) / page * page);
    };
    if (backing == "host") {
        using config = vmmpp::pool_config<vmmpp::host, vmmpp::page_granular, Quota>;
        vmmpp::host_options options;
        if (page_bytes != 0) {
            options.page_bytes = static_cast<std::size_t>(page_bytes);
        }
        // Rounding before the backing checks the page size would divide by zero on a bad one.
        if (options.page_bytes == 0) {
            throw vmmpp::invalid_argument("host page_bytes must not be zero");
        }
        return std::make_unique<pool_impl<config>>(round_up(options.page_bytes), options, std::move(quota));
    }
    if (backing == "vmm") {
        using config = vmmpp::pool_config<vmmpp::vmm, vmmpp::page_granular, Quota>;
        const std::size_t granularity = vmmpp::vmm_granularity(device);  // no device: cuda_unavailable
        if (page_bytes != 0 && page_bytes != granularity) {
            throw vmmpp::invalid_argument("vmm page_bytes " + std::to_string(page_bytes) +
                                          " must be device " + std::to_string(device) + "'s granularity " +
                                          std::to_string(granularity) + " bytes (or 0 for it)");
        }
        vmmpp::vmm_options options;
        options.device = device;
        return std::make_unique<pool_impl<config>>(round_up(granularity), std::move(options), std::move(quota));
    }
    throw vmmpp::invalid_argument("unknown backing '" + std::string(backing) + "' (valid: " + backing_names + ")");
}

} // namespace

struct vmmpp_pool {
    std::unique_ptr<pool_base> pool;
};

struct vmmpp_budget {
    vmmpp::budget budget;
};

extern "C" {

const char* vmmpp_pool_backing_names(void) { return backing_names; }

const char* vmmpp_pool_last_error(void) { return last_error.c_str(); }

int vmmpp_pool_last_over_quota(uint64_t* requested, uint64_t* in_use, uint64_t* limit, char* which,
                               uint64_t which_capacity) {
    const over_quota_record& r = last_over_quota;
    if (!r.set) {
        return 0;
    }
    if (requested != nullptr) {
        *requested = r.requested;
    }
    if (in_use != nullptr) {
        *in_use = r.in_use;
    }
    if (limit != nullptr) {
        *limit = r.limit;
    }
    if (which != nullptr && which_capacity > 0) {
        const std::size_t n = std::min<std::size_t>(r.which.size(), which_capacity - 1);
        std::memcpy(which, r.which.data(), n);
        which[n] = '\0';
    }
    return 1;
}

int vmmpp_is_vmm_supported(int device) { return vmmpp::is_vmm_supported(device) ? 1 : 0; }

vmmpp_kv_status vmmpp_device_check(int device) {
    return guarded([&] { (void)vmmpp::cuda_device(device); });
}

vmmpp_kv_status vmmpp_pool_create(uint64_t capacity, uint64_t page_bytes, const char* backing, int device,
                                  vmmpp_pool** out) {
    return guarded([&] {
        require_args("vmmpp_pool_create", {{"backing", backing != nullptr}, {"out", out != nullptr}});
        auto handle = std::make_unique<vmmpp_pool>();
        handle->pool = make_pool(backing, capacity, page_bytes, device, vmmpp::unlimited{});
        *out = handle.release();
    });
}

void vmmpp_pool_destroy(vmmpp_pool* pool) { delete pool; }

vmmpp_kv_status vmmpp_pool_ensure_committed(vmmpp_pool* pool, uint64_t offset, uint64_t bytes, void** address) {
    return guarded([&] {
        require(pool != nullptr, "vmmpp_pool_ensure_committed: null pool");
        pool->pool->ensure_committed(static_cast<std::size_t>(offset), static_cast<std::size_t>(bytes));
        if (address != nullptr) {
            *address = pool->pool->base() + offset;
        }
    });
}

vmmpp_kv_status vmmpp_pool_release(vmmpp_pool* pool, uint64_t offset, uint64_t bytes) {
    return guarded([&] {
        require(pool != nullptr, "vmmpp_pool_release: null pool");
        pool->pool->release(static_cast<std::size_t>(offset), static_cast<std::size_t>(bytes));
    });
}

vmmpp_kv_status vmmpp_pool_is_committed(vmmpp_pool* pool, uint64_t offset, uint64_t bytes, int* committed) {
    return guarded([&] {
        require_args("vmmpp_pool_is_committed", {{"pool", pool != nullptr}, {"committed", committed != nullptr}});
        *committed = pool->pool->is_committed(static_cast<std::size_t>(offset), static_cast<std::size_t>(bytes)) ? 1 : 0;
    });
}

vmmpp_kv_status vmmpp_pool_span(vmmpp_pool* pool, void** base, uint64_t* capacity, uint64_t* page_bytes,
                                int32_t* device) {
    return guarded([&] {
        require(pool != nullptr, "vmmpp_pool_span: null pool");
        if (base != nullptr) {
            *base = pool->pool->base();
        }
        if (capacity != nullptr) {
            *capacity = pool->pool->capacity();
        }
        if (page_bytes != nullptr) {
            *page_bytes = pool->pool->page_bytes();
        }
        if (device != nullptr) {
            *device = pool->pool->device();
        }
    });
}

vmmpp_kv_status vmmpp_pool_stats_get(vmmpp_pool* pool, vmmpp_pool_stats* out) {
    return guarded([&] {
        require_args("vmmpp_pool_stats_get", {{"pool", pool != nullptr}, {"out", out != nullptr}});
        const vmmpp::pool_stats s = pool->pool->stats();
        out->reserved_bytes = s.reserved;
        out->committed_bytes = s.committed;
        out->peak_committed_bytes = s.peak_committed;
        out->held_pages = s.held_pages;
        out->page_bytes = pool->pool->page_bytes();
        out->commits = s.commits;
        out->decommits = s.decommits;
    });
}

vmmpp_kv_status vmmpp_budget_create(uint64_t global_limit, vmmpp_budget** out) {
    return guarded([&] {
        require_args("vmmpp_budget_create", {{"out", out != nullptr}});
        *out = new vmmpp_budget{vmmpp::budget(static_cast<std::size_t>(global_limit))};
    });
}

void vmmpp_budget_destroy(vmmpp_budget* budget) { delete budget; }

vmmpp_kv_status vmmpp_budget_create_pool(vmmpp_budget* budget, const char* model, uint64_t model_limit,
                                         uint64_t capacity, uint64_t page_bytes, const char* backing, int device,
                                         vmmpp_pool** out) {
    return guarded([&] {
        require_args("vmmpp_budget_create_pool", {{"budget", budget != nullptr}, {"model", model != nullptr},
                                                  {"backing", backing != nullptr}, {"out", out != nullptr}});
        auto handle = std::make_unique<vmmpp_pool>();
        // Registered first, so a taken name is refused before any address space is reserved; a
        // failure after it drops the share, and with it the registration.
        vmmpp::shared_budget share = budget->budget.register_model(model, static_cast<std::size_t>(model_limit));
        handle->pool = make_pool(backing, capacity, page_bytes, device, std::move(share));
        *out = handle.release();
    });
}

vmmpp_kv_status vmmpp_budget_stats_get(vmmpp_budget* budget, vmmpp_kv_budget_stats* out) {
    return guarded([&] {
        require_args("vmmpp_budget_stats_get", {{"budget", budget != nullptr}, {"out", out != nullptr}});
        const vmmpp::budget_stats s = budget->budget.stats();
        out->limit = s.limit;
        out->committed = s.committed;
        out->peak = s.peak;
        out->denied = s.denied;
    });
}

vmmpp_kv_status vmmpp_budget_model_stats_get(vmmpp_budget* budget, const char* model, vmmpp_budget_model_stats* out) {
    return guarded([&] {
        require_args("vmmpp_budget_model_stats_get", {{"budget", budget != nullptr}, {"model", model != nullptr},
                                                      {"out", out != nullptr}});
        const vmmpp::budget_stats s = budget->budget.stats();
        const auto it = std::find_if(s.models.begin(), s.models.end(),
                                     [&](const vmmpp::model_stats& m) { return m.name == model; });
        if (it == s.models.end()) {
            throw vmmpp::unknown_model("model '" + std::string(model) + "' is not registered with this budget");
        }
        out->limit = it->limit;
        out->committed = it->committed;
        out->peak = it->peak;
        out->denied = it->denied;
    });
}

} // extern "C"
