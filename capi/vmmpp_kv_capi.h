/* vmmpp_kv_capi.h: a small C ABI over vmmpp::kv_cache, for Python (ctypes: python/vmmpp_kv.py
 * beside this file) and any other language with a C FFI. It builds a cache of a named configuration
 * and layout, runs the scheduler's operations on it and exports a layer's K or V as DLPack.
 *
 * Every function that can fail returns a vmmpp_kv_status; on failure vmmpp_kv_last_error()
 * says why (per thread, until the thread's next failing call). Calls on one handle are
 * serialised by a mutex in the cache, so Python threads may share one.
 *
 * Lifetime: an export keeps its cache alive (the DLPack keep-alive holds it), and so does a
 * prefix cache (vmmpp_kv_prefix), so vmmpp_kv_destroy only drops the handle's reference and the
 * memory goes when the last export and prefix cache are deleted too. A host tier (vmmpp_kv_tier)
 * keeps its prefix cache alive the same way. Reading blocks that no live
 * sequence holds faults: see vmmpp/interop/dlpack.hpp. */
#ifndef VMMPP_KV_CAPI_H
#define VMMPP_KV_CAPI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(VMMPP_KV_CAPI_BUILD)
#define VMMPP_KV_API __attribute__((visibility("default")))
#else
#define VMMPP_KV_API
#endif

/** Status of a call: what went wrong, by the vmmpp error type it came from. */
typedef enum {
    VMMPP_KV_OK = 0,
    VMMPP_KV_INVALID_ARGUMENT = 1, /* vmmpp::invalid_argument, or an unknown name */
    VMMPP_KV_OUT_OF_MEMORY = 2,    /* vmmpp::out_of_memory, std::bad_alloc */
    VMMPP_KV_OVER_QUOTA = 3,       /* vmmpp::over_quota */
    VMMPP_KV_OUT_OF_BLOCKS = 4,    /* vmmpp::out_of_blocks */
    VMMPP_KV_CUDA_ERROR = 5,       /* vmmpp::cuda_error */
    VMMPP_KV_CUDA_UNAVAILABLE = 6, /* vmmpp::cuda_unavailable: no driver or no device */
    VMMPP_KV_ERROR = 7,            /* anything else */
    VMMPP_KV_OUT_OF_SEQUENCE_SLOTS = 8, /* vmmpp::out_of_sequence_slots (sequence_contiguous) */
    VMMPP_KV_TIER_FULL = 9              /* vmmpp::tier_full: a host tier has no room for a swap-out */
} vmmpp_kv_status;

/** The shape of a cache (vmmpp::kv_geometry). dtype: 0 f32, 1 f16, 2 bf16, 3 fp8_e4m3, 4 fp8_e5m2. */
typedef struct {
    uint32_t layers;
    uint32_t kv_heads;
    uint32_t head_dim;
    int32_t dtype;
    uint32_t block_tokens;
    uint32_t max_blocks;
    uint32_t max_tokens_per_sequence; /* sequence_contiguous: tokens of address space per sequence; else 0 */
} vmmpp_kv_geometry;

/** A snapshot of a cache's use. */
typedef struct {
    uint64_t reserved_bytes;  /* address space of the pool */
    uint64_t committed_bytes; /* backed by memory now */
    uint64_t used_blocks;
    uint64_t free_blocks;
    uint64_t sequences;
    uint64_t cow_copies;
} vmmpp_kv_stats;

typedef struct vmmpp_kv vmmpp_kv;

/** Why this thread's last failing call failed ("" if none did). A null pointer where one is
 *  needed is VMMPP_KV_INVALID_ARGUMENT naming it: "vmmpp_kv_fork: argument child is null". */
VMMPP_KV_API const char* vmmpp_kv_last_error(void);
/** The layout names vmmpp_kv_create accepts, comma-separated, kv_cache's default (block_major)
 *  first: "block_major,block_major_hnd,...". A static string (vmmpp::kv_layouts). */
VMMPP_KV_API const char* vmmpp_kv_layout_names(void);
/** The configuration names vmmpp_kv_create accepts, comma-separated, in vmmpp/config.hpp's order:
 *  "static,elastic,elastic_mapped_ahead,elastic_page,gh200,host". A static string
 *  (vmmpp::named_configs, vmmpp/config_list.hpp). Also accepted, and not listed: the alias
 *  "elastic_pages" (= "elastic_page"). */
VMMPP_KV_API const char* vmmpp_kv_config_names(void);
/** The configuration names vmmpp_kv_create_in_process_budget accepts, comma-separated: those
 *  of vmmpp_kv_config_names under a shared budget, and "host" ("elastic,elastic_mapped_ahead,
 *  elastic_page,host"); the alias "elastic_pages" too. A static string. */
