// tools/kernels/staged_pieces.cu: the one kernel vmmpp's headers launch, kept here as source;
// tools/gen-staged-pieces-ptx turns it into the PTX that include/vmmpp/kv/detail/staged_pieces_ptx.hpp
// embeds (a header-only library has no compiled code of its own: the driver loads the PTX and
// compiles it for the GPU at hand). Keep the argument struct in step with
// vmmpp::detail::staged_pieces_args (kv/detail/staged_copy.hpp).
//
// It moves the pieces of up to max_blocks KV blocks between their places in a cache and a
// contiguous staging buffer: staging holds block j's piece r at (j * rows + r) * width, the
// blocks one after another, so that one DMA moves a whole run of blocks to or from page-locked
// memory (copies of small pieces cost the copy engine ~0.6 us each: 32 KiB pieces reach about 0.6x
// of PCIe's bandwidth, whole blocks ~0.95x).
constexpr unsigned max_blocks = 64;

struct staged_pieces_args {
    unsigned long long block[max_blocks];  // address of each block's first piece in the cache
    unsigned long long staging;            // the staging buffer
    unsigned long long pitch;              // bytes from one piece of a block to the next, in the cache
    unsigned long long width;              // bytes of a piece (a multiple of 16; addresses 16-aligned)
    unsigned rows;                         // pieces per block
    unsigned to_staging;                   // 1: cache -> staging (gather), 0: staging -> cache (scatter)
};

// One CTA per piece: blockIdx.x = j * rows + r.
extern "C" __global__ void vmmpp_staged_pieces(staged_pieces_args a) {
    const unsigned j = blockIdx.x / a.rows;
    const unsigned r = blockIdx.x % a.rows;
    uint4* cache = reinterpret_cast<uint4*>(a.block[j] + r * a.pitch);
    uint4* staging = reinterpret_cast<uint4*>(a.staging + (static_cast<unsigned long long>(j) * a.rows + r) * a.width);
    const unsigned long long n = a.width / 16;
    if (a.to_staging) {
        for (unsigned long long i = threadIdx.x; i < n; i += blockDim.x) {
            staging[i] = cache[i];
        }
    } else {
        for (unsigned long long i = threadIdx.x; i < n; i += blockDim.x) {
            cache[i] = staging[i];
        }
    }
}
