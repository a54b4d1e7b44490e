//! vmmpp for Rust: elastic GPU memory (a reserved span whose physical pages follow what is held
//! in it) with the API of candle-cuda-vmm, and vmmpp's KV cache, over vmmpp's C ABI
//! (libvmmpp_kv_capi.so: capi/vmmpp_kv_capi.h and capi/vmmpp_pool_capi.h).
//!
//! - [`VirtualMemoryPool`], [`SharedMemoryPool`], [`MemoryStats`], [`GlobalMemoryStats`],
//!   [`is_vmm_supported`]: candle-cuda-vmm's names; the backing is chosen by [`Device`]
//!   (`Device::Cuda(n)`: CUDA VMM on GPU n; `Device::Cpu`: host memory, no GPU needed).
//! - [`KvCache`]: vmmpp::kv_cache of a named configuration and layout (paged blocks, sequences,
//!   fork with copy on write, block tables).
//!
//! Every failure is an [`Error`]: vmmpp's typed [`Status`] and its message (and, for a pool a
//! quota refused, the numbers: [`Error::over_quota`]).
//!
//! candle-cuda-vmm's quick start with `candle_cuda_vmm` and `candle_core` replaced by `vmmpp`
//! (the calls are unchanged):
//!
//! ```no_run
//! use vmmpp::{VirtualMemoryPool, Result};
//! use vmmpp::Device;
//!
//! fn main() -> Result<()> {
//!     let device = Device::new_cuda(0)?;
//!
//!     // 128 GB of address space, committed 2 MB at a time
//!     let mut pool = VirtualMemoryPool::new(
//!         128 * 1024 * 1024 * 1024, // 128GB virtual
//!         2 * 1024 * 1024,          // 2MB pages
//!         device,
//!     )?;
//!
//!     // 1 GB of it backed by GPU memory now
//!     let addr = pool.allocate(0, 1024 * 1024 * 1024)?;
//!     println!("Physical usage: {} bytes at {:#x}", pool.physical_memory_usage(), addr);
//!
//!     // and given back
//!     pool.deallocate(0, 1024 * 1024 * 1024)?;
//!     Ok(())
//! }
//! ```
//!
//! The same on CPU memory (`Device::Cpu`, the host backing), which runs anywhere:
//!
//! ```
//! use vmmpp::{Device, VirtualMemoryPool};
//!
//! let mut pool = VirtualMemoryPool::new(1 << 30, 2 << 20, Device::Cpu)?;
//! pool.allocate(0, 3 << 20)?;
//! assert_eq!(pool.physical_memory_usage(), 4 << 20); // two whole pages
//! pool.deallocate(0, 3 << 20)?;
//! assert_eq!(pool.physical_memory_usage(), 0);
//! # Ok::<(), vmmpp::Error>(())
//! ```

mod error;
mod ffi;
mod kv;
mod pool;

pub use error::{Error, OverQuota, Result, Status, VmmError};
pub use kv::{
    process_budget_stats, remove_process_budget, DType, Geometry, KvCache, KvCacheStats, ProcessBudgetStats, SeqId,
};
pub use pool::{
    backing_names, is_vmm_supported, is_vmm_supported_on, Device, GlobalMemoryStats, MemoryStats, ModelMemoryStats,
    SharedMemoryPool, VirtualMemoryPool,
};
