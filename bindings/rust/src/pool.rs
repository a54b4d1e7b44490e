//! The candle-cuda-vmm API over vmmpp's pools and budgets (vmmpp_pool_capi.h):
//! VirtualMemoryPool (one reserved span, pages committed on demand) and SharedMemoryPool (one
//! global limit over several models' pools).

use std::collections::BTreeMap;
use std::os::raw::c_void;
use std::ptr;

use crate::error::{c_string, check_pool, name_list, Error, Result, Status};
use crate::ffi;

/// Where a pool's memory comes from: the backing choice. `Device::Cuda(n)` is vmmpp's vmm backing
/// on GPU n (cuMemCreate/cuMemMap, what candle-cuda-vmm does); `Device::Cpu` is its host backing
/// (mmap'd CPU memory with the same reserve/commit/decommit life), which needs no GPU: what the
/// tests run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    /// CUDA device `ordinal`, checked: CudaUnavailable without a driver, InvalidArgument when
    /// there is no such device (candle's `Device::new_cuda`).
    pub fn new_cuda(ordinal: usize) -> Result<Device> {
        let device = ordinal_of(ordinal)?;
        // SAFETY: no pointers.
        check_pool(unsafe { ffi::vmmpp_device_check(device) })?;
        Ok(Device::Cuda(ordinal))
    }

    /// The vmmpp backing this device means: "host" or "vmm" (vmmpp_pool_backing_names).
    pub fn backing(self) -> &'static str {
        match self {
            Device::Cpu => "host",
            Device::Cuda(_) => "vmm",
        }
    }

    pub fn is_cuda(self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    fn ordinal(self) -> Result<i32> {
        match self {
            Device::Cpu => Ok(0), // ignored by the host backing
            Device::Cuda(n) => ordinal_of(n),
        }
    }
}

fn ordinal_of(n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| Error::new(Status::InvalidArgument, format!("CUDA device {n} does not exist")))
}

/// Whether CUDA device 0 supports virtual memory management. False, not an error, without a
/// driver or a GPU.
pub fn is_vmm_supported() -> bool {
    is_vmm_supported_on(0)
}

/// Whether CUDA device `ordinal` supports virtual memory management (false without it).
pub fn is_vmm_supported_on(ordinal: usize) -> bool {
    match i32::try_from(ordinal) {
        // SAFETY: no pointers; never fails.
        Ok(device) => unsafe { ffi::vmmpp_is_vmm_supported(device) != 0 },
        Err(_) => false,
    }
}

/// The backings the C ABI offers ("host", "vmm").
pub fn backing_names() -> Vec<String> {
    // SAFETY: a static string.
    name_list(unsafe { ffi::vmmpp_pool_backing_names() })
}

/// A snapshot of one pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes of address space reserved (the capacity, in whole pages).
    pub virtual_capacity: usize,
    /// Bytes backed by physical memory now.
    pub physical_usage: usize,
    /// Most bytes ever backed at once.
    pub peak_physical_usage: usize,
    /// The commit unit.
    pub page_size: usize,
    /// Pages committed now (physical_usage / page_size).
    pub mapped_pages: usize,
    /// Backing commit and decommit calls so far.
    pub commits: u64,
    pub decommits: u64,
}

/// One model of a SharedMemoryPool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelMemoryStats {
    pub name: String,
    /// Its own physical limit.
    pub limit: usize,
    /// Its pool's address space.
    pub virtual_capacity: usize,
    /// Bytes charged to it now.
    pub physical_usage: usize,
    pub peak_physical_usage: usize,
    /// Its requests refused, by its limit or the global one.
    pub denied: u64,
    /// Live allocate_for_model allocations.
    pub allocations: usize,
}

/// A snapshot of a SharedMemoryPool: the global figures and each model's, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GlobalMemoryStats {
    pub physical_limit: usize,
    pub physical_usage: usize,
    pub peak_physical_usage: usize,
    /// Requests refused, by any limit.
    pub denied: u64,
    pub models: Vec<ModelMemoryStats>,
}