VMMPP_KV_API const char* vmmpp_kv_process_budget_config_names(void);

/** A new cache. config: one of vmmpp_kv_config_names (vmmpp::named_configs, vmmpp/config.hpp):
 *  "static" (one cudaMalloc), "elastic" (vmm, shared budget of budget_bytes, 0 for the whole
 *  span), "elastic_mapped_ahead" (the same, a background mapper growing it ahead of demand),
 *  "elastic_page" (the same as elastic, growing 2 MiB at a time; "elastic_pages" is an alias),
 *  "gh200" (managed memory) or "host" (CPU memory, no GPU needed; budget_bytes other than 0 is a
 *  budget of its own); static and gh200, charged to no budget, refuse a budget_bytes other than 0
 *  (VMMPP_KV_INVALID_ARGUMENT). An unknown name is VMMPP_KV_INVALID_ARGUMENT, the message listing
 *  the valid ones.
 *  layout: "block_major", "block_major_hnd", "layer_major", "layer_major_hnd", "packed_kv", "mla"
 *  or "sequence_contiguous" (vmmpp_kv_layout_names). device: the CUDA device (ignored by "host"). */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_create(const vmmpp_kv_geometry* geometry, const char* config,
                                             const char* layout, int device, uint64_t budget_bytes,
                                             vmmpp_kv** out);
/** As vmmpp_kv_create, and devices peers[n_peers] may read and write the cache's memory too
 *  (vmmpp::vmm_options::peer_devices: copies between GPUs go direct). vmm configurations only
 *  ("elastic", "elastic_mapped_ahead", "elastic_page"); others refuse peers with
 *  VMMPP_KV_INVALID_ARGUMENT. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_create_with_peers(const vmmpp_kv_geometry* geometry, const char* config,
                                                        const char* layout, int device, uint64_t budget_bytes,
                                                        const int* peers, uint64_t n_peers, vmmpp_kv** out);
/** Drops the handle (NULL is ignored). Exports still alive keep the cache. */
VMMPP_KV_API void vmmpp_kv_destroy(vmmpp_kv* kv);

VMMPP_KV_API vmmpp_kv_status vmmpp_kv_add_sequence(vmmpp_kv* kv, uint64_t* seq);
/** Appends n_tokens tokens; *first (may be NULL) gets the index of the first new one. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_append(vmmpp_kv* kv, uint64_t seq, uint64_t n_tokens, uint64_t* first);
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_fork(vmmpp_kv* kv, uint64_t seq, uint64_t* child);
/** Keeps the first n_tokens tokens. Memory of dropped blocks goes back once the work queued on the
 *  legacy default stream (which waits for every blocking stream) has completed. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_truncate(vmmpp_kv* kv, uint64_t seq, uint64_t n_tokens);
/** As vmmpp_kv_truncate, waiting for the work queued on `stream` (a cudaStream_t, e.g. PyTorch's
 *  torch.cuda.current_stream().cuda_stream) instead: the caller does not wait for the GPU. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_truncate_on_stream(vmmpp_kv* kv, uint64_t seq, uint64_t n_tokens, void* stream);
/** Frees the sequence; its memory goes back as for vmmpp_kv_truncate. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_free(vmmpp_kv* kv, uint64_t seq);
/** As vmmpp_kv_free, for blocks that work queued on `stream` (a cudaStream_t) may still read. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_free_on_stream(vmmpp_kv* kv, uint64_t seq, void* stream);
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_tokens(vmmpp_kv* kv, uint64_t seq, uint64_t* n_tokens);
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_stats_get(vmmpp_kv* kv, vmmpp_kv_stats* out);

/** Slots (block * block_tokens + offset) of tokens [first, first + count) of seq into out[count]. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_slot_mapping(vmmpp_kv* kv, uint64_t seq, uint64_t first, uint64_t count,
                                                   int64_t* out);
/** The block table of seq: *count gets its length; the first min(capacity, length) ids go to out. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_block_table(vmmpp_kv* kv, uint64_t seq, int32_t* out, uint64_t capacity,
                                                  uint64_t* count);
/** Block tables of seqs[n_seqs] as a row-major [n_seqs, max_blocks_per_seq] int32 matrix, padded. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_pack_block_tables(vmmpp_kv* kv, const uint64_t* seqs, uint64_t n_seqs,
                                                        uint64_t max_blocks_per_seq, int32_t pad, int32_t* out);
/** Address of block `block`'s K (part 0) or V (part 1) of layer `layer`. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_address(vmmpp_kv* kv, uint32_t layer, int32_t part, int32_t block, void** out);
/** Waits for the cache's own device work (copy-on-write copies) and for the GPU work that freed
 *  memory waits for, then gives that memory back; on host memory it only gives back. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_synchronize(vmmpp_kv* kv);
/** Gives back every committed page no block holds, spares included (elastic configurations
 *  keep a few for the next growth), and kept handles; *freed_bytes (may be null) gets the
 *  bytes. Memory whose GPU work is still queued stays (synchronize first). */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_trim(vmmpp_kv* kv, uint64_t* freed_bytes);

