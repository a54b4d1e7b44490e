#include <vmmpp/backing/host.hpp>

#include <cstddef>
#include <cstdio>
#include <cstring>

int main() {
    constexpr std::size_t two_mib = std::size_t{2} << 20;
    vmmpp::host h(4 << 20);
    h.commit(0, two_mib);
    std::memset(h.base(), 0x5a, two_mib);
    const bool ok = h.committed_bytes() == two_mib && h.base()[two_mib - 1] == std::byte{0x5a};
    h.decommit(0, two_mib);
    if (!ok || h.committed_bytes() != 0) {
        std::puts("FAIL");
        return 1;
    }
    std::puts("OK");
    return 0;
}
