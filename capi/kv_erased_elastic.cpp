// capi/kv_erased_elastic.cpp: the caches of the elastic and elastic_page configurations
// in every layout (kv_erased_impl.hpp's config_caches), in a translation unit of their own.
#include "kv_erased_impl.hpp"

namespace vmmpp::erased::detail {
template struct config_caches<vmmpp::elastic_config>;
template struct config_caches<vmmpp::elastic_page_config>;
} // namespace vmmpp::erased::detail