fn to_usize(v: u64) -> usize {
    // Every figure is a size of this process's address space.
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// An elastic memory pool: `capacity` bytes of address space reserved at once, physical pages
/// committed under the ranges `allocate` asks for and given back by `deallocate`
/// (vmmpp::elastic_pool with page-granular growth).
///
/// Offsets, the vmmpp way: `allocate(offset, size)` holds [offset, offset + size) and commits
/// the pages under it that are not committed yet; holds are counted per page, so ranges may
/// overlap or share a page, and a page goes back when the last range over it is deallocated.
/// `deallocate` must name a range allocated before (otherwise InvalidArgument, nothing changed).
///
/// Send and Sync: vmmpp's pools are thread safe.
pub struct VirtualMemoryPool {
    raw: *mut ffi::vmmpp_pool,
    base: u64,
    capacity: usize,
    page_size: usize,
    device: Device,
}

// SAFETY: vmmpp::elastic_pool serialises every call on its own mutex; the handle has no thread
// affinity (the last error is per calling thread, read on that thread).
unsafe impl Send for VirtualMemoryPool {}
unsafe impl Sync for VirtualMemoryPool {}

impl VirtualMemoryPool {
    /// Reserves `capacity` bytes (rounded up to whole pages) on `device`'s backing (see Device),
    /// nothing committed. page_size: the commit unit, 0 for the backing's default; the host
    /// backing takes any multiple of the OS page size, vmm only the device's granularity
    /// (2 MiB on current GPUs; InvalidArgument naming it otherwise).
    pub fn new(capacity: usize, page_size: usize, device: Device) -> Result<VirtualMemoryPool> {
        let backing = c_string(device.backing(), "backing")?;
        let mut raw = ptr::null_mut();
        // SAFETY: backing and raw are live; raw is set only on success.
        check_pool(unsafe {
            ffi::vmmpp_pool_create(
                capacity as u64,
                page_size as u64,
                backing.as_ptr(),
                device.ordinal()?,
                &mut raw,
            )
        })?;
        VirtualMemoryPool::adopt(raw, device)
    }

    /// Takes a pool made by the C ABI, reading its span.
    fn adopt(raw: *mut ffi::vmmpp_pool, device: Device) -> Result<VirtualMemoryPool> {
        let mut pool = VirtualMemoryPool {
            raw,
            base: 0,
            capacity: 0,
            page_size: 0,
            device,
        };
        let (mut base, mut capacity, mut page) = (ptr::null_mut::<c_void>(), 0u64, 0u64);
        // SAFETY: pool.raw is live (dropped with pool on error); the outputs are live locals.
        check_pool(unsafe { ffi::vmmpp_pool_span(pool.raw, &mut base, &mut capacity, &mut page, ptr::null_mut()) })?;
        pool.base = base as u64;
        pool.capacity = to_usize(capacity);
        pool.page_size = to_usize(page);
        Ok(pool)
    }

    /// Commits the pages under [offset, offset + size) (see the type's comment) and returns the
    /// address of its first byte. InvalidArgument for a range that is empty or passes the
    /// capacity; OverQuota (with the numbers, Error::over_quota) when a budget refuses;
    /// OutOfMemory, CudaError. Nothing is held on error.
    pub fn allocate(&mut self, offset: usize, size: usize) -> Result<u64> {
        let mut address = ptr::null_mut();
        // SAFETY: self.raw is live; address is a live local.
        check_pool(unsafe { ffi::vmmpp_pool_ensure_committed(self.raw, offset as u64, size as u64, &mut address) })?;
        Ok(address as u64)
    }

    /// Lets go of [offset, offset + size), allocated before: pages no other range holds go back
    /// to the device (and their bytes to the budget) now. No GPU work may still use them.
    pub fn deallocate(&mut self, offset: usize, size: usize) -> Result<()> {
        // SAFETY: self.raw is live.
        check_pool(unsafe { ffi::vmmpp_pool_release(self.raw, offset as u64, size as u64) })
    }

    /// Whether every page under [offset, offset + size) is committed.
    pub fn is_mapped(&self, offset: usize, size: usize) -> Result<bool> {
        let mut committed = 0;
        // SAFETY: self.raw is live; committed is a live local.
        check_pool(unsafe { ffi::vmmpp_pool_is_committed(self.raw, offset as u64, size as u64, &mut committed) })?;
        Ok(committed != 0)
    }

    /// Bytes of physical memory committed now.
    pub fn physical_memory_usage(&self) -> usize {
        self.stats().physical_usage
    }

    /// The first byte of the span (a device pointer on "vmm", a host pointer on "host").
    pub fn base_address(&self) -> u64 {
        self.base
    }
    /// Bytes of address space reserved.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    pub fn page_size(&self) -> usize {
        self.page_size
    }
    pub fn device(&self) -> Device {
        self.device
    }

    pub fn stats(&self) -> MemoryStats {
        let mut s = ffi::vmmpp_pool_stats::default();
        // SAFETY: self.raw is live and s a live local: the call cannot fail (it checks only for null).
        check_pool(unsafe { ffi::vmmpp_pool_stats_get(self.raw, &mut s) })
            .expect("vmmpp_pool_stats_get on a live pool");
        MemoryStats {
            virtual_capacity: to_usize(s.reserved_bytes),
            physical_usage: to_usize(s.committed_bytes),
            peak_physical_usage: to_usize(s.peak_committed_bytes),
            page_size: to_usize(s.page_bytes),
            mapped_pages: to_usize(s.committed_bytes / s.page_bytes.max(1)),
            commits: s.commits,
            decommits: s.decommits,
        }
    }
}

