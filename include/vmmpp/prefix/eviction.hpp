// vmmpp/prefix/eviction.hpp: the eviction policy of a prefix cache: in which order its cached
// blocks are given up. The policy only orders; which blocks may go (those no sequence holds) and
// how they are grouped into whole pages is the prefix cache's to say.
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <list>
#include <string>
#include <unordered_map>
#include <utility>

#include "vmmpp/error.hpp"

namespace vmmpp {

namespace detail {
/// A callable of the shape for_each_oldest takes, for the concept's check.
struct eviction_visitor {
    bool operator()(std::int32_t) const noexcept { return true; }
};
} // namespace detail

/// What prefix_cache needs of an eviction policy (default constructible):
/// - `insert(block)`: a block enters the cache (strong: a throw leaves the policy as it was);
/// - `touch(block)`: a cached block was used now (a hit, a publish); never throws;
/// - `erase(block)`: a cached block left the cache; never throws;
/// - `replace(from, to)`: cached block `from` now lives at id `to` (compaction moved it; `to` is
///   not in the policy), keeping its place in the order; never throws;
/// - `for_each_oldest(f)` (const): calls f(block) for every cached block, the first to evict
///   first, until f returns false;
/// - `size()`: how many blocks it orders.
template <class P>
concept eviction_policy = std::default_initializable<P> &&
                          requires(P& p, const P& cp, std::int32_t block, detail::eviction_visitor f) {
                              p.insert(block);
                              { p.touch(block) } noexcept;
                              { p.erase(block) } noexcept;
                              { p.replace(block, block) } noexcept;
                              cp.for_each_oldest(f);
                              { cp.size() } -> std::same_as<std::size_t>;
                          };

/// Least recently used first: a block's age is its last insert or touch. prefix_cache touches a
/// prompt's blocks last to first, so a prompt's tail goes before its head (as vLLM frees them),
/// and a shared system prompt, touched by every request, goes last.
class lru_eviction {
public:
    void insert(std::int32_t block) {
        if (where_.contains(block)) {
            throw invalid_argument("lru_eviction: block " + std::to_string(block) + " inserted twice");
        }
        order_.push_back(block);  // may throw: nothing changed
        try {
            where_.emplace(block, std::prev(order_.end()));
        } catch (...) {
            order_.pop_back();
            throw;
        }
    }
    void touch(std::int32_t block) noexcept {
        if (auto it = where_.find(block); it != where_.end()) {
            order_.splice(order_.end(), order_, it->second);  // iterators stay valid
        }
    }
    void erase(std::int32_t block) noexcept {
        if (auto it = where_.find(block); it != where_.end()) {
            order_.erase(it->second);
            where_.erase(it);
        }
    }
    void replace(std::int32_t from, std::int32_t to) noexcept {
        if (auto node = where_.extract(from); !node.empty()) {
            *node.mapped() = to;
            node.key() = to;
            where_.insert(std::move(node));  // as many entries as before: no rehash, no allocation
        }
    }
    template <class F>
    void for_each_oldest(F&& f) const {
        for (std::int32_t b : order_) {
            if (!f(b)) {
                return;
            }
        }
    }
    [[nodiscard]] std::size_t size() const noexcept { return order_.size(); }

private:
    std::list<std::int32_t> order_;  // oldest first
    std::unordered_map<std::int32_t, std::list<std::int32_t>::iterator> where_;
};
static_assert(eviction_policy<lru_eviction>, "vmmpp::lru_eviction does not model vmmpp::eviction_policy");

} // namespace vmmpp
