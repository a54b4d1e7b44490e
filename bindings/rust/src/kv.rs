//! KvCache: a vmmpp::kv_cache of a named configuration and layout, through vmmpp_kv_capi.h.

use std::os::raw::c_void;
use std::ptr;

use crate::error::{c_string, check_kv, name_list, Error, Result, Status};
use crate::ffi;

/// A sequence of a KvCache.
pub type SeqId = u64;

/// Element type of the cache (the geometry's dtype).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32 = 0,
    F16 = 1,
    BF16 = 2,
    Fp8E4m3 = 3,
    Fp8E5m2 = 4,
}

/// The shape of a cache (vmmpp::kv_geometry; vmmpp validates it at creation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub layers: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub dtype: DType,
    /// Tokens per block.
    pub block_tokens: u32,
    pub max_blocks: u32,
    /// sequence_contiguous only: tokens of address space per sequence; 0 for the paged layouts.
    pub max_tokens_per_sequence: u32,
}

impl Geometry {
    /// f16, 16 tokens a block (the Python module's defaults), a paged layout.
    pub fn new(layers: u32, kv_heads: u32, head_dim: u32, max_blocks: u32) -> Geometry {
        Geometry {
            layers,
            kv_heads,
            head_dim,
            dtype: DType::F16,
            block_tokens: 16,
            max_blocks,
            max_tokens_per_sequence: 0,
        }
    }

    fn to_c(self) -> ffi::vmmpp_kv_geometry {
        ffi::vmmpp_kv_geometry {
            layers: self.layers,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            dtype: self.dtype as i32,
            block_tokens: self.block_tokens,
            max_blocks: self.max_blocks,
            max_tokens_per_sequence: self.max_tokens_per_sequence,
        }
    }
}

/// A snapshot of a cache's use (vmmpp_kv_stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvCacheStats {
    /// Address space of the pool.
    pub reserved_bytes: u64,
    /// Backed by memory now.
    pub committed_bytes: u64,
    pub used_blocks: u64,
    pub free_blocks: u64,
    pub sequences: u64,
    /// Blocks copied on write after a fork.
    pub cow_copies: u64,
}

/// Figures of a cross-process budget (vmmpp_kv_budget_stats), over every process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessBudgetStats {
    pub limit: u64,
    pub committed: u64,
    pub peak: u64,
    pub denied: u64,
}

/// A KV cache: sequences of tokens in blocks of a pool whose memory follows the live blocks.
/// Dropping it gives its memory back (once no DLPack export of the C ABI holds it).
///
/// Send: the handle may move to another thread. Not Sync: vmmpp::kv_cache needs external
/// synchronisation, so its changes take `&mut self`; share one behind a Mutex.
pub struct KvCache {
    raw: *mut ffi::vmmpp_kv,
}

// SAFETY: the C handle is a heap object with no thread affinity (its last error is per calling
// thread, read on that thread), and the C ABI serialises calls on it with the cache's mutex.
unsafe impl Send for KvCache {}

impl KvCache {
    /// A cache of the named configuration (one of `config_names()`: "static", "elastic",
    /// "elastic_mapped_ahead", "elastic_page", "gh200", "host"; "host" needs no GPU) and layout
    /// (one of `layout_names()`, "block_major" first) on CUDA device `device` (ignored by "host").
    /// budget_bytes: the shared budget of the elastic configurations, 0 for the whole span; for
    /// "host", a budget of its own when not 0; "static" and "gh200" refuse anything but 0
    /// (InvalidArgument). An unknown name is InvalidArgument, the message listing the valid
    /// ones; a GPU configuration without a GPU is CudaUnavailable.
    pub fn new(geometry: &Geometry, config: &str, layout: &str, device: i32, budget_bytes: u64) -> Result<KvCache> {
        let config = c_string(config, "configuration")?;
        let layout = c_string(layout, "layout")?;
        let g = geometry.to_c();
        let mut raw = ptr::null_mut();
        // SAFETY: every pointer is to a live value; raw is set only on success.
        check_kv(unsafe {
            ffi::vmmpp_kv_create(&g, config.as_ptr(), layout.as_ptr(), device, budget_bytes, &mut raw)
        })?;
        Ok(KvCache { raw })
    }

