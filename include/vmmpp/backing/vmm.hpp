// vmmpp/backing/vmm.hpp: GPU memory through CUDA virtual memory management. The whole capacity
// is reserved as virtual addresses once; commit creates physical handles and maps them there,
// decommit unmaps and releases them, so the device's memory follows what is committed.
#pragma once

#include <unistd.h>

#include <cstddef>
#include <map>
#include <string>
#include <vector>

#include "vmmpp/backing/concept.hpp"
#include "vmmpp/detail/commit_map.hpp"
#include "vmmpp/driver/context.hpp"
#include "vmmpp/driver/device.hpp"
#include "vmmpp/driver/handles.hpp"
#include "vmmpp/error.hpp"

namespace vmmpp {

/// One physical handle of a vmm backing, exported as a POSIX file descriptor: where it is mapped
/// in the span, its size, and the descriptor (the receiver of an export closes it).
struct exported_handle {
    std::size_t offset = 0;
    std::size_t bytes = 0;
    int fd = -1;
};

/// Construction options of vmmpp::vmm.
struct vmm_options {
    int device = 0;
    std::size_t handle_bytes = 0;
    /// Devices that also get read/write access to every committed page.
    std::vector<int> peer_devices{};
    /// Physical handles kept after decommit (unmapped, still allocated) and mapped again by a
    /// later commit of the same size, which then skips cuMemCreate, and the decommit skips
    /// cuMemRelease (DESIGN.md: 10 and 15 us of a 2 MiB page's 39 + 36 us). Kept handles still
    /// occupy device memory: a pool charges them to its quota and drops them under pressure.
    std::size_t max_cached_handles = 0;
};

/// VMM backing (cuMemAddressReserve + cuMemCreate/cuMemMap/cuMemSetAccess).
///
/// Handle size: with `handle_bytes == 0` (the default) each commit call creates one physical
/// handle for its whole range, so the pool's growth unit decides it (2 MiB pages for
/// page-granular growth, N pages for chunked<N>: DESIGN.md shows large handles are far cheaper
/// per byte). A decommit must then cover whole handles. With `handle_bytes > 0` every commit is
/// cut into handles of exactly that size.
class vmm {
public:
    using options = vmm_options;
    static constexpr bool is_elastic = true;

    explicit vmm(std::size_t capacity, options opts = {})
        : context_(opts.device),
          pages_(capacity, vmm_granularity(opts.device)),
          handle_bytes_(opts.handle_bytes),
          max_cached_handles_(opts.max_cached_handles) {
        if (!is_vmm_supported(opts.device)) {
            throw invalid_argument("CUDA device " + std::to_string(opts.device) +
                                   " does not support virtual memory management");
        }
        if (handle_bytes_ % pages_.granularity() != 0) {
            throw invalid_argument("vmm handle_bytes " + std::to_string(handle_bytes_) +
                                   " must be a multiple of the granularity " + std::to_string(pages_.granularity()));
        }
        access_.push_back(opts.device);
        for (int peer : opts.peer_devices) {
            (void)cuda_device(peer);  // exists, or invalid_argument
            if (peer != opts.device) {
                access_.push_back(peer);
            }
        }
        cache_.reserve(max_cached_handles_);  // put_cached must not allocate (it runs in noexcept paths)
        scoped_context current(context_);
        reservation_ = address_reservation(capacity, pages_.granularity());
    }
    vmm(const vmm&) = delete;
    vmm& operator=(const vmm&) = delete;
    ~vmm() {
        scoped_context current(context_);
        extents_.clear();  // unmap and release before the reservation goes
        cache_.clear();
        reservation_.reset();
    }

    [[nodiscard]] std::size_t granularity() const noexcept { return pages_.granularity(); }
    [[nodiscard]] std::byte* base() const noexcept { return reinterpret_cast<std::byte*>(reservation_.base()); }
    [[nodiscard]] std::size_t capacity() const noexcept { return pages_.capacity(); }
    [[nodiscard]] std::size_t committed_bytes() const noexcept { return pages_.committed_bytes(); }
    [[nodiscard]] int device_ordinal() const noexcept { return context_.ordinal(); }
    /// Number of mapped physical handles.
    [[nodiscard]] std::size_t handle_count() const noexcept { return extents_.size(); }
    /// Bytes of the unmapped handles kept for reuse (vmm_options::max_cached_handles), and how
    /// many there are. This memory is allocated on the device although nothing is committed.
    [[nodiscard]] std::size_t cached_bytes() const noexcept { return cached_bytes_; }
    [[nodiscard]] std::size_t cached_handle_count() const noexcept { return cache_.size(); }
    /// Commits that reused a kept handle instead of creating one.
    [[nodiscard]] std::size_t reused_handles() const noexcept { return reused_; }

    /// Makes this backing's context current on the calling thread for good (a pool's mapper
    /// thread calls it once), so commits there skip the context push and pop.
    void bind_current_thread() const { bind_thread_to(context_); }

    /// Releases every kept handle (cuMemRelease); returns the bytes given back to the device.
    std::size_t release_cached() noexcept {
        const std::size_t bytes = cached_bytes_;
        if (!cache_.empty()) {
            scoped_context current(context_);
            cache_.clear();
        }
        cached_bytes_ = 0;
        return bytes;
    }

