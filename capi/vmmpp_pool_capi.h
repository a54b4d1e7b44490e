/* vmmpp_pool_capi.h: a small C ABI over vmmpp::elastic_pool and vmmpp::budget, for the Rust crate
 * (bindings/rust, the candle-cuda-vmm API: VirtualMemoryPool, SharedMemoryPool) and any other
 * language with a C FFI. A pool reserves a span of address space and commits the pages under the
 * byte ranges the caller holds in it; a budget is a global limit shared by several models' pools,
 * each model with its own limit (vmmpp/quota/shared_budget.hpp).
 *
 * Part of the vmmpp_kv_capi library (one .so; the status codes are vmmpp_kv_capi.h's). Every
 * function that can fail returns a vmmpp_kv_status; on failure vmmpp_pool_last_error() says why,
 * per thread, until the thread's next failing pool call (the vmmpp_kv_* calls keep their own,
 * vmmpp_kv_last_error). Pools and budgets are thread safe: any thread may call them at any time. */
#ifndef VMMPP_POOL_CAPI_H
#define VMMPP_POOL_CAPI_H

#include <stddef.h>
#include <stdint.h>

#include "vmmpp_kv_capi.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct vmmpp_pool vmmpp_pool;
typedef struct vmmpp_budget vmmpp_budget;

/** A snapshot of a pool (vmmpp::pool_stats). */
typedef struct {
    uint64_t reserved_bytes;       /* the span */
    uint64_t committed_bytes;      /* backed by memory now */
    uint64_t peak_committed_bytes; /* most ever committed at once */
    uint64_t held_pages;           /* pages some held range covers (counted once each) */
    uint64_t page_bytes;           /* the commit unit */
    uint64_t commits;              /* backing commit calls */
    uint64_t decommits;            /* backing decommit calls */
} vmmpp_pool_stats;

/** One model of a budget (vmmpp::model_stats). */
typedef struct {
    uint64_t limit;     /* its own limit in bytes */
    uint64_t committed; /* bytes charged to it now */
    uint64_t peak;      /* the most ever charged to it */
    uint64_t denied;    /* its requests refused, by its limit or the global one */
} vmmpp_budget_model_stats;

/** The backings vmmpp_pool_create accepts, comma-separated: "host,vmm". A static string. */
VMMPP_KV_API const char* vmmpp_pool_backing_names(void);
/** Why this thread's last failing vmmpp_pool_* or vmmpp_budget_* call failed ("" if none did). */
VMMPP_KV_API const char* vmmpp_pool_last_error(void);
/** When this thread's last failing pool call was VMMPP_KV_OVER_QUOTA: returns 1 and gives the
 *  refusal's numbers (vmmpp::over_quota: the bytes requested, those in use under the limit that
 *  refused, that limit) and `which` limit refused ("model <name>" or "global", cut to
 *  which_capacity - 1 bytes and NUL-terminated; which may be NULL with which_capacity 0). Returns 0
 *  and leaves the outputs alone otherwise. Any output may be NULL. */
VMMPP_KV_API int vmmpp_pool_last_over_quota(uint64_t* requested, uint64_t* in_use, uint64_t* limit, char* which,
                                            uint64_t which_capacity);

/** Whether CUDA device `device` supports virtual memory management (cuMemCreate/cuMemMap): 1 or
 *  0. Never fails: 0 without a driver, a device or that device (vmmpp::is_vmm_supported). */
VMMPP_KV_API int vmmpp_is_vmm_supported(int device);
/** VMMPP_KV_OK when CUDA device `device` exists; VMMPP_KV_CUDA_UNAVAILABLE without a driver,
 *  VMMPP_KV_INVALID_ARGUMENT for an ordinal that is no device (the message gives the count). */
VMMPP_KV_API vmmpp_kv_status vmmpp_device_check(int device);

/** A pool of `capacity` bytes of address space (rounded up to a whole number of pages), nothing
 *  committed. backing: "host" (CPU memory, mmap; no GPU needed; device ignored) or "vmm" (CUDA VMM
 *  on `device`). page_bytes: the commit unit, 0 for the backing's default (host 2 MiB, vmm the
 *  device's granularity); host takes any non-zero multiple of the OS page size, vmm only its
 *  device's granularity (vmmpp::vmm commits in granules; the message names it). Growth is page by
 *  page (vmmpp::page_granular): a page goes back the moment nothing holds it. Errors:
 *  VMMPP_KV_INVALID_ARGUMENT (unknown backing, the message listing the valid ones; a zero
 *  capacity, a bad page size), VMMPP_KV_CUDA_UNAVAILABLE (vmm without a GPU), VMMPP_KV_OUT_OF_MEMORY
 *  (address space), VMMPP_KV_CUDA_ERROR. */
