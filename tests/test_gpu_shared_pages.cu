// Two real processes, one set of KV pages: this process fills the pages under a kv_cache and
// sends its pool's handles over a Unix socket to shared_pages_reader (fork + exec), which maps
// them, checks every page, and writes back through them.
#define VMMPP_GPU_TEST_NAME "gpu shared pages"
#include "support/gpu_main.hpp"
#include "support/gpu.hpp"

#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <string>

#include "support/pattern.cuh"
#include "vmmpp/config.hpp"
#include "vmmpp/interop/shared_pages.hpp"
#include "vmmpp/kv/cache.hpp"

using namespace vmmpp_test;

BOOST_AUTO_TEST_CASE(a_second_process_reads_and_writes_the_same_kv_pages) {
    cuda_check(cudaSetDevice(0));
    vmmpp::budget budget(4 * GiB);
    vmmpp::kv_cache<vmmpp::elastic_config, vmmpp::block_major> cache(
        {.layers = 4, .kv_heads = 8, .head_dim = 128, .type = vmmpp::dtype::f16, .block_tokens = 16, .max_blocks = 4096},
        {}, {}, budget.register_model("prefill", 4 * GiB));
    const auto seq = cache.add_sequence();
    cache.append(seq, 3000);  // 188 blocks of 128 KiB: 12 pages of 2 MiB
    const auto& pool = cache.pool();
    std::size_t committed = 0;
    for (std::size_t u = 0; u < pool.unit_count(); ++u) {
        if (pool.is_unit_committed(u)) {
            fill_pattern<<<64, 256>>>(reinterpret_cast<unsigned*>(pool.base() + pool.unit_offset_of(u)),
                                      pool.unit_bytes_of(u), pool.unit_offset_of(u), 0xabcdu);
            committed += pool.unit_bytes_of(u);
        }
    }
    cuda_check(cudaDeviceSynchronize());
    BOOST_TEST(committed == pool.committed_bytes());

    int sv[2];
    BOOST_REQUIRE_EQUAL(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    const pid_t child = ::fork();
    BOOST_REQUIRE(child >= 0);
    if (child == 0) {
        const int fd = ::dup(sv[1]);  // without CLOEXEC: the reader inherits it
        const std::string arg = std::to_string(fd);
        ::execl(VMMPP_SHARED_PAGES_READER, VMMPP_SHARED_PAGES_READER, arg.c_str(), static_cast<char*>(nullptr));
        ::_exit(127);
    }
    ::close(sv[1]);
    vmmpp::send_shared_pages(sv[0], pool);  // exported under the pool's lock, sent without it
    unsigned long long answer[2] = {~0ull, 0};
    const ssize_t got = ::read(sv[0], answer, sizeof answer);
    int status = 0;
    ::waitpid(child, &status, 0);
    ::close(sv[0]);
    BOOST_TEST(WIFEXITED(status));
    BOOST_TEST(WEXITSTATUS(status) == 0);
    BOOST_REQUIRE_EQUAL(got, static_cast<ssize_t>(sizeof answer));
    BOOST_TEST(answer[0] == 0u, answer[0] << " words differed in the reader");
    BOOST_TEST(answer[1] == committed);

    // The reader wrote its pattern into the first page: this process sees it.
    unsigned long long* bad = nullptr;
    cuda_check(cudaMalloc(&bad, sizeof *bad));
    cuda_check(cudaMemset(bad, 0, sizeof *bad));
    check_pattern<<<64, 256>>>(reinterpret_cast<const unsigned*>(pool.base()), pool.page_bytes(), 0, 0x1234u, bad);
    unsigned long long mismatches = 1;
    cuda_check(cudaMemcpy(&mismatches, bad, sizeof mismatches, cudaMemcpyDeviceToHost));
    cuda_check(cudaFree(bad));
    BOOST_TEST(mismatches == 0u);
    cache.free(seq);
    BOOST_TEST(pool.committed_bytes() == 0u);  // the reader's mappings are gone with it
}
