// capi/kv_erased_other_layouts.cpp: the caches of the packed_kv, mla and sequence_contiguous layouts (kv_erased_impl.hpp's
// layout_caches), every configuration and quota, in a translation unit of their own.
#include "kv_erased_impl.hpp"

namespace vmmpp::erased::detail {
template struct layout_caches<vmmpp::packed_kv>;
template struct layout_caches<vmmpp::mla>;
template struct layout_caches<vmmpp::sequence_contiguous>;
} // namespace vmmpp::erased::detail
