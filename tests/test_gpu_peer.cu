// Peer access and block copies on the GPU. One GPU: copy_blocks between vmm caches (a run of
// blocks crossing a 2 MiB physical handle), and between device and host caches. Two GPUs that
// can reach each other: a kernel on device 1 reads and writes a device-0 cache opened to it with
// vmm_options::peer_devices, and copy_blocks between caches on the two devices. With fewer GPUs
// the two-GPU suite reports itself skipped ("needs two CUDA devices with peer access").
#define VMMPP_GPU_TEST_NAME "gpu peer access and block copies"
#include "support/gpu_main.hpp"
#include "support/gpu.hpp"
#include "support/pattern.cuh"

#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "support/kv_factories.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/driver/device.hpp"
#include "vmmpp/kv/transfer.hpp"

using namespace vmmpp_test;
using vmmpp::kv_part;

namespace {

// The NHD layouts of vmmpp::kv_layouts: block_major (one piece a block) and layer_major (2 x layers).
using layouts = vmmpp::apply_t<vmmpp::nhd_kv_layouts, std::tuple>;
/// vmm without a budget, so a cache on any device is one line.
using peer_config = vmmpp::pool_config<vmmpp::vmm, vmmpp::page_granular, vmmpp::unlimited>;

// A block tensor is 16 * 2 * 32 * 2 = 2 KiB, so 1024 of them fill a 2 MiB page (layer_major);
// a block is 12 KiB, 1024 of them 12 MiB (block_major): blocks 1023 and 1024 lie in different
// physical handles in both layouts.
constexpr vmmpp::kv_geometry geom{.layers = 3, .kv_heads = 2, .head_dim = 32, .type = vmmpp::dtype::f16,
                                  .block_tokens = 16, .max_blocks = 4096};

/// Makes a device current for a scope.
class device_guard {
public:
    explicit device_guard(int device) {
        cuda_check(cudaGetDevice(&old_));
        if (device >= 0) {
            cuda_check(cudaSetDevice(device));
        }
    }
    device_guard(const device_guard&) = delete;
    device_guard& operator=(const device_guard&) = delete;
    ~device_guard() { (void)cudaSetDevice(old_); }

private:
    int old_ = 0;
};

unsigned seed_of(unsigned tag, std::int32_t block, std::uint32_t layer, kv_part part) {
    return tag * 1000003u ^ static_cast<unsigned>(block) * 7919u ^ (2 * layer + static_cast<unsigned>(part)) * 104729u;
}

/// Fills every layer's K and V of each block with the pattern of (tag, block, layer, K/V): by
/// a kernel on the cache's device, or by the host for host memory.
template <class Cache>
void fill_blocks(Cache& c, const std::vector<std::int32_t>& blocks, unsigned tag) {
    const int device = c.pool().device();
    device_guard on(device);
    const std::size_t bytes = c.geometry().block_tensor_bytes();
    for (std::int32_t b : blocks) {
        for (std::uint32_t l = 0; l < c.geometry().layers; ++l) {
            for (auto part : {kv_part::key, kv_part::value}) {
                auto* words = reinterpret_cast<unsigned*>(c.address(l, part, b));
                const unsigned seed = seed_of(tag, b, l, part);
                if (device >= 0) {
                    fill_pattern<<<16, 128>>>(words, bytes, 0, seed);
                    cuda_check(cudaGetLastError());
                } else {
                    for (std::size_t i = 0; i < bytes / 4; ++i) {
                        words[i] = pattern_word(i * 4, seed);
                    }
                }
            }
        }
    }
    if (device >= 0) {
        cuda_check(cudaDeviceSynchronize());
    }
}

/// Words of `block` (every layer's K and V) that differ from the pattern `tag` wrote into block
/// `origin` (copied back with cudaMemcpy).
template <class Cache>
std::size_t mismatches(const Cache& c, std::int32_t block, unsigned tag, std::int32_t origin) {
    device_guard on(c.pool().device());
    const std::size_t bytes = c.geometry().block_tensor_bytes();
    std::vector<unsigned> words(bytes / 4);
    std::size_t bad = 0;
    for (std::uint32_t l = 0; l < c.geometry().layers; ++l) {
        for (auto part : {kv_part::key, kv_part::value}) {
            cuda_check(cudaMemcpy(words.data(), c.address(l, part, block), bytes, cudaMemcpyDefault));
            const unsigned seed = seed_of(tag, origin, l, part);
            for (std::size_t i = 0; i < words.size(); ++i) {
                bad += words[i] != pattern_word(i * 4, seed);
            }
        }
    }
    return bad;
}

std::vector<std::int32_t> iota_blocks(std::int32_t first, std::int32_t count) {
    std::vector<std::int32_t> v(static_cast<std::size_t>(count));
    for (std::int32_t i = 0; i < count; ++i) {
        v[static_cast<std::size_t>(i)] = first + i;
    }
    return v;
}

/// Appends `n_blocks` full blocks to a new sequence; returns its blocks.
template <class Cache>
std::vector<std::int32_t> live_blocks(Cache& c, std::size_t n_blocks) {
    const auto s = c.add_sequence();
    c.append(s, n_blocks * c.geometry().block_tokens);
    const auto t = c.block_table(s);
    return {t.begin(), t.end()};
}

/// Copies `from` of `src` (filled with tag 1) to `to` of `dst` (filled with tag 2) on `stream`,
/// then checks the copied blocks and the untouched ones.
template <class Src, class Dst>
void copy_and_check(Src& src, const std::vector<std::int32_t>& from, Dst& dst, const std::vector<std::int32_t>& to,
                    const std::vector<std::int32_t>& untouched, cudaStream_t stream) {
    vmmpp::copy_blocks(src, from, dst, to, stream);
    cuda_check(cudaStreamSynchronize(stream));
    for (std::size_t i = 0; i < from.size(); ++i) {
        BOOST_TEST(mismatches(dst, to[i], 1, from[i]) == 0u, "dst block " << to[i] << " from src block " << from[i]);
    }
    for (std::int32_t b : untouched) {
        BOOST_TEST(mismatches(dst, b, 2, b) == 0u, "untouched dst block " << b);
    }
    for (std::int32_t b : from) {
        BOOST_TEST(mismatches(src, b, 1, b) == 0u, "src block " << b);
    }
}

/// Blocks 1000..1029 -> 1005..1034 (one run each way, across the 2 MiB handle at block 1024),
/// 0,1,2 -> 10,11,12 (a run) and 3 -> 4 (alone).
const std::vector<std::int32_t> copy_from = [] {
    auto v = iota_blocks(1000, 30);
    v.insert(v.end(), {0, 1, 2, 3});
    return v;
}();
const std::vector<std::int32_t> copy_to = [] {
    auto v = iota_blocks(1005, 30);
    v.insert(v.end(), {10, 11, 12, 4});
    return v;
}();
const std::vector<std::int32_t> untouched{0, 3, 5, 9, 13, 1004, 1035, 1039};

/// Two devices whose memory each can reach.
struct needs_two_peer_gpus {
    boost::test_tools::assertion_result operator()(boost::unit_test::test_unit_id) const {
        const int count = vmmpp::driver::device_count();
        const bool ok = count >= 2 && vmmpp::can_access_peer(0, 1) && vmmpp::can_access_peer(1, 0);
        boost::test_tools::assertion_result r(ok);
        r.message() << "needs two CUDA devices with peer access (" << count << " device(s)"
                    << (count >= 2 ? ", 0 and 1 cannot reach each other" : "") << ")";
        return r;
    }
};

} // namespace

