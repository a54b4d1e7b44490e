// Probe: which call takes committed managed memory off an H100 (non-coherent) so that
// cudaMemGetInfo shows it free again? Each variant prefetches 512 MiB of managed memory to the
// device, then tries one way of letting it go, and prints the device's free memory at each step.
// Build: nvcc -std=c++20 -arch=sm_90 -o managed_release managed_release.cu
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define CHECK(x)                                                                                   \
    do {                                                                                           \
        cudaError_t rc_ = (x);                                                                     \
        if (rc_ != cudaSuccess) {                                                                  \
            std::printf("  %s -> %s\n", #x, cudaGetErrorName(rc_));                                \
        }                                                                                          \
    } while (0)

static long long free_mib() {
    size_t f = 0, t = 0;
    cudaDeviceSynchronize();
    cudaMemGetInfo(&f, &t);
    return static_cast<long long>(f >> 20);
}

int main() {
    const size_t bytes = size_t{512} << 20;
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaMemLocation dev{cudaMemLocationTypeDevice, 0}, host{cudaMemLocationTypeHost, 0};
    const char* names[] = {"prefetch to host", "prefetch to host, preferred location unset first",
                           "discard (non-default stream)", "discard on legacy stream 0",
                           "preferred location host + prefetch to host", "free the allocation"};
    for (int variant = 0; variant < 6; ++variant) {
        void* p = nullptr;
        CHECK(cudaMallocManaged(&p, bytes));
        CHECK(cudaMemAdvise(p, bytes, cudaMemAdviseSetPreferredLocation, dev));
        CHECK(cudaMemAdvise(p, bytes, cudaMemAdviseSetAccessedBy, host));
        const long long before = free_mib();
        CHECK(cudaMemPrefetchAsync(p, bytes, dev, 0, s));
        CHECK(cudaMemsetAsync(p, 1, bytes, s));
        CHECK(cudaStreamSynchronize(s));
        const long long committed = free_mib();
        void* ptrs[] = {p};
        size_t sizes[] = {bytes};
        switch (variant) {
        case 0: CHECK(cudaMemPrefetchAsync(p, bytes, host, 0, s)); break;
        case 1:
            CHECK(cudaMemAdvise(p, bytes, cudaMemAdviseUnsetPreferredLocation, dev));
            CHECK(cudaMemPrefetchAsync(p, bytes, host, 0, s));
            break;
        case 2: CHECK(cudaMemDiscardBatchAsync(ptrs, sizes, 1, 0, s)); break;
        case 3: CHECK(cudaMemDiscardBatchAsync(ptrs, sizes, 1, 0, 0)); break;
        case 4:
            CHECK(cudaMemAdvise(p, bytes, cudaMemAdviseSetPreferredLocation, host));
            CHECK(cudaMemPrefetchAsync(p, bytes, host, 0, s));
            break;
        case 5: CHECK(cudaFree(p)); p = nullptr; break;
        }
        CHECK(cudaStreamSynchronize(s));
        const long long released = free_mib();
        std::printf("%-50s free MiB: before %lld, prefetched %lld (-%lld), after release %lld (+%lld)\n",
                    names[variant], before, committed, before - committed, released, released - committed);
        if (p != nullptr) {
            CHECK(cudaFree(p));
        }
        std::printf("%-50s free MiB after cudaFree: %lld\n", "", free_mib());
    }
    return 0;
}
