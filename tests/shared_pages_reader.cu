// Helper process of test_gpu_shared_pages: receives another process's KV pages over the Unix
// socket given as argv[1], maps them, checks the owner's pattern in every mapped page, writes a
// second pattern into the first page, and answers {mismatched words, bytes checked}.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <exception>

#include "support/pattern.cuh"
#include "vmmpp/interop/shared_pages.hpp"

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: shared_pages_reader <socket fd>\n");
        return 2;
    }
    const int socket = std::atoi(argv[1]);
    try {
        vmmpp::imported_pages pages(socket, 0);
        if (cudaSetDevice(0) != cudaSuccess) {
            return 3;
        }
        unsigned long long* bad = nullptr;
        if (cudaMalloc(&bad, sizeof *bad) != cudaSuccess || cudaMemset(bad, 0, sizeof *bad) != cudaSuccess) {
            return 3;
        }
        const std::size_t page = vmmpp::vmm_granularity(0);
        unsigned long long checked = 0;
        std::size_t first = pages.capacity();
        for (std::size_t off = 0; off < pages.capacity(); off += page) {
            if (pages.is_mapped(off, page)) {
                vmmpp_test::check_pattern<<<64, 256>>>(reinterpret_cast<unsigned*>(pages.base() + off), page, off, 0xabcdu,
                                                        bad);
                checked += page;
                first = std::min(first, off);
            }
        }
        if (first < pages.capacity()) {  // answer through the shared memory too
            vmmpp_test::fill_pattern<<<64, 256>>>(reinterpret_cast<unsigned*>(pages.base() + first), page, first, 0x1234u);
        }
        unsigned long long mismatches = 0;
        if (cudaDeviceSynchronize() != cudaSuccess ||
            cudaMemcpy(&mismatches, bad, sizeof mismatches, cudaMemcpyDeviceToHost) != cudaSuccess) {
            return 3;
        }
        const unsigned long long answer[2] = {mismatches, checked};
        if (::write(socket, answer, sizeof answer) != static_cast<ssize_t>(sizeof answer)) {
            return 4;
        }
        cudaFree(bad);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "shared_pages_reader: %s\n", e.what());
        return 1;
    }
    return 0;
}
