// What an inference engine's first contact with vmmpp looks like, built by each packaging test
// against vmmpp as that test delivers it (installed, vendored, or through pkg-config): reserve
// 4 MiB of host memory, commit the first 2 MiB, write to it, give it back.
#include <vmmpp/backing/host.hpp>

#include <cstddef>
#include <cstdio>
#include <cstring>
#include <exception>

int main() {
    try {
        constexpr std::size_t two_mib = std::size_t{2} << 20;
        vmmpp::host h(4 << 20);
        h.commit(0, two_mib);
        std::memset(h.base(), 0x5a, two_mib);
        if (h.committed_bytes() != two_mib || h.base()[two_mib - 1] != std::byte{0x5a}) {
            std::fprintf(stderr, "FAIL: committed %zu bytes, expected %zu\n", h.committed_bytes(), two_mib);
            return 1;
        }
        h.decommit(0, two_mib);
        if (h.committed_bytes() != 0) {
            std::fprintf(stderr, "FAIL: %zu bytes still committed after decommit\n", h.committed_bytes());
            return 1;
        }
        std::puts("OK");
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "FAIL: %s\n", e.what());
        return 1;
    }
}
