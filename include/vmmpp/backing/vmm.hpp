// vmmpp/backing/vmm.hpp: GPU memory through CUDA virtual memory management. The whole capacity
// is reserved as virtual addresses once; commit creates physical handles and maps them there,
// decommit unmaps and releases them, so the device's memory follows what is committed.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "vmmpp/backing/concept.hpp"
#include "vmmpp/detail/commit_map.hpp"
#include "vmmpp/detail/unique_fd.hpp"
#include "vmmpp/driver/context.hpp"
#include "vmmpp/driver/device.hpp"
#include "vmmpp/driver/event.hpp"
#include "vmmpp/driver/handles.hpp"
#include "vmmpp/error.hpp"

namespace vmmpp {

/// One physical handle of a vmm backing, exported as a POSIX file descriptor: where it is mapped
/// in the span, its size, and the descriptor (the receiver of an export closes it).
struct exported_handle {
    std::size_t offset = 0;
    std::size_t bytes = 0;
    detail::unique_fd fd;  ///< owned (closed with the handle), close-on-exec
};

/// What an access to reserved address space with nothing committed under it does (a kernel
/// reading a padded or stale block id, for instance).
enum class unbacked_access {
    /// Nothing is mapped there: any access faults, and the fault (cudaErrorIllegalAddress) ends
    /// the process's CUDA context. Costs nothing.
    fault,
    /// One zero-filled page of the granularity is mapped read-only under every uncommitted page:
    /// reads return zeros; a stray write still faults (it is caught, as without the option, and
    /// never changes what other reads see). The recommended form.
    zeros,
    /// The same page mapped read-write: reads return zeros and a stray write does not fault, but
    /// it lands in the one shared page, so from then on every unbacked address reads what was
    /// written there (garbage instead of zeros) until the backing is destroyed. For kernels that
    /// write padded slots on purpose and never read unbacked memory back.
    zeros_writable,
};

/// Construction options of vmmpp::vmm.
struct vmm_options {
    int device = 0;
    std::size_t handle_bytes = 0;
    /// Devices that also get read/write access to every committed page.
    std::vector<int> peer_devices{};
    /// Physical handles kept after decommit (unmapped, still allocated) and mapped again by a
    /// later commit of the same size, which then skips cuMemCreate, and the decommit skips
    /// cuMemRelease (about a quarter of a page's map and unmap cost: docs/ARCHITECTURE.md). Kept handles still
    /// occupy device memory: a pool charges them to its quota and drops them under pressure.
    std::size_t max_cached_handles = 0;
    /// Whether reads of uncommitted address space fault (the default) or return zeros (a zero
    /// page mapped under it: one granularity page of device memory, a cuMemMap per page of the
    /// span at construction, then per page of growth one extra cuMemUnmap on commit and one
    /// cuMemMap on decommit, plus a cuMemSetAccess per decommitted handle; docs/ARCHITECTURE.md).
    unbacked_access unbacked = unbacked_access::fault;
    /// Physical handles created GPUDirect RDMA capable (allocFlags.gpuDirectRDMACapable), so that
    /// an RDMA NIC can register the committed pages (NIXL/UCX between nodes, docs/NIXL.md).
    /// A device without CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED refuses it
    /// at construction (vmmpp::invalid_argument).
    bool gpu_direct_rdma = false;
};

/// VMM backing (cuMemAddressReserve + cuMemCreate/cuMemMap/cuMemSetAccess).
///
/// Handle size: with `handle_bytes == 0` (the default) each commit call creates one physical
/// handle for its whole range, so the pool's growth unit decides it (2 MiB pages for
/// page-granular growth, N pages for chunked<N>: large handles are far cheaper per byte, see
/// docs/ARCHITECTURE.md). A decommit must then cover whole handles. With `handle_bytes > 0` every commit is
/// cut into handles of exactly that size.
///
/// Driver failures when giving memory back are reported, never dropped (see decommit): a range
/// whose decommit threw may still hold device memory; leaked_bytes() counts handles the driver
/// would not release.
///
/// Capabilities (vmmpp/backing/concept.hpp): handle_keeping_backing (cached_bytes,
/// release_cached), context_binding_backing (bind_current_thread), handle_exporting_backing
/// (export_handles); the adaptors forward all three.
class vmm {
public:
    using options = vmm_options;
    static constexpr bool is_elastic = true;

