//! The candle-cuda-vmm API on the host backing (Device::Cpu: CPU memory, no GPU):
//! VirtualMemoryPool's allocate / deallocate / physical_memory_usage, SharedMemoryPool's models
//! under one global limit, the over-quota refusals with their numbers, and is_vmm_supported.

use vmmpp::{is_vmm_supported, Device, SharedMemoryPool, Status, VirtualMemoryPool};

const MIB: usize = 1 << 20;
const PAGE: usize = 2 * MIB;

#[test]
fn allocate_commits_the_pages_under_the_range_and_deallocate_gives_them_back() {
    let mut pool = VirtualMemoryPool::new(64 * MIB, PAGE, Device::Cpu).unwrap();
    assert_eq!(
        (pool.capacity(), pool.page_size(), pool.physical_memory_usage()),
        (64 * MIB, PAGE, 0)
    );
    assert_ne!(pool.base_address(), 0);

    // [0, 3 MiB) lies on pages 0 and 1.
    let address = pool.allocate(0, 3 * MIB).unwrap();
    assert_eq!(address, pool.base_address());
    assert_eq!(pool.physical_memory_usage(), 2 * PAGE);
    assert!(pool.is_mapped(0, 2 * PAGE).unwrap());
    assert!(!pool.is_mapped(2 * PAGE, 1).unwrap());

    // Host memory: the committed range is plain memory.
    // SAFETY: [address, address + 3 MiB) is committed and nothing else uses it.
    let bytes = unsafe { std::slice::from_raw_parts_mut(address as *mut u8, 3 * MIB) };
    bytes.iter_mut().enumerate().for_each(|(i, b)| *b = (i % 251) as u8);
    assert!(bytes.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));

    // A range sharing page 1 commits nothing new; a page goes back when its last range does.
    assert_eq!(
        pool.allocate(3 * MIB, MIB).unwrap(),
        pool.base_address() + 3 * MIB as u64
    );
    assert_eq!(pool.physical_memory_usage(), 2 * PAGE);
    pool.deallocate(0, 3 * MIB).unwrap();
    assert_eq!(pool.physical_memory_usage(), PAGE);
    assert!(!pool.is_mapped(0, 1).unwrap());
    assert!(pool.is_mapped(PAGE, PAGE).unwrap());
    pool.deallocate(3 * MIB, MIB).unwrap();
    assert_eq!(pool.physical_memory_usage(), 0);

    let stats = pool.stats();
    assert_eq!(
        (stats.virtual_capacity, stats.physical_usage, stats.peak_physical_usage),
        (64 * MIB, 0, 2 * PAGE)
    );
    assert_eq!(
        (stats.page_size, stats.mapped_pages, stats.commits, stats.decommits),
        (PAGE, 0, 2, 2)
    );
}

#[test]
fn pool_errors_are_typed_and_change_nothing() {
    let mut pool = VirtualMemoryPool::new(8 * MIB, PAGE, Device::Cpu).unwrap();
    pool.allocate(0, PAGE).unwrap();

    // Twice released: the second one is refused.
    pool.deallocate(0, PAGE).unwrap();
    let e = pool.deallocate(0, PAGE).unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument, "{e}");
    assert!(e.over_quota().is_none());

    // Past the span, and empty.
    let e = pool.allocate(7 * MIB, 2 * MIB).unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);
    assert!(e.message().contains("capacity 8388608 bytes"), "{}", e.message());
    assert_eq!(pool.allocate(0, 0).unwrap_err().status(), Status::InvalidArgument);
    assert_eq!(pool.physical_memory_usage(), 0);

    // The capacity is rounded up to whole pages; a page size must be a multiple of the OS page.
    assert_eq!(
        VirtualMemoryPool::new(5 * MIB + 1, PAGE, Device::Cpu)
            .unwrap()
            .capacity(),
        6 * MIB
    );
    assert_eq!(VirtualMemoryPool::new(MIB, 0, Device::Cpu).unwrap().page_size(), PAGE); // the default
    assert_eq!(
        VirtualMemoryPool::new(64 * 1024, 4096, Device::Cpu)
            .unwrap()
            .page_size(),
        4096
    );
    let e = VirtualMemoryPool::new(MIB, 1000, Device::Cpu).err().unwrap();
    assert_eq!(e.status(), Status::InvalidArgument);
    assert!(e.message().contains("1000"), "{}", e.message());
    assert_eq!(
        VirtualMemoryPool::new(0, PAGE, Device::Cpu).err().unwrap().status(),
        Status::InvalidArgument
    );
}

