// vmmpp/detail/json.hpp: a small JSON writer for vmmpp's statistics (no external library): objects,
// arrays, strings (escaped per RFC 8259), unsigned and signed integers, booleans. Enough for
// snapshots a serving system exports; it does not parse.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>

namespace vmmpp::detail {

/// Appends JSON text to a string. Commas between members and elements are placed by the writer;
/// the caller opens and closes objects and arrays in order.
class json_writer {
public:
    /// The text written so far.
    [[nodiscard]] const std::string& str() const noexcept { return out_; }

    /// `{` (as a value, or as the value of member `key` inside an object).
    json_writer& begin_object(std::string_view key = {}) { return open(key, '{'); }
    /// `}`.
    json_writer& end_object() { return close('}'); }
    /// `[`.
    json_writer& begin_array(std::string_view key = {}) { return open(key, '['); }
    /// `]`.
    json_writer& end_array() { return close(']'); }

    /// Member `key` (or an array element when `key` is empty) with a string value.
    json_writer& string(std::string_view key, std::string_view value) {
        prefix(key);
        quoted(value);
        return *this;
    }
    /// Member `key` (or an element) with an integer value.
    template <class T>
        requires std::is_integral_v<T> && (!std::is_same_v<T, bool>)
    json_writer& number(std::string_view key, T value) {
        prefix(key);
        if constexpr (std::is_signed_v<T>) {
            out_ += std::to_string(static_cast<long long>(value));
        } else {
            out_ += std::to_string(static_cast<unsigned long long>(value));
        }
        return *this;
    }
    /// Member `key` (or an element) with a boolean value.
    json_writer& boolean(std::string_view key, bool value) {
        prefix(key);
        out_ += value ? "true" : "false";
        return *this;
    }

private:
    json_writer& open(std::string_view key, char c) {
        prefix(key);
        out_ += c;
        first_ = true;
        return *this;
    }
    json_writer& close(char c) {
        out_ += c;
        first_ = false;
        return *this;
    }
    void prefix(std::string_view key) {
        if (!first_) {
            out_ += ',';
        }
        first_ = false;
        if (!key.empty()) {
            quoted(key);
            out_ += ':';
        }
    }
    void quoted(std::string_view s) {
        out_ += '"';
        for (const char ch : s) {
            const auto c = static_cast<unsigned char>(ch);
            switch (c) {
            case '"': out_ += "\\\""; break;
            case '\\': out_ += "\\\\"; break;
            case '\n': out_ += "\\n"; break;
            case '\r': out_ += "\\r"; break;
            case '\t': out_ += "\\t"; break;
            default:
                if (c < 0x20) {
                    char buf[8];
                    std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(c));
                    out_ += buf;
                } else {
                    out_ += ch;
                }
            }
        }
        out_ += '"';
    }

    std::string out_;
    bool first_ = true;
};

} // namespace vmmpp::detail
