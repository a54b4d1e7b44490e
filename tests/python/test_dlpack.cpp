// vmmpp/interop/dlpack.hpp without a GPU: the DLPack structure of a host_config cache's K/V
// (every layout: NHD, HND, packed K/V, MLA), dtype codes, the device every kind of backing maps
// to, versioned exports, the deleter and the keep-alive, refusals.
#define BOOST_TEST_MODULE dlpack export
#include "support/cpu_main.hpp"

#include <cstring>
#include <memory>
#include <vector>

#include "vmmpp/config.hpp"
#include "vmmpp/interop/dlpack.hpp"

namespace {

constexpr vmmpp::kv_geometry geom{.layers = 3, .kv_heads = 2, .head_dim = 8, .type = vmmpp::dtype::f16,
                                  .block_tokens = 4, .max_blocks = 64};
constexpr std::size_t page = std::size_t{2} << 20;

using dlpack_ptr = std::unique_ptr<DLManagedTensor, vmmpp::dlpack_deleter>;
using dlpack_versioned_ptr = std::unique_ptr<DLManagedTensorVersioned, vmmpp::dlpack_deleter>;

template <class Cache>
void check_tensor(const DLTensor& t, const Cache& cache, std::uint32_t layer, vmmpp::kv_part part,
                  std::int64_t block_stride) {
    BOOST_TEST(t.data == static_cast<void*>(cache.address(layer, part, 0)));
    BOOST_TEST(t.byte_offset == 0u);
    BOOST_TEST(t.ndim == 4);
    BOOST_TEST(t.device.device_type == kDLCPU);
    BOOST_TEST(t.device.device_id == 0);
    BOOST_TEST(t.dtype.code == kDLFloat);
    BOOST_TEST(t.dtype.bits == 16);
    BOOST_TEST(t.dtype.lanes == 1);
    const std::vector<std::int64_t> shape(t.shape, t.shape + 4), strides(t.strides, t.strides + 4);
    BOOST_TEST(shape == (std::vector<std::int64_t>{64, 4, 2, 8}), boost::test_tools::per_element());
    BOOST_TEST(strides == (std::vector<std::int64_t>{block_stride, 16, 8, 1}), boost::test_tools::per_element());
}

} // namespace

BOOST_AUTO_TEST_CASE(layer_major_export) {
    vmmpp::kv_cache<vmmpp::host_config, vmmpp::layer_major> cache(geom);
    for (std::uint32_t layer = 0; layer < geom.layers; ++layer) {
        for (auto part : {vmmpp::kv_part::key, vmmpp::kv_part::value}) {
            dlpack_ptr t(vmmpp::to_dlpack(cache, layer, part));
            check_tensor(t->dl_tensor, cache, layer, part, 4 * 2 * 8);
            BOOST_TEST(t->deleter != nullptr);
        }
    }
}

BOOST_AUTO_TEST_CASE(block_major_block_stride_is_the_whole_block) {
    vmmpp::kv_cache<vmmpp::host_config, vmmpp::block_major> cache(geom);
    dlpack_ptr t(vmmpp::to_dlpack(cache, 2, vmmpp::kv_part::value));
    check_tensor(t->dl_tensor, cache, 2, vmmpp::kv_part::value, 2 * 3 * 4 * 2 * 8);
    // Element [b, o, h, d] sits where the cache says block b of that layer is.
    const auto* base = static_cast<std::byte*>(t->dl_tensor.data);
    const std::int64_t* s = t->dl_tensor.strides;
    BOOST_TEST(base + (5 * s[0] + 3 * s[1] + 1 * s[2] + 7 * s[3]) * 2 ==
               cache.address(2, vmmpp::kv_part::value, 5) + ((3 * 2 + 1) * 8 + 7) * 2);
}

BOOST_AUTO_TEST_CASE(values_written_through_slots_read_through_the_export) {
    vmmpp::kv_cache<vmmpp::host_config, vmmpp::block_major> cache(geom);
    const auto seq = cache.add_sequence();
    cache.append(seq, 9);
    std::vector<std::int64_t> slots(9);
    cache.slot_mapping(seq, 0, slots);
    dlpack_ptr k1(vmmpp::to_dlpack(cache, 1, vmmpp::kv_part::key));
    const DLTensor& t = k1->dl_tensor;
    for (std::size_t i = 0; i < slots.size(); ++i) {
        const auto block = static_cast<std::int32_t>(slots[i] / geom.block_tokens);
        const std::uint16_t v = static_cast<std::uint16_t>(100 + i);
        std::memcpy(cache.key(1, block) + (slots[i] % geom.block_tokens) * 2 * 8 * 2 + (1 * 8 + 3) * 2, &v, 2);
    }
    for (std::size_t i = 0; i < slots.size(); ++i) {
        const std::int64_t b = slots[i] / geom.block_tokens, o = slots[i] % geom.block_tokens;
        std::uint16_t v = 0;
        std::memcpy(&v, static_cast<std::byte*>(t.data) + (b * t.strides[0] + o * t.strides[1] + t.strides[2] + 3) * 2,
                    2);
        BOOST_TEST(v == 100 + i);
    }
}