    /// Creates, maps and opens physical memory for [offset, offset+bytes). Strong guarantee: a
    /// failure half way unmaps and releases what this call did, then rethrows.
    void commit(std::size_t offset, std::size_t bytes) {
        pages_.check("commit", offset, bytes, false);
        const std::size_t piece = handle_bytes_ == 0 ? bytes : handle_bytes_;
        if (bytes % piece != 0 || (handle_bytes_ != 0 && offset % piece != 0)) {
            throw invalid_argument("vmm commit [" + std::to_string(offset) + ", +" + std::to_string(bytes) +
                                   ") is not a whole number of " + std::to_string(piece) + "-byte handles");
        }
        scoped_context current(context_);
        std::map<std::size_t, extent> made;  // destroyed (unmapped, released) if anything throws
        std::size_t reused = 0;
        try {
            for (std::size_t off = offset; off < offset + bytes; off += piece) {
                extent e;
                e.memory = take_cached(piece);
                if (e.memory) {
                    ++reused;
                } else {
                    e.memory = create(piece, bytes);
                }
                e.map = mapping(reservation_.base() + off, e.memory, access_);
                made.emplace(off, std::move(e));
            }
        } catch (...) {
            // Give reused handles back to the cache rather than releasing them: the strong
            // guarantee covers the cache too.
            for (auto& [off, e] : made) {
                e.map.reset();
                if (reused > 0) {
                    --reused;
                    put_cached(std::move(e.memory));
                }
            }
            throw;
        }
        reused_ += reused;
        extents_.merge(made);  // moves nodes: cannot throw
        pages_.mark(offset, bytes, true);
    }

    /// Unmaps and releases [offset, offset+bytes), which must consist of whole handles.
    void decommit(std::size_t offset, std::size_t bytes) {
        pages_.check("decommit", offset, bytes, true);
        auto first = extents_.lower_bound(offset);
        const std::size_t end = offset + bytes;
        if (first == extents_.end() || first->first != offset) {
            throw invalid_argument("vmm decommit at offset " + std::to_string(offset) +
                                   " would split a physical handle: decommit whole commits");
        }
        auto last = first;
        while (last != extents_.end() && last->first < end) {
            if (last->first + last->second.memory.bytes() > end) {
                throw invalid_argument("vmm decommit [" + std::to_string(offset) + ", +" + std::to_string(bytes) +
                                       ") would split the handle at offset " + std::to_string(last->first));
            }
            ++last;
        }
        scoped_context current(context_);
        for (auto it = first; it != last; ++it) {
            it->second.map.reset();  // unmap; the handle is kept or released below
            put_cached(std::move(it->second.memory));
        }
        extents_.erase(first, last);
        pages_.mark(offset, bytes, false);
    }

    /// Every committed physical handle as a POSIX file descriptor, lowest offset first, so another
    /// process can map the same pages (vmmpp/interop/shared_pages.hpp passes them over a Unix
    /// socket). The caller owns the descriptors; on failure none is left open.
    [[nodiscard]] std::vector<exported_handle> export_handles() const {
        scoped_context current(context_);
        std::vector<exported_handle> out;
        out.reserve(extents_.size());
        try {
            for (const auto& [offset, e] : extents_) {
                out.push_back({offset, e.memory.bytes(), e.memory.export_fd()});
            }
        } catch (...) {
            for (const auto& h : out) {
                ::close(h.fd);
            }
            throw;
        }
        return out;
    }

    friend constexpr void get_property(const vmm&, device_accessible) noexcept {}

private:
    /// A kept handle of exactly `bytes`, or an empty one.
    physical_allocation take_cached(std::size_t bytes) noexcept {
        for (auto it = cache_.rbegin(); it != cache_.rend(); ++it) {
            if (it->bytes() == bytes) {
                physical_allocation a = std::move(*it);
                cache_.erase(std::next(it).base());
                cached_bytes_ -= bytes;
                return a;
            }
        }
        return {};
    }
    /// Keeps an unmapped handle for reuse if there is room; otherwise releases it.
    void put_cached(physical_allocation&& memory) noexcept {
        if (cache_.size() < max_cached_handles_ && cache_.capacity() > cache_.size()) {
            cached_bytes_ += memory.bytes();
            cache_.push_back(std::move(memory));
        }
        memory.reset();  // released unless it was moved into the cache
    }
    physical_allocation create(std::size_t piece, std::size_t request) {
        try {
            return physical_allocation(device_ordinal(), piece);
        } catch (const cuda_error& err) {
            if (err.code() == CUDA_ERROR_OUT_OF_MEMORY) {
                throw out_of_memory("device " + std::to_string(device_ordinal()) + " physical memory (cuMemCreate)",
                                    request, committed_bytes(), capacity());
            }
            throw;
        }
    }

    struct extent {
        physical_allocation memory;  // declared first: destroyed after the mapping
        mapping map;
    };

    primary_context context_;
    detail::commit_map pages_;
    std::size_t handle_bytes_;
    std::size_t max_cached_handles_;
    std::vector<int> access_;
    address_reservation reservation_;
    std::map<std::size_t, extent> extents_;
    std::vector<physical_allocation> cache_;  // unmapped handles kept for reuse, newest last
    std::size_t cached_bytes_ = 0;
    std::size_t reused_ = 0;
};

static_assert(backing<vmm>, "vmmpp::vmm must model vmmpp::backing");

} // namespace vmmpp