/** The DLPack device (DLDeviceType, device_id) of the cache's exports. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_dlpack_device(vmmpp_kv* kv, int managed_as_cuda, int32_t* device_type,
                                                    int32_t* device_id);
/** Layer `layer`'s K (part 0) or V (part 1) as a DLManagedTensor* (versioned == 0) or a
 *  DLManagedTensorVersioned* (versioned != 0). The caller owns it: hand it to a consumer (a
 *  PyCapsule named vmmpp_dlpack_capsule_name(versioned) with vmmpp_dlpack_capsule_destructor)
 *  or give it back with vmmpp_dlpack_release. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_export(vmmpp_kv* kv, uint32_t layer, int32_t part, int versioned,
                                             int managed_as_cuda, void** out);
/** sequence_contiguous only: seq's K (part 0) or V (part 1) of layer `layer` as one dense
 *  [1, tokens, kv_heads, head_dim] tensor (no gather): *data, shape[4] and strides[4] (elements).
 *  Other layouts: VMMPP_KV_INVALID_ARGUMENT. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_sequence_tensor(vmmpp_kv* kv, uint64_t seq, uint32_t layer, int32_t part,
                                                      void** data, int64_t* shape, int64_t* strides);
/** The same run as a DLPack export (as vmmpp_kv_export): valid while seq lives, and it grows in
 *  place, but an export's shape is the token count when it was made. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_export_sequence(vmmpp_kv* kv, uint64_t seq, uint32_t layer, int32_t part,
                                                      int versioned, int managed_as_cuda, void** out);
/** Calls the deleter of an export that no consumer took (NULL is ignored). */
VMMPP_KV_API void vmmpp_dlpack_release(void* managed, int versioned);
/** "dltensor" or "dltensor_versioned": static strings, safe to give PyCapsule_New. */
VMMPP_KV_API const char* vmmpp_dlpack_capsule_name(int versioned);
/** A PyCapsule destructor (PyCapsule_Destructor) for capsules of either name: deletes the export
 *  if no consumer renamed the capsule (took it). Finds the Python C API in the running process. */
VMMPP_KV_API void vmmpp_dlpack_capsule_destructor(void* capsule);
/** Exports made and not yet deleted, over every cache of the process (for leak checks). */
VMMPP_KV_API uint64_t vmmpp_kv_live_exports(void);

/** Test helper, host-accessible memory only: writes a known value into every element of tokens
 *  [first, first + count) of seq, every layer, K and V, through its slot mapping:
 *  (seq * 37 + token * 7 + layer * 131 + part * 61 + head * 17 + dim * 3) % 251 (exact in f32,
 *  f16 and bf16; fp8 is refused). */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_write_test_pattern(vmmpp_kv* kv, uint64_t seq, uint64_t first, uint64_t count);

/* Cross-process budgets (vmmpp::process_budget): several processes' caches share one limit. */

/** Budget figures of a process budget (vmmpp::process_budget_stats), over every process. */
typedef struct {
    uint64_t limit;     /* the global limit in bytes */
    uint64_t committed; /* bytes charged now, all models and processes */
    uint64_t peak;      /* the most ever charged */
    uint64_t denied;    /* refused acquires */
} vmmpp_kv_budget_stats;

/** As vmmpp_kv_create, but the cache's memory is charged to model `model` (limit
 *  model_limit_bytes, the same in every process that registers it) of the process budget
 *  `budget_name` (a POSIX shared-memory segment; created with global_limit_bytes if there is
 *  none, joined otherwise: vmmpp::process_budget::create_or_open). config: one of
 *  vmmpp_kv_process_budget_config_names, the named configuration with its quota swapped for the
 *  process budget's (vmmpp::with_quota_t<C, vmmpp::process_quota>): "elastic" (vmm, adaptive
 *  extents), "elastic_mapped_ahead", "elastic_page" (vmm, 2 MiB pages; alias "elastic_pages") or
 *  "host" (CPU memory, for tests).
 *  layout: "layer_major", "layer_major_hnd", "block_major" or "block_major_hnd". A refused commit
 *  is VMMPP_KV_OVER_QUOTA, as with the per-process budget. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_create_in_process_budget(const vmmpp_kv_geometry* geometry, const char* config,
                                                               const char* layout, int device,
                                                               const char* budget_name, uint64_t global_limit_bytes,
                                                               const char* model, uint64_t model_limit_bytes,
                                                               vmmpp_kv** out);
/** The process budget `budget_name`'s figures now (attaching it; VMMPP_KV_INVALID_ARGUMENT if none). */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_process_budget_stats(const char* budget_name, vmmpp_kv_budget_stats* out);
/** Unlinks the process budget `budget_name` (attached processes keep theirs); *removed (may be
 *  NULL) gets 1 if there was one. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_process_budget_remove(const char* budget_name, int* removed);

/* Moving blocks between caches, processes and GPUs (vmmpp/interop/nixl.hpp; examples/nixl_transfer). */

