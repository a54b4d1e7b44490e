// vmmpp/detail/range_counts.hpp: how many holds cover each byte of a span, as a step function.
// A pool counts holds per page, which cannot tell a double release from a release of another
// range on the same page; debug builds also keep these byte-exact counts to catch it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <iterator>
#include <map>

namespace vmmpp::detail {

/// Hold counts over byte ranges: add, check and remove [offset, offset+bytes) in O(log n + k).
/// Ranges may be released in other pieces than they were held in, as long as every byte is held.
class range_counts {
public:
    /// One more hold on every byte of [offset, offset+bytes).
    void add(std::size_t offset, std::size_t bytes) {
        auto first = split(offset);
        auto last = split(offset + bytes);
        for (auto it = first; it != last; ++it) {
            ++it->second;
        }
    }
    /// Whether every byte of [offset, offset+bytes) is held at least once.
    [[nodiscard]] bool covers(std::size_t offset, std::size_t bytes) const {
        auto it = steps_.upper_bound(offset);
        if (it == steps_.begin() || std::prev(it)->second == 0) {
            return false;
        }
        for (; it != steps_.end() && it->first < offset + bytes; ++it) {
            if (it->second == 0) {
                return false;
            }
        }
        return true;
    }
    /// One hold less on every byte of [offset, offset+bytes), which covers() must have said.
    void remove(std::size_t offset, std::size_t bytes) {
        auto first = split(offset);
        auto last = split(offset + bytes);
        for (auto it = first; it != last; ++it) {
            --it->second;
        }
        merge_around(offset);
        merge_around(offset + bytes);
    }
    [[nodiscard]] bool empty() const noexcept { return steps_.empty(); }

private:
    /// A step starting exactly at `at` (with the count that held there).
    std::map<std::size_t, std::uint32_t>::iterator split(std::size_t at) {
        auto next = steps_.upper_bound(at);
        if (next != steps_.begin() && std::prev(next)->first == at) {
            return std::prev(next);
        }
        const std::uint32_t count = next == steps_.begin() ? 0 : std::prev(next)->second;
        return steps_.emplace_hint(next, at, count);
    }
    /// Drops the step at `at` if it and the stretch before it are both unheld. Steps inside held
    /// stretches stay, so releasing exactly what was held finds its boundaries and never allocates.
    void merge_around(std::size_t at) noexcept {
        auto it = steps_.find(at);
        if (it == steps_.end() || it->second != 0) {
            return;
        }
        if (it == steps_.begin() || std::prev(it)->second == 0) {
            steps_.erase(it);
        }
    }

    std::map<std::size_t, std::uint32_t> steps_;  // count from key up to the next key
};

} // namespace vmmpp::detail