impl Drop for VirtualMemoryPool {
    fn drop(&mut self) {
        // SAFETY: self.raw came from vmmpp_pool_create or vmmpp_budget_create_pool; destroyed once.
        unsafe { ffi::vmmpp_pool_destroy(self.raw) }
    }
}

/// The budget handle, destroyed after the models' pools (its state lives on in their shares).
struct Budget(*mut ffi::vmmpp_budget);

impl Drop for Budget {
    fn drop(&mut self) {
        // SAFETY: made by vmmpp_budget_create; destroyed once.
        unsafe { ffi::vmmpp_budget_destroy(self.0) }
    }
}

struct Model {
    pool: VirtualMemoryPool,
    /// Live allocations: offset -> bytes (whole pages), lowest first.
    allocations: BTreeMap<usize, usize>,
}

/// Several models' pools under one global physical limit (vmmpp::budget): each model gets its own
/// span and its own limit, and a commit is refused (OverQuota, with the numbers) when it would
/// pass either. Memory a model deallocates is at once available to the others.
///
/// `allocate_for_model(name, size)` places `size` bytes (rounded up to whole pages, so no two
/// allocations share a page) at the lowest free offset of the model's span, first fit, commits
/// them, and returns their address; `deallocate_for_model(name, address)` gives them back.
pub struct SharedMemoryPool {
    // Declared before `budget`: the pools go first.
    models: BTreeMap<String, Model>,
    budget: Budget,
    device: Device,
    page_size: usize,
}

// SAFETY: vmmpp's budgets and pools are thread safe; the map is only changed through &mut self.
unsafe impl Send for SharedMemoryPool {}
unsafe impl Sync for SharedMemoryPool {}

impl SharedMemoryPool {
    /// A global physical limit of `physical_limit` bytes (non-zero) for the models of `device`
    /// (the backing choice, see Device), pages of the backing's default size.
    pub fn new(physical_limit: usize, device: Device) -> Result<SharedMemoryPool> {
        SharedMemoryPool::with_page_size(physical_limit, 0, device)
    }

    /// As new, the models' pools committing `page_size` bytes at a time (see VirtualMemoryPool::new).
    pub fn with_page_size(physical_limit: usize, page_size: usize, device: Device) -> Result<SharedMemoryPool> {
        device.ordinal()?;
        let mut raw = ptr::null_mut();
        // SAFETY: raw is a live local, set only on success.
        check_pool(unsafe { ffi::vmmpp_budget_create(physical_limit as u64, &mut raw) })?;
        Ok(SharedMemoryPool {
            models: BTreeMap::new(),
            budget: Budget(raw),
            device,
            page_size,
        })
    }

    /// Registers `model_id` with `virtual_capacity` bytes of address space, which is also its
    /// physical limit (the most it could ever commit). InvalidArgument for a model registered
    /// already.
    pub fn register_model(&mut self, model_id: &str, virtual_capacity: usize) -> Result<()> {
        self.register_model_with_limit(model_id, virtual_capacity, virtual_capacity)
    }

    /// Registers `model_id` with `virtual_capacity` bytes of address space and a physical limit of
    /// `physical_limit` bytes (non-zero) of its own, under the global one.
    pub fn register_model_with_limit(
        &mut self,
        model_id: &str,
        virtual_capacity: usize,
        physical_limit: usize,
    ) -> Result<()> {
        let name = c_string(model_id, "model")?;
        let backing = c_string(self.device.backing(), "backing")?;
        let mut raw = ptr::null_mut();
        // SAFETY: every pointer is live; raw is set only on success. The C side refuses a
        // registered name, so the map and the budget agree.
        check_pool(unsafe {
            ffi::vmmpp_budget_create_pool(
                self.budget.0,
                name.as_ptr(),
                physical_limit as u64,
                virtual_capacity as u64,
                self.page_size as u64,
                backing.as_ptr(),
                self.device.ordinal()?,
                &mut raw,
            )
        })?;
        let pool = VirtualMemoryPool::adopt(raw, self.device)?;
        self.models.insert(
            model_id.to_owned(),
            Model {
                pool,
                allocations: BTreeMap::new(),
            },
        );
        Ok(())
    }

    /// Unregisters `model_id`: its pool goes, every page it committed back to the budget.
    pub fn unregister_model(&mut self, model_id: &str) -> Result<()> {
        self.models
            .remove(model_id)
            .map(drop)
            .ok_or_else(|| unknown_model(model_id))
    }

