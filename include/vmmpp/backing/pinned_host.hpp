// vmmpp/backing/pinned_host.hpp: page-locked CPU memory, the host tier's backing
// (vmmpp/tier/host_tier.hpp). vmmpp::host's reserve/commit/decommit life, with every committed
// range registered with the driver (cuMemHostRegister), so copies between it and the GPU are DMA
// at the PCIe limit and truly asynchronous; pageable memory is staged through the driver's own
// buffers at a fraction of that and can make an "async" copy wait.
#pragma once

#include <cstddef>
#include <cstdint>
#include <iterator>
#include <map>
#include <optional>

#include "vmmpp/backing/concept.hpp"
#include "vmmpp/backing/host.hpp"
#include "vmmpp/driver/api.hpp"
#include "vmmpp/driver/context.hpp"

namespace vmmpp {

/// Construction options of vmmpp::pinned_host.
struct pinned_host_options {
    /// Commit unit; a multiple of the OS page size.
    std::size_t page_bytes = detail::default_page_bytes;
    /// The device whose primary context registers the memory. Registration is portable (every
    /// context may copy from and to it); the device only has to exist.
    int device = 0;
};

/// Page-locked host backing: `host` (mmap reservation, mprotect commit, madvise decommit) plus one
/// cuMemHostRegister(CU_MEMHOSTREGISTER_PORTABLE) per commit call. A decommit unregisters the
/// registrations inside its range and registers again the parts of those it cuts, so any
/// commit/decommit pattern a pool makes works; a copy that crosses two registrations may be
/// staged, so a pool that commits its span at once (preallocated, the tier's default) makes one.
/// Registering pins and maps every page (about 0.1-0.3 ms a MiB on an H100 host): it is done
/// once, when memory is committed, not per copy.
class pinned_host {
public:
    using options = pinned_host_options;
    static constexpr bool is_elastic = true;

    pinned_host(std::size_t capacity, options opts = {})
        : memory_(capacity, host_options{opts.page_bytes}), context_(opts.device) {}
    pinned_host(const pinned_host&) = delete;
    pinned_host& operator=(const pinned_host&) = delete;
    ~pinned_host() {
        scoped_context current(context_);
        for (const auto& [offset, bytes] : registrations_) {
            (void)driver::get().mem_host_unregister(memory_.base() + offset);
        }
    }

    [[nodiscard]] std::size_t granularity() const noexcept { return memory_.granularity(); }
    [[nodiscard]] std::byte* base() const noexcept { return memory_.base(); }
    [[nodiscard]] std::size_t capacity() const noexcept { return memory_.capacity(); }
    [[nodiscard]] std::size_t committed_bytes() const noexcept { return memory_.committed_bytes(); }
    /// Bytes registered with the driver (committed_bytes(), unless a registration failed).
    [[nodiscard]] std::size_t registered_bytes() const noexcept {
        std::size_t n = 0;
        for (const auto& [offset, bytes] : registrations_) {
            n += bytes;
        }
        return n;
    }

    /// Commits [offset, offset+bytes) and page-locks it. Strong guarantee: a refused
    /// registration (cuda_error; CUDA_ERROR_OUT_OF_MEMORY when the OS limits locked memory)
    /// decommits the range again.
    void commit(std::size_t offset, std::size_t bytes) {
        memory_.commit(offset, bytes);
        try {
            register_range(offset, bytes);
        } catch (...) {
            memory_.decommit(offset, bytes);
            throw;
        }
    }

    /// Unlocks and decommits [offset, offset+bytes). The driver must not copy from or to the
    /// range any more (the pool's fences see to it: a tier's copies fence its blocks).
    void decommit(std::size_t offset, std::size_t bytes) {
        memory_.check_committed("decommit", offset, bytes);
        unregister_range(offset, bytes);
        memory_.decommit(offset, bytes);
    }

    friend constexpr void get_property(const pinned_host&, host_accessible) noexcept {}
    friend constexpr void get_property(const pinned_host&, page_locked) noexcept {}

private:
    void register_range(std::size_t offset, std::size_t bytes) {
        scoped_context current(context_);
        driver::check(driver::get().mem_host_register(memory_.base() + offset, bytes, CU_MEMHOSTREGISTER_PORTABLE),
                      "cuMemHostRegister(pinned_host)");
        registrations_.emplace(offset, bytes);
    }

    /// Unregisters every registration that meets [offset, offset+bytes) and registers again the
    /// parts of them outside it.
    void unregister_range(std::size_t offset, std::size_t bytes) {
        const std::size_t end = offset + bytes;
        auto it = registrations_.upper_bound(offset);
        if (it != registrations_.begin() && std::prev(it)->first + std::prev(it)->second > offset) {
            --it;
        }
        scoped_context current(context_);
        while (it != registrations_.end() && it->first < end) {
            const auto [first, n] = *it;
            driver::check(driver::get().mem_host_unregister(memory_.base() + first), "cuMemHostUnregister(pinned_host)");
            it = registrations_.erase(it);
            if (first < offset) {
                register_range(first, offset - first);
            }
            if (first + n > end) {
                register_range(end, first + n - end);
            }
        }
    }

    host memory_;
    primary_context context_;
    std::map<std::size_t, std::size_t> registrations_;  // offset -> bytes, one per cuMemHostRegister
};

static_assert(backing<pinned_host>, "vmmpp::pinned_host must model vmmpp::backing");
static_assert(has_property<pinned_host, host_accessible> && has_property<pinned_host, page_locked> &&
              !has_property<pinned_host, device_accessible>);

} // namespace vmmpp
