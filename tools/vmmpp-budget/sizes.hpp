// vmmpp-budget: human sizes and durations. "24GiB", "512MiB", "1.5GiB", "64KiB", "3GB" (decimal
// units), "1048576" (bytes); "250ms", "2s", "1m". Kept apart from main.cpp so ctest checks them.
#pragma once

#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <string_view>

namespace vmmpp_budget {

/// `text` as bytes, or nothing if it is not a size: digits with an optional fraction, then an
/// optional unit (B, KiB, MiB, GiB, TiB, kB, MB, GB, TB; K, M, G, T mean KiB..TiB), case
/// insensitive, no sign. A fraction needs a unit and must give whole bytes within 64 bits.
inline std::optional<std::uint64_t> parse_size(std::string_view text) {
    std::size_t i = 0;
    while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) != 0 || text[i] == '.')) {
        ++i;
    }
    const std::string number(text.substr(0, i));
    std::string unit;
    for (const char c : text.substr(i)) {
        unit += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    }
    if (number.empty() || number.front() == '.' || number.back() == '.' ||
        number.find('.') != number.rfind('.')) {
        return std::nullopt;
    }
    long double scale = 0;
    if (unit.empty() || unit == "b") {
        scale = 1;
    } else if (unit == "k" || unit == "kib") {
        scale = 1024.0L;
    } else if (unit == "m" || unit == "mib") {
        scale = 1024.0L * 1024;
    } else if (unit == "g" || unit == "gib") {
        scale = 1024.0L * 1024 * 1024;
    } else if (unit == "t" || unit == "tib") {
        scale = 1024.0L * 1024 * 1024 * 1024;
    } else if (unit == "kb") {
        scale = 1e3L;
    } else if (unit == "mb") {
        scale = 1e6L;
    } else if (unit == "gb") {
        scale = 1e9L;
    } else if (unit == "tb") {
        scale = 1e12L;
    } else {
        return std::nullopt;
    }
    if (number.find('.') == std::string::npos) {
        if (number.size() > 19) {
            return std::nullopt;
        }
        const std::uint64_t n = std::stoull(number);
        const long double bytes = static_cast<long double>(n) * scale;
        if (bytes >= 18446744073709551615.0L) {
            return std::nullopt;
        }
        return n * static_cast<std::uint64_t>(scale);
    }
    if (scale == 1) {
        return std::nullopt;  // a fraction of a byte
    }
    const long double bytes = std::stold(number) * scale;
    if (bytes >= 18446744073709551615.0L || bytes != std::floor(bytes)) {
        return std::nullopt;
    }
    return static_cast<std::uint64_t>(bytes);
}

/// `bytes` for people: "24.0 GiB", "512.0 MiB", "4.0 KiB", "100 B".
inline std::string format_size(std::uint64_t bytes) {
    static constexpr const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    if (bytes < 1024) {
        return std::to_string(bytes) + " B";
    }
    long double v = static_cast<long double>(bytes);
    int u = 0;
    while (v >= 1024 && u < 5) {
        v /= 1024;
        ++u;
    }
    char text[32];
    std::snprintf(text, sizeof text, "%.1Lf %s", v, units[u]);
    return text;
}

/// `text` as a duration ("250ms", "2s", "1.5s", "1m"; a plain number is seconds), or nothing.
inline std::optional<std::chrono::milliseconds> parse_duration(std::string_view text) {
    std::size_t i = 0;
    while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) != 0 || text[i] == '.')) {
        ++i;
    }
    const std::string number(text.substr(0, i));
    const std::string_view unit = text.substr(i);
    if (number.empty() || number.front() == '.' || number.back() == '.' || number.find('.') != number.rfind('.') ||
        number.size() > 12) {
        return std::nullopt;
    }
    const long double n = std::stold(number);
    long double ms = 0;
    if (unit == "ms") {
        ms = n;
    } else if (unit.empty() || unit == "s") {
        ms = n * 1000;
    } else if (unit == "m" || unit == "min") {
        ms = n * 60000;
    } else {
        return std::nullopt;
    }
    return std::chrono::milliseconds(static_cast<std::int64_t>(std::llround(ms)));
}

} // namespace vmmpp_budget
