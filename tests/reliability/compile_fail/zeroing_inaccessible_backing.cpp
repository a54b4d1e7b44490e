// Must not compile: zeroing over a backing that declares neither host_accessible nor
// device_accessible (nothing could write its zeros).
#include <cstddef>

#include "vmmpp/backing/zeroing.hpp"

struct opaque {
    struct options {};
    static constexpr bool is_elastic = true;
    opaque(std::size_t, options) {}
    std::size_t granularity() const { return 1; }
    std::byte* base() const { return nullptr; }
    std::size_t capacity() const { return 0; }
    std::size_t committed_bytes() const { return 0; }
    void commit(std::size_t, std::size_t) {}
    void decommit(std::size_t, std::size_t) {}
};
static_assert(vmmpp::backing<opaque>);  // a backing, only not a reachable one
int main() { return sizeof(vmmpp::zeroing<opaque>); }