/** A committed extent of the cache's pool: one backing commit (one physical handle on vmm), the
 *  unit a transfer engine registers. commit numbers the commit that made it (a new one when
 *  memory given back is committed again at the same offset). */
typedef struct {
    uint64_t offset;
    uint64_t bytes;
    uint64_t commit;
} vmmpp_kv_extent;
/** Bytes [offset, offset + bytes) of a cache's span. */
typedef struct {
    uint64_t offset;
    uint64_t bytes;
} vmmpp_kv_range;
/** One transfer of `bytes` bytes between offset local_offset here and remote_offset there. */
typedef struct {
    uint64_t local_offset;
    uint64_t remote_offset;
    uint64_t bytes;
} vmmpp_kv_piece_pair;
typedef struct vmmpp_imported_pages vmmpp_imported_pages;

/** The cache's span: *base (offsets count from it), *capacity bytes, *device (-1: host memory). */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_span(vmmpp_kv* kv, void** base, uint64_t* capacity, int32_t* device);
/** The committed extents, lowest offset first: *count gets how many, the first min(capacity,
 *  count) go to out. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_committed_extents(vmmpp_kv* kv, vmmpp_kv_extent* out, uint64_t capacity,
                                                        uint64_t* count);
/** vmmpp::block_pieces: the byte pieces of blocks[n_blocks] (live ids), in list order, adjacent
 *  ones merged, cut where an extent ends; *count and out as for vmmpp_kv_committed_extents. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_block_pieces(vmmpp_kv* kv, const int32_t* blocks, uint64_t n_blocks,
                                                   vmmpp_kv_range* out, uint64_t capacity, uint64_t* count);
/** vmmpp::pair_pieces: two piece lists of the same bytes lined up into pairs of equal length;
 *  VMMPP_KV_INVALID_ARGUMENT if their totals differ. *count and out as above. */
VMMPP_KV_API vmmpp_kv_status vmmpp_pair_pieces(const vmmpp_kv_range* local, uint64_t n_local,
                                               const vmmpp_kv_range* remote, uint64_t n_remote,
                                               vmmpp_kv_piece_pair* out, uint64_t capacity, uint64_t* count);
/** vmmpp::copy_blocks: blocks src_blocks[i] of src into dst_blocks[i] of dst, queued on `stream`
 *  (a cudaStream_t; NULL: the legacy default stream). The caches must share configuration and
 *  layout; between GPUs, create them with each other's device as a peer. Either sequence may be
 *  freed at once, on any stream: its memory goes back, and a block is rewritten, after the copy. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_copy_blocks(vmmpp_kv* src, const int32_t* src_blocks, vmmpp_kv* dst,
                                                  const int32_t* dst_blocks, uint64_t n_blocks, void* stream);
/** vmm configurations: sends every committed physical handle over the connected Unix socket
 *  `socket` (vmmpp::send_shared_pages); the receiver gets read/write access to them. The handles
 *  are exported under the cache's lock and sent without it, so the cache's other calls go on
 *  while the peer reads; a peer that has not taken them all after 10 s fails the call
 *  (VMMPP_KV_ERROR, the message names the timeout and how many records went). */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_send_shared_pages(vmmpp_kv* kv, int socket);
/** Receives what vmmpp_kv_send_shared_pages sent on `socket` and maps it at the same offsets of
 *  a span reserved here, read/write for `device` (another GPU than the owner's: a peer mapping). */
VMMPP_KV_API vmmpp_kv_status vmmpp_import_pages(int socket, int device, vmmpp_imported_pages** out);
VMMPP_KV_API vmmpp_kv_status vmmpp_imported_pages_span(vmmpp_imported_pages* pages, void** base,
                                                       uint64_t* capacity, uint64_t* mapped_bytes);