    /// Commits `size` bytes (whole pages) for `model_id` at the lowest free offset of its span and
    /// returns their address. InvalidArgument for an unknown model or a zero size; OutOfMemory
    /// when no free range of its span is large enough; OverQuota (the model's limit or the global
    /// one, with the numbers) when the budget refuses. Nothing is allocated on error.
    pub fn allocate_for_model(&mut self, model_id: &str, size: usize) -> Result<u64> {
        let model = self.models.get_mut(model_id).ok_or_else(|| unknown_model(model_id))?;
        if size == 0 {
            return Err(Error::new(
                Status::InvalidArgument,
                format!("model '{model_id}': allocation of 0 bytes"),
            ));
        }
        let page = model.pool.page_size();
        let bytes = size.checked_add(page - 1).map(|s| s / page * page).ok_or_else(|| {
            Error::new(
                Status::InvalidArgument,
                format!("model '{model_id}': {size} bytes is too large"),
            )
        })?;
        let mut offset = 0usize;
        for (&start, &len) in &model.allocations {
            if start - offset >= bytes {
                break;
            }
            offset = start + len;
        }
        if model.pool.capacity() - offset < bytes {
            let allocated: usize = model.allocations.values().sum();
            return Err(Error::new(
                Status::OutOfMemory,
                format!(
                    "model '{model_id}': no free range of {bytes} bytes in its {} bytes of address space ({allocated} bytes allocated)",
                    model.pool.capacity()
                ),
            ));
        }
        let address = model.pool.allocate(offset, bytes)?;
        model.allocations.insert(offset, bytes);
        Ok(address)
    }

    /// Gives back the allocation of `model_id` that starts at `address` (from allocate_for_model).
    /// InvalidArgument for an unknown model or an address no allocation starts at.
    pub fn deallocate_for_model(&mut self, model_id: &str, address: u64) -> Result<()> {
        let model = self.models.get_mut(model_id).ok_or_else(|| unknown_model(model_id))?;
        let base = model.pool.base_address();
        let bytes = address
            .checked_sub(base)
            .and_then(|o| usize::try_from(o).ok())
            .and_then(|o| model.allocations.get(&o).map(|&b| (o, b)));
        let Some((offset, bytes)) = bytes else {
            return Err(Error::new(
                Status::InvalidArgument,
                format!("model '{model_id}': no allocation starts at address {address:#x}"),
            ));
        };
        model.pool.deallocate(offset, bytes)?;
        model.allocations.remove(&offset);
        Ok(())
    }

    /// The registered models, by name.
    pub fn models(&self) -> Vec<String> {
        self.models.keys().cloned().collect()
    }

    /// The pool of `model_id` (its span, stats, or allocate/deallocate by offset).
    pub fn model_pool(&mut self, model_id: &str) -> Result<&mut VirtualMemoryPool> {
        self.models
            .get_mut(model_id)
            .map(|m| &mut m.pool)
            .ok_or_else(|| unknown_model(model_id))
    }

    /// Bytes committed by every model now.
    pub fn physical_memory_usage(&self) -> usize {
        to_usize(self.budget_totals().committed)
    }

    /// The model's figures: its budget share and its pool.
    pub fn model_stats(&self, model_id: &str) -> Result<ModelMemoryStats> {
        let model = self.models.get(model_id).ok_or_else(|| unknown_model(model_id))?;
        let name = c_string(model_id, "model")?;
        let mut s = ffi::vmmpp_budget_model_stats::default();
        // SAFETY: every pointer is live.
        check_pool(unsafe { ffi::vmmpp_budget_model_stats_get(self.budget.0, name.as_ptr(), &mut s) })?;
        Ok(ModelMemoryStats {
            name: model_id.to_owned(),
            limit: to_usize(s.limit),
            virtual_capacity: model.pool.capacity(),
            physical_usage: to_usize(s.committed),
            peak_physical_usage: to_usize(s.peak),
            denied: s.denied,
            allocations: model.allocations.len(),
        })
    }

    /// The global figures and every model's.
    pub fn global_stats(&self) -> Result<GlobalMemoryStats> {
        let t = self.budget_totals();
        let models = self
            .models
            .keys()
            .map(|name| self.model_stats(name))
            .collect::<Result<Vec<_>>>()?;
        Ok(GlobalMemoryStats {
            physical_limit: to_usize(t.limit),
            physical_usage: to_usize(t.committed),
            peak_physical_usage: to_usize(t.peak),
            denied: t.denied,
            models,
        })
    }

    fn budget_totals(&self) -> ffi::vmmpp_kv_budget_stats {
        let mut s = ffi::vmmpp_kv_budget_stats::default();
        // SAFETY: the budget is live and s a live local: the call cannot fail (it checks only for null).
        check_pool(unsafe { ffi::vmmpp_budget_stats_get(self.budget.0, &mut s) })
            .expect("vmmpp_budget_stats_get on a live budget");
        s
    }
}

fn unknown_model(model_id: &str) -> Error {
    // The message vmmpp::unknown_model gives (an invalid_argument).
    Error::new(
        Status::InvalidArgument,
        format!("model '{model_id}' is not registered with this budget"),
    )
}
