//! Hand-written declarations of the C ABI this crate uses: capi/vmmpp_kv_capi.h (the KV cache)
//! and capi/vmmpp_pool_capi.h (pools and budgets). Kept in step with the headers by hand; every
//! struct is `#[repr(C)]` with the headers' field order.

#![allow(non_camel_case_types)]

use std::os::raw::{c_char, c_int, c_void};

/// vmmpp_kv_status: 0 is VMMPP_KV_OK, the rest are error::Status.
pub type vmmpp_kv_status = c_int;

#[repr(C)]
pub struct vmmpp_kv {
    _private: [u8; 0],
}
#[repr(C)]
pub struct vmmpp_pool {
    _private: [u8; 0],
}
#[repr(C)]
pub struct vmmpp_budget {
    _private: [u8; 0],
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct vmmpp_kv_geometry {
    pub layers: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub dtype: i32,
    pub block_tokens: u32,
    pub max_blocks: u32,
    pub max_tokens_per_sequence: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct vmmpp_kv_stats {
    pub reserved_bytes: u64,
    pub committed_bytes: u64,
    pub used_blocks: u64,
    pub free_blocks: u64,
    pub sequences: u64,
    pub cow_copies: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct vmmpp_kv_budget_stats {
    pub limit: u64,
    pub committed: u64,
    pub peak: u64,
    pub denied: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct vmmpp_pool_stats {
    pub reserved_bytes: u64,
    pub committed_bytes: u64,
    pub peak_committed_bytes: u64,
    pub held_pages: u64,
    pub page_bytes: u64,
    pub commits: u64,
    pub decommits: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct vmmpp_budget_model_stats {
    pub limit: u64,
    pub committed: u64,
    pub peak: u64,
    pub denied: u64,
}

extern "C" {
    // --- vmmpp_kv_capi.h ---
    pub fn vmmpp_kv_last_error() -> *const c_char;
    pub fn vmmpp_kv_layout_names() -> *const c_char;
    pub fn vmmpp_kv_config_names() -> *const c_char;
    pub fn vmmpp_kv_create(
        geometry: *const vmmpp_kv_geometry,
        config: *const c_char,
        layout: *const c_char,
        device: c_int,
        budget_bytes: u64,
        out: *mut *mut vmmpp_kv,
    ) -> vmmpp_kv_status;
    pub fn vmmpp_kv_create_in_process_budget(
        geometry: *const vmmpp_kv_geometry,
        config: *const c_char,
        layout: *const c_char,
        device: c_int,
        budget_name: *const c_char,
        global_limit_bytes: u64,
        model: *const c_char,
        model_limit_bytes: u64,
        out: *mut *mut vmmpp_kv,
    ) -> vmmpp_kv_status;
    pub fn vmmpp_kv_process_budget_stats(
        budget_name: *const c_char,
        out: *mut vmmpp_kv_budget_stats,
    ) -> vmmpp_kv_status;
    pub fn vmmpp_kv_process_budget_remove(budget_name: *const c_char, removed: *mut c_int) -> vmmpp_kv_status;
    pub fn vmmpp_kv_destroy(kv: *mut vmmpp_kv);
    pub fn vmmpp_kv_add_sequence(kv: *mut vmmpp_kv, seq: *mut u64) -> vmmpp_kv_status;
    pub fn vmmpp_kv_append(kv: *mut vmmpp_kv, seq: u64, n_tokens: u64, first: *mut u64) -> vmmpp_kv_status;
    pub fn vmmpp_kv_fork(kv: *mut vmmpp_kv, seq: u64, child: *mut u64) -> vmmpp_kv_status;
    pub fn vmmpp_kv_truncate(kv: *mut vmmpp_kv, seq: u64, n_tokens: u64) -> vmmpp_kv_status;
    pub fn vmmpp_kv_free(kv: *mut vmmpp_kv, seq: u64) -> vmmpp_kv_status;
    pub fn vmmpp_kv_tokens(kv: *mut vmmpp_kv, seq: u64, n_tokens: *mut u64) -> vmmpp_kv_status;
    pub fn vmmpp_kv_stats_get(kv: *mut vmmpp_kv, out: *mut vmmpp_kv_stats) -> vmmpp_kv_status;
    pub fn vmmpp_kv_slot_mapping(kv: *mut vmmpp_kv, seq: u64, first: u64, count: u64, out: *mut i64)
        -> vmmpp_kv_status;
    pub fn vmmpp_kv_block_table(
        kv: *mut vmmpp_kv,
        seq: u64,
        out: *mut i32,
        capacity: u64,
        count: *mut u64,
    ) -> vmmpp_kv_status;
    pub fn vmmpp_kv_synchronize(kv: *mut vmmpp_kv) -> vmmpp_kv_status;
    pub fn vmmpp_kv_trim(kv: *mut vmmpp_kv, freed_bytes: *mut u64) -> vmmpp_kv_status;
    pub fn vmmpp_kv_span(
        kv: *mut vmmpp_kv,
        base: *mut *mut c_void,
        capacity: *mut u64,
        device: *mut i32,
    ) -> vmmpp_kv_status;

    // --- vmmpp_pool_capi.h ---
    pub fn vmmpp_pool_backing_names() -> *const c_char;
    pub fn vmmpp_pool_last_error() -> *const c_char;
    pub fn vmmpp_pool_last_over_quota(
        requested: *mut u64,
        in_use: *mut u64,
        limit: *mut u64,
        which: *mut c_char,
        which_capacity: u64,
    ) -> c_int;
    pub fn vmmpp_is_vmm_supported(device: c_int) -> c_int;
    pub fn vmmpp_device_check(device: c_int) -> vmmpp_kv_status;
    pub fn vmmpp_pool_create(
        capacity: u64,
        page_bytes: u64,
        backing: *const c_char,
        device: c_int,
        out: *mut *mut vmmpp_pool,
    ) -> vmmpp_kv_status;
    pub fn vmmpp_pool_destroy(pool: *mut vmmpp_pool);
    pub fn vmmpp_pool_ensure_committed(
        pool: *mut vmmpp_pool,
        offset: u64,
        bytes: u64,
        address: *mut *mut c_void,
    ) -> vmmpp_kv_status;
    pub fn vmmpp_pool_release(pool: *mut vmmpp_pool, offset: u64, bytes: u64) -> vmmpp_kv_status;
    pub fn vmmpp_pool_is_committed(
        pool: *mut vmmpp_pool,
        offset: u64,
        bytes: u64,
        committed: *mut c_int,
    ) -> vmmpp_kv_status;
    pub fn vmmpp_pool_span(
        pool: *mut vmmpp_pool,
        base: *mut *mut c_void,
        capacity: *mut u64,
        page_bytes: *mut u64,
        device: *mut i32,
    ) -> vmmpp_kv_status;
    pub fn vmmpp_pool_stats_get(pool: *mut vmmpp_pool, out: *mut vmmpp_pool_stats) -> vmmpp_kv_status;
    pub fn vmmpp_budget_create(global_limit: u64, out: *mut *mut vmmpp_budget) -> vmmpp_kv_status;
    pub fn vmmpp_budget_destroy(budget: *mut vmmpp_budget);
    pub fn vmmpp_budget_create_pool(
        budget: *mut vmmpp_budget,
        model: *const c_char,
        model_limit: u64,
        capacity: u64,
        page_bytes: u64,
        backing: *const c_char,
        device: c_int,
        out: *mut *mut vmmpp_pool,
    ) -> vmmpp_kv_status;
    pub fn vmmpp_budget_stats_get(budget: *mut vmmpp_budget, out: *mut vmmpp_kv_budget_stats) -> vmmpp_kv_status;
    pub fn vmmpp_budget_model_stats_get(
        budget: *mut vmmpp_budget,
        model: *const c_char,
        out: *mut vmmpp_budget_model_stats,
    ) -> vmmpp_kv_status;
}