/** Unmaps and releases the imported pages (NULL is ignored); the owner's memory can then go back. */
VMMPP_KV_API void vmmpp_imported_pages_destroy(vmmpp_imported_pages* pages);
/** flags of vmmpp_copy_piece_pairs: one cudaMemcpyAsync per pair instead of one batch. */
#define VMMPP_COPY_ONE_BY_ONE 1
/** Queues the copies of pairs[n_pairs], (local_base + local_offset) <- (remote_base +
 *  remote_offset), `bytes` each, on `stream`: blocks pulled from imported pages into this
 *  process's cache. One cudaMemcpyBatchAsync for the list (flags 0; on a stream other than the
 *  legacy default one, which the batch API refuses), or one cudaMemcpyAsync per pair
 *  (VMMPP_COPY_ONE_BY_ONE, or stream NULL). */
VMMPP_KV_API vmmpp_kv_status vmmpp_copy_piece_pairs(void* local_base, const void* remote_base,
                                                    const vmmpp_kv_piece_pair* pairs, uint64_t n_pairs, void* stream,
                                                    int flags);

/* Prefix caching (vmmpp::prefix_cache, vmmpp/prefix/prefix_cache.hpp): full blocks of finished
 * requests kept by content key, so a request whose prompt starts the same way gets them back. */

/** A block's 128-bit content key (vmmpp::block_key). */
typedef struct {
    uint64_t hi;
    uint64_t lo;
} vmmpp_kv_block_key;

/** vmmpp::prefix_cache_stats: what a prefix cache did since it was made, and what it holds. */
typedef struct {
    uint64_t hits;                /* blocks attach found cached */
    uint64_t misses;              /* full blocks attach asked for and did not find */
    uint64_t evictions;           /* blocks evicted */
    uint64_t cached_blocks;       /* every block the prefix cache holds */
    uint64_t cached_bytes;
    uint64_t evictable_blocks;    /* those no sequence holds */
    uint64_t evictable_bytes;
    uint64_t committed_bytes;     /* the pool's committed bytes */
    uint64_t packed_floor_bytes;  /* live and cached blocks' bytes, packed, in whole pages */
    double idle_footprint_ratio;  /* committed_bytes / packed_floor_bytes (1 if both are 0; inf if memory is committed for no block) */
    uint64_t block_bytes;         /* bytes of one block, all its pieces (what an evicted block gives up) */
} vmmpp_kv_prefix_stats;

/** Event kinds (vmmpp::prefix_event_kind). */
#define VMMPP_KV_PREFIX_STORED 0  /* a block cached under key, chained on parent */
#define VMMPP_KV_PREFIX_REMOVED 1 /* a block evicted (parent is the root key then) */
/** vmmpp::prefix_event: a block stored or removed, for cache-aware routers. */
typedef struct {
    int32_t kind; /* VMMPP_KV_PREFIX_STORED or VMMPP_KV_PREFIX_REMOVED */
    int32_t block;
    uint64_t key_hi, key_lo;
    uint64_t parent_hi, parent_lo; /* stored: the chain's previous block (the root key for a prompt's first) */
} vmmpp_kv_prefix_event;

typedef struct vmmpp_kv_prefix vmmpp_kv_prefix;

/** A prefix cache over `kv` (one per cache: a second is VMMPP_KV_INVALID_ARGUMENT). It holds a
 *  reference to the cache, so vmmpp_kv_destroy(kv) before vmmpp_kv_prefix_destroy only drops the
 *  cache handle, and every call takes the cache's mutex (the one the vmmpp_kv_* calls take).
 *  max_cached_bytes bounds the bytes of cached blocks no sequence holds (UINT64_MAX: no bound;
 *  0: none are kept); record_events != 0 queues events for vmmpp_kv_prefix_drain_events.
 *  A layout whose blocks cannot be shared (sequence_contiguous) is VMMPP_KV_INVALID_ARGUMENT.
 *  The engine goes on using the cache's own calls (write, slot mapping, block table) on the
 *  sequences; it frees them through vmmpp_kv_prefix_free, which keeps the bound (vmmpp_kv_free
 *  lets the bytes pass the bound until the prefix cache's next call). */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_prefix_create(vmmpp_kv* kv, uint64_t max_cached_bytes, int record_events,
                                                    vmmpp_kv_prefix** out);
