// bench_prefix_cost: prefix_cache's cost per block against the 2 MiB take on the host backing
// (host_config; bench/prefix_cost.hpp says what each benchmark measures). The GPU configurations
// run the same code from bench_prefix_cost_gpu (scripts/issue29-cost-run).
// PREFIX_COST_SCALE (default 1) multiplies the iteration counts; PREFIX_COST_SIZES (default
// "4096,16384,65536") the max_blocks values.
#include <cstdlib>
#include <sstream>

#include "prefix_cost.hpp"

int main(int argc, char** argv) {
    const char* scale_env = std::getenv("PREFIX_COST_SCALE");
    const double scale = scale_env != nullptr ? std::atof(scale_env) : 1.0;
    const char* sizes_env = std::getenv("PREFIX_COST_SIZES");
    std::vector<std::int64_t> sizes;
    std::stringstream in(sizes_env != nullptr ? sizes_env : "4096,16384,65536");
    for (std::string x; std::getline(in, x, ',');) {
        sizes.push_back(std::stoll(x));
    }
    prefix_cost::register_all<vmmpp::host_config, vmmpp::block_major>("host_config", "block_major", sizes, scale);
    prefix_cost::register_all<vmmpp::host_config, vmmpp::layer_major>("host_config", "layer_major", sizes, scale);
    benchmark::Initialize(&argc, argv);
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return prefix_cost::errors == 0 ? 0 : 1;
}
