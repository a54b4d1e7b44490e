#pragma once
// What a transfer engine (NIXL, or any library that registers memory and moves descriptor lists)
// needs from a kv_cache whose memory comes and goes: the regions to register, kept right as the
// pool commits and gives back extents, and the byte pieces of a list of blocks, cut so that each
// lies in one registered region and paired with the pieces of the same blocks in another cache.
//
// NIXL itself is not included: the engine keeps its own agent (Python `nixl_agent`, C++
// `nixlAgent`) and turns offsets into its descriptors (address = base + offset, the cache's
// device). docs/NIXL.md says which path moves blocks at link speed in which case, and why.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <span>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "vmmpp/error.hpp"
#include "vmmpp/kv/cache.hpp"
#include "vmmpp/kv/transfer.hpp"
#include "vmmpp/pool.hpp"

namespace vmmpp {

/// What to do to a transfer engine's registrations so that they match the pool's extents now:
/// deregister `removed` (extents given back, or committed again since), then register `added`.
struct registration_change {
    std::vector<committed_extent> added;
    std::vector<committed_extent> removed;
    [[nodiscard]] bool empty() const noexcept { return added.empty() && removed.empty(); }
};

/// The extents registered with a transfer engine, and what changed since.
///
/// One registration per extent, because an extent is one physical handle and UCX's cuda_ipc
/// transport exports and imports a handle whole: a region spanning two handles would be sent as
/// the first one only. An extent is known by its offset, size and commit number, so one given
/// back and committed again at the same address (a different handle) is re-registered.
class registration_tracker {
public:
    /// The change that takes the registrations from what is registered to `now` (as returned by
    /// elastic_pool::committed_extents: sorted by offset, disjoint).
    [[nodiscard]] registration_change changes(std::span<const committed_extent> now) const {
        registration_change c;
        std::set_difference(registered_.begin(), registered_.end(), now.begin(), now.end(),
                            std::back_inserter(c.removed), before);
        std::set_difference(now.begin(), now.end(), registered_.begin(), registered_.end(),
                            std::back_inserter(c.added), before);
        return c;
    }

    /// Brings the registrations to `now`: calls `deregister(extent)` for every extent that went,
    /// then `register_extent(extent)` for every new one, and records each call that returned.
    /// If a call throws, what was done before it stays recorded (so a later sync retries only the
    /// rest) and the exception propagates.
    template <class Register, class Deregister>
    void sync(std::span<const committed_extent> now, Register&& register_extent, Deregister&& deregister) {
        const registration_change c = changes(now);
        for (const committed_extent& e : c.removed) {
            deregister(e);
            registered_.erase(std::lower_bound(registered_.begin(), registered_.end(), e, before));
        }
        for (const committed_extent& e : c.added) {
            register_extent(e);
            registered_.insert(std::lower_bound(registered_.begin(), registered_.end(), e, before), e);
        }
    }

