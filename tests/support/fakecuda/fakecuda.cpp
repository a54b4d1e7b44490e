// tests/support/fakecuda/fakecuda.cpp: a CPU stand-in for the CUDA driver, built as a file named
// exactly libcuda.so.1, so vmmpp's GPU code paths (the vmm backing, pools over it, stream-ordered
// release) run, and fail on purpose, on a machine without a GPU.
//
// vmmpp resolves every driver entry point through cuGetProcAddress_v2 (vmmpp/driver/api.hpp), so
// this library exports only that and its control functions (fakecuda_*, reached by tests through
// tests/support/fakecuda.hpp). It models one device, ordinal 0, that supports VMM:
//
// - cuMemAddressReserve reserves PROT_NONE address space; cuMemCreate makes a memfd of the size
//   (device memory is FAKECUDA_MEMORY bytes, default 1 GiB); cuMemMap maps it there MAP_FIXED |
//   MAP_SHARED, PROT_NONE until cuMemSetAccess opens it; cuMemUnmap puts PROT_NONE anonymous
//   memory back. A handle's memory is freed once it is released and unmapped. Exported POSIX
//   file descriptors are dups of the memfd. The granularity is FAKECUDA_GRANULARITY (default
//   65536) bytes. As the real driver: mapping at an offset into a handle, mapping part of a
//   handle, or unmapping (setting access on) part of a mapping is CUDA_ERROR_INVALID_VALUE.
// - Streams: each stream is its own queue, as on the real GPU: work runs in order within a
//   stream, in any order across streams, except that the legacy default stream waits for every
//   blocking stream's earlier work and they for its (as the real driver's), and cuStreamWaitEvent
//   holds a stream until the event's record has run. The GPU runs work at once, or queues it
//   while held (fakecuda_hold_gpu); a test then runs one stream (fakecuda_run_stream) or all
//   (fakecuda_run_gpu), so work on one stream can finish while another's is still queued.
//   cuLaunchHostFunc's function runs when its place in the stream is reached, on the thread
//   that makes the GPU run (the real driver uses a thread of its own). A copy that runs while its source or
//   destination, inside a reservation, is not mapped with access copies nothing and makes
//   CUDA_ERROR_ILLEGAL_ADDRESS sticky: every call returns it, as after a lost context, until
//   fakecuda_reset. Ranges are checked against the fake's own table, not by faulting; addresses
//   outside every reservation are host memory.
// - Kernels: a library loaded from PTX (cuLibraryLoadData) yields the kernels its text declares
//   (`.entry name`); the fake runs the one vmmpp ships, vmmpp_staged_pieces (its argument is
//   vmmpp::detail::staged_pieces_args), in stream order, checking every piece it touches as a
//   copy's range (and its 16-byte alignment: CUDA_ERROR_MISALIGNED_ADDRESS). Any other kernel is
//   CUDA_ERROR_NOT_SUPPORTED at launch. cuMemAllocFromPoolAsync (from a pool of cuMemPoolCreate)
//   hands out host memory at once; cuMemFreeAsync frees it when the stream reaches the free
//   (fakecuda_async_bytes counts it). Stream priorities are kept and told, not acted on.
// - Any entry point can be made to fail (fakecuda_fail): the call returns the result and does
//   nothing.
//
// One mutex serialises every call (a pool's mapper thread calls in concurrently); contexts are
// per thread, as the real driver's.
#include <cuda.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "vmmpp/kv/detail/staged_pieces_args.hpp"

// The driver's opaque handle types, defined here: this library is the driver.
struct CUctx_st {
    int device = 0;
};
struct CUstream_st {
    bool blocking = true;  // not CU_STREAM_NON_BLOCKING: ordered with the legacy default stream
    CUcontext context = nullptr;  // current when it was created (cuStreamGetCtx)
    int priority = 0;
};
struct CUmemPoolHandle_st {
    cuuint64_t release_threshold = 0;
};
struct CUevent_st {
    std::uint64_t last_record = 0;  // sequence number of its last cuEventRecord; 0: never recorded
};
struct CUlib_st {
    std::string code;  // the PTX it was loaded from
};
struct CUkern_st {
    std::string name;
};

namespace {

constexpr std::size_t default_granularity = 64 * 1024;
constexpr std::size_t default_memory = std::size_t{1} << 30;

/// A size from the environment, or `fallback`; a malformed value stops the process, loudly.
std::size_t size_from_env(const char* name, std::size_t fallback) {
    const char* text = std::getenv(name);
    if (text == nullptr || *text == '\0') {
        return fallback;
    }
    char* end = nullptr;
    const unsigned long long value = std::strtoull(text, &end, 0);
    if (*end != '\0' || value == 0) {
        std::fprintf(stderr, "fakecuda: %s=%s is not a positive number of bytes\n", name, text);
        std::abort();
    }
    return static_cast<std::size_t>(value);
}

/// Physical memory of one cuMemCreate (or import): a memfd. Alive while a handle or a mapping
/// refers to it; its bytes count against the device's memory until then.
struct allocation {
    allocation(int descriptor, std::size_t size, std::size_t& alive) : fd(descriptor), bytes(size), alive_bytes(alive) {
        alive_bytes += bytes;
    }
    allocation(const allocation&) = delete;
    allocation& operator=(const allocation&) = delete;
    ~allocation() {
        ::close(fd);
        alive_bytes -= bytes;
    }
    int fd;
    std::size_t bytes;
    std::size_t& alive_bytes;  // the fake's total, updated under its mutex
    bool gpu_direct_rdma = false;  // created with allocFlags.gpuDirectRDMACapable
};

/// One operation on the GPU's queue.
struct work {
    enum class kind { copy, set, record, wait, host, staged_pieces, free };
    kind what = kind::record;
    std::uint64_t seq = 0;
    CUstream stream = nullptr;
    std::uint64_t after = 0;  // wait: the sequence number of the event record it waits for
    CUhostFn host = nullptr;  // host: the function and its argument
    void* host_data = nullptr;
    std::uintptr_t dst = 0;
    std::uintptr_t src = 0;
    std::size_t bytes = 0;
    unsigned char value = 0;
    std::shared_ptr<const vmmpp::detail::staged_pieces_args> pieces = nullptr;  // staged_pieces: its argument
    std::size_t blocks = 0;                                             // and how many blocks it moves
};

struct mapped_range {
    std::size_t bytes = 0;
    std::shared_ptr<allocation> memory;
    int prot = PROT_NONE;
};

/// A planned failure: the call with this number (counted per function, 1-based) returns `result`.
struct planned_failure {
    std::uint64_t at = 0;
    CUresult result = CUDA_SUCCESS;
};

struct device_state;
void run_staged_pieces(device_state& s, const vmmpp::detail::staged_pieces_args& a, std::size_t blocks);

/// The whole device. Every member is guarded by `mutex`.
struct device_state {
    std::mutex mutex;
    const std::size_t granularity = size_from_env("FAKECUDA_GRANULARITY", default_granularity);
    const std::size_t memory = size_from_env("FAKECUDA_MEMORY", default_memory);
    std::size_t alive_bytes = 0;

