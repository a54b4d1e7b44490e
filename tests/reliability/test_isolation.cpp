// Tenant isolation (issue 7) on the host: the zeroing backing adaptor zeroes exactly what it
// commits, and a model whose pool (or KV cache) is built over memory another model used before
// reads zeros over zeroing<...> — and that model's bytes without it, so these tests can fail.
#define BOOST_TEST_MODULE isolation
#include "support/cpu_main.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

#include "reliability/support/rigs.hpp"

using namespace vmmpp_rel;

namespace {

using host_external = vmmpp::external<vmmpp::host_accessible>;

template <class B>
concept has_device_ordinal = requires(const B& b) {
    { b.device_ordinal() } -> std::same_as<int>;
};

/// Bytes of [p, p+n) that are not zero.
std::size_t nonzero(const std::byte* p, std::size_t n) {
    return static_cast<std::size_t>(std::count_if(p, p + n, [](std::byte b) { return b != std::byte{0}; }));
}

} // namespace

static_assert(vmmpp::backing<vmmpp::zeroing<vmmpp::host>> && vmmpp::zeroing<vmmpp::host>::is_elastic);
static_assert(!vmmpp::zeroing<host_external>::is_elastic);
static_assert(!vmmpp::zeroing<vmmpp::host>::zeroes_on_device);
static_assert(vmmpp::zeroing<vmmpp::vmm>::zeroes_on_device && vmmpp::zeroing<vmmpp::device>::zeroes_on_device);
// Managed memory is zeroed where the managed backing just prefetched it: on the device.
static_assert(vmmpp::zeroing<vmmpp::managed_prefetch<>>::zeroes_on_device);
static_assert(vmmpp::has_property<vmmpp::zeroing<vmmpp::vmm>, vmmpp::device_accessible> &&
              !vmmpp::has_property<vmmpp::zeroing<vmmpp::vmm>, vmmpp::host_accessible>);
static_assert(std::is_same_v<vmmpp::zeroing<host_external>::options, vmmpp::external_options>);
static_assert(has_device_ordinal<vmmpp::zeroing<host_external>> && has_device_ordinal<vmmpp::zeroing<vmmpp::vmm>>);
static_assert(!has_device_ordinal<vmmpp::zeroing<vmmpp::host>>);

BOOST_AUTO_TEST_CASE(zeroing_zeroes_exactly_what_it_commits) {
    std::vector<std::byte> buffer(8 * page, std::byte{0xab});
    vmmpp::zeroing<host_external> z(8 * page, {.pointer = buffer.data()});
    BOOST_TEST(z.base() == buffer.data());
    BOOST_TEST(z.capacity() == 8 * page);
    BOOST_TEST(z.device_ordinal() == -1);
    z.commit(2 * page, 2 * page);
    BOOST_TEST(z.committed_bytes() == 2 * page);
    BOOST_TEST(nonzero(buffer.data() + 2 * page, 2 * page) == 0u);
    BOOST_TEST(nonzero(buffer.data(), 2 * page) == 2 * page);  // the rest is untouched
    BOOST_TEST(nonzero(buffer.data() + 4 * page, 4 * page) == 4 * page);
    std::memset(buffer.data() + 2 * page, 0x11, 2 * page);
    z.decommit(2 * page, 2 * page);  // a decommit leaves the bytes (only commits zero)
    BOOST_TEST(nonzero(buffer.data() + 2 * page, 2 * page) == 2 * page);
    z.commit(2 * page, page);  // taken again: zeroed again
    BOOST_TEST(nonzero(buffer.data() + 2 * page, page) == 0u);
    BOOST_TEST(nonzero(buffer.data() + 3 * page, page) == page);
    // The upstream's checks still apply; a refused commit zeroes nothing.
    BOOST_CHECK_THROW(z.commit(2 * page, page), vmmpp::invalid_argument);  // already committed
    BOOST_CHECK_THROW(z.commit(3 * page + 1, page), vmmpp::invalid_argument);
    BOOST_TEST(nonzero(buffer.data() + 3 * page, page) == page);
}

