//! The candle-cuda-vmm pools on a real GPU (vmmpp's vmm backing): a 128 GiB span with 1 GiB
//! committed and given back, then two models under one global limit, the second refused past it.
//! Without a GPU that supports virtual memory management it says so and exits 0.
//!
//!     VMMPP_CAPI_LIB_DIR=$PWD/build/dev/interop cargo run --offline \
//!         --manifest-path bindings/rust/Cargo.toml --example gpu_pool

use vmmpp::{is_vmm_supported, Device, Result, SharedMemoryPool, Status, VirtualMemoryPool};

const MIB: usize = 1 << 20;
const GIB: usize = 1 << 30;

fn main() -> Result<()> {
    if !is_vmm_supported() {
        println!("gpu_pool: skipped, no CUDA device 0 with virtual memory management (is_vmm_supported() is false)");
        return Ok(());
    }
    let device = Device::new_cuda(0)?;

    let mut pool = VirtualMemoryPool::new(128 * GIB, 2 * MIB, device)?;
    println!(
        "reserved {} GiB at {:#x}, page {} MiB",
        pool.capacity() / GIB,
        pool.base_address(),
        pool.page_size() / MIB
    );
    assert_eq!(pool.physical_memory_usage(), 0);
    let address = pool.allocate(0, GIB)?;
    assert_eq!(address, pool.base_address());
    assert_eq!(pool.physical_memory_usage(), GIB);
    println!(
        "allocate(0, 1 GiB): {} MiB committed",
        pool.physical_memory_usage() / MIB
    );
    pool.deallocate(0, GIB)?;
    assert_eq!(pool.physical_memory_usage(), 0);
    println!("deallocate(0, 1 GiB): {} bytes committed", pool.physical_memory_usage());

    // Two models, 256 MiB for both; each could map 192 MiB of its own.
    let mut shared = SharedMemoryPool::new(256 * MIB, device)?;
    shared.register_model("llama", 192 * MIB)?;
    shared.register_model("gpt2", 192 * MIB)?;
    let llama = shared.allocate_for_model("llama", 192 * MIB)?;
    let refused = shared.allocate_for_model("gpt2", 128 * MIB).unwrap_err();
    assert_eq!(refused.status(), Status::OverQuota);
    let q = refused.over_quota().expect("a pool's over-quota error has its numbers");
    assert_eq!(
        (q.which.as_str(), q.requested, q.in_use, q.limit),
        ("global", 128 << 20, 192 << 20, 256 << 20)
    );
    println!("gpt2 refused: {refused}");
    shared.deallocate_for_model("llama", llama)?;
    shared.allocate_for_model("gpt2", 128 * MIB)?;
    let stats = shared.global_stats()?;
    println!("after llama gave its memory back, gpt2 got it: {stats:?}");
    assert_eq!(stats.physical_usage, 128 * MIB);
    println!("gpu_pool: ok");
    Ok(())
}