    /// What is registered, lowest offset first.
    [[nodiscard]] const std::vector<committed_extent>& registered() const noexcept { return registered_; }

private:
    static bool before(const committed_extent& a, const committed_extent& b) noexcept {
        return std::tie(a.offset, a.commit, a.bytes) < std::tie(b.offset, b.commit, b.bytes);
    }
    std::vector<committed_extent> registered_;
};

/// The byte pieces (offsets in the span) that hold `blocks`, in list order: for each block its
/// layout's pieces (Layout::for_each_piece), a piece merged with the one before it when they
/// are adjacent in memory, then cut where an extent of `extents` ends, so that each piece lies in
/// one registered region. Two caches of one layout and block shape give piece lists that enumerate
/// the same bytes of the same blocks in the same order (pair_pieces lines them up).
///
/// Throws vmmpp::invalid_argument if a piece is not inside committed extents (which a live block
/// never is). `extents` must be sorted by offset (committed_extents is).
template <class Layout>
[[nodiscard]] std::vector<byte_range> block_pieces(const kv_geometry& geometry, std::span<const std::int32_t> blocks,
                                                   std::span<const committed_extent> extents) {
    std::vector<byte_range> merged;
    for (std::int32_t b : blocks) {
        Layout::for_each_piece(geometry, static_cast<std::uint32_t>(b), [&](std::size_t offset, std::size_t bytes) {
            if (!merged.empty() && merged.back().offset + merged.back().bytes == offset) {
                merged.back().bytes += bytes;
            } else {
                merged.push_back({offset, bytes});
            }
        });
    }
    std::vector<byte_range> out;
    out.reserve(merged.size());
    for (const byte_range& piece : merged) {
        std::size_t at = piece.offset;
        const std::size_t end = piece.offset + piece.bytes;
        while (at < end) {
            // The extent holding `at`: the last one that starts at or before it.
            const auto e = std::upper_bound(extents.begin(), extents.end(), at,
                                            [](std::size_t offset, const committed_extent& x) { return offset < x.offset; });
            if (e == extents.begin() || std::prev(e)->offset + std::prev(e)->bytes <= at) {
                throw invalid_argument("block_pieces: bytes [" + std::to_string(at) + ", " + std::to_string(end) +
                                       ") are not in a committed extent");
            }
            const committed_extent& x = *std::prev(e);
            const std::size_t cut = std::min(end, x.offset + x.bytes);
            out.push_back({at, cut - at});
            at = cut;
        }
    }
    return out;
}

/// The pieces of `blocks` of `cache`, cut at its extents (see the other overload). Throws
/// vmmpp::invalid_argument unless every id is a live block, and vmmpp::cache_asleep if the
/// cache sleeps (its blocks have no memory then).
template <class Config, class Layout>
[[nodiscard]] std::vector<byte_range> block_pieces(const kv_cache<Config, Layout>& cache,
                                                   std::span<const std::int32_t> blocks) {
    if (cache.asleep()) {
        throw cache_asleep("block_pieces");
    }
    detail::check_live_blocks(cache, blocks, "block_pieces");
    const std::vector<committed_extent> extents = cache.pool().committed_extents();
    return block_pieces<Layout>(cache.geometry(), blocks, extents);
}

/// One transfer: `bytes` bytes at `local_offset` here and at `remote_offset` there.
struct piece_pair {
    std::size_t local_offset = 0;
    std::size_t remote_offset = 0;
    std::size_t bytes = 0;
    friend bool operator==(const piece_pair&, const piece_pair&) = default;
};

/// Lines up two piece lists that enumerate the same bytes in the same order (block_pieces of the
/// same blocks' counterparts in two caches): a piece is cut wherever the other side's ends, so
/// every pair has one length on both sides, as a transfer request's two descriptor lists must.
/// Throws vmmpp::invalid_argument, naming both totals, if the lists differ in total size, and,
/// naming the piece, if a piece ends past SIZE_MAX or a list's total does not fit in size_t.
[[nodiscard]] inline std::vector<piece_pair> pair_pieces(std::span<const byte_range> local,
                                                         std::span<const byte_range> remote) {
    // Every sum checked: the lists may come from a caller across the C ABI, and a total that
    // wrapped would pass the equality check below and pair only part of the longer list.
    const auto total_of = [](std::span<const byte_range> pieces, const char* side) {
        std::size_t total = 0;
        for (std::size_t k = 0; k < pieces.size(); ++k) {
            const byte_range& p = pieces[k];
            if (p.bytes > SIZE_MAX - p.offset) {
                throw invalid_argument("pair_pieces: " + std::string(side) + " piece " + std::to_string(k) + " ([" +
                                       std::to_string(p.offset) + ", +" + std::to_string(p.bytes) +
                                       ")) ends past the largest offset, " + std::to_string(SIZE_MAX));
            }
            if (p.bytes > SIZE_MAX - total) {
                throw invalid_argument("pair_pieces: the " + std::string(side) + " pieces' sizes overflow size_t: " +
                                       std::to_string(total) + " bytes before piece " + std::to_string(k) + " plus its " +
                                       std::to_string(p.bytes));
            }
            total += p.bytes;
        }
        return total;
    };
    const std::size_t local_total = total_of(local, "local");
    const std::size_t remote_total = total_of(remote, "remote");
    if (local_total != remote_total) {
        throw invalid_argument("pair_pieces: the local pieces hold " + std::to_string(local_total) +
                               " bytes, the remote ones " + std::to_string(remote_total));
    }
    std::vector<piece_pair> out;
    out.reserve(std::max(local.size(), remote.size()));
    std::size_t i = 0;
    std::size_t j = 0;
    std::size_t i_done = 0;  // bytes of local[i] already paired
    std::size_t j_done = 0;
    while (i < local.size() && j < remote.size()) {
        const std::size_t n = std::min(local[i].bytes - i_done, remote[j].bytes - j_done);
        if (n > 0) {
            out.push_back({local[i].offset + i_done, remote[j].offset + j_done, n});
        }
        i_done += n;
        j_done += n;
        if (i_done == local[i].bytes) {
            ++i;
            i_done = 0;
        }
        if (j_done == remote[j].bytes) {
            ++j;
            j_done = 0;
        }
    }
    return out;
}

} // namespace vmmpp
