// vmmpp/detail/commit_map.hpp: which granules of a backing are committed, and the argument
// checks every backing shares (alignment, bounds, state), so each rejects misuse the same way.
#pragma once

#include <cstddef>
#include <new>
#include <string>
#include <vector>

#include "vmmpp/error.hpp"

namespace vmmpp::detail {

/// One bit per granule of a span; answers "is this range entirely (un)committed".
class commit_map {
public:
    commit_map(std::size_t capacity, std::size_t granularity) : granularity_(granularity) {
        if (granularity == 0) {
            throw invalid_argument("granularity must not be zero");
        }
        if (capacity == 0 || capacity % granularity != 0) {
            throw invalid_argument("capacity " + std::to_string(capacity) +
                                   " bytes must be a non-zero multiple of the granularity " +
                                   std::to_string(granularity) + " bytes");
        }
        try {
            committed_.assign(capacity / granularity, false);
        } catch (const std::bad_alloc&) {
            throw out_of_memory("host memory for the page map of a " + std::to_string(capacity) + "-byte span",
                                capacity / granularity / 8, 0, 0);
        }
    }

    [[nodiscard]] std::size_t granularity() const noexcept { return granularity_; }
    [[nodiscard]] std::size_t capacity() const noexcept { return committed_.size() * granularity_; }
    [[nodiscard]] std::size_t committed_bytes() const noexcept { return committed_granules_ * granularity_; }

    /// Throws invalid_argument unless [offset, offset+bytes) is non-empty, aligned, inside the
    /// span and entirely in the state `operation` needs (uncommitted for "commit", committed
    /// for "decommit").
    void check(const char* operation, std::size_t offset, std::size_t bytes, bool want_committed) const {
        const auto range = [&] {
            return "[" + std::to_string(offset) + ", +" + std::to_string(bytes) + ")";
        };
        if (bytes == 0) {
            throw invalid_argument(std::string(operation) + " of zero bytes at offset " + std::to_string(offset));
        }
        if (offset % granularity_ != 0 || bytes % granularity_ != 0) {
            throw invalid_argument(std::string(operation) + " range " + range() +
                                   " is not aligned to the granularity " + std::to_string(granularity_) + " bytes");
        }
        if (offset > capacity() || bytes > capacity() - offset) {
            throw invalid_argument(std::string(operation) + " range " + range() + " lies beyond the capacity " +
                                   std::to_string(capacity()) + " bytes");
        }
        for (std::size_t g = offset / granularity_, end = g + bytes / granularity_; g < end; ++g) {
            if (committed_[g] != want_committed) {
                throw invalid_argument(std::string(operation) + " range " + range() + ": granule at offset " +
                                       std::to_string(g * granularity_) + " is " +
                                       (want_committed ? "not committed" : "already committed"));
            }
        }
    }

    /// Marks a checked range committed or not. Never throws.
    void mark(std::size_t offset, std::size_t bytes, bool committed) noexcept {
        for (std::size_t g = offset / granularity_, end = g + bytes / granularity_; g < end; ++g) {
            if (committed_[g] != committed) {
                committed_[g] = committed;
                committed ? ++committed_granules_ : --committed_granules_;
            }
        }
    }

private:
    std::size_t granularity_;
    std::size_t committed_granules_ = 0;
    std::vector<bool> committed_;
};

inline constexpr std::size_t default_page_bytes = std::size_t{2} << 20;  // 2 MiB, the VMM granularity of current NVIDIA GPUs

} // namespace vmmpp::detail
