// Must not compile: a resource over host memory (host_config) where CCCL asks for memory a kernel
// can use (a resource_ref with cuda::mr::device_accessible).
#include "vmmpp/config.hpp"
#include "vmmpp/interop/cuda_mr.hpp"
int main() {
    vmmpp::elastic_pool<vmmpp::host_config> pool(std::size_t{2} << 20);
    vmmpp::pool_memory_resource mr(pool);
    cuda::mr::resource_ref<cuda::mr::device_accessible> ref{mr};
    return ref == ref ? 0 : 1;
}