/// Element [b, t, h, d] of `t` through its strides.
std::byte* element_of(const DLTensor& t, std::int64_t b, std::int64_t o, std::int64_t h, std::int64_t d) {
    const std::int64_t* s = t.strides;
    return static_cast<std::byte*>(t.data) + (b * s[0] + o * s[1] + h * s[2] + d * s[3]) * 2;
}

BOOST_AUTO_TEST_CASE(hnd_exports_put_heads_before_tokens) {
    vmmpp::kv_cache<vmmpp::host_config, vmmpp::layer_major_hnd> lm(geom);
    dlpack_ptr t(vmmpp::to_dlpack(lm, 1, vmmpp::kv_part::value));
    const std::vector<std::int64_t> shape(t->dl_tensor.shape, t->dl_tensor.shape + 4);
    const std::vector<std::int64_t> strides(t->dl_tensor.strides, t->dl_tensor.strides + 4);
    BOOST_TEST(shape == (std::vector<std::int64_t>{64, 4, 2, 8}), boost::test_tools::per_element());
    // [blocks, tokens, heads, dim] read over memory laid out [blocks, heads, tokens, dim]
    BOOST_TEST(strides == (std::vector<std::int64_t>{4 * 2 * 8, 8, 4 * 8, 1}), boost::test_tools::per_element());
    BOOST_TEST(element_of(t->dl_tensor, 5, 3, 1, 7) ==
               lm.address(1, vmmpp::kv_part::value, 5) + ((1 * 4 + 3) * 8 + 7) * 2);

    vmmpp::kv_cache<vmmpp::host_config, vmmpp::block_major_hnd> bm(geom);
    dlpack_ptr u(vmmpp::to_dlpack(bm, 2, vmmpp::kv_part::key));
    const std::vector<std::int64_t> bstrides(u->dl_tensor.strides, u->dl_tensor.strides + 4);
    BOOST_TEST(bstrides == (std::vector<std::int64_t>{2 * 3 * 4 * 2 * 8, 8, 4 * 8, 1}),
               boost::test_tools::per_element());
    BOOST_TEST(element_of(u->dl_tensor, 9, 2, 1, 4) ==
               bm.address(2, vmmpp::kv_part::key, 9) + ((1 * 4 + 2) * 8 + 4) * 2);
}

BOOST_AUTO_TEST_CASE(packed_kv_exports_views_into_the_packed_tensor) {
    vmmpp::kv_cache<vmmpp::host_config, vmmpp::packed_kv> cache(geom);
    dlpack_ptr k(vmmpp::to_dlpack(cache, 2, vmmpp::kv_part::key));
    dlpack_versioned_ptr v(vmmpp::to_dlpack_versioned(cache, 2, vmmpp::kv_part::value));
    dlpack_ptr p(vmmpp::to_dlpack(cache.packed_tensor(2), vmmpp::dlpack_device(cache)));
    const std::vector<std::int64_t> kv_strides{4 * 2 * 16, 16, 4 * 16, 1};  // rows of K|V: 2 x 8
    for (const DLTensor* t : {&k->dl_tensor, &v->dl_tensor, &p->dl_tensor}) {
        BOOST_TEST(std::vector<std::int64_t>(t->strides, t->strides + 4) == kv_strides,
                   boost::test_tools::per_element());
        BOOST_TEST(t->device.device_type == kDLCPU);
    }
    BOOST_TEST(std::vector<std::int64_t>(k->dl_tensor.shape, k->dl_tensor.shape + 4) ==
                   (std::vector<std::int64_t>{64, 4, 2, 8}),
               boost::test_tools::per_element());
    BOOST_TEST(std::vector<std::int64_t>(p->dl_tensor.shape, p->dl_tensor.shape + 4) ==
                   (std::vector<std::int64_t>{64, 4, 2, 16}),
               boost::test_tools::per_element());
    // V's [b, t, h, d] is the packed tensor's [b, t, h, 8 + d]; K's is its [b, t, h, d]
    BOOST_TEST(element_of(v->dl_tensor, 7, 1, 1, 2) == element_of(p->dl_tensor, 7, 1, 1, 8 + 2));
    BOOST_TEST(element_of(k->dl_tensor, 7, 1, 1, 2) == element_of(p->dl_tensor, 7, 1, 1, 2));
    BOOST_TEST(element_of(v->dl_tensor, 7, 1, 1, 2) ==
               cache.address(2, vmmpp::kv_part::value, 7) + ((1 * 4 + 1) * 16 + 2) * 2);
}