    CUctx_st primary{};
    int primary_refs = 0;

    CUmemGenericAllocationHandle next_handle = 1;
    std::map<CUmemGenericAllocationHandle, std::shared_ptr<allocation>> handles;
    std::map<std::uintptr_t, std::size_t> reservations;  // base -> bytes
    std::map<std::uintptr_t, mapped_range> mappings;     // address -> what is mapped there
    std::map<std::uintptr_t, std::size_t> host_registrations;  // page-locked host ranges: base -> bytes
    std::map<std::uintptr_t, std::size_t> async_allocations;   // cuMemAllocAsync: base -> bytes
    std::set<CUmemPoolHandle_st*> pools;
    std::set<CUlib_st*> libraries;
    std::set<CUkern_st*> kernels;

    std::set<CUstream_st*> streams;
    std::set<CUevent_st*> events;
    std::map<CUstream, std::uint64_t> last_on_stream;  // sequence number of each stream's last work
    std::deque<work> queue;  // submitted and not yet run, by sequence number
    bool held = false;
    std::uint64_t submitted = 0;
    CUresult sticky = CUDA_SUCCESS;

    std::map<std::string, std::uint64_t, std::less<>> calls;
    std::map<std::string, std::vector<planned_failure>, std::less<>> failures;

    /// Counts a call of `function`; returns what it must return without doing anything: a
    /// planned failure, else the sticky error (unless `sticky_exempt`), else CUDA_SUCCESS.
    CUresult enter(std::string_view function, bool sticky_exempt) {
        auto counted = calls.find(function);
        if (counted == calls.end()) {
            counted = calls.emplace(std::string(function), 0).first;
        }
        const std::uint64_t n = ++counted->second;
        if (auto planned = failures.find(function); planned != failures.end()) {
            auto& list = planned->second;
            for (auto it = list.begin(); it != list.end(); ++it) {
                if (it->at == n) {
                    const CUresult result = it->result;
                    list.erase(it);
                    return result;
                }
            }
        }
        return sticky_exempt ? CUDA_SUCCESS : sticky;
    }

    [[nodiscard]] bool valid_stream(CUstream s) const {
        return s == nullptr || s == CU_STREAM_LEGACY || s == CU_STREAM_PER_THREAD || streams.contains(s);
    }

    /// Whether [address, address+bytes) touches a reservation (device memory) at all.
    [[nodiscard]] bool touches_reservation(std::uintptr_t address, std::size_t bytes) const {
        auto it = reservations.upper_bound(address + bytes - 1);
        if (it == reservations.begin()) {
            return false;
        }
        --it;
        return it->first + it->second > address;
    }
    /// Whether [address, address+bytes) lies inside one reservation.
    [[nodiscard]] bool inside_reservation(std::uintptr_t address, std::size_t bytes) const {
        auto it = reservations.upper_bound(address);
        if (it == reservations.begin()) {
            return false;
        }
        --it;
        return address >= it->first && bytes <= it->second && address - it->first <= it->second - bytes;
    }
    /// Whether the GPU may touch [address, address+bytes) with `prot`: host memory, or device
    /// memory mapped without a gap and opened with at least that access.
    [[nodiscard]] bool reachable(std::uintptr_t address, std::size_t bytes, int prot) const {
        if (bytes == 0 || !touches_reservation(address, bytes)) {
            return true;
        }
        auto it = mappings.upper_bound(address);
        if (it == mappings.begin()) {
            return false;
        }
        --it;
        std::uintptr_t at = address;
        const std::uintptr_t end = address + bytes;
        for (;;) {
            if (it == mappings.end() || it->first > at || it->first + it->second.bytes <= at ||
                (it->second.prot & prot) != prot) {
                return false;
            }
            at = it->first + it->second.bytes;
            if (at >= end) {
                return true;
            }
            ++it;
        }
    }
    /// The mappings that make up exactly [address, address+bytes), as [first, last); first ==
    /// last when the range is not a run of whole, adjacent mappings.
    [[nodiscard]] std::pair<decltype(mappings)::iterator, decltype(mappings)::iterator> whole_mappings(
        std::uintptr_t address, std::size_t bytes) {
        auto first = mappings.find(address);
        if (first == mappings.end() || bytes == 0) {
            return {mappings.end(), mappings.end()};
        }
        std::uintptr_t at = address;
        auto it = first;
        while (it != mappings.end() && it->first == at && at - address < bytes) {
            at += it->second.bytes;
            ++it;
        }
        if (at - address != bytes) {
            return {mappings.end(), mappings.end()};
        }
        return {first, it};
    }

