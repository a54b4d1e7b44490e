// Helpers for gpu tests: a Boost.Test precondition, error checking, device memory readings.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include <boost/test/unit_test.hpp>

#include "vmmpp/driver/api.hpp"

namespace vmmpp_test {

/// Boost.Test precondition: the test needs a CUDA device.
struct needs_gpu {
    boost::test_tools::assertion_result operator()(boost::unit_test::test_unit_id) const {
        boost::test_tools::assertion_result r(vmmpp::driver::device_count() > 0);
        r.message() << "no CUDA device";
        return r;
    }
};

inline void cuda_check(cudaError_t rc) {
    if (rc != cudaSuccess) {
        BOOST_FAIL("CUDA error " << cudaGetErrorName(rc) << ": " << cudaGetErrorString(rc));
    }
}

/// Free device memory of the current device, in bytes.
inline std::size_t free_device_bytes() {
    std::size_t free = 0, total = 0;
    cuda_check(cudaMemGetInfo(&free, &total));
    return free;
}

inline constexpr std::size_t MiB = std::size_t{1} << 20;
inline constexpr std::size_t GiB = std::size_t{1} << 30;

} // namespace vmmpp_test