BOOST_AUTO_TEST_CASE(mla_exports_one_latent_per_layer) {
    const vmmpp::kv_geometry latent{.layers = 2, .kv_heads = 1, .head_dim = 576, .type = vmmpp::dtype::bf16,
                                    .block_tokens = 64, .max_blocks = 16};
    vmmpp::kv_cache<vmmpp::host_config, vmmpp::mla> cache(latent);
    dlpack_ptr t(vmmpp::to_dlpack(cache, 1, vmmpp::kv_part::key));
    BOOST_TEST(t->dl_tensor.dtype.code == kDLBfloat);
    // FlashMLA's k_cache: (num_blocks, page_block_size, 1, 576)
    BOOST_TEST(std::vector<std::int64_t>(t->dl_tensor.shape, t->dl_tensor.shape + 4) ==
                   (std::vector<std::int64_t>{16, 64, 1, 576}),
               boost::test_tools::per_element());
    BOOST_TEST(std::vector<std::int64_t>(t->dl_tensor.strides, t->dl_tensor.strides + 4) ==
                   (std::vector<std::int64_t>{64 * 576, 576, 576, 1}),
               boost::test_tools::per_element());
    BOOST_TEST(element_of(t->dl_tensor, 3, 5, 0, 9) == cache.address(1, vmmpp::kv_part::key, 3) + (5 * 576 + 9) * 2);
    auto owner = std::make_shared<int>(1);
    BOOST_CHECK_THROW((void)vmmpp::to_dlpack(cache, 0, vmmpp::kv_part::value, {.keep_alive = owner}),
                      vmmpp::invalid_argument);
    BOOST_TEST(owner.use_count() == 1);
}

BOOST_AUTO_TEST_CASE(dtype_codes) {
    using vmmpp::dtype;
    auto code = [](dtype t) {
        const DLDataType d = vmmpp::dlpack_dtype(t);
        return std::vector<int>{d.code, d.bits, d.lanes};
    };
    BOOST_TEST(code(dtype::f32) == (std::vector<int>{kDLFloat, 32, 1}), boost::test_tools::per_element());
    BOOST_TEST(code(dtype::f16) == (std::vector<int>{kDLFloat, 16, 1}), boost::test_tools::per_element());
    BOOST_TEST(code(dtype::bf16) == (std::vector<int>{kDLBfloat, 16, 1}), boost::test_tools::per_element());
    BOOST_TEST(code(dtype::fp8_e4m3) == (std::vector<int>{kDLFloat8_e4m3fn, 8, 1}), boost::test_tools::per_element());
    BOOST_TEST(code(dtype::fp8_e5m2) == (std::vector<int>{kDLFloat8_e5m2, 8, 1}), boost::test_tools::per_element());
    BOOST_CHECK_THROW((void)vmmpp::dlpack_dtype(static_cast<dtype>(99)), vmmpp::invalid_argument);
}

BOOST_AUTO_TEST_CASE(devices_by_backing_properties) {
    auto is = [](DLDevice d, DLDeviceType type, int id) { return d.device_type == type && d.device_id == id; };
    BOOST_TEST(is(vmmpp::dlpack_device<vmmpp::host>(-1), kDLCPU, 0));
    BOOST_TEST(is(vmmpp::dlpack_device<vmmpp::vmm>(3), kDLCUDA, 3));
    BOOST_TEST(is(vmmpp::dlpack_device<vmmpp::device>(1), kDLCUDA, 1));
    BOOST_CHECK_THROW((void)vmmpp::dlpack_device<vmmpp::vmm>(-1), vmmpp::invalid_argument);
    BOOST_TEST(is(vmmpp::dlpack_device<vmmpp::managed_prefetch<>>(2), kDLCUDAManaged, 0));
    BOOST_TEST(is(vmmpp::dlpack_device<vmmpp::managed_prefetch<>>(2, true), kDLCUDA, 2));
    using pinned = vmmpp::external<vmmpp::device_accessible, vmmpp::host_accessible>;
    BOOST_TEST(is(vmmpp::dlpack_device<pinned>(-1), kDLCUDAHost, 0));
    BOOST_TEST(is(vmmpp::dlpack_device<vmmpp::external<vmmpp::host_accessible>>(-1), kDLCPU, 0));
}