    /// Puts one operation on its stream's queue; runs it at once unless the GPU is held.
    std::uint64_t submit(CUstream stream, work w) {
        w.seq = ++submitted;
        w.stream = stream;
        last_on_stream[stream] = w.seq;
        queue.push_back(w);
        if (!held) {
            run_all();
        }
        return w.seq;
    }
    [[nodiscard]] static bool is_legacy(CUstream s) noexcept { return s == nullptr || s == CU_STREAM_LEGACY; }
    [[nodiscard]] bool is_blocking(CUstream s) const noexcept {
        return s == CU_STREAM_PER_THREAD || (streams.contains(s) && s->blocking);
    }
    /// Whether work item `seq` has run (every submitted item not in the queue has).
    [[nodiscard]] bool has_run(std::uint64_t seq) const noexcept {
        if (seq > submitted) {
            return false;
        }
        return std::none_of(queue.begin(), queue.end(), [&](const work& w) { return w.seq == seq; });
    }
    /// Whether queue[i] may run now: nothing earlier on its stream is queued, nor earlier work
    /// the legacy stream orders it after, and the event it waits for has been recorded.
    [[nodiscard]] bool runnable(std::size_t i) const {
        const work& w = queue[i];
        for (std::size_t j = 0; j < i; ++j) {
            const CUstream e = queue[j].stream;
            if (e == w.stream || (is_legacy(w.stream) && is_blocking(e)) || (is_legacy(e) && is_blocking(w.stream))) {
                return false;
            }
        }
        return w.what != work::kind::wait || has_run(w.after);
    }
    /// Runs queue[i] and takes it off the queue.
    void run_at(std::size_t i) {
        const work w = queue[i];
        queue.erase(queue.begin() + static_cast<std::ptrdiff_t>(i));
        execute(w);
    }
    /// Runs the oldest item that may run; false when the queue is empty. (The oldest queued item
    /// can always run: everything it may wait for is older.)
    bool run_one() {
        for (std::size_t i = 0; i < queue.size(); ++i) {
            if (runnable(i)) {
                run_at(i);
                return true;
            }
        }
        return false;
    }
    /// The GPU runs work, oldest first, until item `seq` has run.
    void run_until(std::uint64_t seq) {
        while (!has_run(seq) && run_one()) {
        }
    }
    void run_all() {
        while (run_one()) {
        }
    }
    /// Runs the queued work of `stream` that may run, in order, and nothing else: other streams'
    /// work stays queued (a slow stream). Stops at an item that must wait for another stream.
    void run_stream(CUstream stream) {
        for (;;) {
            const auto it = std::find_if(queue.begin(), queue.end(), [&](const work& w) { return w.stream == stream; });
            if (it == queue.end() || !runnable(static_cast<std::size_t>(it - queue.begin()))) {
                return;
            }
            run_at(static_cast<std::size_t>(it - queue.begin()));
        }
    }
    void execute(const work& w) {
        if (sticky != CUDA_SUCCESS || w.what == work::kind::record || w.what == work::kind::wait) {
            return;  // a lost context runs nothing; a record or a wait only marks its place
        }
        if (w.what == work::kind::host) {
            w.host(w.host_data);  // under the driver's mutex: it must not call the driver (as documented)
            return;
        }
        if (w.what == work::kind::free) {
            std::free(reinterpret_cast<void*>(w.dst));
            async_allocations.erase(w.dst);
            return;
        }
        if (w.what == work::kind::staged_pieces) {
            run_staged_pieces(*this, *w.pieces, w.blocks);
            return;
        }
        const bool ok = reachable(w.dst, w.bytes, PROT_WRITE) &&
                        (w.what == work::kind::set || reachable(w.src, w.bytes, PROT_READ));
        if (!ok) {
            sticky = CUDA_ERROR_ILLEGAL_ADDRESS;
            return;
        }
        if (w.what == work::kind::copy) {
            std::memmove(reinterpret_cast<void*>(w.dst), reinterpret_cast<const void*>(w.src), w.bytes);
        } else {
            std::memset(reinterpret_cast<void*>(w.dst), w.value, w.bytes);
        }
    }
};

/// The staged-pieces kernel (tools/kernels/staged_pieces.cu): block j's piece r moves between
/// the cache and the staging buffer; a piece out of reach or misaligned stops it, sticky.
void run_staged_pieces(device_state& s, const vmmpp::detail::staged_pieces_args& a, std::size_t blocks) {
    for (std::size_t j = 0; j < blocks; ++j) {
        for (std::size_t r = 0; r < a.rows; ++r) {
            const std::uintptr_t cache = a.block[j] + r * a.pitch;
            const std::uintptr_t staging = a.staging + (j * a.rows + r) * a.width;
            const std::uintptr_t to = a.to_staging ? staging : cache;
            const std::uintptr_t from = a.to_staging ? cache : staging;
            if (cache % 16 != 0 || staging % 16 != 0 || a.width % 16 != 0) {
                s.sticky = CUDA_ERROR_MISALIGNED_ADDRESS;
                return;
            }
            if (!s.reachable(to, a.width, PROT_WRITE) || !s.reachable(from, a.width, PROT_READ)) {
                s.sticky = CUDA_ERROR_ILLEGAL_ADDRESS;
                return;
            }
            std::memmove(reinterpret_cast<void*>(to), reinterpret_cast<const void*>(from), a.width);
        }
    }
}

device_state& state() {
    static device_state* s = new device_state;  // never destroyed: drivers outlive static destructors
    return *s;
}

/// Every entry point starts with one: it holds the device's mutex for the whole call.
class driver_call {
public:
    explicit driver_call(std::string_view function, bool sticky_exempt = false) : lock_(state().mutex) {
        refusal_ = state().enter(function, sticky_exempt);
    }
    /// What the call must return without doing anything, or CUDA_SUCCESS.
    [[nodiscard]] CUresult refusal() const noexcept { return refusal_; }

private:
    std::lock_guard<std::mutex> lock_;
    CUresult refusal_ = CUDA_SUCCESS;
};

// The calling thread's context stack (cuCtxPush/Pop/Set/GetCurrent).
thread_local std::vector<CUcontext> context_stack;

[[nodiscard]] bool has_current_context() { return !context_stack.empty() && context_stack.back() != nullptr; }

struct error_text {
    CUresult code;
    const char* name;
    const char* text;
};
constexpr error_text error_texts[] = {
    {CUDA_SUCCESS, "CUDA_SUCCESS", "no error"},
    {CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {CUDA_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {CUDA_ERROR_INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {CUDA_ERROR_INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {CUDA_ERROR_NOT_READY, "CUDA_ERROR_NOT_READY", "device not ready"},
    {CUDA_ERROR_ILLEGAL_ADDRESS, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"},
    {CUDA_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {CUDA_ERROR_UNKNOWN, "CUDA_ERROR_UNKNOWN", "unknown error"},
};
const error_text* find_error(CUresult code) {
    for (const auto& e : error_texts) {
        if (e.code == code) {
            return &e;
        }
    }
    return nullptr;
}

// --- entry points ----------------------------------------------------------------------------

CUresult init(unsigned int) {
    driver_call call("cuInit", true);
    return call.refusal();
}
CUresult driver_get_version(int* version) {
    driver_call call("cuDriverGetVersion", true);
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    *version = CUDA_VERSION;
    return CUDA_SUCCESS;
}
CUresult get_error_name(CUresult code, const char** name) {
    const error_text* e = find_error(code);
    *name = e != nullptr ? e->name : nullptr;
    return e != nullptr ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}
CUresult get_error_string(CUresult code, const char** text) {
    const error_text* e = find_error(code);
    *text = e != nullptr ? e->text : nullptr;
    return e != nullptr ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

CUresult device_get_count(int* count) {
    driver_call call("cuDeviceGetCount");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    *count = 1;
    return CUDA_SUCCESS;
}
CUresult device_get(CUdevice* device, int ordinal) {
    driver_call call("cuDeviceGet");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    if (ordinal != 0) {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    *device = 0;
    return CUDA_SUCCESS;
}
CUresult device_get_attribute(int* value, CUdevice_attribute attribute, CUdevice device) {
    driver_call call("cuDeviceGetAttribute");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    if (device != 0) {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    switch (attribute) {
    case CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED:
    case CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED:
    case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: *value = 1; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *value = 9; break;
    case CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED:
        // As an H100 by default; FAKECUDA_GDR_WITH_VMM=0 plays a device without it.
        *value = std::getenv("FAKECUDA_GDR_WITH_VMM") == nullptr || std::string_view(std::getenv("FAKECUDA_GDR_WITH_VMM")) != "0";
        break;
    default: *value = 0; break;  // no managed memory, no host page tables
    }
    return CUDA_SUCCESS;
}
CUresult device_can_access_peer(int* can, CUdevice device, CUdevice peer) {
    driver_call call("cuDeviceCanAccessPeer");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    if (device != 0 || peer != 0) {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    *can = 0;
    return CUDA_SUCCESS;
}

CUresult primary_ctx_retain(CUcontext* ctx, CUdevice device) {
    driver_call call("cuDevicePrimaryCtxRetain");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    if (device != 0) {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    ++state().primary_refs;
    *ctx = &state().primary;
    return CUDA_SUCCESS;
}
CUresult primary_ctx_release(CUdevice device) {
    driver_call call("cuDevicePrimaryCtxRelease");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    if (device != 0) {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    if (state().primary_refs == 0) {
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    --state().primary_refs;
    return CUDA_SUCCESS;
}
CUresult ctx_push_current(CUcontext ctx) {
    driver_call call("cuCtxPushCurrent");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    if (ctx == nullptr) {
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    context_stack.push_back(ctx);
    return CUDA_SUCCESS;
}
CUresult ctx_pop_current(CUcontext* ctx) {
    driver_call call("cuCtxPopCurrent");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    if (context_stack.empty()) {
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    if (ctx != nullptr) {
        *ctx = context_stack.back();
    }
    context_stack.pop_back();
    return CUDA_SUCCESS;
}
CUresult ctx_get_current(CUcontext* ctx) {
    driver_call call("cuCtxGetCurrent");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    *ctx = context_stack.empty() ? nullptr : context_stack.back();
    return CUDA_SUCCESS;
}
CUresult ctx_set_current(CUcontext ctx) {
    driver_call call("cuCtxSetCurrent");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    if (context_stack.empty()) {
        if (ctx != nullptr) {
            context_stack.push_back(ctx);
        }
    } else {
        context_stack.back() = ctx;
    }
    return CUDA_SUCCESS;
}
CUresult ctx_synchronize() {
    driver_call call("cuCtxSynchronize");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    if (!has_current_context()) {
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    state().run_all();
    return state().sticky;
}

CUresult mem_get_info(std::size_t* free, std::size_t* total) {
    driver_call call("cuMemGetInfo");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    if (!has_current_context()) {
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    const device_state& s = state();
    *total = s.memory;
    *free = s.alive_bytes < s.memory ? s.memory - s.alive_bytes : 0;
    return CUDA_SUCCESS;
}
CUresult mem_get_allocation_granularity(std::size_t* granularity, const CUmemAllocationProp* prop,
                                        CUmemAllocationGranularity_flags) {
    driver_call call("cuMemGetAllocationGranularity");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    if (prop == nullptr || prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (prop->location.id != 0) {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    *granularity = state().granularity;
    return CUDA_SUCCESS;
}

CUresult mem_create(CUmemGenericAllocationHandle* handle, std::size_t bytes, const CUmemAllocationProp* prop,
                    unsigned long long flags) {
    driver_call call("cuMemCreate");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    device_state& s = state();
    if (prop == nullptr || prop->type != CU_MEM_ALLOCATION_TYPE_PINNED ||
        prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE || flags != 0 || bytes == 0 ||
        bytes % s.granularity != 0) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (prop->location.id != 0) {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    if (bytes > s.memory - std::min(s.alive_bytes, s.memory)) {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    const int fd = ::memfd_create("fakecuda", MFD_CLOEXEC);
    if (fd < 0) {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    if (::ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
        ::close(fd);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *handle = s.next_handle++;
    auto created = std::make_shared<allocation>(fd, bytes, s.alive_bytes);
    created->gpu_direct_rdma = prop->allocFlags.gpuDirectRDMACapable != 0;
    s.handles.emplace(*handle, std::move(created));
    return CUDA_SUCCESS;
}
CUresult mem_release(CUmemGenericAllocationHandle handle) {
    driver_call call("cuMemRelease");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    // The memory goes once no mapping refers to it either (the shared_ptr).
    return state().handles.erase(handle) == 1 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

CUresult mem_address_reserve(CUdeviceptr* ptr, std::size_t bytes, std::size_t alignment, CUdeviceptr, unsigned long long flags) {
    driver_call call("cuMemAddressReserve");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    device_state& s = state();
    const std::size_t align = std::max(alignment, s.granularity);
    if (bytes == 0 || bytes % s.granularity != 0 || (align & (align - 1)) != 0 || flags != 0) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // Over-reserve, then trim to the alignment.
    void* raw = ::mmap(nullptr, bytes + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED) {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    const auto start = reinterpret_cast<std::uintptr_t>(raw);
    const std::uintptr_t base = (start + align - 1) & ~(std::uintptr_t{align} - 1);
    if (base > start) {
        ::munmap(raw, base - start);
    }
    if (const std::uintptr_t tail = start + bytes + align - (base + bytes); tail > 0) {
        ::munmap(reinterpret_cast<void*>(base + bytes), tail);
    }
    s.reservations.emplace(base, bytes);
    *ptr = base;
    return CUDA_SUCCESS;
}
CUresult mem_address_free(CUdeviceptr ptr, std::size_t bytes) {
    driver_call call("cuMemAddressFree");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    device_state& s = state();
    auto it = s.reservations.find(ptr);
    if (it == s.reservations.end() || it->second != bytes) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // Refused while anything is still mapped there, so a leaked mapping shows.
    if (auto m = s.mappings.lower_bound(ptr); m != s.mappings.end() && m->first < ptr + bytes) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    ::munmap(reinterpret_cast<void*>(ptr), bytes);
    s.reservations.erase(it);
    return CUDA_SUCCESS;
}

CUresult mem_map(CUdeviceptr ptr, std::size_t bytes, std::size_t offset, CUmemGenericAllocationHandle handle,
                 unsigned long long flags) {
    driver_call call("cuMemMap");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    device_state& s = state();
    auto h = s.handles.find(handle);
    if (h == s.handles.end()) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    if (offset != 0 || bytes != h->second->bytes || flags != 0 || ptr % s.granularity != 0 ||
        !s.inside_reservation(ptr, bytes)) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (auto next = s.mappings.lower_bound(ptr + bytes); next != s.mappings.begin()) {
        auto prev = std::prev(next);
        if (prev->first + prev->second.bytes > ptr) {
            return CUDA_ERROR_INVALID_VALUE;  // something is mapped there already
        }
    }
    void* at = ::mmap(reinterpret_cast<void*>(ptr), bytes, PROT_NONE, MAP_SHARED | MAP_FIXED, h->second->fd, 0);
    if (at == MAP_FAILED) {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    s.mappings.emplace(ptr, mapped_range{bytes, h->second, PROT_NONE});
    return CUDA_SUCCESS;
}
CUresult mem_unmap(CUdeviceptr ptr, std::size_t bytes) {
    driver_call call("cuMemUnmap");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    device_state& s = state();
    auto [first, last] = s.whole_mappings(ptr, bytes);
    if (first == last) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    for (auto it = first; it != last; ++it) {
        // Inaccessible address space again, still reserved.
        ::mmap(reinterpret_cast<void*>(it->first), it->second.bytes, PROT_NONE,
               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
    }
    s.mappings.erase(first, last);
    return CUDA_SUCCESS;
}
CUresult mem_set_access(CUdeviceptr ptr, std::size_t bytes, const CUmemAccessDesc* desc, std::size_t count) {
    driver_call call("cuMemSetAccess");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    device_state& s = state();
    if (desc == nullptr || count == 0) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    int prot = PROT_NONE;
    for (std::size_t i = 0; i < count; ++i) {
        if (desc[i].location.type != CU_MEM_LOCATION_TYPE_DEVICE) {
            return CUDA_ERROR_INVALID_VALUE;
        }
        if (desc[i].location.id != 0) {
            return CUDA_ERROR_INVALID_DEVICE;  // one device: no peer to open the memory to
        }
        switch (desc[i].flags) {
        case CU_MEM_ACCESS_FLAGS_PROT_NONE: prot = PROT_NONE; break;
        case CU_MEM_ACCESS_FLAGS_PROT_READ: prot = PROT_READ; break;
        case CU_MEM_ACCESS_FLAGS_PROT_READWRITE: prot = PROT_READ | PROT_WRITE; break;
        default: return CUDA_ERROR_INVALID_VALUE;
        }
    }
    auto [first, last] = s.whole_mappings(ptr, bytes);
    if (first == last) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    for (auto it = first; it != last; ++it) {
        if (::mprotect(reinterpret_cast<void*>(it->first), it->second.bytes, prot) != 0) {
            return CUDA_ERROR_UNKNOWN;
        }
        it->second.prot = prot;
    }
    return CUDA_SUCCESS;
}

CUresult mem_export_to_shareable_handle(void* shareable, CUmemGenericAllocationHandle handle,
                                        CUmemAllocationHandleType type, unsigned long long flags) {
    driver_call call("cuMemExportToShareableHandle");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    auto h = state().handles.find(handle);
    if (h == state().handles.end()) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    if (type != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR || flags != 0 || shareable == nullptr) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // Without O_CLOEXEC: the real driver does not document it, and vmmpp sets it itself.
    const int fd = ::fcntl(h->second->fd, F_DUPFD, 0);
    if (fd < 0) {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *static_cast<int*>(shareable) = fd;
    return CUDA_SUCCESS;
}
CUresult mem_import_from_shareable_handle(CUmemGenericAllocationHandle* handle, void* os_handle,
                                          CUmemAllocationHandleType type) {
    driver_call call("cuMemImportFromShareableHandle");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    device_state& s = state();
    const int fd = static_cast<int>(reinterpret_cast<std::intptr_t>(os_handle));
    struct stat st {};
    if (type != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR || ::fstat(fd, &st) != 0 || st.st_size <= 0) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // The same memory if this process has it already (a handle or a mapping), as the driver does.
    std::shared_ptr<allocation> memory;
    auto same = [&](const std::shared_ptr<allocation>& a) {
        struct stat other {};
        return ::fstat(a->fd, &other) == 0 && other.st_dev == st.st_dev && other.st_ino == st.st_ino;
    };
    for (const auto& [id, a] : s.handles) {
        if (!memory && same(a)) {
            memory = a;
        }
    }
    for (const auto& [address, m] : s.mappings) {
        if (!memory && same(m.memory)) {
            memory = m.memory;
        }
    }
    if (!memory) {
        const int own = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
        if (own < 0) {
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
        memory = std::make_shared<allocation>(own, static_cast<std::size_t>(st.st_size), s.alive_bytes);
    }
    *handle = s.next_handle++;
    s.handles.emplace(*handle, std::move(memory));
    return CUDA_SUCCESS;
}

CUresult stream_create(CUstream* stream, unsigned int flags) {
    driver_call call("cuStreamCreate");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    if (!has_current_context()) {
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    *stream = new CUstream_st{.blocking = (flags & CU_STREAM_NON_BLOCKING) == 0, .context = context_stack.back()};
    state().streams.insert(*stream);
    return CUDA_SUCCESS;
}
CUresult stream_create_with_priority(CUstream* stream, unsigned int flags, int priority) {
    driver_call call("cuStreamCreateWithPriority");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    if (!has_current_context()) {
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    *stream = new CUstream_st{.blocking = (flags & CU_STREAM_NON_BLOCKING) == 0, .context = context_stack.back(),
                              .priority = priority};
    state().streams.insert(*stream);
    return CUDA_SUCCESS;
}
/// The special handles answer 0 (the default priority), as the real driver's.
CUresult stream_get_priority(CUstream stream, int* priority) {
    driver_call call("cuStreamGetPriority");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    device_state& s = state();
    if (priority == nullptr || !s.valid_stream(stream)) {
        return priority == nullptr ? CUDA_ERROR_INVALID_VALUE : CUDA_ERROR_INVALID_HANDLE;
    }
    *priority = s.streams.contains(stream) ? stream->priority : 0;
    return CUDA_SUCCESS;
}
CUresult stream_destroy(CUstream stream) {
    driver_call call("cuStreamDestroy");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    if (state().streams.erase(stream) == 0) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    state().last_on_stream.erase(stream);
    delete stream;  // its queued work still runs: the queue does not refer to the stream
    return CUDA_SUCCESS;
}
/// As the real driver: a created stream's context is the one current at its creation; the
/// special handles (NULL, CU_STREAM_LEGACY, CU_STREAM_PER_THREAD) answer the calling thread's
/// current context, CUDA_ERROR_INVALID_CONTEXT when none is.
CUresult stream_get_ctx(CUstream stream, CUcontext* ctx) {
    driver_call call("cuStreamGetCtx");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    device_state& s = state();
    if (ctx == nullptr) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (!s.valid_stream(stream)) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    if (s.streams.contains(stream)) {
        *ctx = stream->context;
        return CUDA_SUCCESS;
    }
    if (!has_current_context()) {
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    *ctx = context_stack.back();
    return CUDA_SUCCESS;
}
CUresult stream_synchronize(CUstream stream) {
    driver_call call("cuStreamSynchronize");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    device_state& s = state();
    if (!s.valid_stream(stream)) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    if (auto it = s.last_on_stream.find(stream); it != s.last_on_stream.end()) {
        s.run_until(it->second);
    }
    return s.sticky;
}

/// The common part of the copies and the memset: checks, then queues.
CUresult enqueue(const driver_call& call, CUstream stream, work w) {
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    device_state& s = state();
    if (!has_current_context()) {
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    if (!s.valid_stream(stream)) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    s.submit(stream, w);
    return CUDA_SUCCESS;
}
/// As the real driver: a context must be current; a range overlapping a registered one is
/// CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED; unregistering takes the exact pointer registered.
/// The fake only keeps the books (its copies do not tell pinned from pageable memory).
CUresult mem_host_register(void* p, std::size_t bytes, unsigned int) {
    driver_call call("cuMemHostRegister");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    device_state& s = state();
    if (!has_current_context()) {
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    if (p == nullptr || bytes == 0) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    const auto base = reinterpret_cast<std::uintptr_t>(p);
    auto next = s.host_registrations.lower_bound(base);
    if ((next != s.host_registrations.end() && next->first < base + bytes) ||
        (next != s.host_registrations.begin() && std::prev(next)->first + std::prev(next)->second > base)) {
        return CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED;
    }
    s.host_registrations.emplace(base, bytes);
    return CUDA_SUCCESS;
}
CUresult mem_host_unregister(void* p) {
    driver_call call("cuMemHostUnregister");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    device_state& s = state();
    if (!has_current_context()) {
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    if (s.host_registrations.erase(reinterpret_cast<std::uintptr_t>(p)) == 0) {
        return CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED;
    }
    return CUDA_SUCCESS;
}

CUresult memcpy_async(CUdeviceptr dst, CUdeviceptr src, std::size_t bytes, CUstream stream) {
    driver_call call("cuMemcpyAsync");
    return enqueue(call, stream, {.what = work::kind::copy, .dst = dst, .src = src, .bytes = bytes});
}
CUresult memcpy_htod_async(CUdeviceptr dst, const void* src, std::size_t bytes, CUstream stream) {
    driver_call call("cuMemcpyHtoDAsync");
    return enqueue(call, stream,
                   {.what = work::kind::copy, .dst = dst, .src = reinterpret_cast<std::uintptr_t>(src), .bytes = bytes});
}
CUresult memcpy_dtoh_async(void* dst, CUdeviceptr src, std::size_t bytes, CUstream stream) {
    driver_call call("cuMemcpyDtoHAsync");
    return enqueue(call, stream,
                   {.what = work::kind::copy, .dst = reinterpret_cast<std::uintptr_t>(dst), .src = src, .bytes = bytes});
}
CUresult memset_d8_async(CUdeviceptr dst, unsigned char value, std::size_t bytes, CUstream stream) {
    driver_call call("cuMemsetD8Async");
    return enqueue(call, stream, {.what = work::kind::set, .dst = dst, .bytes = bytes, .value = value});
}

CUresult event_create(CUevent* event, unsigned int) {
    driver_call call("cuEventCreate");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    if (!has_current_context()) {
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    *event = new CUevent_st;
    state().events.insert(*event);
    return CUDA_SUCCESS;
}
CUresult event_destroy(CUevent event) {
    driver_call call("cuEventDestroy");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    if (state().events.erase(event) == 0) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    delete event;  // a queued record of it still runs: the queue does not refer to the event
    return CUDA_SUCCESS;
}
CUresult event_record(CUevent event, CUstream stream) {
    driver_call call("cuEventRecord");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    device_state& s = state();
    if (!s.events.contains(event) || !s.valid_stream(stream)) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    event->last_record = s.submit(stream, {.what = work::kind::record});
    return CUDA_SUCCESS;
}
CUresult event_query(CUevent event) {
    driver_call call("cuEventQuery");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    const device_state& s = state();
    if (!s.events.contains(event)) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    return s.has_run(event->last_record) ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}
CUresult event_synchronize(CUevent event) {
    driver_call call("cuEventSynchronize");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    device_state& s = state();
    if (!s.events.contains(event)) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    s.run_until(event->last_record);  // the GPU finishes everything up to that record
    return s.sticky;
}

CUresult stream_wait_event(CUstream stream, CUevent event, unsigned int) {
    driver_call call("cuStreamWaitEvent");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    device_state& s = state();
    if (!s.events.contains(event) || !s.valid_stream(stream)) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    (void)s.submit(stream, {.what = work::kind::wait, .after = event->last_record});  // never recorded: no wait
    return CUDA_SUCCESS;
}
CUresult launch_host_func(CUstream stream, CUhostFn fn, void* data) {
    driver_call call("cuLaunchHostFunc");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    device_state& s = state();
    if (!has_current_context()) {
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    if (fn == nullptr || !s.valid_stream(stream)) {
        return fn == nullptr ? CUDA_ERROR_INVALID_VALUE : CUDA_ERROR_INVALID_HANDLE;
    }
    (void)s.submit(stream, {.what = work::kind::host, .host = fn, .host_data = data});
    return CUDA_SUCCESS;
}

CUresult library_load_data(CUlibrary* library, const void* code, CUjit_option*, void**, unsigned int,
                           CUlibraryOption*, void**, unsigned int) {
    driver_call call("cuLibraryLoadData");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    if (library == nullptr || code == nullptr) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    std::string text(static_cast<const char*>(code));
    if (text.find(".version") == std::string::npos || text.find(".entry") == std::string::npos) {
        return CUDA_ERROR_INVALID_PTX;  // the fake takes PTX text only
    }
    auto* lib = new CUlib_st{std::move(text)};
    state().libraries.insert(lib);
    *library = lib;
    return CUDA_SUCCESS;
}
CUresult library_get_kernel(CUkernel* kernel, CUlibrary library, const char* name) {
    driver_call call("cuLibraryGetKernel");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    device_state& s = state();
    if (kernel == nullptr || name == nullptr) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (!s.libraries.contains(library)) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    if (library->code.find(std::string(".entry ") + name + "(") == std::string::npos) {
        return CUDA_ERROR_NOT_FOUND;
    }
    auto* k = new CUkern_st{name};
    s.kernels.insert(k);
    *kernel = k;
    return CUDA_SUCCESS;
}
/// Runs vmmpp_staged_pieces only; its grid is blocks x rows pieces, one CTA each.
CUresult launch_kernel(CUfunction f, unsigned int grid_x, unsigned int grid_y, unsigned int grid_z,
                       unsigned int block_x, unsigned int block_y, unsigned int block_z, unsigned int, CUstream stream,
                       void** params, void** extra) {
    driver_call call("cuLaunchKernel");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    device_state& s = state();
    if (!has_current_context()) {
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    auto* k = reinterpret_cast<CUkern_st*>(f);
    if (!s.kernels.contains(k) || !s.valid_stream(stream)) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    if (k->name != "vmmpp_staged_pieces") {
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    if (params == nullptr || extra != nullptr || grid_y != 1 || grid_z != 1 || block_x == 0 || block_x > 1024 ||
        block_y != 1 || block_z != 1) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    auto args = std::make_shared<const vmmpp::detail::staged_pieces_args>(
        *static_cast<const vmmpp::detail::staged_pieces_args*>(params[0]));  // the driver copies the argument
    if (args->rows == 0 || grid_x % args->rows != 0 || grid_x / args->rows > vmmpp::detail::staged_max_blocks) {
        return CUDA_ERROR_INVALID_VALUE;  // the real kernel would read past its block list
    }
    (void)s.submit(stream, {.what = work::kind::staged_pieces, .pieces = args, .blocks = grid_x / args->rows});
    return CUDA_SUCCESS;
}
CUresult mem_pool_create(CUmemoryPool* pool, const CUmemPoolProps* props) {
    driver_call call("cuMemPoolCreate");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    if (pool == nullptr || props == nullptr || props->allocType != CU_MEM_ALLOCATION_TYPE_PINNED ||
        props->location.type != CU_MEM_LOCATION_TYPE_DEVICE || props->location.id != 0) {
        return CUDA_ERROR_INVALID_VALUE;  // the fake has one device
    }
    *pool = new CUmemPoolHandle_st;
    state().pools.insert(*pool);
    return CUDA_SUCCESS;
}
CUresult mem_pool_set_attribute(CUmemoryPool pool, CUmemPool_attribute attribute, void* value) {
    driver_call call("cuMemPoolSetAttribute");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    if (!state().pools.contains(pool) || value == nullptr) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (attribute == CU_MEMPOOL_ATTR_RELEASE_THRESHOLD) {
        pool->release_threshold = *static_cast<const cuuint64_t*>(value);
    }
    return CUDA_SUCCESS;
}
CUresult mem_alloc_from_pool_async(CUdeviceptr* ptr, std::size_t bytes, CUmemoryPool pool, CUstream stream) {
    driver_call call("cuMemAllocFromPoolAsync");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    device_state& s = state();
    if (!has_current_context()) {
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    if (ptr == nullptr || bytes == 0 || !s.pools.contains(pool)) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (!s.valid_stream(stream)) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    void* p = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
    if (p == nullptr) {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    s.async_allocations.emplace(reinterpret_cast<std::uintptr_t>(p), bytes);
    *ptr = reinterpret_cast<CUdeviceptr>(p);
    return CUDA_SUCCESS;
}
CUresult mem_free_async(CUdeviceptr ptr, CUstream stream) {
    driver_call call("cuMemFreeAsync");
    if (call.refusal() != CUDA_SUCCESS) {
        return call.refusal();
    }
    device_state& s = state();
    if (!has_current_context()) {
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    if (!s.async_allocations.contains(ptr)) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (!s.valid_stream(stream)) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    (void)s.submit(stream, {.what = work::kind::free, .dst = ptr});
    return CUDA_SUCCESS;
}

/// An entry of the table cuGetProcAddress answers from. `as<decltype(&::cuX)>(&x)` only compiles
/// when the fake's function has exactly the type cuda.h gives the real one.
struct entry_point {
    const char* name;
    void* function;
};
template <class Signature>
void* as(Signature function) {
    return reinterpret_cast<void*>(function);
}
const entry_point entry_points[] = {
    {"cuInit", as<decltype(&::cuInit)>(&init)},
    {"cuDriverGetVersion", as<decltype(&::cuDriverGetVersion)>(&driver_get_version)},
    {"cuGetErrorName", as<decltype(&::cuGetErrorName)>(&get_error_name)},
    {"cuGetErrorString", as<decltype(&::cuGetErrorString)>(&get_error_string)},
    {"cuDeviceGetCount", as<decltype(&::cuDeviceGetCount)>(&device_get_count)},
    {"cuDeviceGet", as<decltype(&::cuDeviceGet)>(&device_get)},
    {"cuDeviceGetAttribute", as<decltype(&::cuDeviceGetAttribute)>(&device_get_attribute)},
    {"cuDeviceCanAccessPeer", as<decltype(&::cuDeviceCanAccessPeer)>(&device_can_access_peer)},
    {"cuDevicePrimaryCtxRetain", as<decltype(&::cuDevicePrimaryCtxRetain)>(&primary_ctx_retain)},
    {"cuDevicePrimaryCtxRelease", as<decltype(&::cuDevicePrimaryCtxRelease)>(&primary_ctx_release)},
    {"cuCtxPushCurrent", as<decltype(&::cuCtxPushCurrent)>(&ctx_push_current)},
    {"cuCtxPopCurrent", as<decltype(&::cuCtxPopCurrent)>(&ctx_pop_current)},
    {"cuCtxGetCurrent", as<decltype(&::cuCtxGetCurrent)>(&ctx_get_current)},
    {"cuCtxSetCurrent", as<decltype(&::cuCtxSetCurrent)>(&ctx_set_current)},
    {"cuCtxSynchronize", as<decltype(&::cuCtxSynchronize)>(&ctx_synchronize)},
    {"cuMemGetInfo", as<decltype(&::cuMemGetInfo)>(&mem_get_info)},
    {"cuMemGetAllocationGranularity", as<decltype(&::cuMemGetAllocationGranularity)>(&mem_get_allocation_granularity)},
    {"cuMemCreate", as<decltype(&::cuMemCreate)>(&mem_create)},
    {"cuMemRelease", as<decltype(&::cuMemRelease)>(&mem_release)},
    {"cuMemAddressReserve", as<decltype(&::cuMemAddressReserve)>(&mem_address_reserve)},
    {"cuMemAddressFree", as<decltype(&::cuMemAddressFree)>(&mem_address_free)},
    {"cuMemMap", as<decltype(&::cuMemMap)>(&mem_map)},
    {"cuMemUnmap", as<decltype(&::cuMemUnmap)>(&mem_unmap)},
    {"cuMemSetAccess", as<decltype(&::cuMemSetAccess)>(&mem_set_access)},
    {"cuMemExportToShareableHandle", as<decltype(&::cuMemExportToShareableHandle)>(&mem_export_to_shareable_handle)},
    {"cuMemImportFromShareableHandle",
     as<decltype(&::cuMemImportFromShareableHandle)>(&mem_import_from_shareable_handle)},
    {"cuStreamCreate", as<decltype(&::cuStreamCreate)>(&stream_create)},
    {"cuStreamDestroy", as<decltype(&::cuStreamDestroy)>(&stream_destroy)},
    {"cuStreamSynchronize", as<decltype(&::cuStreamSynchronize)>(&stream_synchronize)},
    {"cuStreamGetCtx", as<decltype(&::cuStreamGetCtx)>(&stream_get_ctx)},
    {"cuMemcpyAsync", as<decltype(&::cuMemcpyAsync)>(&memcpy_async)},
    {"cuMemcpyHtoDAsync", as<decltype(&::cuMemcpyHtoDAsync)>(&memcpy_htod_async)},
    {"cuMemcpyDtoHAsync", as<decltype(&::cuMemcpyDtoHAsync)>(&memcpy_dtoh_async)},
    {"cuMemsetD8Async", as<decltype(&::cuMemsetD8Async)>(&memset_d8_async)},
    {"cuEventCreate", as<decltype(&::cuEventCreate)>(&event_create)},
    {"cuEventDestroy", as<decltype(&::cuEventDestroy)>(&event_destroy)},
    {"cuEventRecord", as<decltype(&::cuEventRecord)>(&event_record)},
    {"cuEventQuery", as<decltype(&::cuEventQuery)>(&event_query)},
    {"cuEventSynchronize", as<decltype(&::cuEventSynchronize)>(&event_synchronize)},
    {"cuStreamWaitEvent", as<decltype(&::cuStreamWaitEvent)>(&stream_wait_event)},
    {"cuLaunchHostFunc", as<decltype(&::cuLaunchHostFunc)>(&launch_host_func)},
    {"cuMemHostRegister", as<decltype(&::cuMemHostRegister)>(&mem_host_register)},
    {"cuMemHostUnregister", as<decltype(&::cuMemHostUnregister)>(&mem_host_unregister)},
    {"cuLibraryLoadData", as<decltype(&::cuLibraryLoadData)>(&library_load_data)},
    {"cuLibraryGetKernel", as<decltype(&::cuLibraryGetKernel)>(&library_get_kernel)},
    {"cuLaunchKernel", as<decltype(&::cuLaunchKernel)>(&launch_kernel)},
    {"cuMemPoolCreate", as<decltype(&::cuMemPoolCreate)>(&mem_pool_create)},
    {"cuMemPoolSetAttribute", as<decltype(&::cuMemPoolSetAttribute)>(&mem_pool_set_attribute)},
    {"cuMemAllocFromPoolAsync", as<decltype(&::cuMemAllocFromPoolAsync)>(&mem_alloc_from_pool_async)},
    {"cuStreamCreateWithPriority", as<decltype(&::cuStreamCreateWithPriority)>(&stream_create_with_priority)},
    {"cuStreamGetPriority", as<decltype(&::cuStreamGetPriority)>(&stream_get_priority)},
    {"cuMemFreeAsync", as<decltype(&::cuMemFreeAsync)>(&mem_free_async)},
};

} // namespace

// --- exported: everything above has internal linkage ------------------------------------------

extern "C" {

/// The one driver symbol: every entry point by its base name ("cuMemCreate"), whatever version
/// is asked for. An unknown name is CUDA_ERROR_NOT_FOUND.
CUresult cuGetProcAddress_v2(const char* symbol, void** function, int, cuuint64_t,
                             CUdriverProcAddressQueryResult* status) {
    if (symbol == nullptr || function == nullptr) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    for (const auto& e : entry_points) {
        if (std::strcmp(e.name, symbol) == 0) {
            *function = e.function;
            if (status != nullptr) {
                *status = CU_GET_PROC_ADDRESS_SUCCESS;
            }
            return CUDA_SUCCESS;
        }
    }
    *function = nullptr;
    if (status != nullptr) {
        *status = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    }
    return CUDA_ERROR_NOT_FOUND;
}

/// Runs the queued work, clears planned failures and the sticky error, and lets the GPU run at
/// once again. Call counts stay.
void fakecuda_reset(void) {
    device_state& s = state();
    std::lock_guard lock(s.mutex);
    s.held = false;
    s.run_all();
    s.failures.clear();
    s.sticky = CUDA_SUCCESS;
}
/// The `nth` next call (1: the next one) of `function` (a base name, "cuMemMap") returns `result`
/// and does nothing. Several may be planned; nth <= 0 cancels that function's plans.
void fakecuda_fail(const char* function, int nth, int result) {
    device_state& s = state();
    std::lock_guard lock(s.mutex);
    auto& plans = s.failures[function];
    if (nth <= 0) {
        plans.clear();
        return;
    }
    auto counted = s.calls.find(std::string_view(function));
    const std::uint64_t so_far = counted == s.calls.end() ? 0 : counted->second;
    plans.push_back({so_far + static_cast<std::uint64_t>(nth), static_cast<CUresult>(result)});
}
/// Nonzero: work submitted to streams queues instead of running. Zero: runs the queue and
/// returns to running work at once.
void fakecuda_hold_gpu(int hold) {
    device_state& s = state();
    std::lock_guard lock(s.mutex);
    s.held = hold != 0;
    if (!s.held) {
        s.run_all();
    }
}
/// Runs everything queued, oldest first (the GPU catches up); the GPU stays held if it was.
void fakecuda_run_gpu(void) {
    device_state& s = state();
    std::lock_guard lock(s.mutex);
    s.run_all();
}
/// Runs the queued work of one stream (0: the legacy default stream) as far as it may run
/// without another stream's work; the rest stays queued. The GPU stays held.
void fakecuda_run_stream(CUstream stream) {
    device_state& s = state();
    std::lock_guard lock(s.mutex);
    s.run_stream(stream);
}
/// Operations queued on one stream and not yet run.
std::size_t fakecuda_queued_on(CUstream stream) {
    std::lock_guard lock(state().mutex);
    const auto& q = state().queue;
    return static_cast<std::size_t>(std::count_if(q.begin(), q.end(), [&](const work& w) { return w.stream == stream; }));
}
/// Operations queued and not yet run.
std::size_t fakecuda_queued(void) {
    std::lock_guard lock(state().mutex);
    return state().queue.size();
}
/// The sticky error (CUDA_ERROR_ILLEGAL_ADDRESS after a bad copy), or 0.
int fakecuda_sticky_error(void) {
    std::lock_guard lock(state().mutex);
    return static_cast<int>(state().sticky);
}
/// Handles created or imported and not released, and their bytes.
std::size_t fakecuda_live_handles(void) {
    std::lock_guard lock(state().mutex);
    return state().handles.size();
}
/// Live handles created GPUDirect RDMA capable.
std::size_t fakecuda_gpu_direct_rdma_handles(void) {
    std::lock_guard lock(state().mutex);
    std::size_t n = 0;
    for (const auto& [id, a] : state().handles) {
        n += a->gpu_direct_rdma ? 1 : 0;
    }
    return n;
}
std::size_t fakecuda_live_handle_bytes(void) {
    std::lock_guard lock(state().mutex);
    std::size_t bytes = 0;
    for (const auto& [id, a] : state().handles) {
        bytes += a->bytes;
    }
    return bytes;
}
/// Bytes mapped into reservations now.
std::size_t fakecuda_mapped_bytes(void) {
    std::lock_guard lock(state().mutex);
    std::size_t bytes = 0;
    for (const auto& [address, m] : state().mappings) {
        bytes += m.bytes;
    }
    return bytes;
}
/// Bytes of host memory registered (page-locked) now.
std::size_t fakecuda_registered_host_bytes(void) {
    std::lock_guard lock(state().mutex);
    std::size_t bytes = 0;
    for (const auto& [base, n] : state().host_registrations) {
        bytes += n;
    }
    return bytes;
}
/// Bytes of cuMemAllocFromPoolAsync memory not yet freed (its cuMemFreeAsync not yet reached).
std::size_t fakecuda_async_bytes(void) {
    std::lock_guard lock(state().mutex);
    std::size_t bytes = 0;
    for (const auto& [base, n] : state().async_allocations) {
        bytes += n;
    }
    return bytes;
}
/// Calls of `function` (a base name) so far, failed ones included.
std::size_t fakecuda_calls(const char* function) {
    std::lock_guard lock(state().mutex);
    auto it = state().calls.find(std::string_view(function));
    return it == state().calls.end() ? 0 : static_cast<std::size_t>(it->second);
}

} // extern "C"
