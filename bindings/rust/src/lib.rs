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

mod error;
mod ffi;
mod kv;
mod pool;

pub use error::{Error, OverQuota, Result, Status, VmmError};
pub use kv::{process_budget_stats, remove_process_budget, DType, Geometry, KvCache, KvCacheStats, ProcessBudgetStats, SeqId};
pub use pool::{
    backing_names, is_vmm_supported, is_vmm_supported_on, Device, GlobalMemoryStats, MemoryStats, ModelMemoryStats,
    SharedMemoryPool, VirtualMemoryPool,
};
