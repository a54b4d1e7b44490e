// Included once by a cpu test executable, after defining BOOST_TEST_MODULE.
#pragma once
#include <boost/test/unit_test.hpp>