#[test]
fn without_a_gpu_vmm_is_unsupported_and_cuda_unavailable() {
    if is_vmm_supported() {
        // A GPU machine: the vmm backing works (examples/gpu_pool.rs does more).
        let mut pool = VirtualMemoryPool::new(64 * MIB, 0, Device::new_cuda(0).unwrap()).unwrap();
        pool.allocate(0, 1).unwrap();
        assert_eq!(pool.physical_memory_usage(), pool.page_size());
        return;
    }
    assert_eq!(Device::new_cuda(0).unwrap_err().status(), Status::CudaUnavailable);
    let e = VirtualMemoryPool::new(64 * MIB, PAGE, Device::Cuda(0)).err().unwrap();
    assert_eq!(e.status(), Status::CudaUnavailable, "{e}");
    let e = SharedMemoryPool::new(64 * MIB, Device::Cuda(0))
        .and_then(|mut shared| shared.register_model("m", 8 * MIB))
        .unwrap_err();
    assert_eq!(e.status(), Status::CudaUnavailable, "{e}");
}

#[test]
fn two_models_share_the_global_limit_and_over_limit_is_refused_with_the_numbers() {
    // 4 pages for everyone; model a may hold 3 of them, b all 4.
    let mut shared = SharedMemoryPool::with_page_size(4 * PAGE, PAGE, Device::Cpu).unwrap();
    shared.register_model_with_limit("a", 16 * MIB, 3 * PAGE).unwrap();
    shared.register_model("b", 16 * MIB).unwrap();
    assert_eq!(shared.models(), ["a", "b"]);

    let a1 = shared.allocate_for_model("a", 2 * PAGE).unwrap();
    let b1 = shared.allocate_for_model("b", PAGE - 100).unwrap(); // whole pages
    assert_eq!(shared.physical_memory_usage(), 3 * PAGE);
    assert_ne!(a1, b1);

    // a's own limit: 2 pages more would make 4 of its 3.
    let e = shared.allocate_for_model("a", 2 * PAGE).unwrap_err();
    assert_eq!(e.status(), Status::OverQuota, "{e}");
    let q = e.over_quota().expect("the numbers of the refusal");
    assert_eq!(
        (q.which.as_str(), q.requested, q.in_use, q.limit),
        ("model a", 2 * PAGE as u64, 2 * PAGE as u64, 3 * PAGE as u64)
    );
    assert!(e.message().contains("over quota (model a)"), "{}", e.message());

    // The global limit: b may hold 4 pages, but only 1 is left of the 4.
    let e = shared.allocate_for_model("b", 2 * PAGE).unwrap_err();
    assert_eq!(e.status(), Status::OverQuota, "{e}");
    let q = e.over_quota().unwrap();
    assert_eq!(
        (q.which.as_str(), q.requested, q.in_use, q.limit),
        ("global", 2 * PAGE as u64, 3 * PAGE as u64, 4 * PAGE as u64)
    );
    assert_eq!(shared.physical_memory_usage(), 3 * PAGE); // nothing committed by the refusals

    // What a gives back, b can have.
    shared.deallocate_for_model("a", a1).unwrap();
    let b2 = shared.allocate_for_model("b", 2 * PAGE).unwrap();
    assert_eq!(shared.physical_memory_usage(), 3 * PAGE);

    let g = shared.global_stats().unwrap();
    assert_eq!(
        (g.physical_limit, g.physical_usage, g.peak_physical_usage, g.denied),
        (4 * PAGE, 3 * PAGE, 3 * PAGE, 2)
    );
    let a = &g.models[0];
    assert_eq!(
        (a.name.as_str(), a.limit, a.physical_usage, a.denied, a.allocations),
        ("a", 3 * PAGE, 0, 1, 0)
    );
    let b = &g.models[1];
    assert_eq!(
        (b.name.as_str(), b.limit, b.physical_usage, b.denied, b.allocations),
        ("b", 16 * MIB, 3 * PAGE, 1, 2)
    );
    assert_eq!(b.virtual_capacity, 16 * MIB);

    // Unregistering b drops its pool (Drop): the 3 pages it still holds go back to the budget.
    let _ = b2;
    shared.unregister_model("b").unwrap();
    assert_eq!(shared.physical_memory_usage(), 0);
    assert_eq!(shared.global_stats().unwrap().models.len(), 1);
    // The name is free again.
    shared.register_model("b", 4 * MIB).unwrap();
}

