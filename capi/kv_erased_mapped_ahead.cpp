// capi/kv_erased_mapped_ahead.cpp: the caches of the elastic_mapped_ahead configuration
// in every layout (kv_erased_impl.hpp's config_caches), in a translation unit of their own.
#include "kv_erased_impl.hpp"

namespace vmmpp::erased::detail {
template struct config_caches<vmmpp::elastic_mapped_ahead_config>;
} // namespace vmmpp::erased::detail
