// quickstart: a KV cache whose memory follows the live tokens. On a machine with a CUDA GPU it
// uses elastic_config (CUDA VMM under a shared budget); without one it runs the same code on the
// host backing and says so.
#include <cstdio>
#include <vector>

#include <vmmpp/driver/device.hpp>
#include <vmmpp/vmmpp.hpp>

namespace {

constexpr std::size_t MiB = std::size_t{1} << 20;

// A Llama-3-8B-like cache: 32 layers, 8 KV heads of 128, bf16, 16-token blocks, room for 64k tokens.
constexpr vmmpp::kv_geometry geometry{.layers = 32, .kv_heads = 8, .head_dim = 128, .type = vmmpp::dtype::bf16,
                                      .block_tokens = 16, .max_blocks = 4096};

template <class Cache>
void report(const char* when, const Cache& cache) {
    const auto s = cache.pool().stats();
    std::printf("%-34s %3zu sequences %5zu blocks  committed %6.1f MiB of %6.1f MiB reserved  (%llu commits, %llu decommits)\n",
                when, cache.sequence_count(), cache.used_blocks(), static_cast<double>(s.committed) / MiB,
                static_cast<double>(s.reserved) / MiB, static_cast<unsigned long long>(s.commits),
                static_cast<unsigned long long>(s.decommits));
}

template <class Cache>
void run(Cache& cache) {
    report("empty:", cache);
    std::vector<vmmpp::seq_id> seqs;
    for (int i = 0; i < 8; ++i) {
        seqs.push_back(cache.add_sequence());
        cache.append(seqs.back(), 1000 + 300 * static_cast<std::size_t>(i));  // prompts
    }
    report("8 prompts admitted:", cache);
    const auto beam = cache.fork(seqs[0]);  // shares every block of seqs[0]
    cache.append(beam, 1);                  // copy-on-write of the shared partial block
    report("forked one, appended to the fork:", cache);
    std::vector<std::int64_t> slots(1);
    cache.slot_mapping(beam, cache.tokens(beam) - 1, slots);
    std::printf("  the fork's new token lives in slot %lld; its block table has %zu blocks\n",
                static_cast<long long>(slots[0]), cache.block_table(beam).size());
    for (std::size_t i = 0; i + 1 < seqs.size(); ++i) {
        cache.free(seqs[i]);
    }
    cache.free(beam);
    // Freed pages go back once the GPU work queued before the frees has completed (the driver
    // would otherwise unmap under it). Nothing else runs here, so wait for it; an engine just
    // carries on, and a later call gives the pages back.
    (void)cache.pool().synchronize();
    report("7 finished, 1 left:", cache);
}

} // namespace

int main() {
    if (vmmpp::driver::device_count() > 0 && vmmpp::is_vmm_supported(0)) {
        std::printf("CUDA device found: elastic_config (CUDA VMM, 2 MiB pages committed in extents, shared budget)\n");
        vmmpp::budget budget(std::size_t{4} << 30);
        vmmpp::kv_cache<vmmpp::elastic_config> cache(geometry, {}, {}, budget.register_model("llama-8b", std::size_t{3} << 30));
        run(cache);
        const auto b = budget.stats();
        std::printf("budget: %.1f MiB committed, peak %.1f MiB of %.1f MiB\n", static_cast<double>(b.committed) / MiB,
                    static_cast<double>(b.peak) / MiB, static_cast<double>(b.limit) / MiB);
    } else {
        std::printf("no CUDA device here: running on the host backing (host_config), same code, CPU memory\n");
        vmmpp::kv_cache<vmmpp::host_config> cache(geometry);
        run(cache);
    }
    return 0;
}