BOOST_AUTO_TEST_SUITE(one_gpu, *boost::unit_test::precondition(needs_gpu{}))

BOOST_AUTO_TEST_CASE_TEMPLATE(copy_blocks_between_vmm_caches, Layout, layouts) {
    kv_factory<kv_case<vmmpp::elastic_config, Layout>> fs, fd;
    auto src = fs.make(geom);
    auto dst = fd.make(geom);
    fill_blocks(*src, live_blocks(*src, 1030), 1);
    fill_blocks(*dst, live_blocks(*dst, 1040), 2);
    cudaStream_t stream = nullptr;
    cuda_check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    copy_and_check(*src, copy_from, *dst, copy_to, untouched, stream);
    cuda_check(cudaStreamDestroy(stream));
    BOOST_TEST(dst->used_blocks() == 1040u);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(copy_blocks_across_configurations, Layout, layouts) {
    // vmm (chunked) -> host (the CPU tier) -> vmm (page granular) -> static (cudaMalloc).
    kv_factory<kv_case<vmm_chunked_config, Layout>> fv;
    kv_factory<kv_case<vmmpp::host_config, Layout>> fh;
    kv_factory<kv_case<vmmpp::elastic_config, Layout>> fe;
    kv_factory<kv_case<vmmpp::static_config, Layout>> fst;
    auto gpu = fv.make(geom);
    auto host = fh.make(geom);
    auto back = fe.make(geom);
    auto fixed = fst.make(geom);
    fill_blocks(*gpu, live_blocks(*gpu, 1030), 1);
    fill_blocks(*host, live_blocks(*host, 1040), 2);
    copy_and_check(*gpu, copy_from, *host, copy_to, untouched, nullptr);  // device -> host
    fill_blocks(*back, live_blocks(*back, 1040), 2);
    // Host -> device: host block copy_to[i] holds tag 1 of block copy_from[i]; copy it to
    // copy_to[i] again and check against the original source.
    vmmpp::copy_blocks(*host, copy_to, *back, copy_to, nullptr);
    cuda_check(cudaDeviceSynchronize());
    for (std::size_t i = 0; i < copy_to.size(); ++i) {
        BOOST_TEST(mismatches(*back, copy_to[i], 1, copy_from[i]) == 0u, "block " << copy_to[i]);
    }
    BOOST_TEST(mismatches(*back, 0, 2, 0) == 0u);
    fill_blocks(*fixed, live_blocks(*fixed, 1040), 2);
    copy_and_check(*gpu, copy_from, *fixed, copy_to, untouched, nullptr);  // vmm -> cudaMalloc
}

BOOST_AUTO_TEST_CASE(a_peer_that_does_not_exist_is_refused) {
    BOOST_CHECK_THROW((vmmpp::vmm(2 * MiB, {.device = 0, .peer_devices = {64}})), vmmpp::invalid_argument);
    BOOST_CHECK_THROW((vmmpp::kv_cache<peer_config>(geom, vmmpp::vmm_options{.device = 0, .peer_devices = {64}})),
                      vmmpp::invalid_argument);
    BOOST_CHECK_THROW((void)vmmpp::can_access_peer(0, 64), vmmpp::invalid_argument);
    BOOST_TEST(vmmpp::can_access_peer(0, 0));
    // A cache whose own device is listed as a peer is fine (the device is not added twice).
    vmmpp::kv_cache<peer_config> self(geom, vmmpp::vmm_options{.device = 0, .peer_devices = {0}});
    fill_blocks(self, live_blocks(self, 3), 1);
    BOOST_TEST(mismatches(self, 2, 1, 2) == 0u);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(two_gpus, *boost::unit_test::precondition(needs_two_peer_gpus{}))

BOOST_AUTO_TEST_CASE_TEMPLATE(a_kernel_on_the_peer_reads_and_writes_the_pages, Layout, layouts) {
    vmmpp::kv_cache<peer_config, Layout> c(geom, vmmpp::vmm_options{.device = 0, .peer_devices = {1}});
    BOOST_TEST(c.pool().device() == 0);
    BOOST_TEST(c.tensor(0, kv_part::key).device == 0);
    const auto blocks = live_blocks(c, 1030);
    // Device 1 writes device 0's pages (through the mapping cuMemSetAccess opened to it)...
    {
        device_guard on(1);
        for (std::int32_t b : blocks) {
            for (std::uint32_t l = 0; l < geom.layers; ++l) {
                for (auto part : {kv_part::key, kv_part::value}) {
                    fill_pattern<<<16, 128>>>(reinterpret_cast<unsigned*>(c.address(l, part, b)), geom.block_tensor_bytes(),
                                              0, seed_of(1, b, l, part));
                    cuda_check(cudaGetLastError());
                }
            }
        }
        cuda_check(cudaDeviceSynchronize());
    }
    // ...device 0 reads what it wrote...
    BOOST_TEST(mismatches(c, 0, 1, 0) == 0u);
    BOOST_TEST(mismatches(c, 1024, 1, 1024) == 0u);
    BOOST_TEST(mismatches(c, 1029, 1, 1029) == 0u);
    // ...and device 1 reads what device 0 writes.
    fill_blocks(c, blocks, 2);
    unsigned long long* bad = nullptr;
    {
        device_guard on(1);
        cuda_check(cudaMalloc(&bad, sizeof(*bad)));
        cuda_check(cudaMemset(bad, 0, sizeof(*bad)));
        for (std::int32_t b : blocks) {
            for (std::uint32_t l = 0; l < geom.layers; ++l) {
                for (auto part : {kv_part::key, kv_part::value}) {
                    check_pattern<<<16, 128>>>(reinterpret_cast<const unsigned*>(c.address(l, part, b)),
                                               geom.block_tensor_bytes(), 0, seed_of(2, b, l, part), bad);
                    cuda_check(cudaGetLastError());
                }
            }
        }
        unsigned long long host_bad = 1;
        cuda_check(cudaMemcpy(&host_bad, bad, sizeof(host_bad), cudaMemcpyDeviceToHost));
        BOOST_TEST(host_bad == 0u);
        cuda_check(cudaFree(bad));
    }
}

BOOST_AUTO_TEST_CASE_TEMPLATE(copy_blocks_between_two_gpus, Layout, layouts) {
    vmmpp::kv_cache<peer_config, Layout> a(geom, vmmpp::vmm_options{.device = 0, .peer_devices = {1}});
    vmmpp::kv_cache<peer_config, Layout> b(geom, vmmpp::vmm_options{.device = 1, .peer_devices = {0}});
    BOOST_TEST(b.pool().device() == 1);
    fill_blocks(a, live_blocks(a, 1040), 1);
    fill_blocks(b, live_blocks(b, 1040), 2);
    cudaStream_t on0 = nullptr;
    {
        device_guard on(0);
        cuda_check(cudaStreamCreateWithFlags(&on0, cudaStreamNonBlocking));
    }
    copy_and_check(a, copy_from, b, copy_to, untouched, on0);  // device 0 -> device 1
    // And back on a stream of device 1: b's copy_to blocks now hold tag 1 of copy_from.
    fill_blocks(a, copy_from, 3);
    cudaStream_t on1 = nullptr;
    {
        device_guard on(1);
        cuda_check(cudaStreamCreateWithFlags(&on1, cudaStreamNonBlocking));
    }
    vmmpp::copy_blocks(b, copy_to, a, copy_from, on1);
    cuda_check(cudaStreamSynchronize(on1));
    for (std::size_t i = 0; i < copy_from.size(); ++i) {
        BOOST_TEST(mismatches(a, copy_from[i], 1, copy_from[i]) == 0u, "block " << copy_from[i]);
    }
    cuda_check(cudaStreamDestroy(on0));
    cuda_check(cudaStreamDestroy(on1));
}

BOOST_AUTO_TEST_CASE(copy_blocks_between_two_gpus_without_peer_mappings) {
    // Neither cache opens its pages to the other device: cudaMemcpyPeerAsync must still copy
    // (the driver stages it, or uses the peer link on its own).
    vmmpp::kv_cache<peer_config> a(geom, vmmpp::vmm_options{.device = 0});
    vmmpp::kv_cache<peer_config> b(geom, vmmpp::vmm_options{.device = 1});
    fill_blocks(a, live_blocks(a, 1040), 1);
    fill_blocks(b, live_blocks(b, 1040), 2);
    copy_and_check(a, copy_from, b, copy_to, untouched, nullptr);
}

BOOST_AUTO_TEST_SUITE_END()