    /// A cache in CPU memory ("host" configuration, "block_major" layout): no GPU needed.
    pub fn host(geometry: &Geometry) -> Result<KvCache> {
        KvCache::new(geometry, "host", "block_major", 0, 0)
    }

    /// A cache whose memory is charged to model `model` (limit model_limit_bytes) of the
    /// cross-process budget `budget_name` (a POSIX shared-memory segment, created with
    /// global_limit_bytes if there is none, joined otherwise). config: one of "elastic",
    /// "elastic_mapped_ahead", "elastic_page" or "host". A refused commit is OverQuota.
    #[allow(clippy::too_many_arguments)]
    pub fn in_process_budget(
        geometry: &Geometry,
        config: &str,
        layout: &str,
        device: i32,
        budget_name: &str,
        global_limit_bytes: u64,
        model: &str,
        model_limit_bytes: u64,
    ) -> Result<KvCache> {
        let config = c_string(config, "configuration")?;
        let layout = c_string(layout, "layout")?;
        let budget_name = c_string(budget_name, "budget name")?;
        let model = c_string(model, "model")?;
        let g = geometry.to_c();
        let mut raw = ptr::null_mut();
        // SAFETY: every pointer is to a live value; raw is set only on success.
        check_kv(unsafe {
            ffi::vmmpp_kv_create_in_process_budget(
                &g,
                config.as_ptr(),
                layout.as_ptr(),
                device,
                budget_name.as_ptr(),
                global_limit_bytes,
                model.as_ptr(),
                model_limit_bytes,
                &mut raw,
            )
        })?;
        Ok(KvCache { raw })
    }

    /// The configuration names `new` accepts (vmmpp::named_configs).
    pub fn config_names() -> Vec<String> {
        // SAFETY: a static string.
        name_list(unsafe { ffi::vmmpp_kv_config_names() })
    }
    /// The layout names `new` accepts (vmmpp::kv_layouts), the default first.
    pub fn layout_names() -> Vec<String> {
        // SAFETY: a static string.
        name_list(unsafe { ffi::vmmpp_kv_layout_names() })
    }

    pub fn add_sequence(&mut self) -> Result<SeqId> {
        let mut seq = 0;
        // SAFETY: self.raw is live; seq is a live local.
        check_kv(unsafe { ffi::vmmpp_kv_add_sequence(self.raw, &mut seq) })?;
        Ok(seq)
    }

    /// Appends n_tokens tokens to seq; returns the index of the first new one. OutOfBlocks,
    /// OverQuota or OutOfMemory when the cache cannot grow (nothing appended).
    pub fn append(&mut self, seq: SeqId, n_tokens: u64) -> Result<u64> {
        let mut first = 0;
        // SAFETY: self.raw is live; first is a live local.
        check_kv(unsafe { ffi::vmmpp_kv_append(self.raw, seq, n_tokens, &mut first) })?;
        Ok(first)
    }

