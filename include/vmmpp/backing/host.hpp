// vmmpp/backing/host.hpp: CPU memory with the same reserve/commit/decommit life as GPU VMM
// memory. It is the CPU tier of a KV cache and what CI (no GPU) exercises for real.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <string>
#include <utility>

#include "vmmpp/backing/concept.hpp"
#include "vmmpp/detail/commit_map.hpp"
#include "vmmpp/error.hpp"

namespace vmmpp {

/// Construction options of vmmpp::host.
struct host_options {
    /// Commit unit; a multiple of the OS page size. 2 MiB by default, like a GPU's VMM granule.
    std::size_t page_bytes = detail::default_page_bytes;
};

/// Host backing: mmap(PROT_NONE) reserves the capacity; `commit` makes a range read/write;
/// `decommit` gives its pages back to the OS (MADV_DONTNEED, then PROT_NONE), so resident
/// memory falls and a later commit reads zeros.
class host {
public:
    using options = host_options;
    static constexpr bool is_elastic = true;

    explicit host(std::size_t capacity, options opts = {})
        : reservation_(capacity, checked_page_bytes(opts.page_bytes)), pages_(capacity, opts.page_bytes) {}
    host(const host&) = delete;
    host& operator=(const host&) = delete;
    ~host() = default;

    [[nodiscard]] std::size_t granularity() const noexcept { return pages_.granularity(); }
    [[nodiscard]] std::byte* base() const noexcept { return reservation_.base(); }
    [[nodiscard]] std::size_t capacity() const noexcept { return pages_.capacity(); }
    [[nodiscard]] std::size_t committed_bytes() const noexcept { return pages_.committed_bytes(); }

    /// Makes [offset, offset+bytes) readable and writable. Strong guarantee.
    void commit(std::size_t offset, std::size_t bytes) {
        pages_.check("commit", offset, bytes, false);
        if (::mprotect(base() + offset, bytes, PROT_READ | PROT_WRITE) != 0) {
            const int err = errno;
            (void)::mprotect(base() + offset, bytes, PROT_NONE);
            throw out_of_memory("host commit (mprotect: " + std::string(std::strerror(err)) + ")", bytes,
                                committed_bytes(), capacity());
        }
        pages_.mark(offset, bytes, true);
    }

    /// Throws invalid_argument, naming `operation`, unless [offset, offset+bytes) is committed
    /// and aligned (what decommit checks first).
    void check_committed(const char* operation, std::size_t offset, std::size_t bytes) const {
        pages_.check(operation, offset, bytes, true);
    }

    /// Gives [offset, offset+bytes) back to the OS and makes it inaccessible again.
    void decommit(std::size_t offset, std::size_t bytes) {
        pages_.check("decommit", offset, bytes, true);
        if (::madvise(base() + offset, bytes, MADV_DONTNEED) != 0 ||
            ::mprotect(base() + offset, bytes, PROT_NONE) != 0) {
            throw invalid_argument("host decommit failed: " + std::string(std::strerror(errno)));
        }
        pages_.mark(offset, bytes, false);
    }

    friend constexpr void get_property(const host&, host_accessible) noexcept {}

private:
    static std::size_t checked_page_bytes(std::size_t page_bytes) {
        const auto os_page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
        if (page_bytes == 0 || page_bytes % os_page != 0) {
            throw invalid_argument("host page_bytes " + std::to_string(page_bytes) +
                                   " must be a non-zero multiple of the OS page size " + std::to_string(os_page));
        }
        return page_bytes;
    }

    /// The mmap(PROT_NONE) address range; unmapped on destruction.
    class reservation {
    public:
        reservation(std::size_t bytes, std::size_t page_bytes) : bytes_(bytes) {
            if (bytes == 0 || bytes % page_bytes != 0) {
                throw invalid_argument("capacity " + std::to_string(bytes) +
                                       " bytes must be a non-zero multiple of the page size " +
                                       std::to_string(page_bytes) + " bytes");
            }
            void* p = ::mmap(nullptr, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (p == MAP_FAILED) {
                throw out_of_memory("host address space (mmap: " + std::string(std::strerror(errno)) + ")", bytes,
                                    0, 0);
            }
            base_ = static_cast<std::byte*>(p);
        }
        reservation(const reservation&) = delete;
        reservation& operator=(const reservation&) = delete;
        ~reservation() { ::munmap(base_, bytes_); }
        [[nodiscard]] std::byte* base() const noexcept { return base_; }

    private:
        std::byte* base_ = nullptr;
        std::size_t bytes_;
    };

    reservation reservation_;  // first: the page map is only built once the range exists
    detail::commit_map pages_;
};

static_assert(backing<host>, "vmmpp::host must model vmmpp::backing");
static_assert(has_property<host, host_accessible> && !has_property<host, device_accessible>);

} // namespace vmmpp
