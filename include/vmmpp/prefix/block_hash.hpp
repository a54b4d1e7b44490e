// vmmpp/prefix/block_hash.hpp: the content key of a full KV block, what a prefix cache finds
// blocks by. A block's key is chained over its parent's key, so equal keys mean equal prompts
// from the first token on, not only equal blocks: the KV of a token depends on every token
// before it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>

namespace vmmpp {

/// A block's 128-bit content key: two 64-bit lanes, each mixed over every input word.
///
/// Why 128 bits: a collision is not a slower lookup but a wrong answer, another prompt's KV
/// handed to a request. With 64 bits, some collision becomes likely after about 2^32 (4 x 10^9)
/// distinct blocks (the birthday bound): days for a fleet keying 10^9 blocks a day. With 128 bits
/// that takes about 2^64 blocks. The mix is not cryptographic: a tenant that can choose prompts to
/// collide with another's should add a secret per tenant to the extra keys.
struct block_key {
    std::uint64_t hi = 0;
    std::uint64_t lo = 0;
    friend constexpr bool operator==(const block_key&, const block_key&) = default;
};

/// For unordered containers: the low lane is already well mixed.
struct block_key_hash {
    std::size_t operator()(const block_key& k) const noexcept { return static_cast<std::size_t>(k.lo); }
};

namespace detail {

/// The 64-bit finalizer of MurmurHash3 (fmix64): every input bit flips about half the output bits.
[[nodiscard]] constexpr std::uint64_t fmix64(std::uint64_t k) noexcept {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return k;
}
[[nodiscard]] constexpr std::uint64_t rotl64(std::uint64_t x, int r) noexcept { return (x << r) | (x >> (64 - r)); }

/// Two lanes absorbing 64-bit words with different multipliers and rotations, crossed at the end
/// (MurmurHash3_x64_128's structure, one word per round).
class key_mixer {
public:
    constexpr explicit key_mixer(const block_key& seed) noexcept
        : a_(seed.hi ^ 0x9e3779b97f4a7c15ULL), b_(seed.lo ^ 0xc2b2ae3d27d4eb4fULL) {}

    constexpr void add(std::uint64_t w) noexcept {
        ++words_;
        a_ ^= rotl64(w * 0x87c37b91114253d5ULL, 31) * 0x4cf5ad432745937fULL;
        a_ = rotl64(a_, 27) + b_;
        a_ = a_ * 5 + 0x52dce729;
        b_ ^= rotl64(w * 0x4cf5ad432745937fULL, 33) * 0x87c37b91114253d5ULL;
        b_ = rotl64(b_, 31) + a_;
        b_ = b_ * 5 + 0x38495ab5;
    }

    [[nodiscard]] constexpr block_key finish() const noexcept {
        std::uint64_t a = a_ ^ words_, b = b_ ^ words_;
        a += b;
        b += a;
        a = fmix64(a);
        b = fmix64(b);
        a += b;
        b += a;
        return {a, b};
    }

private:
    std::uint64_t a_, b_;
    std::uint64_t words_ = 0;
};

} // namespace detail

/// The key of the first block of every prompt's chain: the parent of a prompt's first block.
inline constexpr block_key root_block_key{0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL};

/// The key of a full block: `parent` (root_block_key for a prompt's first block), its token ids
/// (all of them: block_tokens ids) and `extra`, keys that make the same tokens a different KV
/// (model revision, LoRA adapter id, multimodal input hashes, a tenant's salt), in order. The
/// counts are hashed too, so no two different inputs are the same words.
[[nodiscard]] constexpr block_key hash_block(const block_key& parent, std::span<const std::int32_t> tokens,
                                             std::span<const std::uint64_t> extra = {}) noexcept {
    detail::key_mixer m(parent);
    m.add(tokens.size());
    for (std::int32_t t : tokens) {
        m.add(static_cast<std::uint32_t>(t));
    }
    m.add(extra.size() ^ 0xe7037ed1a0b428dbULL);
    for (std::uint64_t e : extra) {
        m.add(e);
    }
    return m.finish();
}

/// The keys of the full blocks of `tokens` (tokens.size() / block_tokens of them), in order,
/// each chained over the one before: calls f(index, key) for each, and stops early where f
/// returns false. Returns how many keys f accepted.
template <class F>
std::size_t for_each_block_key(std::span<const std::int32_t> tokens, std::size_t block_tokens,
                               std::span<const std::uint64_t> extra, F&& f) {
    block_key parent = root_block_key;
    const std::size_t full = block_tokens == 0 ? 0 : tokens.size() / block_tokens;
    for (std::size_t i = 0; i < full; ++i) {
        parent = hash_block(parent, tokens.subspan(i * block_tokens, block_tokens), extra);
        if (!std::invoke(f, i, parent)) {
            return i;
        }
    }
    return full;
}

} // namespace vmmpp