    /// A new sequence sharing seq's blocks (copied on write).
    pub fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        let mut child = 0;
        // SAFETY: self.raw is live; child is a live local.
        check_kv(unsafe { ffi::vmmpp_kv_fork(self.raw, seq, &mut child) })?;
        Ok(child)
    }

    /// Keeps the first n_tokens tokens of seq.
    pub fn truncate(&mut self, seq: SeqId, n_tokens: u64) -> Result<()> {
        // SAFETY: self.raw is live.
        check_kv(unsafe { ffi::vmmpp_kv_truncate(self.raw, seq, n_tokens) })
    }

    /// Frees seq; its blocks' memory goes back once the GPU work queued on the legacy default
    /// stream has completed (at once on host memory).
    pub fn free(&mut self, seq: SeqId) -> Result<()> {
        // SAFETY: self.raw is live.
        check_kv(unsafe { ffi::vmmpp_kv_free(self.raw, seq) })
    }

    pub fn tokens(&self, seq: SeqId) -> Result<u64> {
        let mut n = 0;
        // SAFETY: self.raw is live; n is a live local.
        check_kv(unsafe { ffi::vmmpp_kv_tokens(self.raw, seq, &mut n) })?;
        Ok(n)
    }

    pub fn stats(&self) -> Result<KvCacheStats> {
        let mut s = ffi::vmmpp_kv_stats::default();
        // SAFETY: self.raw is live; s is a live local.
        check_kv(unsafe { ffi::vmmpp_kv_stats_get(self.raw, &mut s) })?;
        Ok(KvCacheStats {
            reserved_bytes: s.reserved_bytes,
            committed_bytes: s.committed_bytes,
            used_blocks: s.used_blocks,
            free_blocks: s.free_blocks,
            sequences: s.sequences,
            cow_copies: s.cow_copies,
        })
    }

    /// The block ids of seq, in token order.
    pub fn block_table(&self, seq: SeqId) -> Result<Vec<i32>> {
        let mut count = 0u64;
        // SAFETY: capacity 0 writes no ids; count is a live local.
        check_kv(unsafe { ffi::vmmpp_kv_block_table(self.raw, seq, ptr::null_mut(), 0, &mut count) })?;
        let mut out = vec![0i32; count as usize];
        // SAFETY: out holds out.len() ids; the table cannot change between the calls (&self, not Sync).
        check_kv(unsafe { ffi::vmmpp_kv_block_table(self.raw, seq, out.as_mut_ptr(), out.len() as u64, &mut count) })?;
        out.truncate(count as usize);
        Ok(out)
    }

    /// Slots (block * block_tokens + offset) of tokens [first, first + count) of seq.
    pub fn slot_mapping(&self, seq: SeqId, first: u64, count: u64) -> Result<Vec<i64>> {
        let n = usize::try_from(count).map_err(|_| {
            Error::new(
                Status::InvalidArgument,
                format!("slot_mapping: count {count} is too large"),
            )
        })?;
        let mut out = vec![0i64; n];
        // SAFETY: out holds count slots.
        check_kv(unsafe { ffi::vmmpp_kv_slot_mapping(self.raw, seq, first, count, out.as_mut_ptr()) })?;
        Ok(out)
    }

    /// Waits for the cache's device work and gives back the memory that waited for it.
    pub fn synchronize(&mut self) -> Result<()> {
        // SAFETY: self.raw is live.
        check_kv(unsafe { ffi::vmmpp_kv_synchronize(self.raw) })
    }

    /// Gives back every committed page no block holds; returns the bytes.
    pub fn trim(&mut self) -> Result<u64> {
        let mut freed = 0;
        // SAFETY: self.raw is live; freed is a live local.
        check_kv(unsafe { ffi::vmmpp_kv_trim(self.raw, &mut freed) })?;
        Ok(freed)
    }

    /// The span: its first byte, its bytes, its CUDA device (-1: host memory).
    pub fn span(&self) -> Result<(*mut c_void, u64, i32)> {
        let (mut base, mut capacity, mut device) = (ptr::null_mut(), 0u64, 0i32);
        // SAFETY: every pointer is to a live local.
        check_kv(unsafe { ffi::vmmpp_kv_span(self.raw, &mut base, &mut capacity, &mut device) })?;
        Ok((base, capacity, device))
    }
}

impl Drop for KvCache {
    fn drop(&mut self) {
        // SAFETY: self.raw came from vmmpp_kv_create* and is destroyed once, here.
        unsafe { ffi::vmmpp_kv_destroy(self.raw) }
    }
}

/// The figures of the cross-process budget `budget_name` now (InvalidArgument if there is none).
pub fn process_budget_stats(budget_name: &str) -> Result<ProcessBudgetStats> {
    let name = c_string(budget_name, "budget name")?;
    let mut s = ffi::vmmpp_kv_budget_stats::default();
    // SAFETY: name and s are live.
    check_kv(unsafe { ffi::vmmpp_kv_process_budget_stats(name.as_ptr(), &mut s) })?;
    Ok(ProcessBudgetStats {
        limit: s.limit,
        committed: s.committed,
        peak: s.peak,
        denied: s.denied,
    })
}

/// Unlinks the cross-process budget `budget_name` (attached processes keep theirs); true if there
/// was one.
pub fn remove_process_budget(budget_name: &str) -> Result<bool> {
    let name = c_string(budget_name, "budget name")?;
    let mut removed = 0;
    // SAFETY: name and removed are live.
    check_kv(unsafe { ffi::vmmpp_kv_process_budget_remove(name.as_ptr(), &mut removed) })?;
    Ok(removed != 0)
}
