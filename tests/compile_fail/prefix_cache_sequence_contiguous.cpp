// Must not compile: prefix caching over a layout whose sequences cannot share blocks.
#include "vmmpp/config.hpp"
#include "vmmpp/prefix/prefix_cache.hpp"
using wrong = vmmpp::prefix_cache<vmmpp::kv_cache<vmmpp::host_config, vmmpp::sequence_contiguous>>;
int main() { return sizeof(wrong); }
