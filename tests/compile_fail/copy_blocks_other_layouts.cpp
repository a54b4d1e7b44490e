// Must not compile: copy_blocks between caches whose layouts are neither the same nor one
// blocks_contiguous over the other (a block's pieces would not match).
#include <cstdint>
#include <span>

#include "vmmpp/config.hpp"
#include "vmmpp/kv/transfer.hpp"
void copy(vmmpp::kv_cache<vmmpp::host_config, vmmpp::layer_major>& a,
          vmmpp::kv_cache<vmmpp::host_config, vmmpp::packed_kv>& b, std::span<const std::int32_t> ids) {
    vmmpp::copy_blocks(a, ids, b, ids);
}
int main() { return 0; }
