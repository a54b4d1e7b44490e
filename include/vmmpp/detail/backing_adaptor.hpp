// vmmpp/detail/backing_adaptor.hpp: what every backing adaptor (fault_injecting, zeroing) forwards
// unchanged to the backing it wraps, written once. An adaptor derives from it and adds its own
// commit/decommit and a get_property friend that forwards the upstream's properties.
#pragma once

#include <cstddef>
#include <utility>

#include "vmmpp/backing/concept.hpp"

namespace vmmpp::detail {

/// Holds `Upstream` and forwards its size, address, commitment and device, and each optional
/// capability it has (handle_keeping_backing, context_binding_backing, handle_exporting_backing),
/// so a pool over an adaptor still charges, drops, binds and exports what the upstream does. As
/// CCCL's cuda::forward_property: a member exists exactly when the upstream's does.
template <class Upstream>
class backing_adaptor {
public:
    using upstream_type = Upstream;
    static constexpr bool is_elastic = Upstream::is_elastic;

    [[nodiscard]] std::size_t granularity() const noexcept { return upstream_.granularity(); }
    [[nodiscard]] std::byte* base() const noexcept { return upstream_.base(); }
    [[nodiscard]] std::size_t capacity() const noexcept { return upstream_.capacity(); }
    [[nodiscard]] std::size_t committed_bytes() const noexcept { return upstream_.committed_bytes(); }
    [[nodiscard]] int device_ordinal() const noexcept
        requires requires(const Upstream& u) { u.device_ordinal(); }
    {
        return upstream_.device_ordinal();
    }
    [[nodiscard]] std::size_t cached_bytes() const noexcept(noexcept(std::declval<const Upstream&>().cached_bytes()))
        requires handle_keeping_backing<Upstream>
    {
        return upstream_.cached_bytes();
    }
    std::size_t release_cached() noexcept(noexcept(std::declval<Upstream&>().release_cached()))
        requires handle_keeping_backing<Upstream>
    {
        return upstream_.release_cached();
    }
    void bind_current_thread() const
        requires context_binding_backing<Upstream>
    {
        upstream_.bind_current_thread();
    }
    [[nodiscard]] decltype(auto) export_handles() const
        requires handle_exporting_backing<Upstream>
    {
        return upstream_.export_handles();
    }
    /// The wrapped backing (a vmm backing's handle count, say).
    [[nodiscard]] const Upstream& upstream() const noexcept { return upstream_; }

protected:
    template <class... Args>
    explicit backing_adaptor(Args&&... args) : upstream_(std::forward<Args>(args)...) {}
    backing_adaptor(const backing_adaptor&) = delete;
    backing_adaptor& operator=(const backing_adaptor&) = delete;
    ~backing_adaptor() = default;

    Upstream upstream_;
};

} // namespace vmmpp::detail