    explicit vmm(std::size_t capacity, options opts = {})
        : context_(opts.device),
          pages_(capacity, vmm_granularity(opts.device)),
          handle_bytes_(opts.handle_bytes),
          max_cached_handles_(opts.max_cached_handles),
          unbacked_(opts.unbacked),
          gpu_direct_rdma_(opts.gpu_direct_rdma) {
        if (!is_vmm_supported(opts.device)) {
            throw invalid_argument("CUDA device " + std::to_string(opts.device) +
                                   " does not support virtual memory management");
        }
        if (gpu_direct_rdma_ && !supports_gpu_direct_rdma_with_vmm(opts.device)) {
            throw invalid_argument("CUDA device " + std::to_string(opts.device) +
                                   " cannot allocate GPUDirect RDMA capable VMM memory (vmm_options::gpu_direct_rdma)");
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
        cache_.reserve(max_cached_handles_);  // keep() must not allocate (it runs in noexcept paths)
        scoped_context current(context_);
        reservation_ = address_reservation(capacity, pages_.granularity());
        if (unbacked_ != unbacked_access::fault) {
            map_zero_page_everywhere();  // on failure unmaps what it mapped; the members unwind
        }
    }
    vmm(const vmm&) = delete;
    vmm& operator=(const vmm&) = delete;
    ~vmm() {
        std::optional<scoped_context> current;
        try {
            current.emplace(context_);
        } catch (...) {
            // A lost context (a sticky error) refuses the push: give back what the driver will take.
        }
        extents_.clear();  // unmap and release before the reservation goes
        cache_.clear();
        unmap_zero_pages(0, zero_mapped_.size());
        zero_page_.reset();
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
    /// Bytes of handles the driver refused to release (cuMemRelease failed, in decommit or
    /// release_cached): dropped by this backing, possibly still allocated on the device.
    [[nodiscard]] std::size_t leaked_bytes() const noexcept { return leaked_bytes_; }
    /// What reads of uncommitted address space do (vmm_options::unbacked).
    [[nodiscard]] unbacked_access unbacked() const noexcept { return unbacked_; }
    /// Device memory of the zero page (one granularity page with unbacked_access::zeros or
    /// zeros_writable, else 0); not counted in committed_bytes().
    [[nodiscard]] std::size_t zero_page_bytes() const noexcept { return zero_page_ ? zero_page_.bytes() : 0; }
    /// Bytes of uncommitted address space where the zero page is missing because mapping it back
    /// failed (in a decommit, or in a commit's rollback): reads there fault as without the option.
    /// Each commit and decommit first tries to map them again. 0 without the option.
    [[nodiscard]] std::size_t unzeroed_bytes() const noexcept { return holes_.size() * pages_.granularity(); }

    /// Makes this backing's context current on the calling thread for good (a pool's mapper
    /// thread calls it once), so commits there skip the context push and pop.
    void bind_current_thread() const { bind_thread_to(context_); }

    /// Releases every kept handle (cuMemRelease); returns the bytes given back to the device.
    /// A handle the driver refuses to release is dropped all the same and counted in
    /// leaked_bytes(), not in the result: its memory may still be allocated.
    std::size_t release_cached() noexcept {
        std::size_t released = 0;
        if (!cache_.empty()) {
            std::optional<scoped_context> current;
            try {
                current.emplace(context_);
            } catch (...) {
                // A lost context refuses the push; the releases report their own failures.
            }
            for (auto& memory : cache_) {
                const std::size_t bytes = memory.bytes();
                if (memory.release() == CUDA_SUCCESS) {
                    released += bytes;
                } else {
                    leaked_bytes_ += bytes;
                }
            }
            cache_.clear();
        }
        cached_bytes_ = 0;
        return released;
    }

    /// Creates (or takes a kept handle), maps and opens physical memory for [offset,
    /// offset+bytes). Strong guarantee, the handle cache included: a failure half way unmaps
    /// what this call mapped, puts every kept handle it took back in the cache, releases the
    /// handles it created, then rethrows.
    void commit(std::size_t offset, std::size_t bytes) {
        pages_.check("commit", offset, bytes, false);
        const std::size_t piece = handle_bytes_ == 0 ? bytes : handle_bytes_;
        if (bytes % piece != 0 || (handle_bytes_ != 0 && offset % piece != 0)) {
            throw invalid_argument("vmm commit [" + std::to_string(offset) + ", +" + std::to_string(bytes) +
                                   ") is not a whole number of " + std::to_string(piece) + "-byte handles");
        }
        scoped_context current(context_);
        repair_zero_pages();
        std::map<std::size_t, extent> made;  // rolled back (undo) if anything throws
        try {
            for (std::size_t off = offset; off < offset + bytes; off += piece) {
                extent e;
                e.memory = take_cached(piece);
                e.reused = static_cast<bool>(e.memory);
                if (!e.reused) {
                    e.memory = create(piece, bytes);  // before the zero page goes: the likely failure
                }
                try {
                    // The zero page leaves the piece only once its handle exists (creation is
                    // the likely failure), and comes back if anything after that fails.
                    take_zero_page_away(off, piece);
                    e.map = mapping(reservation_.base() + off, e.memory, access_);
                    made.emplace(off, std::move(e));  // on bad_alloc `e` is left intact
                } catch (...) {
                    undo(e);  // the piece in hand: a kept handle goes back to the cache
                    put_zero_page_back(off, piece);
                    throw;
                }
            }
        } catch (...) {
            for (auto& [off, e] : made) {
                undo(e);
                put_zero_page_back(off, piece);
            }
            throw;
        }
        for (const auto& [off, e] : made) {
            reused_ += e.reused ? 1 : 0;
        }
        forget_holes(offset, bytes);  // committed now: no zero page is owed there
        extents_.merge(made);  // moves nodes: cannot throw
        pages_.mark(offset, bytes, true);
    }

    /// Unmaps and releases (or keeps, up to max_cached_handles) [offset, offset+bytes), which
    /// must consist of whole handles; lowest offset first.
    ///
    /// A driver failure is reported, and what it touched never serves again:
    /// - cuMemUnmap of a handle fails: decommit stops there and throws cuda_error (call()
    ///   "cuMemUnmap", the offset in the message). The handles before it are decommitted as
    ///   usual; that handle and the ones after it stay exactly as they were (mapped, their pages
    ///   committed). A handle whose unmap failed is never kept for reuse.
    /// - cuMemRelease fails after a successful unmap: the handle is dropped (never kept, never
    ///   mapped again), its bytes are added to leaked_bytes() and its pages are decommitted; the
    ///   rest of the range is decommitted, then cuda_error ("cuMemRelease") is thrown.
    /// If both happen, the cuMemUnmap failure is the one thrown. committed_bytes() tells the
    /// caller what happened: unchanged, nothing was given back and the range is usable as before
    /// (a pool keeps it as a spare and tries again later); lower, part of it went and the rest
    /// may still hold device memory (a pool retires the unit: never committed, decommitted or
    /// handed out again, and still charged).
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
        repair_zero_pages();
        failed_call failed;
        auto it = first;
        for (; it != last; ++it) {
            extent& e = it->second;
            const std::size_t handle_bytes = e.memory.bytes();
            if (CUresult rc = e.map.unmap(); rc != CUDA_SUCCESS) {
                failed = {"cuMemUnmap", rc, it->first, handle_bytes};
                break;  // this handle and the ones after it stay mapped and committed
            }
            put_zero_page_back(it->first, handle_bytes);  // a failure leaves a hole, counted, retried
            if (keep(e.memory)) {
                continue;
            }
            if (CUresult rc = e.memory.release(); rc != CUDA_SUCCESS) {
                leaked_bytes_ += handle_bytes;
                if (failed.call == nullptr) {
                    failed = {"cuMemRelease", rc, it->first, handle_bytes};
                }
            }
        }
        const std::size_t done = (it == last ? end : it->first) - offset;
        extents_.erase(first, it);
        if (done > 0) {
            pages_.mark(offset, done, false);
        }
        if (failed.call != nullptr) {
            throw handle_error(failed);
        }
    }

    /// Whether `device` may read and write the span (the backing's device, or one of
    /// vmm_options::peer_devices): copies from another GPU can go direct.
    [[nodiscard]] bool grants_access(int device) const noexcept {
        return std::find(access_.begin(), access_.end(), device) != access_.end();
    }

    /// Every committed physical handle as a POSIX file descriptor, lowest offset first, so another
    /// process can map the same pages (vmmpp/interop/shared_pages.hpp passes them over a Unix
    /// socket). The result owns the descriptors (close-on-exec); on failure none is left open.
    [[nodiscard]] std::vector<exported_handle> export_handles() const {
        scoped_context current(context_);
        std::vector<exported_handle> out;
        out.reserve(extents_.size());
        for (const auto& [offset, e] : extents_) {
            out.push_back({offset, e.memory.bytes(), e.memory.export_fd()});
        }
        return out;
    }

    friend constexpr void get_property(const vmm&, device_accessible) noexcept {}

private:
    struct extent {
        physical_allocation memory;  // declared first: destroyed after the mapping
        mapping map;
        bool reused = false;  // taken from the cache by the commit that made it
    };

    /// A driver call of decommit that failed, on the handle at `offset`.
    struct failed_call {
        const char* call = nullptr;
        CUresult rc = CUDA_SUCCESS;
        std::size_t offset = 0;
        std::size_t bytes = 0;
    };
    [[nodiscard]] static cuda_error handle_error(const failed_call& f) {
        const auto& d = driver::get();
        const char* name = nullptr;
        const char* text = nullptr;
        d.get_error_name(f.rc, &name);
        d.get_error_string(f.rc, &text);
        return cuda_error(f.call, static_cast<int>(f.rc), name ? name : "unknown",
                          std::string(text ? text : "") + " (vmm decommit of the " + std::to_string(f.bytes) +
                              "-byte handle at offset " + std::to_string(f.offset) + ")");
    }

    /// Rolls back one piece of a failed commit: unmaps it, then puts a kept handle back in the
    /// cache (there is room: this commit took it out) and releases a created one. A handle whose
    /// unmap failed is released, never kept.
    void undo(extent& e) noexcept {
        if (e.map.unmap() == CUDA_SUCCESS && e.reused && keep(e.memory)) {
            return;
        }
        e.memory.reset();
    }

    // The zero page (vmm_options::unbacked). zero_mapped_[p] says whether it is mapped at page p;
    // holes_ lists uncommitted pages where mapping it back failed (retried by the next commit or
    // decommit). The driver calls go straight through the table: one mapping object per page of
    // a large reservation would cost host memory for nothing.

    [[nodiscard]] CUmemAccess_flags zero_page_flags() const noexcept {
        return unbacked_ == unbacked_access::zeros ? CU_MEM_ACCESS_FLAGS_PROT_READ : CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    }
    [[nodiscard]] std::vector<CUmemAccessDesc> access_descs(CUmemAccess_flags flags, bool own_device_only) const {
        std::vector<CUmemAccessDesc> descs(own_device_only ? 1 : access_.size());
        for (std::size_t i = 0; i < descs.size(); ++i) {
            descs[i].location.type = CU_MEM_LOCATION_TYPE_DEVICE;
            descs[i].location.id = access_[i];
            descs[i].flags = flags;
        }
        return descs;
    }

    /// Creates the zero page, fills it with zeros through a read-write mapping at page 0, then
    /// maps it under every page and sets the final access over the whole span in one call. On
    /// failure every zero mapping made is undone and the error propagates.
    void map_zero_page_everywhere() {
        const std::size_t g = pages_.granularity();
        const std::size_t n = pages_.capacity() / g;
        const auto& d = driver::get();
        zero_page_ = physical_allocation(device_ordinal(), g);
        zero_mapped_.assign(n, false);
        try {
            driver::check(d.mem_map(reservation_.base(), g, 0, zero_page_.get(), 0), "cuMemMap");
            zero_mapped_[0] = true;
            const auto fill = access_descs(CU_MEM_ACCESS_FLAGS_PROT_READWRITE, true);
            driver::check(d.mem_set_access(reservation_.base(), g, fill.data(), fill.size()), "cuMemSetAccess");
            // Physical memory from cuMemCreate is not guaranteed to be zero.
            const std::vector<std::byte> zeros(g);
            driver::check(d.memcpy_htod_async(reservation_.base(), zeros.data(), g, nullptr), "cuMemcpyHtoDAsync");
            stream_event done = stream_event::create();
            done.record(nullptr);
            done.synchronize();
            for (std::size_t p = 1; p < n; ++p) {
                driver::check(d.mem_map(reservation_.base() + p * g, g, 0, zero_page_.get(), 0), "cuMemMap");
                zero_mapped_[p] = true;
            }
            const auto descs = access_descs(zero_page_flags(), false);
            driver::check(d.mem_set_access(reservation_.base(), n * g, descs.data(), descs.size()), "cuMemSetAccess");
        } catch (...) {
            unmap_zero_pages(0, n);
            zero_page_.reset();
            throw;
        }
    }

    /// Unmaps the zero page from pages [first, first+count) where it is mapped; never throws
    /// (destructor, construction rollback).
    void unmap_zero_pages(std::size_t first, std::size_t count) noexcept {
        const std::size_t g = pages_.granularity();
        for (std::size_t p = first; p < first + count && p < zero_mapped_.size(); ++p) {
            if (zero_mapped_[p] && driver::get().mem_unmap(reservation_.base() + p * g, g) == CUDA_SUCCESS) {
                zero_mapped_[p] = false;
            }
        }
    }

    /// Unmaps the zero page from [offset, offset+bytes) so a handle can be mapped there; throws
    /// cuda_error ("cuMemUnmap") at the first page the driver refuses, the pages before it
    /// unmapped (the caller puts them back).
    void take_zero_page_away(std::size_t offset, std::size_t bytes) {
        if (!zero_page_) {
            return;
        }
        const std::size_t g = pages_.granularity();
        for (std::size_t p = offset / g; p < (offset + bytes) / g; ++p) {
            if (zero_mapped_[p]) {
                driver::check(driver::get().mem_unmap(reservation_.base() + p * g, g), "cuMemUnmap");
                zero_mapped_[p] = false;
            }
        }
    }

    /// Maps the zero page at every page of [offset, offset+bytes) that lacks it (nothing else is
    /// mapped there), with one cuMemSetAccess per run of pages mapped. Never throws: a page it
    /// cannot map is a hole (unzeroed_bytes()), retried later.
    void put_zero_page_back(std::size_t offset, std::size_t bytes) noexcept {
        if (!zero_page_) {
            return;
        }
        const auto& d = driver::get();
        const std::size_t g = pages_.granularity();
        const std::size_t end = (offset + bytes) / g;
        std::vector<CUmemAccessDesc> descs;
        try {
            descs = access_descs(zero_page_flags(), false);
        } catch (...) {
            // Out of host memory for a handful of descriptors: every page becomes a hole.
        }
        std::size_t p = offset / g;
        while (p < end) {
            if (zero_mapped_[p]) {
                ++p;
                continue;
            }
            const std::size_t run = p;  // map a run of missing pages, then open it in one call
            while (p < end && !zero_mapped_[p] && !descs.empty() &&
                   d.mem_map(reservation_.base() + p * g, g, 0, zero_page_.get(), 0) == CUDA_SUCCESS) {
                zero_mapped_[p] = true;
                ++p;
            }
            if (p > run &&
                d.mem_set_access(reservation_.base() + run * g, (p - run) * g, descs.data(), descs.size()) != CUDA_SUCCESS) {
                for (std::size_t q = run; q < p; ++q) {
                    (void)d.mem_unmap(reservation_.base() + q * g, g);
                    zero_mapped_[q] = false;
                }
            }
            for (std::size_t q = run; q < p; ++q) {
                if (zero_mapped_[q]) {
                    holes_.erase(q);
                } else {
                    note_hole(q);
                }
            }
            if (p < end && !zero_mapped_[p]) {
                note_hole(p);  // the page whose cuMemMap failed
                ++p;
            }
        }
    }
    void note_hole(std::size_t page) noexcept {
        try {
            holes_.insert(page);
        } catch (...) {
            // Out of host memory: the hole is not remembered; reads there fault as without the option.
        }
    }
    /// Pages now committed are no longer holes.
    void forget_holes(std::size_t offset, std::size_t bytes) noexcept {
        const std::size_t g = pages_.granularity();
        holes_.erase(holes_.lower_bound(offset / g), holes_.lower_bound((offset + bytes) / g));
    }
    /// Tries again to map the zero page at every hole.
    void repair_zero_pages() noexcept {
        const std::vector<std::size_t> pages = [&]() noexcept {
            try {
                return std::vector<std::size_t>(holes_.begin(), holes_.end());
            } catch (...) {
                return std::vector<std::size_t>{};
            }
        }();
        for (std::size_t p : pages) {
            put_zero_page_back(p * pages_.granularity(), pages_.granularity());
        }
    }

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
    /// Moves a handle into the cache if there is room (true); otherwise leaves it to the caller.
    /// Only for a handle that is unmapped: the caller has seen its unmap succeed.
    bool keep(physical_allocation& memory) noexcept {
        if (cache_.size() < max_cached_handles_ && cache_.capacity() > cache_.size()) {
            cached_bytes_ += memory.bytes();
            cache_.push_back(std::move(memory));  // reserved: cannot throw
            return true;
        }
        return false;
    }
    physical_allocation create(std::size_t piece, std::size_t request) {
        try {
            return physical_allocation(device_ordinal(), piece, gpu_direct_rdma_);
        } catch (const cuda_error& err) {
            if (err.code() == CUDA_ERROR_OUT_OF_MEMORY) {
                throw out_of_memory("device " + std::to_string(device_ordinal()) + " physical memory (cuMemCreate)",
                                    request, committed_bytes(), capacity());
            }
            throw;
        }
    }

    primary_context context_;
    detail::commit_map pages_;
    std::size_t handle_bytes_;
    std::size_t max_cached_handles_;
    unbacked_access unbacked_;
    bool gpu_direct_rdma_;  // handles are created GPUDirect RDMA capable
    std::vector<int> access_;
    address_reservation reservation_;
    physical_allocation zero_page_;   // empty with unbacked_access::fault
    std::vector<bool> zero_mapped_;   // per page: the zero page is mapped there
    std::set<std::size_t> holes_;     // uncommitted pages missing the zero page
    std::map<std::size_t, extent> extents_;
    std::vector<physical_allocation> cache_;  // unmapped handles kept for reuse, newest last
    std::size_t cached_bytes_ = 0;
    std::size_t reused_ = 0;
    std::size_t leaked_bytes_ = 0;
};

static_assert(backing<vmm>, "vmmpp::vmm must model vmmpp::backing");
static_assert(handle_keeping_backing<vmm> && context_binding_backing<vmm> && handle_exporting_backing<vmm>,
              "vmmpp::vmm keeps handles, binds its context to a thread and exports its handles");

} // namespace vmmpp