BOOST_AUTO_TEST_CASE(zeroing_over_a_host_backing) {
    vmmpp::zeroing<vmmpp::host> z(4 * page);
    z.commit(0, 2 * page);
    BOOST_TEST(nonzero(z.base(), 2 * page) == 0u);
    std::memset(z.base(), 0x7f, 2 * page);
    z.decommit(0, 2 * page);
    z.commit(0, page);
    BOOST_TEST(nonzero(z.base(), page) == 0u);
}

BOOST_AUTO_TEST_CASE(a_fault_before_zeroing_leaves_the_memory_as_it_was) {
    // zeroing over fault_injecting: the refused commit reaches neither the buffer nor the zeroing.
    std::vector<std::byte> buffer(4 * page, std::byte{0x33});
    auto plan = std::make_shared<vmmpp::fault_plan>();
    plan->fail_commit_in(1);
    vmmpp::zeroing<vmmpp::fault_injecting<host_external>> z(4 * page,
                                                             {.upstream = {.pointer = buffer.data()}, .plan = plan});
    BOOST_CHECK_THROW(z.commit(0, page), vmmpp::out_of_memory);
    BOOST_TEST(z.committed_bytes() == 0u);
    BOOST_TEST(nonzero(buffer.data(), 4 * page) == 4 * page);
    z.commit(0, page);
    BOOST_TEST(nonzero(buffer.data(), page) == 0u);
    // fault_injecting over zeroing: the same from the other side.
    vmmpp::fault_injecting<vmmpp::zeroing<host_external>> f(4 * page, {.upstream = {.pointer = buffer.data()},
                                                                         .plan = plan});
    plan->fail_commit_in(1);
    BOOST_CHECK_THROW(f.commit(2 * page, page), vmmpp::out_of_memory);
    BOOST_TEST(nonzero(buffer.data() + 2 * page, page) == page);
    f.commit(2 * page, page);
    BOOST_TEST(nonzero(buffer.data() + 2 * page, page) == 0u);
}

namespace {

/// Model A's pool over `buffer` (on `budget`) fills it with a pattern and is destroyed; then
/// model B's pool of `Backing` over the same buffer takes the same memory. Returns the bytes
/// of B's memory that are not zero.
template <class Backing>
std::size_t bytes_b_sees_of_a(std::vector<std::byte>& buffer, vmmpp::budget& budget, const char* b_name) {
    using a_config = vmmpp::pool_config<host_external, vmmpp::preallocated, vmmpp::shared_budget>;
    using b_config = vmmpp::pool_config<Backing, vmmpp::preallocated, vmmpp::shared_budget>;
    const std::size_t bytes = buffer.size();
    {
        vmmpp::elastic_pool<a_config> a(bytes, {.pointer = buffer.data()}, {},
                                        budget.register_model(std::string("a for ") + b_name, bytes));
        std::memset(a.base(), 0xa5, bytes);  // model A's keys and values
        BOOST_TEST(budget.stats().committed == bytes);
    }
    BOOST_TEST(budget.stats().committed == 0u);  // A gave its memory back; B may take it now
    vmmpp::elastic_pool<b_config> b(bytes, {.pointer = buffer.data()}, {}, budget.register_model(b_name, bytes));
    BOOST_TEST(b.committed_bytes() == bytes);
    BOOST_TEST(budget.stats().committed == bytes);
    return nonzero(b.base(), bytes);
}

} // namespace

BOOST_AUTO_TEST_CASE(a_pool_over_zeroing_never_reads_the_previous_tenants_bytes) {
    std::vector<std::byte> buffer(4 * page);
    vmmpp::budget budget(4 * page);  // room for one of the two models at a time
    BOOST_TEST(bytes_b_sees_of_a<vmmpp::zeroing<host_external>>(buffer, budget, "b zeroed") == 0u);
    // Without zeroing B reads every byte A left: the check above is not vacuous.
    BOOST_TEST(bytes_b_sees_of_a<host_external>(buffer, budget, "b plain") == 4 * page);
}

