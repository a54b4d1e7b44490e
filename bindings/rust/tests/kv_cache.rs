//! KvCache on the "host" configuration (CPU memory, no GPU): its lifecycle, the typed errors it
//! carries, and that dropping it gives its memory back.

use vmmpp::{process_budget_stats, remove_process_budget, Geometry, KvCache, Status};

/// 2 layers, 2 heads of 64, f16, 16 tokens a block: 8 KiB a block (K and V of both layers).
fn geometry(max_blocks: u32) -> Geometry {
    Geometry::new(2, 2, 64, max_blocks)
}

#[test]
fn names_come_from_the_library() {
    let configs = KvCache::config_names();
    assert!(configs.iter().any(|c| c == "host"), "{configs:?}");
    assert!(configs.iter().any(|c| c == "elastic"), "{configs:?}");
    assert_eq!(KvCache::layout_names().first().map(String::as_str), Some("block_major"));
}

#[test]
fn lifecycle_add_append_fork_truncate_free() {
    let mut kv = KvCache::host(&geometry(64)).unwrap();
    let s0 = kv.stats().unwrap();
    assert_eq!(
        (s0.used_blocks, s0.free_blocks, s0.sequences, s0.committed_bytes),
        (0, 64, 0, 0)
    );

    let seq = kv.add_sequence().unwrap();
    assert_eq!(kv.append(seq, 40).unwrap(), 0);
    assert_eq!(kv.append(seq, 2).unwrap(), 40);
    assert_eq!(kv.tokens(seq).unwrap(), 42);
    let table = kv.block_table(seq).unwrap();
    assert_eq!(table.len(), 3); // 42 tokens in blocks of 16
    let s1 = kv.stats().unwrap();
    assert_eq!((s1.used_blocks, s1.free_blocks, s1.sequences), (3, 61, 1));
    assert!(
        s1.committed_bytes > 0 && s1.committed_bytes <= s1.reserved_bytes,
        "{s1:?}"
    );

    // Slot of token t: its block's id * 16 + t % 16.
    let slots = kv.slot_mapping(seq, 0, 42).unwrap();
    for (t, slot) in slots.iter().enumerate() {
        assert_eq!(*slot, i64::from(table[t / 16]) * 16 + (t % 16) as i64, "token {t}");
    }

    // A fork shares the parent's blocks.
    let child = kv.fork(seq).unwrap();
    assert_ne!(child, seq);
    assert_eq!(kv.block_table(child).unwrap(), table);
    assert_eq!(kv.stats().unwrap().used_blocks, 3);
    kv.truncate(child, 16).unwrap();
    assert_eq!(kv.tokens(child).unwrap(), 16);
    assert_eq!(kv.block_table(child).unwrap(), table[..1].to_vec());

    kv.free(seq).unwrap();
    kv.free(child).unwrap();
    let s2 = kv.stats().unwrap();
    assert_eq!((s2.used_blocks, s2.free_blocks, s2.sequences), (0, 64, 0));
    kv.trim().unwrap();
    assert_eq!(kv.stats().unwrap().committed_bytes, 0);
}

#[test]
fn errors_carry_the_status_and_message() {
    let e = KvCache::new(&geometry(8), "no_such_config", "block_major", 0, 0)
        .err()
        .unwrap();
    assert_eq!(e.status(), Status::InvalidArgument);
    assert!(
        e.message().contains("no_such_config") && e.message().contains("host"),
        "{}",
        e.message()
    );

    let e = KvCache::new(&geometry(8), "host", "no_such_layout", 0, 0)
        .err()
        .unwrap();
    assert_eq!(e.status(), Status::InvalidArgument);
    assert!(e.message().contains("block_major"), "{}", e.message());

    let e = KvCache::new(&geometry(8), "host\0", "block_major", 0, 0).err().unwrap();
    assert_eq!(e.status(), Status::InvalidArgument);

    let mut kv = KvCache::host(&geometry(4)).unwrap();
    let e = kv.tokens(12345).unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);

    // 4 blocks of 16 tokens: 65 tokens need 5.
    let seq = kv.add_sequence().unwrap();
    let e = kv.append(seq, 65).unwrap_err();
    assert_eq!(e.status(), Status::OutOfBlocks);
    assert!(e.message().contains("5 needed, 4 free of 4"), "{}", e.message());
    assert_eq!(kv.tokens(seq).unwrap(), 0); // nothing appended
    assert_eq!(kv.append(seq, 64).unwrap(), 0); // the blocks are all there

    if !vmmpp::is_vmm_supported() {
        let e = KvCache::new(&geometry(8), "elastic", "block_major", 0, 0)
            .err()
            .unwrap();
        assert_eq!(e.status(), Status::CudaUnavailable, "{e}");
    }
}

#[test]
fn drop_gives_the_memory_back_and_a_budget_refuses_with_over_quota() {
    let budget = format!("vmmpp_rust_kv_{}", std::process::id());
    let _ = remove_process_budget(&budget);
    let page = 2u64 << 20;
    {
        // 1024 blocks of 8 KiB = 8 MiB of span; the model may commit one 2 MiB page.
        let mut kv =
            KvCache::in_process_budget(&geometry(1024), "host", "block_major", 0, &budget, 4 * page, "m", page)
                .unwrap();
        let seq = kv.add_sequence().unwrap();
        kv.append(seq, 16).unwrap();
        let used = process_budget_stats(&budget).unwrap();
        assert_eq!((used.limit, used.committed), (4 * page, page));

        // 256 blocks of 8 KiB fill the page; one more block needs a second page.
        let seq2 = kv.add_sequence().unwrap();
        let e = kv.append(seq2, 256 * 16).unwrap_err();
        assert_eq!(e.status(), Status::OverQuota, "{e}");
        assert!(e.message().contains("over quota (model m)"), "{}", e.message());
        assert_eq!(process_budget_stats(&budget).unwrap().committed, page);
    } // dropped with a live sequence
    assert_eq!(process_budget_stats(&budget).unwrap().committed, 0);
    assert!(remove_process_budget(&budget).unwrap());
}

#[test]
fn kv_cache_is_send() {
    fn send<T: Send>(_: T) {}
    let kv = KvCache::host(&geometry(8)).unwrap();
    std::thread::spawn(move || {
        let mut kv = kv;
        let seq = kv.add_sequence().unwrap();
        kv.append(seq, 3).unwrap();
        send(kv);
    })
    .join()
    .unwrap();
}
