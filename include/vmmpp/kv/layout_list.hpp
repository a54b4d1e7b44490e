// vmmpp/kv/layout_list.hpp: every KV layout, once. The tests, the benchmarks, the C ABI
// (capi/) and, through it, the Python module take their layouts from here; a new layout is
// added to `kv_layouts` and nowhere else. A list that means a subset derives it with a trait
// below (or its own), it does not restate it.
//
//   kv_layouts            every layout, kv_cache's default (block_major) first
//   paged_kv_layouts      those that hand out any free block to any sequence (all but sequence_contiguous)
//   split_kv_layouts      paged, K and V in separate tensors of one layout each (the four *_major)
//   nhd_kv_layouts        split, tokens before heads in a block (layer_major, block_major)
//
// Each layout's name (type_name<L>, from L::name) is the name the C ABI and Python use.
#pragma once

#include <type_traits>

#include "vmmpp/kv/layout.hpp"
#include "vmmpp/type_list.hpp"

namespace vmmpp {

/// Every layout. kv_cache's default layout comes first.
using kv_layouts =
    type_list<block_major, block_major_hnd, layer_major, layer_major_hnd, packed_kv, mla, sequence_contiguous>;
/// kv_cache's default layout (kv_cache<Config> is kv_cache<Config, default_kv_layout>).
using default_kv_layout = block_major;

/// Any block id goes to any sequence (sequence_slot_layout's layouts give a sequence a slot).
template <class L>
struct is_paged_layout : std::bool_constant<!sequence_slot_layout<L>> {};
/// Paged, two parts (K and V), each part a tensor of its own (not packed, not mla's one latent).
template <class L>
struct is_split_kv_layout : std::bool_constant<is_paged_layout<L>::value && L::parts == 2 && !L::packs_kv> {};
/// Split K/V with tokens before heads in a block (NHD).
template <class L>
struct is_nhd_split_layout : std::false_type {};
template <token_order Order>
struct is_nhd_split_layout<basic_layer_major<Order>> : std::bool_constant<Order == token_order::nhd> {};
template <token_order Order>
struct is_nhd_split_layout<basic_block_major<Order>> : std::bool_constant<Order == token_order::nhd> {};

using paged_kv_layouts = filter_t<kv_layouts, is_paged_layout>;
using split_kv_layouts = filter_t<kv_layouts, is_split_kv_layout>;
using nhd_kv_layouts = filter_t<kv_layouts, is_nhd_split_layout>;

static_assert(kv_layouts::size == 7 && paged_kv_layouts::size == 6 && split_kv_layouts::size == 4 &&
              nhd_kv_layouts::size == 2);
static_assert(list_contains_v<default_kv_layout, kv_layouts>);

} // namespace vmmpp
