// bench_prefix_cost_gpu: prefix_cache's cost per block against the 2 MiB take on the GPU
// configurations (static_config, elastic_config, elastic_page_config x block_major, layer_major),
// the same code as the host's bench_prefix_cost (bench/prefix_cost.hpp). Times are the host side
// (the engine's thread); compaction also reports the stream synchronise after it.
// max_blocks: 8,192 (16 GiB of 2 MiB blocks) for every configuration, and 65,536 (a 128 GiB span:
// reserved address space only) for the elastic ones; static_config commits its whole span, which
// an 80 GB H100 cannot hold at 65,536. PREFIX_COST_SCALE multiplies the iteration counts.
#include <cstdlib>

#include "prefix_cost.hpp"

int main(int argc, char** argv) {
    const char* scale_env = std::getenv("PREFIX_COST_SCALE");
    const double scale = scale_env != nullptr ? std::atof(scale_env) : 1.0;
    using namespace prefix_cost;
    const std::vector<std::int64_t> both{8192, 65536}, small{8192};
    register_all<vmmpp::static_config, vmmpp::block_major>("static_config", "block_major", small, scale);
    register_all<vmmpp::static_config, vmmpp::layer_major>("static_config", "layer_major", small, scale);
    register_all<vmmpp::elastic_config, vmmpp::block_major>("elastic_config", "block_major", both, scale);
    register_all<vmmpp::elastic_config, vmmpp::layer_major>("elastic_config", "layer_major", both, scale);
    register_all<vmmpp::elastic_page_config, vmmpp::block_major>("elastic_page_config", "block_major", both, scale);
    register_all<vmmpp::elastic_page_config, vmmpp::layer_major>("elastic_page_config", "layer_major", both, scale);
    benchmark::Initialize(&argc, argv);
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return prefix_cost::errors == 0 ? 0 : 1;
}
