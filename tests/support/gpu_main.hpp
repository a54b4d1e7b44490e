// Included by exactly one translation unit of a gpu test executable (instead of defining
// BOOST_TEST_MODULE). Without a CUDA device the executable prints why and exits with
// VMMPP_SKIP_CODE, which ctest reports as "skipped", never as "passed".
#pragma once

#include <cstdio>
#include <cstdlib>

#include <boost/test/unit_test.hpp>

#include "vmmpp/driver/api.hpp"

#ifndef VMMPP_GPU_TEST_NAME
#define VMMPP_GPU_TEST_NAME "vmmpp gpu tests"
#endif

boost::unit_test::test_suite* init_unit_test_suite(int, char**) {
    if (vmmpp::driver::device_count() == 0) {
        std::printf("no CUDA device (%s): skipping " VMMPP_GPU_TEST_NAME "\n",
                    vmmpp::driver::available() ? "driver loaded, 0 devices" : "no usable driver");
        std::fflush(stdout);
        std::exit(VMMPP_SKIP_CODE);
    }
    boost::unit_test::framework::master_test_suite().p_name.value = VMMPP_GPU_TEST_NAME;
    return nullptr;
}
