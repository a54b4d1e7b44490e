// vmmpp/kv/detail/block_tables.hpp: what kernels read of sequences' block lists: the [sequences,
// max_blocks_per_seq] int32 matrix of block tables (kv_cache::pack_block_tables) and vLLM's
// slot_mapping.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string>

#include "vmmpp/error.hpp"

namespace vmmpp::detail {

/// Throws invalid_argument unless a [rows, max_blocks_per_seq] table's size does not overflow:
/// a row longer than the cache's `max_blocks` is never useful, and bounding it keeps rows x
/// columns in range.
inline void check_table_shape(std::size_t rows, std::size_t max_blocks_per_seq, std::size_t max_blocks) {
    if (max_blocks_per_seq > max_blocks ||
        (max_blocks_per_seq != 0 && rows > std::numeric_limits<std::size_t>::max() / max_blocks_per_seq)) {
        throw invalid_argument("block tables of " + std::to_string(rows) + " sequences x " +
                               std::to_string(max_blocks_per_seq) + " blocks: at most " + std::to_string(max_blocks) +
                               " blocks per sequence");
    }
}

/// Packs `table(seqs[r])` (a sequence's block ids) into row r of `out`, a [seqs.size(),
/// max_blocks_per_seq] row-major matrix, padded with `pad`. Every check comes before the first
/// write: invalid_argument (shape, output size, a sequence with too many blocks) or what
/// `table` throws.
template <class Table>
void pack_tables(std::span<const std::uint64_t> seqs, std::size_t max_blocks_per_seq, std::size_t max_blocks,
                 std::span<std::int32_t> out, std::int32_t pad, Table&& table) {
    check_table_shape(seqs.size(), max_blocks_per_seq, max_blocks);
    if (out.size() != seqs.size() * max_blocks_per_seq) {
        throw invalid_argument("pack_block_tables: output holds " + std::to_string(out.size()) + " ids, needs " +
                               std::to_string(seqs.size()) + " x " + std::to_string(max_blocks_per_seq));
    }
    for (std::uint64_t seq : seqs) {
        if (const std::size_t n = table(seq).size(); n > max_blocks_per_seq) {
            throw invalid_argument("pack_block_tables: sequence " + std::to_string(seq) + " has " + std::to_string(n) +
                                   " blocks, more than " + std::to_string(max_blocks_per_seq));
        }
    }
    for (std::size_t r = 0; r < seqs.size(); ++r) {
        const std::span<const std::int32_t> blocks = table(seqs[r]);
        auto row = out.subspan(r * max_blocks_per_seq, max_blocks_per_seq);
        std::copy(blocks.begin(), blocks.end(), row.begin());
        std::fill(row.begin() + static_cast<std::ptrdiff_t>(blocks.size()), row.end(), pad);
    }
}

/// vLLM's slot_mapping of tokens [first, first + out.size()) of sequence `seq` (`tokens` tokens
/// in `blocks`): block * block_tokens + offset in block. invalid_argument for tokens it lacks.
inline void slot_mapping(std::uint64_t seq, std::span<const std::int32_t> blocks, std::size_t tokens,
                         std::size_t block_tokens, std::size_t first, std::span<std::int64_t> out) {
    if (first > tokens || out.size() > tokens - first) {
        throw invalid_argument("slot_mapping of tokens [" + std::to_string(first) + ", +" + std::to_string(out.size()) +
                               ") of sequence " + std::to_string(seq) + " with " + std::to_string(tokens) + " tokens");
    }
    for (std::size_t i = 0; i < out.size(); ++i) {
        const std::size_t t = first + i;
        out[i] = static_cast<std::int64_t>(blocks[t / block_tokens]) * static_cast<std::int64_t>(block_tokens) +
                 static_cast<std::int64_t>(t % block_tokens);
    }
}

} // namespace vmmpp::detail
