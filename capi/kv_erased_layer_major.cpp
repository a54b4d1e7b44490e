// capi/kv_erased_layer_major.cpp: the caches of the layer_major and layer_major_hnd layouts (kv_erased_impl.hpp's
// layout_caches), every configuration and quota, in a translation unit of their own.
#include "kv_erased_impl.hpp"

namespace vmmpp::erased::detail {
template struct layout_caches<vmmpp::layer_major>;
template struct layout_caches<vmmpp::layer_major_hnd>;
} // namespace vmmpp::erased::detail
