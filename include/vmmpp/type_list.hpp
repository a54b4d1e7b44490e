// vmmpp/type_list.hpp: a small list of types and what the lists of layouts and configurations
// (vmmpp/kv/layout_list.hpp, vmmpp/config_list.hpp) need of one: filter it, turn it into
// another template's arguments (a std::tuple or boost::mpl::list for typed tests), visit every
// type, and find one by name at run time.
//
//   using paged = vmmpp::filter_t<vmmpp::kv_layouts, is_paged>;      // a subset, by a trait
//   using cases = vmmpp::apply_t<paged, std::tuple>;                 // BOOST_AUTO_TEST_CASE_TEMPLATE
//   using pairs = vmmpp::product_t<configs, paged, kv_case>;         // kv_case<C, L>, every C x L
//   vmmpp::for_each_type<vmmpp::kv_layouts>([]<class L>(std::type_identity<L>) { ... });
//   vmmpp::dispatch_by_name<vmmpp::kv_layouts>("block_major", "layout", [&]<class L>(std::type_identity<L>) {...});
//
// A type's name is type_name<T>: T::name unless specialised (the configurations are).
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>

#include "vmmpp/error.hpp"

namespace vmmpp {

/// A list of types, nothing more.
template <class... Ts>
struct type_list {
    static constexpr std::size_t size = sizeof...(Ts);
};

/// The name a type goes by in a list: T::name, or a specialisation.
template <class T>
inline constexpr std::string_view type_name = T::name;

namespace detail {

template <class List, template <class...> class To>
struct apply_list;
template <class... Ts, template <class...> class To>
struct apply_list<type_list<Ts...>, To> {
    using type = To<Ts...>;
};

template <class List, template <class> class F>
struct transform_list;
template <class... Ts, template <class> class F>
struct transform_list<type_list<Ts...>, F> {
    using type = type_list<typename F<Ts>::type...>;
};

template <class... Lists>
struct concat_lists;
template <>
struct concat_lists<> {
    using type = type_list<>;
};
template <class... Ts>
struct concat_lists<type_list<Ts...>> {
    using type = type_list<Ts...>;
};
template <class... As, class... Bs, class... Rest>
struct concat_lists<type_list<As...>, type_list<Bs...>, Rest...> {
    using type = typename concat_lists<type_list<As..., Bs...>, Rest...>::type;
};

template <class List, template <class> class Keep>
struct filter_list;
template <class... Ts, template <class> class Keep>
struct filter_list<type_list<Ts...>, Keep> {
    using type = typename concat_lists<std::conditional_t<Keep<Ts>::value, type_list<Ts>, type_list<>>...>::type;
};

template <class A, class B, template <class, class> class Pair>
struct product_lists;
template <class... As, class... Bs, template <class, class> class Pair>
struct product_lists<type_list<As...>, type_list<Bs...>, Pair> {
    template <class A>
    using row = type_list<Pair<A, Bs>...>;
    using type = typename concat_lists<row<As>...>::type;
};

template <class F, class List>
struct dispatch_result;
template <class F, class T, class... Ts>
struct dispatch_result<F, type_list<T, Ts...>> {
    using type = std::invoke_result_t<F, std::type_identity<T>>;
};

template <class T, class List>
struct list_contains;
template <class T, class... Ts>
struct list_contains<T, type_list<Ts...>> : std::bool_constant<(std::is_same_v<T, Ts> || ...)> {};

} // namespace detail

/// To<Ts...> of type_list<Ts...>: apply_t<kv_layouts, std::tuple>, apply_t<kv_layouts, boost::mpl::list>.
template <class List, template <class...> class To>
using apply_t = typename detail::apply_list<List, To>::type;
/// type_list<F<Ts>::type...>.
template <class List, template <class> class F>
using transform_t = typename detail::transform_list<List, F>::type;
/// The types T of List for which Keep<T>::value, in List's order.
template <class List, template <class> class Keep>
using filter_t = typename detail::filter_list<List, Keep>::type;
/// The lists one after the other.
template <class... Lists>
using concat_t = typename detail::concat_lists<Lists...>::type;
/// Pair<A, B> for every A of ListA and B of ListB, A the outer loop: product_t<configs, layouts, kv_case>.
template <class ListA, class ListB, template <class, class> class Pair>
using product_t = typename detail::product_lists<ListA, ListB, Pair>::type;
/// Whether T is in List.
template <class T, class List>
inline constexpr bool list_contains_v = detail::list_contains<T, List>::value;

/// Calls f(std::type_identity<T>{}) for every T of List, in order.
template <class List, class F>
constexpr void for_each_type(F&& f) {
    [&]<class... Ts>(type_list<Ts...>*) { (f(std::type_identity<Ts>{}), ...); }(static_cast<List*>(nullptr));
}

/// The names of List's types, joined by `separator`: "a, b, c".
template <class List>
std::string type_names(std::string_view separator = ", ") {
    std::string out;
    for_each_type<List>([&]<class T>(std::type_identity<T>) {
        if (!out.empty()) {
            out += separator;
        }
        out += type_name<T>;
    });
    return out;
}

/// Calls f(std::type_identity<T>{}) for the T of List named `name` and returns what it returns,
/// by value (every call must return the same type); no such T: invalid_argument "unknown <what> '<name>'
/// (<the names>)".
template <class List, class F>
auto dispatch_by_name(std::string_view name, std::string_view what, F&& f) {
    using result = typename detail::dispatch_result<F&, List>::type;
    if constexpr (std::is_void_v<result>) {
        bool found = false;
        for_each_type<List>([&]<class T>(std::type_identity<T> t) {
            if (!found && type_name<T> == name) {
                found = true;
                f(t);
            }
        });
        if (found) {
            return;
        }
    } else {
        std::optional<result> out;
        for_each_type<List>([&]<class T>(std::type_identity<T> t) {
            if (!out && type_name<T> == name) {
                out.emplace(f(t));
            }
        });
        if (out) {
            return std::move(*out);
        }
    }
    throw invalid_argument("unknown " + std::string(what) + " '" + std::string(name) + "' (" + type_names<List>() +
                           ")");
}

} // namespace vmmpp