#[test]
fn shared_pool_refusals_name_the_model() {
    let mut shared = SharedMemoryPool::with_page_size(4 * PAGE, PAGE, Device::Cpu).unwrap();
    shared.register_model("a", 4 * PAGE).unwrap();

    let e = shared.register_model("a", 4 * PAGE).unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);
    assert!(e.message().contains("'a'"), "{}", e.message());

    for e in [
        shared.allocate_for_model("nobody", PAGE).unwrap_err(),
        shared.deallocate_for_model("nobody", 0).unwrap_err(),
        shared.unregister_model("nobody").unwrap_err(),
    ] {
        assert_eq!(e.status(), Status::InvalidArgument);
        assert_eq!(e.message(), "model 'nobody' is not registered with this budget");
    }

    // No allocation starts there.
    let a = shared.allocate_for_model("a", PAGE).unwrap();
    assert_eq!(
        shared.deallocate_for_model("a", a + 1).unwrap_err().status(),
        Status::InvalidArgument
    );
    assert_eq!(
        shared.allocate_for_model("a", 0).unwrap_err().status(),
        Status::InvalidArgument
    );

    // The span is 4 pages: 3 more fit, a fourth does not (address space, not quota).
    shared.allocate_for_model("a", 3 * PAGE).unwrap();
    let e = shared.allocate_for_model("a", 1).unwrap_err();
    assert_eq!(e.status(), Status::OutOfMemory, "{e}");
    assert!(e.over_quota().is_none());
    let e = SharedMemoryPool::new(0, Device::Cpu).err().unwrap();
    assert_eq!(e.status(), Status::InvalidArgument);
}

#[test]
fn allocations_take_the_lowest_free_range() {
    let mut shared = SharedMemoryPool::with_page_size(8 * PAGE, PAGE, Device::Cpu).unwrap();
    shared.register_model("m", 8 * PAGE).unwrap();
    let base = shared.model_pool("m").unwrap().base_address();
    let page = PAGE as u64;
    let x = shared.allocate_for_model("m", PAGE).unwrap();
    let y = shared.allocate_for_model("m", 2 * PAGE).unwrap();
    let z = shared.allocate_for_model("m", PAGE).unwrap();
    assert_eq!((x, y, z), (base, base + page, base + 3 * page));
    shared.deallocate_for_model("m", y).unwrap();
    // One page fits in y's hole; three do not, so they go after z.
    assert_eq!(shared.allocate_for_model("m", PAGE).unwrap(), base + page);
    assert_eq!(shared.allocate_for_model("m", 3 * PAGE).unwrap(), base + 4 * page);
    assert_eq!(shared.allocate_for_model("m", PAGE).unwrap(), base + 2 * page);
    assert_eq!(shared.physical_memory_usage(), 7 * PAGE);
}

#[test]
fn pools_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<VirtualMemoryPool>();
    send_sync::<SharedMemoryPool>();
}