namespace {

// 2 layers, 2 heads, 64 dims, fp16, 16 tokens: 4 KiB per block and tensor.
constexpr vmmpp::kv_geometry tenant_geometry{.layers = 2, .kv_heads = 2, .head_dim = 64, .type = vmmpp::dtype::f16,
                                             .block_tokens = 16, .max_blocks = 256};

/// Model A's cache over `buffer` writes tokens into 40 blocks, frees them and is destroyed; then
/// model B's cache of `Backing` over the same buffer takes 40 blocks (the same ids: lowest
/// first). Returns the bytes of B's blocks, every layer's K and V, that are not zero, and checks
/// that without zeroing they are A's.
template <class Backing, class Layout>
std::size_t kv_bytes_b_sees_of_a(std::vector<std::byte>& buffer) {
    using a_cache = vmmpp::kv_cache<vmmpp::pool_config<host_external, vmmpp::preallocated, vmmpp::unlimited>, Layout>;
    using b_cache = vmmpp::kv_cache<vmmpp::pool_config<Backing, vmmpp::preallocated, vmmpp::unlimited>, Layout>;
    constexpr std::size_t tokens = 40 * 16;
    std::vector<std::int64_t> slots(tokens);
    {
        a_cache a(tenant_geometry, {.pointer = buffer.data()});
        const auto s = a.add_sequence();
        a.append(s, tokens);
        a.slot_mapping(s, 0, slots);
        for (std::size_t t = 0; t < tokens; ++t) {
            write_token(a, slots[t], static_cast<std::uint16_t>(1000 + t));
        }
        a.free(s);
    }
    b_cache b(tenant_geometry, {.pointer = buffer.data()});
    const auto s = b.add_sequence();
    b.append(s, tokens);
    std::vector<std::int64_t> b_slots(tokens);
    b.slot_mapping(s, 0, b_slots);
    BOOST_TEST((b_slots == slots));  // B got A's very blocks
    std::size_t seen = 0, a_tokens = 0;
    for (std::int32_t block : b.block_table(s)) {
        for (std::uint32_t l = 0; l < tenant_geometry.layers; ++l) {
            for (auto part : {vmmpp::kv_part::key, vmmpp::kv_part::value}) {
                seen += nonzero(b.address(l, part, block), tenant_geometry.block_tensor_bytes());
            }
        }
    }
    for (std::size_t t = 0; t < tokens; ++t) {
        a_tokens += token_holds(b, b_slots[t], static_cast<std::uint16_t>(1000 + t));
    }
    BOOST_TEST_MESSAGE(seen << " non-zero bytes, " << a_tokens << " of A's tokens readable");
    BOOST_TEST((seen == 0 ? a_tokens == 0 : a_tokens == tokens));
    return seen;
}

} // namespace

BOOST_AUTO_TEST_CASE(a_kv_cache_over_zeroing_never_reads_the_previous_tenants_tokens) {
    std::vector<std::byte> buffer(rig<fault_case<vmmpp_test::host_external_config>>::span_of(tenant_geometry));
    BOOST_TEST((kv_bytes_b_sees_of_a<vmmpp::zeroing<host_external>, vmmpp::layer_major>(buffer) == 0u));
    BOOST_TEST((kv_bytes_b_sees_of_a<host_external, vmmpp::layer_major>(buffer) > 0u));
    BOOST_TEST((kv_bytes_b_sees_of_a<vmmpp::zeroing<host_external>, vmmpp::block_major>(buffer) == 0u));
    BOOST_TEST((kv_bytes_b_sees_of_a<host_external, vmmpp::block_major>(buffer) > 0u));
}

BOOST_AUTO_TEST_CASE(zeroing_over_device_memory_needs_its_device) {
    // An external device buffer that names no device cannot be zeroed: refused when built, before
    // any CUDA call (the buffer is never touched, so any pointer does).
    std::vector<std::byte> not_device_memory(page);
    BOOST_CHECK_THROW(vmmpp::zeroing<vmmpp::external<vmmpp::device_accessible>>(
                          page, {.pointer = not_device_memory.data(), .device = -1}),
                      vmmpp::invalid_argument);
}