VMMPP_KV_API vmmpp_kv_status vmmpp_pool_create(uint64_t capacity, uint64_t page_bytes, const char* backing, int device,
                                               vmmpp_pool** out);
/** Gives every committed page back (and its charge to the budget) and unregisters the pool's
 *  model from its budget (NULL is ignored). Addresses into the span are invalid afterwards. */
VMMPP_KV_API void vmmpp_pool_destroy(vmmpp_pool* pool);

/** Holds bytes [offset, offset + bytes) of the span: commits every page under it that is not
 *  committed yet (vmmpp::elastic_pool::ensure_committed). Holds are counted by page, so ranges may
 *  overlap or share pages; each hold is let go by one vmmpp_pool_release of the same range.
 *  *address (may be NULL) gets the range's first byte (base + offset). Errors, nothing held or
 *  committed by the call: VMMPP_KV_INVALID_ARGUMENT (range outside the span, or empty),
 *  VMMPP_KV_OVER_QUOTA (the model's limit or the budget's global one refused the pages; the
 *  whole range's uncommitted pages are charged at once, before any is committed, so the refusal's
 *  numbers, vmmpp_pool_last_over_quota, are for all of them), VMMPP_KV_OUT_OF_MEMORY, VMMPP_KV_CUDA_ERROR. */
VMMPP_KV_API vmmpp_kv_status vmmpp_pool_ensure_committed(vmmpp_pool* pool, uint64_t offset, uint64_t bytes,
                                                         void** address);
/** Lets go of [offset, offset + bytes), held before: pages nothing holds any more go back to the
 *  backing and their bytes to the budget at once. No GPU work may still touch them (call
 *  cudaDeviceSynchronize or the stream's sync first). Errors: VMMPP_KV_INVALID_ARGUMENT for a
 *  range not held or outside the span (nothing changed); VMMPP_KV_CUDA_ERROR when the driver
 *  refuses the decommit (the release took effect; the page stays a committed spare). */
VMMPP_KV_API vmmpp_kv_status vmmpp_pool_release(vmmpp_pool* pool, uint64_t offset, uint64_t bytes);
/** *committed gets 1 if every page under [offset, offset + bytes) is committed, else 0.
 *  VMMPP_KV_INVALID_ARGUMENT for a range outside the span. */
VMMPP_KV_API vmmpp_kv_status vmmpp_pool_is_committed(vmmpp_pool* pool, uint64_t offset, uint64_t bytes,
                                                     int* committed);
/** The span: *base, *capacity bytes, *page_bytes, *device (-1: host memory). Outputs may be NULL. */
VMMPP_KV_API vmmpp_kv_status vmmpp_pool_span(vmmpp_pool* pool, void** base, uint64_t* capacity, uint64_t* page_bytes,
                                             int32_t* device);
VMMPP_KV_API vmmpp_kv_status vmmpp_pool_stats_get(vmmpp_pool* pool, vmmpp_pool_stats* out);

/** A budget of `global_limit` bytes (non-zero, else VMMPP_KV_INVALID_ARGUMENT) for the models
 *  whose pools vmmpp_budget_create_pool makes. */
VMMPP_KV_API vmmpp_kv_status vmmpp_budget_create(uint64_t global_limit, vmmpp_budget** out);
/** Drops the handle (NULL is ignored); pools made from it keep the budget until they go. */
VMMPP_KV_API void vmmpp_budget_destroy(vmmpp_budget* budget);
/** As vmmpp_pool_create, and registers model `model` with the budget, limit model_limit bytes:
 *  every page the pool commits is charged to the model and to the global limit (refused with
 *  VMMPP_KV_OVER_QUOTA past either), and goes back to both when released. The model stays
 *  registered until vmmpp_pool_destroy. Errors: as vmmpp_pool_create, and
 *  VMMPP_KV_INVALID_ARGUMENT for a zero limit or a model registered now (nothing changed). */
VMMPP_KV_API vmmpp_kv_status vmmpp_budget_create_pool(vmmpp_budget* budget, const char* model, uint64_t model_limit,
                                                      uint64_t capacity, uint64_t page_bytes, const char* backing,
                                                      int device, vmmpp_pool** out);
/** The budget's totals now (limit, committed, peak, denied: vmmpp::budget_stats). */
VMMPP_KV_API vmmpp_kv_status vmmpp_budget_stats_get(vmmpp_budget* budget, vmmpp_kv_budget_stats* out);
/** Model `model`'s figures now; VMMPP_KV_INVALID_ARGUMENT if it is not registered. */
VMMPP_KV_API vmmpp_kv_status vmmpp_budget_model_stats_get(vmmpp_budget* budget, const char* model,
                                                          vmmpp_budget_model_stats* out);

#ifdef __cplusplus
}
#endif

#endif /* VMMPP_POOL_CAPI_H */