/** As vmmpp_kv_prefix_create, and lends the cached blocks no sequence holds to the other models
 *  and processes of the cache's budget (vmmpp::prefix_lending, vmmpp/prefix/lending.hpp): a
 *  model whose commit the global limit refuses, after every spare is taken, evicts about what it
 *  needs of them (whole pages, the oldest first) before it gets VMMPP_KV_OVER_QUOTA; another
 *  process's request is served by this process's budget watcher, with no call here. Blocks of
 *  live sequences are never lent. The reclaim evicts under the cache's mutex (the one every
 *  vmmpp_kv_* call takes), waiting for it at most 20 ms (another process's request: not at all),
 *  so this cache's calls stay serialised with it. A cache not charged to a budget shared with
 *  others (not made by vmmpp_kv_create_in_process_budget) is VMMPP_KV_INVALID_ARGUMENT. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_prefix_create_lending(vmmpp_kv* kv, uint64_t max_cached_bytes,
                                                            int record_events, vmmpp_kv_prefix** out);
/** vmmpp::lending_stats: what a lending prefix cache gave others (zeros for one that does not lend). */
typedef struct vmmpp_kv_prefix_lending_stats {
    uint64_t lends;       /* reclaims that evicted something for another model or process */
    uint64_t lent_blocks; /* blocks those reclaims evicted */
    uint64_t lent_bytes;  /* bytes of pages they emptied */
    uint64_t busy;        /* reclaims that found the cache's mutex held past their wait */
} vmmpp_kv_prefix_lending_stats;
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_prefix_lending_stats_get(vmmpp_kv_prefix* prefix,
                                                               vmmpp_kv_prefix_lending_stats* out);
/** Drops every cached block's reference (blocks no sequence holds go back) and the handle's
 *  reference to the cache (NULL is ignored); a lending one stops lending first. With a host tier
 *  over it (vmmpp_kv_tier_create) alive, only the handle goes: the prefix cache goes with the tier. */
VMMPP_KV_API void vmmpp_kv_prefix_destroy(vmmpp_kv_prefix* prefix);
/** Registers the full blocks among the first n_tokens tokens of seq (tokens[n_tokens]: its token
 *  ids from the first, their KV written; at most its token count) under keys chained over the
 *  tokens and extra[n_extra] (model revision, adapter, tenant salt...). *registered (may be
 *  NULL) gets how many blocks were new. An unknown sequence is VMMPP_KV_INVALID_ARGUMENT. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_prefix_publish(vmmpp_kv_prefix* prefix, uint64_t seq, const int32_t* tokens,
                                                     uint64_t n_tokens, const uint64_t* extra, uint64_t n_extra,
                                                     uint64_t* registered);
/** *cached_tokens gets how many leading tokens of tokens[n_tokens] are cached (whole blocks). */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_prefix_lookup(vmmpp_kv_prefix* prefix, const int32_t* tokens, uint64_t n_tokens,
                                                    const uint64_t* extra, uint64_t n_extra, uint64_t* cached_tokens);
/** A new sequence (*seq) holding the cached leading blocks of tokens[n_tokens]; *cached_tokens
 *  gets how many tokens they hold (the engine appends the rest). Counts hits and misses. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_prefix_attach(vmmpp_kv_prefix* prefix, const int32_t* tokens, uint64_t n_tokens,
                                                    const uint64_t* extra, uint64_t n_extra, uint64_t* seq,
                                                    uint64_t* cached_tokens);
/** As vmmpp_kv_prefix_attach, the blocks to be read by work queued on `stream` (a cudaStream_t;
 *  NULL: the legacy default stream): a cached block that compaction moved, its copy queued on the
 *  stream of the free or trim that moved it, is read on `stream` only after that copy. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_prefix_attach_on_stream(vmmpp_kv_prefix* prefix, const int32_t* tokens,
                                                              uint64_t n_tokens, const uint64_t* extra,
                                                              uint64_t n_extra, void* stream, uint64_t* seq,
                                                              uint64_t* cached_tokens);
/** vmmpp_kv_append, evicting cached blocks no sequence holds when the cache refuses (out of
 *  blocks, over quota, out of memory), until it succeeds or nothing is left to evict. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_prefix_append(vmmpp_kv_prefix* prefix, uint64_t seq, uint64_t n_tokens,
                                                    uint64_t* first);
/** As vmmpp_kv_prefix_append, the append's work queued on `stream` (a cudaStream_t). */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_prefix_append_on_stream(vmmpp_kv_prefix* prefix, uint64_t seq,
                                                              uint64_t n_tokens, void* stream, uint64_t* first);
