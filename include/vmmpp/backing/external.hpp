// vmmpp/backing/external.hpp: memory someone else owns (a PyTorch tensor, an engine's buffer),
// described by pointer and size. vmmpp carves it up and accounts for it, and never frees it.
#pragma once

#include <cstddef>

#include "vmmpp/backing/concept.hpp"
#include "vmmpp/detail/commit_map.hpp"
#include "vmmpp/error.hpp"

namespace vmmpp {

/// Construction options of vmmpp::external.
struct external_options {
    /// First byte of the borrowed span; must outlive the backing.
    void* pointer = nullptr;
    std::size_t page_bytes = detail::default_page_bytes;
    /// The CUDA device the memory lives on, or -1 for host memory.
    int device = -1;
};

/// External (non-owning) backing. `Properties...` says who can reach the memory, e.g.
/// `external<device_accessible>` for a CUDA buffer, `external<host_accessible>` for host memory.
template <class... Properties>
class external {
public:
    using options = external_options;
    static constexpr bool is_elastic = false;

    explicit external(std::size_t capacity, options opts)
        : pages_(capacity, opts.page_bytes), base_(static_cast<std::byte*>(opts.pointer)), device_(opts.device) {
        if (base_ == nullptr) {
            throw invalid_argument("external backing needs a non-null pointer");
        }
    }
    external(const external&) = delete;
    external& operator=(const external&) = delete;
    ~external() = default;

    [[nodiscard]] std::size_t granularity() const noexcept { return pages_.granularity(); }
    [[nodiscard]] std::byte* base() const noexcept { return base_; }
    [[nodiscard]] std::size_t capacity() const noexcept { return pages_.capacity(); }
    [[nodiscard]] std::size_t committed_bytes() const noexcept { return pages_.committed_bytes(); }
    [[nodiscard]] int device_ordinal() const noexcept { return device_; }

    void commit(std::size_t offset, std::size_t bytes) {
        pages_.check("commit", offset, bytes, false);
        pages_.mark(offset, bytes, true);
    }
    void decommit(std::size_t offset, std::size_t bytes) {
        pages_.check("decommit", offset, bytes, true);
        pages_.mark(offset, bytes, false);
    }

    template <class P>
        requires(std::same_as<P, Properties> || ...)
    friend constexpr void get_property(const external&, P) noexcept {}

private:
    detail::commit_map pages_;
    std::byte* base_;
    int device_;
};

static_assert(backing<external<device_accessible>>, "vmmpp::external must model vmmpp::backing");
static_assert(has_property<external<device_accessible>, device_accessible> &&
              !has_property<external<device_accessible>, host_accessible>);

} // namespace vmmpp
