// The one list of layouts (vmmpp/kv/layout_list.hpp) and of named configurations
// (vmmpp/config_list.hpp), and the type_list helpers they are used through: every layout and
// configuration in its list once, under a name of its own; kv_cache's default layout is the
// list's default; the subsets are what their traits say; dispatch by name finds each type and
// refuses an unknown name with the valid ones.
#define BOOST_TEST_MODULE type lists
#include "support/cpu_main.hpp"

#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>

#include "vmmpp/config_list.hpp"
#include "vmmpp/kv/cache.hpp"
#include "vmmpp/kv/layout_list.hpp"
#include "vmmpp/type_list.hpp"

namespace {

// kv_cache's default layout is the list's, and comes first.
static_assert(std::is_same_v<vmmpp::kv_cache<vmmpp::host_config>::layout_type, vmmpp::default_kv_layout>);
static_assert(std::is_same_v<vmmpp::default_kv_layout, vmmpp::block_major>);
static_assert(std::is_same_v<std::tuple_element_t<0, vmmpp::apply_t<vmmpp::kv_layouts, std::tuple>>,
                             vmmpp::default_kv_layout>);
// Every layout models kv_layout.
static_assert([]<class... Ls>(vmmpp::type_list<Ls...>*) { return (vmmpp::kv_layout<Ls> && ...); }(
    static_cast<vmmpp::kv_layouts*>(nullptr)));
// The subsets.
static_assert(!vmmpp::list_contains_v<vmmpp::sequence_contiguous, vmmpp::paged_kv_layouts>);
static_assert(std::is_same_v<vmmpp::split_kv_layouts, vmmpp::type_list<vmmpp::block_major, vmmpp::block_major_hnd,
                                                                        vmmpp::layer_major, vmmpp::layer_major_hnd>>);
static_assert(std::is_same_v<vmmpp::nhd_kv_layouts, vmmpp::type_list<vmmpp::block_major, vmmpp::layer_major>>);
static_assert(!vmmpp::list_contains_v<vmmpp::host_config, vmmpp::device_named_configs>);
static_assert(std::is_same_v<vmmpp::budgeted_named_configs,
                             vmmpp::type_list<vmmpp::elastic_config, vmmpp::elastic_mapped_ahead_config,
                                              vmmpp::elastic_page_config>>);
// with_quota_t swaps the quota only (the C ABI's process-budget caches are made so).
static_assert(std::is_same_v<vmmpp::with_quota_t<vmmpp::elastic_page_config, vmmpp::unlimited>,
                             vmmpp::pool_config<vmmpp::vmm, vmmpp::page_granular, vmmpp::unlimited>>);
static_assert(std::is_same_v<vmmpp::with_quota_t<vmmpp::host_config, vmmpp::shared_budget>,
                             vmmpp::pool_config<vmmpp::host, vmmpp::page_granular, vmmpp::shared_budget>>);
static_assert(std::is_same_v<vmmpp::with_quota_t<vmmpp::pool_config<vmmpp::host, vmmpp::page_granular,
                                                                    vmmpp::unlimited, vmmpp::null_mutex>,
                                                 vmmpp::shared_budget>,
                             vmmpp::pool_config<vmmpp::host, vmmpp::page_granular, vmmpp::shared_budget,
                                                vmmpp::null_mutex>>);
// product_t: A the outer loop.
template <class A, class B>
struct pair {};
static_assert(std::is_same_v<vmmpp::product_t<vmmpp::type_list<int, char>, vmmpp::type_list<float, double>, pair>,
                             vmmpp::type_list<pair<int, float>, pair<int, double>, pair<char, float>, pair<char, double>>>);

template <class List>
std::set<std::string> names_of() {
    std::set<std::string> names;
    vmmpp::for_each_type<List>([&]<class T>(std::type_identity<T>) { names.emplace(vmmpp::type_name<T>); });
    return names;
}

} // namespace

BOOST_AUTO_TEST_CASE(every_name_is_its_own) {
    BOOST_TEST(names_of<vmmpp::kv_layouts>().size() == vmmpp::kv_layouts::size);
    BOOST_TEST(names_of<vmmpp::named_configs>().size() == vmmpp::named_configs::size);
    BOOST_TEST(vmmpp::type_names<vmmpp::kv_layouts>(",") ==
               "block_major,block_major_hnd,layer_major,layer_major_hnd,packed_kv,mla,sequence_contiguous");
    BOOST_TEST(vmmpp::type_names<vmmpp::named_configs>() ==
               "static, elastic, elastic_mapped_ahead, elastic_page, gh200, host");
}

BOOST_AUTO_TEST_CASE(dispatch_by_name_finds_each_layout_and_refuses_others) {
    vmmpp::for_each_type<vmmpp::kv_layouts>([]<class L>(std::type_identity<L>) {
        const auto found = vmmpp::dispatch_by_name<vmmpp::kv_layouts>(
            vmmpp::type_name<L>, "layout", []<class M>(std::type_identity<M>) {
                return std::make_unique<std::string>(vmmpp::type_name<M>);  // a move-only result
            });
        BOOST_TEST(*found == std::string(vmmpp::type_name<L>));
    });
    int calls = 0;
    vmmpp::dispatch_by_name<vmmpp::named_configs>("host", "configuration", [&]<class C>(std::type_identity<C>) {
        BOOST_TEST((std::is_same_v<C, vmmpp::host_config>));
        ++calls;
    });
    BOOST_TEST(calls == 1);
    try {
        vmmpp::dispatch_by_name<vmmpp::kv_layouts>("diagonal", "layout", [](auto) { return 0; });
        BOOST_FAIL("an unknown layout was accepted");
    } catch (const vmmpp::invalid_argument& e) {
        const std::string what = e.what();
        BOOST_TEST(what.find("unknown layout 'diagonal'") != std::string::npos);
        for (const auto& name : names_of<vmmpp::kv_layouts>()) {
            BOOST_TEST(what.find(name) != std::string::npos, name);
        }
    }
}
