// The driver layer on whatever machine runs it: without a GPU every entry point answers with a
// clean vmmpp error (not a loader failure or a crash); with one, bad device ordinals are errors.
#define BOOST_TEST_MODULE driver
#include "support/cpu_main.hpp"

#include <string>

#include "vmmpp/backing/device.hpp"
#include "vmmpp/backing/managed_prefetch.hpp"
#include "vmmpp/backing/vmm.hpp"
#include "vmmpp/driver/device.hpp"

BOOST_AUTO_TEST_CASE(gpu_entry_points_fail_cleanly_or_check_ordinals) {
    const int count = vmmpp::driver::device_count();
    BOOST_TEST_MESSAGE("CUDA devices: " << count);
    BOOST_TEST(!vmmpp::is_vmm_supported(count));  // no device with that ordinal
    BOOST_TEST(!vmmpp::is_vmm_supported(-1));
    if (count == 0) {
        if (!vmmpp::driver::available()) {
            try {
                (void)vmmpp::driver::get();
                BOOST_ERROR("driver::get() did not throw without a driver");
            } catch (const vmmpp::cuda_unavailable& e) {
                BOOST_TEST(std::string(e.what()).find("CUDA driver unavailable") != std::string::npos, e.what());
            }
            BOOST_CHECK_THROW(vmmpp::vmm(2 << 20), vmmpp::cuda_unavailable);
            BOOST_CHECK_THROW(vmmpp::device(2 << 20), vmmpp::cuda_unavailable);
            BOOST_CHECK_THROW(vmmpp::managed_prefetch<>(2 << 20), vmmpp::cuda_unavailable);
            BOOST_CHECK_THROW((void)vmmpp::vmm_granularity(0), vmmpp::cuda_unavailable);
        } else {
            BOOST_CHECK_THROW(vmmpp::vmm(2 << 20), vmmpp::invalid_argument);
        }
    } else {
        BOOST_CHECK_THROW(vmmpp::vmm(2 << 20, {.device = count}), vmmpp::invalid_argument);
        BOOST_CHECK_THROW(vmmpp::device(2 << 20, {.device = -1}), vmmpp::invalid_argument);
        BOOST_CHECK_THROW(vmmpp::vmm(2 << 20, {.device = 0, .peer_devices = {count}}), vmmpp::invalid_argument);
        BOOST_TEST(vmmpp::vmm_granularity(0) > 0u);
    }
}