/** vmmpp_kv_free, then the bound (max_cached_bytes) is kept, then cached blocks no sequence holds
 *  are compacted into free ids where that empties pages: the sequence's cached blocks stay. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_prefix_free(vmmpp_kv_prefix* prefix, uint64_t seq);
/** As vmmpp_kv_prefix_free, for blocks that work queued on `stream` (a cudaStream_t) may still read. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_prefix_free_on_stream(vmmpp_kv_prefix* prefix, uint64_t seq, void* stream);
/** Evicts n_blocks cached blocks no sequence holds (or all there are), least recently used
 *  first. *count (may be NULL) gets how many went; the first min(capacity, count)
 *  ids go to blocks (NULL only with capacity 0) and their keys to keys (may be NULL). The
 *  eviction is done whatever the capacity: a capacity of the geometry's max_blocks is always
 *  enough. *freed_page_bytes (may be NULL) gets the bytes of pool pages no live or cached block
 *  touches any more. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_prefix_evict(vmmpp_kv_prefix* prefix, uint64_t n_blocks, int32_t* blocks,
                                                   vmmpp_kv_block_key* keys, uint64_t capacity, uint64_t* count,
                                                   uint64_t* freed_page_bytes);
/** Evicts whole page groups, oldest first, until at least `bytes` of pages are free of blocks
 *  (or no group is left); outputs as vmmpp_kv_prefix_evict. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_prefix_evict_bytes(vmmpp_kv_prefix* prefix, uint64_t bytes, int32_t* blocks,
                                                         vmmpp_kv_block_key* keys, uint64_t capacity, uint64_t* count,
                                                         uint64_t* freed_page_bytes);
/** Evicts every cached block no sequence holds; outputs as vmmpp_kv_prefix_evict. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_prefix_clear(vmmpp_kv_prefix* prefix, int32_t* blocks, vmmpp_kv_block_key* keys,
                                                   uint64_t capacity, uint64_t* count, uint64_t* freed_page_bytes);
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_prefix_stats_get(vmmpp_kv_prefix* prefix, vmmpp_kv_prefix_stats* out);
/** Takes up to `capacity` of the queued events (record_events), oldest first, into out; *count
 *  gets how many, *left (may be NULL) how many stay queued for the next call. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_prefix_drain_events(vmmpp_kv_prefix* prefix, vmmpp_kv_prefix_event* out,
                                                          uint64_t capacity, uint64_t* count, uint64_t* left);

/* The host tier (vmmpp::host_tier, vmmpp/tier/host_tier.hpp): a second tier behind a prefix cache,
 * in host memory. The prefix cache's evicted blocks are copied to it (when it has room) instead
 * of being dropped; a prompt whose prefix continues there gets those blocks copied back; a
 * preempted sequence is swapped out to it and back in instead of being recomputed. Every copy
 * runs on the tier's own stream; the calls take the cache's mutex. */

/** vmmpp::host_tier_stats: what a tier did since it was made, and what it holds. */
typedef struct {
    uint64_t offloaded_blocks; /* evicted GPU blocks copied to the host */
    uint64_t dropped_blocks;   /* evicted GPU blocks the tier could not keep (no room, a refused copy) */
    uint64_t loaded_blocks;    /* host blocks copied back by attach */
    uint64_t host_hits;        /* blocks attach found in the tier (not on the GPU) */
    uint64_t evicted_blocks;   /* keyed host blocks given up for room */
    uint64_t swapped_out;      /* sequences */
    uint64_t swapped_in;
    uint64_t bytes_to_host;
    uint64_t bytes_to_device;
    uint64_t keyed_blocks;     /* host blocks holding a prefix block now */
    uint64_t swapped_blocks;   /* host blocks holding swapped-out sequences now */
    uint64_t free_blocks;
    uint64_t max_blocks;
    uint64_t stored_ahead_blocks; /* cached GPU blocks copied ahead of eviction (store_ahead) */
} vmmpp_kv_tier_stats;

typedef struct vmmpp_kv_tier vmmpp_kv_tier;

/** A host tier of max_blocks blocks (each one of the cache's blocks, committed when it is made:
 *  page-locked for a GPU cache, plain host memory for a "host" one) over `prefix`, which from
 *  now on offers it every block it evicts. One per prefix cache: a second is
 *  VMMPP_KV_INVALID_ARGUMENT. It holds a reference to the prefix cache (vmmpp_kv_prefix_destroy
 *  first only drops that handle). stream: a cudaStream_t of its own for every copy (a
 *  non-blocking, low-priority one keeps the copies out of decode's way), never NULL or the
 *  legacy or per-thread default stream for a GPU cache (VMMPP_KV_INVALID_ARGUMENT); ignored for
 *  a "host" cache (may be NULL). max_blocks 0 is VMMPP_KV_INVALID_ARGUMENT; no host memory is
 *  VMMPP_KV_OUT_OF_MEMORY, a refused registration VMMPP_KV_CUDA_ERROR. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_tier_create(vmmpp_kv_prefix* prefix, uint64_t max_blocks, void* stream,
                                                  vmmpp_kv_tier** out);
/** Stops the prefix cache's spills into the tier, waits for the tier's copies, frees its memory
 *  (swapped-out sequences with it) and drops its reference to the prefix cache (NULL is ignored). */
