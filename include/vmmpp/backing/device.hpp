// vmmpp/backing/device.hpp: the static layout: one cudaMalloc of the whole capacity up front,
// as static engines do. Commit and decommit only account; the memory never changes.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "vmmpp/backing/concept.hpp"
#include "vmmpp/detail/commit_map.hpp"
#include "vmmpp/driver/context.hpp"
#include "vmmpp/error.hpp"

namespace vmmpp {

/// Construction options of vmmpp::device.
struct device_options {
    int device = 0;
    /// Accounting unit for commit/decommit.
    std::size_t page_bytes = detail::default_page_bytes;
};

/// Device backing: one cudaMalloc of `capacity` bytes, held until destruction.
class device {
public:
    using options = device_options;
    static constexpr bool is_elastic = false;

    explicit device(std::size_t capacity, options opts = {})
        : context_(opts.device), pages_(capacity, opts.page_bytes) {
        scoped_context current(context_);
        void* p = nullptr;
        if (cudaError_t rc = ::cudaMalloc(&p, capacity); rc != cudaSuccess) {
            (void)::cudaGetLastError();
            if (rc == cudaErrorMemoryAllocation) {
                throw out_of_memory("device " + std::to_string(opts.device) + " memory (cudaMalloc)", capacity, 0, 0);
            }
            driver::check(rc, "cudaMalloc");
        }
        base_ = static_cast<std::byte*>(p);
    }
    device(const device&) = delete;
    device& operator=(const device&) = delete;
    ~device() {
        scoped_context current(context_);
        (void)::cudaFree(base_);
    }

    [[nodiscard]] std::size_t granularity() const noexcept { return pages_.granularity(); }
    [[nodiscard]] std::byte* base() const noexcept { return base_; }
    [[nodiscard]] std::size_t capacity() const noexcept { return pages_.capacity(); }
    [[nodiscard]] std::size_t committed_bytes() const noexcept { return pages_.committed_bytes(); }
    [[nodiscard]] int device_ordinal() const noexcept { return context_.ordinal(); }

    /// Marks a range in use (the memory is already there).
    void commit(std::size_t offset, std::size_t bytes) {
        pages_.check("commit", offset, bytes, false);
        pages_.mark(offset, bytes, true);
    }
    /// Marks a range unused (the memory stays allocated).
    void decommit(std::size_t offset, std::size_t bytes) {
        pages_.check("decommit", offset, bytes, true);
        pages_.mark(offset, bytes, false);
    }

    friend constexpr void get_property(const device&, device_accessible) noexcept {}

private:
    primary_context context_;
    detail::commit_map pages_;
    std::byte* base_ = nullptr;
};

static_assert(backing<device>, "vmmpp::device must model vmmpp::backing");

} // namespace vmmpp