BOOST_AUTO_TEST_CASE(device_memory_cache_exports_kdlcuda) {
    // An external<device_accessible> span claims to be on device 2; nothing touches the memory.
    using config = vmmpp::pool_config<vmmpp::external<vmmpp::device_accessible>, vmmpp::preallocated, vmmpp::unlimited>;
    std::vector<std::byte> buffer(4 * page);
    vmmpp::kv_cache<config> cache(geom, vmmpp::external_options{.pointer = buffer.data(), .device = 2});
    dlpack_ptr t(vmmpp::to_dlpack(cache, 0, vmmpp::kv_part::key));
    BOOST_TEST(t->dl_tensor.device.device_type == kDLCUDA);
    BOOST_TEST(t->dl_tensor.device.device_id == 2);
    BOOST_TEST(t->dl_tensor.data == static_cast<void*>(buffer.data()));

    using managed_like = vmmpp::pool_config<vmmpp::external<vmmpp::device_accessible, vmmpp::host_accessible>,
                                            vmmpp::preallocated, vmmpp::unlimited>;
    vmmpp::kv_cache<managed_like> managed(geom, vmmpp::external_options{.pointer = buffer.data(), .device = 1});
    dlpack_ptr m(vmmpp::to_dlpack(managed, 0, vmmpp::kv_part::key));
    BOOST_TEST(m->dl_tensor.device.device_type == kDLCUDAManaged);
    dlpack_ptr c(vmmpp::to_dlpack(managed, 0, vmmpp::kv_part::key, {.managed_as_cuda = true}));
    BOOST_TEST(c->dl_tensor.device.device_type == kDLCUDA);
    BOOST_TEST(c->dl_tensor.device.device_id == 1);
}

BOOST_AUTO_TEST_CASE(versioned_export) {
    vmmpp::kv_cache<vmmpp::host_config, vmmpp::layer_major> cache(geom);
    dlpack_versioned_ptr t(vmmpp::to_dlpack_versioned(cache, 1, vmmpp::kv_part::value));
    BOOST_TEST(t->version.major == 1u);
    BOOST_TEST(t->version.minor == 1u);
    BOOST_TEST(t->flags == 0u);
    check_tensor(t->dl_tensor, cache, 1, vmmpp::kv_part::value, 4 * 2 * 8);
    dlpack_versioned_ptr r(vmmpp::to_dlpack_versioned(cache, 1, vmmpp::kv_part::value, {.read_only = true}));
    BOOST_TEST(r->flags == static_cast<std::uint64_t>(DLPACK_FLAG_BITMASK_READ_ONLY));
}

BOOST_AUTO_TEST_CASE(deleter_drops_the_keep_alive_and_never_the_memory) {
    auto cache = std::make_shared<vmmpp::kv_cache<vmmpp::host_config, vmmpp::layer_major>>(geom);
    const auto seq = cache->add_sequence();
    cache->append(seq, 1);
    std::weak_ptr<const void> watch = cache;
    DLManagedTensor* t = vmmpp::to_dlpack(*cache, 0, vmmpp::kv_part::key, {.keep_alive = cache});
    DLManagedTensorVersioned* v = vmmpp::to_dlpack_versioned(*cache, 0, vmmpp::kv_part::value, {.keep_alive = cache});
    auto* first = static_cast<std::byte*>(t->dl_tensor.data);
    cache.reset();
    BOOST_TEST(!watch.expired());  // the exports hold it
    first[0] = std::byte{7};       // block 0 of a live sequence: still committed
    t->deleter(t);
    BOOST_TEST(!watch.expired());
    v->deleter(v);
    BOOST_TEST(watch.expired());  // the last export dropped it
}

BOOST_AUTO_TEST_CASE(refusals_leave_nothing_behind) {
    vmmpp::kv_cache<vmmpp::host_config, vmmpp::layer_major> cache(geom);
    auto owner = std::make_shared<int>(1);
    BOOST_CHECK_THROW((void)vmmpp::to_dlpack(cache, geom.layers, vmmpp::kv_part::key, {.keep_alive = owner}),
                      vmmpp::invalid_argument);
    BOOST_CHECK_THROW((void)vmmpp::to_dlpack_versioned(cache, geom.layers, vmmpp::kv_part::key, {.keep_alive = owner}),
                      vmmpp::invalid_argument);
    BOOST_TEST(owner.use_count() == 1);
    vmmpp::kv_tensor bad = cache.tensor(0, vmmpp::kv_part::key);
    bad.type = static_cast<vmmpp::dtype>(42);
    BOOST_CHECK_THROW((void)vmmpp::to_dlpack(bad, DLDevice{kDLCPU, 0}, owner), vmmpp::invalid_argument);
    BOOST_TEST(owner.use_count() == 1);
    vmmpp::dlpack_deleter{}(static_cast<DLManagedTensor*>(nullptr));  // a null export is fine
}