VMMPP_KV_API void vmmpp_kv_tier_destroy(vmmpp_kv_tier* tier);
/** vmmpp_kv_prefix_attach_on_stream, then the prompt's next full blocks found in the tier are
 *  appended (evicting cached GPU blocks as needed) and copied back on the tier's stream; `stream`
 *  (the engine's: its next work reads them) waits for the copies, and the blocks are cached on
 *  the GPU again. *seq: the new sequence; *cached_tokens: its leading tokens already there (GPU
 *  and host hits; the engine appends the rest); *host_tokens (may be NULL): of those, the ones
 *  copied from the tier. Where the GPU has no room for the host hits, the sequence keeps its GPU
 *  hits only (*host_tokens 0). Errors as vmmpp_kv_prefix_attach (nothing changed), and
 *  VMMPP_KV_CUDA_ERROR queueing the copies (the sequence is freed again). */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_tier_attach(vmmpp_kv_tier* tier, const int32_t* tokens, uint64_t n_tokens,
                                                  const uint64_t* extra, uint64_t n_extra, void* stream,
                                                  uint64_t* seq, uint64_t* cached_tokens, uint64_t* host_tokens);
/** How many leading tokens of tokens[n_tokens] are cached, in whole blocks chained over
 *  extra[n_extra]: *gpu_tokens on the GPU, then *host_tokens more in the tier. Counts nothing. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_tier_lookup(vmmpp_kv_tier* tier, const int32_t* tokens, uint64_t n_tokens,
                                                  const uint64_t* extra, uint64_t n_extra, uint64_t* gpu_tokens,
                                                  uint64_t* host_tokens);
/** Swap preemption: copies every block of `seq` (its tokens written by work queued on `stream`)
 *  to host blocks on the tier's stream and frees the sequence through the prefix cache on
 *  `stream` (its published blocks stay cached; its memory goes back after the copy). *id: what
 *  vmmpp_kv_tier_swap_in takes. Makes room by giving up the oldest cached host blocks.
 *  VMMPP_KV_TIER_FULL: not enough host blocks even then (the rest hold swapped-out sequences;
 *  nothing changed, recompute the sequence instead); VMMPP_KV_INVALID_ARGUMENT: unknown sequence;
 *  VMMPP_KV_CUDA_ERROR: the copy refused (the sequence stays). */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_tier_swap_out(vmmpp_kv_tier* tier, uint64_t seq, void* stream, uint64_t* id);
/** A new sequence (*seq) with the tokens of swapped-out sequence `id` (vmmpp_kv_tier_swapped_tokens),
 *  its blocks copied back on the tier's stream; `stream` waits for the copies. The id is used up
 *  and its host blocks go back. VMMPP_KV_INVALID_ARGUMENT: unknown id; VMMPP_KV_OUT_OF_BLOCKS,
 *  VMMPP_KV_OVER_QUOTA, VMMPP_KV_OUT_OF_MEMORY: no room on the GPU even after evicting every
 *  cached block no sequence holds (nothing changed: the sequence stays swapped out, try again
 *  later); VMMPP_KV_CUDA_ERROR: the copy refused (the id stays). */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_tier_swap_in(vmmpp_kv_tier* tier, uint64_t id, void* stream, uint64_t* seq);
/** Gives up swapped-out sequence `id` (the engine recomputes it, or the request was cancelled);
 *  its host blocks go back. VMMPP_KV_INVALID_ARGUMENT: unknown id. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_tier_drop_swapped(vmmpp_kv_tier* tier, uint64_t id);
/** *n_tokens: the tokens swapped-out sequence `id` holds. VMMPP_KV_INVALID_ARGUMENT: unknown id. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_tier_swapped_tokens(vmmpp_kv_tier* tier, uint64_t id, uint64_t* n_tokens);
/** Copies up to max_blocks evictable cached GPU blocks the tier does not hold yet, next to be
 *  evicted first, into free host blocks (vmmpp::host_tier::store_ahead): their eviction then
 *  copies nothing. An engine calling it every step with a small budget spreads the tier's traffic
 *  over its steps. *stored: the blocks copied. VMMPP_KV_CUDA_ERROR: the copy refused (nothing kept). */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_tier_store_ahead(vmmpp_kv_tier* tier, uint64_t max_blocks, uint64_t* stored);
/** Blocks until every copy queued by the tier so far has completed (at once on a "host" cache). */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_tier_synchronize(vmmpp_kv_tier* tier);
/** *idle: 1 if every copy queued by the tier so far has completed, else 0 (never waits). */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_tier_idle(vmmpp_kv_tier* tier, int* idle);
/** Makes `stream` wait for every copy queued by the tier so far (attach and swap_in do it for
 *  theirs); nothing on a "host" cache. */
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_tier_stream_waits_for_copies(vmmpp_kv_tier* tier, void* stream);
VMMPP_KV_API vmmpp_kv_status vmmpp_kv_tier_stats_get(vmmpp_kv_tier* tier, vmmpp_kv_tier_stats* out);

#ifdef __cplusplus
}
#endif

#endif /* VMMPP_KV_CAPI_H */
