// vmmpp/kv/sleep.hpp: the types of a kv_cache's sleep and wake (kv_cache::sleep, kv_cache::wake):
// an idle model's cache copies its live blocks to a host buffer and gives back all of its device
// memory, keeping its address reservation and every sequence; waking commits the same offsets
// again and copies the blocks back, so block ids, block tables, addresses and tensor
// descriptors stay valid.
#pragma once

#include <cstddef>
#include <string>

#include "vmmpp/error.hpp"

namespace vmmpp {

/// A call that needs the cache's memory was made while the cache sleeps (append, truncate, free,
/// sleep), or one of its blocks was asked to move. The cache is unchanged; wake() it first.
class cache_asleep : public error {
public:
    explicit cache_asleep(const std::string& operation)
        : error("vmmpp::kv_cache::" + operation + " while the cache sleeps: wake() it first"), operation_(operation) {}
    /// The refused operation ("append", "free", ...).
    [[nodiscard]] const std::string& operation() const noexcept { return operation_; }

private:
    std::string operation_;
};

/// What kv_cache::sleep or kv_cache::wake did.
struct sleep_result {
    std::size_t bytes_copied = 0;  ///< live block bytes copied (to the host on sleep, back on wake)
    std::size_t ranges = 0;        ///< contiguous ranges they formed (one copy call each)
    std::size_t blocks = 0;        ///< live blocks
    /// sleep: bytes of device memory the pool gave back (its committed bytes before, less after).
    /// wake: bytes it committed.
    std::size_t pool_bytes = 0;
};

} // namespace vmmpp
