// python/src/vmmpp_module.cpp: the extension module vmmpp._vmmpp (nanobind). vmmpp's KV cache,
// prefix cache and host tier (through the type-erased caches of capi/kv_erased.hpp, the ones the
// C ABI uses), budgets shared by models in one process (vmmpp::budget) and across processes
// (vmmpp::process_budget), statistics as dicts and JSON, and tensors through DLPack. vmmpp's
// typed errors become vmmpp.Error subclasses carrying the same numbers; integers are range
// checked by name; calls that wait for the GPU or another thread run without the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "kv_erased.hpp"
#include "vmmpp/kv/layout_list.hpp"

namespace nb = nanobind;
using namespace nb::literals;
using vmmpp::erased::cache_base;
using vmmpp::erased::prefix_base;
using vmmpp::erased::tier_base;

namespace {

// --- errors: vmmpp.Error and its subclasses, with the numbers of the C++ error ---

/// The exception classes (created at import, alive as long as the module).
struct error_types {
    PyObject* error = nullptr;
    PyObject* invalid_argument = nullptr;
    PyObject* unknown_model = nullptr;
    PyObject* no_such_segment = nullptr;
    PyObject* incompatible_segment = nullptr;
    PyObject* model_in_use = nullptr;
    PyObject* out_of_memory = nullptr;
    PyObject* over_quota = nullptr;
    PyObject* out_of_blocks = nullptr;
    PyObject* out_of_sequence_slots = nullptr;
    PyObject* tier_full = nullptr;
    PyObject* cache_asleep = nullptr;
    PyObject* retired_memory = nullptr;
    PyObject* cuda_error = nullptr;
    PyObject* cuda_unavailable = nullptr;
    PyObject* untrusted_segment = nullptr;
} errors;

/// A new exception class vmmpp.<name> deriving from `bases` (a class or a tuple), its `status`
/// the C ABI's status name (what vmmpp_kv.VmmppError.status says), added to module `m`.
PyObject* new_error(nb::module_& m, const char* name, const char* status, PyObject* bases, const char* doc) {
    const std::string qualified = std::string("vmmpp.") + name;
    PyObject* type = PyErr_NewExceptionWithDoc(qualified.c_str(), doc, bases, nullptr);
    if (type == nullptr) {
        throw nb::python_error();
    }
    nb::setattr(type, "status", nb::str(status));
    m.attr(name) = nb::handle(type);
    return type;
}

/// Raises `type` with message `what` and the attributes `fields` on the instance.
void raise_error(PyObject* type, const char* what, std::initializer_list<std::pair<const char*, nb::object>> fields) {
    nb::object exc = nb::steal(PyObject_CallFunction(type, "s", what));
    if (!exc.is_valid()) {
        return;  // the constructor raised: that error stands
    }
    for (const auto& [name, value] : fields) {
        nb::setattr(exc, name, value);
    }
    PyErr_SetObject(type, exc.ptr());
}

nb::object num(std::uint64_t v) { return nb::int_(v); }

void translate_error(const std::exception_ptr& p, void*) {
    // Most derived first: each catch names the class and hands the numbers on.
    try {
        std::rethrow_exception(p);
    } catch (const vmmpp::tier_full& e) {
        raise_error(errors.tier_full, e.what(),
                    {{"needed", num(e.needed())}, {"free", num(e.free())}, {"max_blocks", num(e.max_blocks())}});
    } catch (const vmmpp::out_of_sequence_slots& e) {
        raise_error(errors.out_of_sequence_slots, e.what(),
                    {{"slots", num(e.slots())}, {"slot_blocks", num(e.slot_blocks())}});
    } catch (const vmmpp::out_of_blocks& e) {
        raise_error(errors.out_of_blocks, e.what(),
                    {{"needed", num(e.needed())}, {"free", num(e.free())}, {"max_blocks", num(e.max_blocks())}});
    } catch (const vmmpp::over_quota& e) {
        raise_error(errors.over_quota, e.what(),
                    {{"which", nb::str(e.which().c_str())},
                     {"requested", num(e.requested())},
                     {"in_use", num(e.in_use())},
                     {"limit", num(e.limit())}});
    } catch (const vmmpp::out_of_memory& e) {
        raise_error(errors.out_of_memory, e.what(),
                    {{"requested", num(e.requested())}, {"committed", num(e.committed())}, {"limit", num(e.limit())}});
    } catch (const vmmpp::cache_asleep& e) {
        raise_error(errors.cache_asleep, e.what(), {{"operation", nb::str(e.operation().c_str())}});
    } catch (const vmmpp::retired_memory& e) {
        raise_error(errors.retired_memory, e.what(), {{"offset", num(e.offset())}, {"bytes", num(e.bytes())}});
    } catch (const vmmpp::unknown_model& e) {
        raise_error(errors.unknown_model, e.what(), {});
    } catch (const vmmpp::no_such_segment& e) {
        raise_error(errors.no_such_segment, e.what(), {});
    } catch (const vmmpp::incompatible_segment& e) {
        raise_error(errors.incompatible_segment, e.what(), {});
    } catch (const vmmpp::model_in_use& e) {
        raise_error(errors.model_in_use, e.what(), {});
    } catch (const vmmpp::invalid_argument& e) {
        raise_error(errors.invalid_argument, e.what(), {});
    } catch (const vmmpp::cuda_unavailable& e) {
        raise_error(errors.cuda_unavailable, e.what(), {});
    } catch (const vmmpp::cuda_error& e) {
        raise_error(errors.cuda_error, e.what(),
                    {{"call", nb::str(e.call().c_str())},
                     {"code", nb::int_(e.code())},
                     {"code_name", nb::str(e.code_name().c_str())}});
    } catch (const vmmpp::untrusted_segment& e) {
        raise_error(errors.untrusted_segment, e.what(),
                    {{"owner_uid", num(e.owner_uid())}, {"our_uid", num(e.our_uid())}, {"mode", num(e.mode())}});
    } catch (const vmmpp::error& e) {
        raise_error(errors.error, e.what(), {});
    }
}

// --- arguments: integers by name, streams, token lists ---

/// `h` (an int, or anything with __index__) as a T; InvalidArgument naming `name` when it is not
/// an integer or does not fit T (ctypes would wrap it silently: max_blocks=2**33 became 0).
template <class T>
T to_int(nb::handle h, const char* name) {
    nb::object index = nb::steal(PyNumber_Index(h.ptr()));
    if (!index.is_valid()) {
        PyErr_Clear();
        throw vmmpp::invalid_argument(std::string(name) + " must be an integer, not " + Py_TYPE(h.ptr())->tp_name);
    }
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
    if (overflow == 0 && !(v == -1 && PyErr_Occurred())) {
        if (std::is_signed_v<T> ? (v >= static_cast<long long>(std::numeric_limits<T>::min()) &&
                                   v <= static_cast<long long>(std::numeric_limits<T>::max()))
                                : (v >= 0 && static_cast<unsigned long long>(v) <= std::numeric_limits<T>::max())) {
            return static_cast<T>(v);
        }
    } else if (overflow > 0 && std::numeric_limits<T>::max() > static_cast<unsigned long long>(LLONG_MAX)) {
        const unsigned long long u = PyLong_AsUnsignedLongLong(index.ptr());
        if (!(u == ULLONG_MAX && PyErr_Occurred())) {
            return static_cast<T>(u);
        }
    }
    PyErr_Clear();
    throw vmmpp::invalid_argument(std::string(name) + " = " + nb::str(index).c_str() + " is out of range: it must lie in [" +
                                  std::to_string(std::numeric_limits<T>::min()) + ", " +
                                  std::to_string(std::numeric_limits<T>::max()) + "]");
}

/// A stream argument: None (the legacy default stream), an int (a cudaStream_t), or an object
/// with a `cuda_stream` attribute holding one (torch.cuda.Stream, cupy's streams).
cudaStream_t to_stream(nb::handle h, const char* name = "stream") {
    if (h.is_none()) {
        return nullptr;
    }
    if (!PyLong_Check(h.ptr()) && nb::hasattr(h, "cuda_stream")) {
        return reinterpret_cast<cudaStream_t>(to_int<std::uintptr_t>(h.attr("cuda_stream"), name));
    }
    return reinterpret_cast<cudaStream_t>(to_int<std::uintptr_t>(h, name));
}

/// Every item of the iterable `h` as a T (token ids, extra keys, block ids, sequence ids).
template <class T>
std::vector<T> to_ints(nb::handle h, const char* name) {
    std::vector<T> out;
    if (PySequence_Check(h.ptr())) {
        out.reserve(static_cast<std::size_t>(nb::len(h)));
    }
    for (nb::handle item : h) {
        out.push_back(to_int<T>(item, name));
    }
    return out;
}

/// An array.array of `typecode` holding `bytes` bytes from `data` (what vmmpp_kv returns too:
/// no NumPy needed, and numpy.asarray / torch.frombuffer take it without a copy).
nb::object to_array(const char* typecode, const void* data, std::size_t bytes) {
    nb::object array = nb::module_::import_("array").attr("array")(typecode);
    array.attr("frombytes")(nb::bytes(static_cast<const char*>(data), bytes));
    return array;
}

// --- locking: the cache's mutex, without holding the GIL while waiting for it ---

/// Runs f() under the cache's mutex. If another thread holds it, the GIL is let go of while
/// waiting (that thread may be in a long call: sleep, synchronize, a reclaim).
template <class F>
decltype(auto) locked(cache_base& c, F&& f) {
    std::unique_lock lock(c.mutex, std::try_to_lock);
    if (!lock.owns_lock()) {
        nb::gil_scoped_release unlocked;
        lock.lock();
    }
    return f();
}

/// Runs f() under the cache's mutex without the GIL: for calls that wait (for the GPU, for
/// copies, for other pools' locks). f must not touch Python objects.
template <class F>
decltype(auto) waiting(cache_base& c, F&& f) {
    nb::gil_scoped_release unlocked;
    std::lock_guard lock(c.mutex);
    return f();
}

vmmpp::kv_part to_part(nb::handle h) {
    const int part = to_int<int>(h, "part");
    if (part != 0 && part != 1) {
        throw vmmpp::invalid_argument("part " + std::to_string(part) + " is neither 0 (KEY) nor 1 (VALUE)");
    }
    return static_cast<vmmpp::kv_part>(part);
}

// --- dicts of the statistics ---

nb::dict limit_change_dict(const vmmpp::limit_change& c) {
    nb::dict d;
    d["status"] = vmmpp::to_string(c.status);
    d["applied"] = c.applied();
    d["limit"] = c.limit;
    d["previous"] = c.previous;
    d["committed"] = c.committed;
    d["bytes_over"] = c.bytes_over;
    d["reclaimed"] = c.reclaimed;
    return d;
}

nb::dict model_stats_dict(const vmmpp::model_stats& m) {
    nb::dict d;
    d["name"] = m.name;
    d["limit"] = m.limit;
    d["committed"] = m.committed;
    d["peak"] = m.peak;
    d["denied"] = m.denied;
    d["reclaims"] = m.reclaims;
    d["reclaimed"] = m.reclaimed;
    d["cache_reclaims"] = m.cache_reclaims;
    d["cache_reclaimed"] = m.cache_reclaimed;
    d["spares"] = m.spares;
    d["over"] = m.over();
    return d;
}

nb::dict budget_stats_dict(const vmmpp::budget_stats& s) {
    nb::dict d;
    d["limit"] = s.limit;
    d["committed"] = s.committed;
    d["peak"] = s.peak;
    d["denied"] = s.denied;
    d["over"] = s.over();
    nb::list models;
    for (const vmmpp::model_stats& m : s.models) {
        models.append(model_stats_dict(m));
    }
    d["models"] = models;
    return d;
}

nb::dict sleep_result_dict(const vmmpp::sleep_result& r) {
    nb::dict d;
    d["bytes_copied"] = r.bytes_copied;
    d["ranges"] = r.ranges;
    d["blocks"] = r.blocks;
    d["pool_bytes"] = r.pool_bytes;
    return d;
}

// --- the Python objects ---

/// vmmpp.ProcessBudget: a vmmpp::process_budget (a POSIX shared-memory segment).
struct py_process_budget {
    std::string name;
    vmmpp::process_budget budget;
};

/// Host memory a cache sleeps into: page-locked (cudaMallocHost) for a cache the GPU reads, so
/// the copies run at full speed; plain memory for a host cache.
class sleep_buffer {
public:
    sleep_buffer() = default;
    sleep_buffer(std::size_t bytes, bool pinned) : bytes_(bytes), pinned_(pinned) {
        if (bytes == 0) {
            return;
        }
        if (pinned) {
            void* p = nullptr;
            if (::cudaMallocHost(&p, bytes) != cudaSuccess) {
                (void)::cudaGetLastError();
                throw vmmpp::out_of_memory("page-locked host memory to sleep into (cudaMallocHost)", bytes, 0, 0);
            }
            data_ = static_cast<std::byte*>(p);
        } else {
            data_ = new std::byte[bytes];
        }
    }
    sleep_buffer(sleep_buffer&& o) noexcept
        : data_(std::exchange(o.data_, nullptr)), bytes_(std::exchange(o.bytes_, 0)), pinned_(o.pinned_) {}
    sleep_buffer& operator=(sleep_buffer&& o) noexcept {
        std::swap(data_, o.data_);
        std::swap(bytes_, o.bytes_);
        std::swap(pinned_, o.pinned_);
        return *this;
    }
    ~sleep_buffer() {
        if (data_ != nullptr) {
            if (pinned_) {
                (void)::cudaFreeHost(data_);
            } else {
                delete[] data_;
            }
        }
    }
    std::span<std::byte> span() noexcept { return {data_, bytes_}; }

private:
    std::byte* data_ = nullptr;
    std::size_t bytes_ = 0;
    bool pinned_ = false;
};

/// *p, or InvalidArgument "the <what> is closed" once close() dropped it.
template <class T>
T& open_or_raise(const std::shared_ptr<T>& p, const char* what) {
    if (!p) {
        throw vmmpp::invalid_argument(std::string("the ") + what + " is closed");
    }
    return *p;
}

/// vmmpp.KVCache.
struct py_cache {
    std::shared_ptr<cache_base> cache;  ///< null once closed (exports and prefix caches may hold it still)
    std::string config;
    std::string layout;
    std::string dtype;
    /// Where the live blocks are while the cache sleeps (held until it wakes).
    std::shared_ptr<sleep_buffer> slept;

    cache_base& get() const { return open_or_raise(cache, "KV cache"); }
};

/// vmmpp.PrefixCache.
struct py_prefix {
    std::shared_ptr<cache_base> cache;
    std::shared_ptr<prefix_base> prefix;  ///< null once closed

    prefix_base& get() const { return open_or_raise(prefix, "prefix cache"); }
};

/// vmmpp.HostTier.
struct py_tier {
    std::shared_ptr<cache_base> cache;
    std::shared_ptr<tier_base> tier;  ///< null once closed

    tier_base& get() const { return open_or_raise(tier, "host tier"); }
};

/// A DLPack producer: one layer's K or V, or (sequence_contiguous) one sequence's run. Each
/// __dlpack__ makes a new export holding the cache.
struct py_tensor {
    std::shared_ptr<cache_base> cache;
    std::uint32_t layer = 0;
    vmmpp::kv_part part = vmmpp::kv_part::key;
    bool managed_as_cuda = false;
    bool of_sequence = false;
    vmmpp::seq_id seq = 0;
};

// --- DLPack ---

/// A capsule's destructor: deletes the export unless a consumer took it (renamed the capsule).
void dlpack_capsule_destructor(PyObject* capsule) noexcept {
    if (PyCapsule_IsValid(capsule, vmmpp::dlpack_capsule_name) != 0) {
        vmmpp::dlpack_deleter{}(
            static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, vmmpp::dlpack_capsule_name)));
    } else if (PyCapsule_IsValid(capsule, vmmpp::dlpack_versioned_capsule_name) != 0) {
        vmmpp::dlpack_deleter{}(static_cast<DLManagedTensorVersioned*>(
            PyCapsule_GetPointer(capsule, vmmpp::dlpack_versioned_capsule_name)));
    }
}

nb::tuple dlpack_device(const cache_base& c, bool managed_as_cuda) {
    const DLDevice d = c.dlpack_device(managed_as_cuda);
    return nb::make_tuple(static_cast<int>(d.device_type), d.device_id);
}

nb::object dlpack(const py_tensor& t, nb::handle stream, nb::handle max_version, nb::handle dl_device, nb::handle copy) {
    cache_base& c = *t.cache;
    if (!copy.is_none() && PyObject_IsTrue(copy.ptr()) == 1) {
        PyErr_SetString(PyExc_BufferError, "vmmpp exports views of the KV cache; copy=True is not supported");
        throw nb::python_error();
    }
    const DLDevice device = c.dlpack_device(t.managed_as_cuda);
    if (!dl_device.is_none()) {
        const nb::tuple asked = nb::tuple(dl_device);
        if (nb::len(asked) != 2 || to_int<int>(asked[0], "dl_device[0]") != static_cast<int>(device.device_type) ||
            to_int<int>(asked[1], "dl_device[1]") != device.device_id) {
            PyErr_Format(PyExc_BufferError, "the KV cache is on DLPack device (%d, %d), not %S",
                         static_cast<int>(device.device_type), device.device_id, dl_device.ptr());
            throw nb::python_error();
        }
    }
    // DLPack's stream -1: the consumer asks for no synchronization.
    const bool no_sync = stream.is_none() || (PyLong_Check(stream.ptr()) && to_int<long long>(stream, "stream") == -1);
    if (!no_sync && device.device_type != kDLCPU) {
        // The cache's own device work (copy-on-write copies) is on its stream: finish it, so the
        // consumer's stream sees it, whatever stream that is.
        waiting(c, [&] { c.synchronize(); });
    }
    bool versioned = false;
    if (!max_version.is_none()) {
        versioned = to_int<int>(nb::tuple(max_version)[0], "max_version[0]") >= 1;
    }
    const vmmpp::kv_tensor tensor = locked(
        c, [&] { return t.of_sequence ? c.sequence_tensor(t.seq, t.layer, t.part) : c.tensor(t.layer, t.part); });
    std::shared_ptr<const void> keep_alive = t.cache;
    void* managed = nullptr;
    const char* name = nullptr;
    if (versioned) {
        managed = vmmpp::to_dlpack_versioned(tensor, device, std::move(keep_alive));
        name = vmmpp::dlpack_versioned_capsule_name;
    } else {
        managed = vmmpp::to_dlpack(tensor, device, std::move(keep_alive));
        name = vmmpp::dlpack_capsule_name;
    }
    PyObject* capsule = PyCapsule_New(managed, name, dlpack_capsule_destructor);
    if (capsule == nullptr) {
        if (versioned) {
            vmmpp::dlpack_deleter{}(static_cast<DLManagedTensorVersioned*>(managed));
        } else {
            vmmpp::dlpack_deleter{}(static_cast<DLManagedTensor*>(managed));
        }
        throw nb::python_error();
    }
    return nb::steal(capsule);
}

// --- KVCache ---

const std::pair<const char*, vmmpp::dtype> dtypes[] = {
    {"f32", vmmpp::dtype::f32},           {"f16", vmmpp::dtype::f16},
    {"bf16", vmmpp::dtype::bf16},         {"fp8_e4m3", vmmpp::dtype::fp8_e4m3},
    {"fp8_e5m2", vmmpp::dtype::fp8_e5m2},
};

vmmpp::dtype to_dtype(const std::string& name) {
    std::string names;
    for (const auto& [n, t] : dtypes) {
        if (name == n) {
            return t;
        }
        names += names.empty() ? n : std::string(", ") + n;
    }
    throw vmmpp::invalid_argument("unknown dtype '" + name + "'; the dtypes are " + names);
}

/// "fault", "zeros" or "zeros_writable" (vmmpp::unbacked_access).
vmmpp::unbacked_access to_unbacked(const std::string& name) {
    if (name == "fault") {
        return vmmpp::unbacked_access::fault;
    }
    if (name == "zeros") {
        return vmmpp::unbacked_access::zeros;
    }
    if (name == "zeros_writable") {
        return vmmpp::unbacked_access::zeros_writable;
    }
    throw vmmpp::invalid_argument("unbacked '" + name + "' is not one of fault, zeros, zeros_writable");
}

void init_cache(py_cache* self, nb::handle layers, nb::handle kv_heads, nb::handle head_dim, nb::handle max_blocks,
                const std::string& dtype, nb::handle block_tokens, const std::string& config, const std::string& layout,
                nb::handle device, nb::handle budget_bytes, nb::handle max_tokens_per_sequence, nb::handle peers,
                const std::string& unbacked, nb::handle budget, nb::handle model, nb::handle model_limit_bytes) {
    vmmpp::kv_geometry g;
    g.layers = to_int<std::uint32_t>(layers, "layers");
    g.kv_heads = to_int<std::uint32_t>(kv_heads, "kv_heads");
    g.head_dim = to_int<std::uint32_t>(head_dim, "head_dim");
    g.max_blocks = to_int<std::uint32_t>(max_blocks, "max_blocks");
    g.type = to_dtype(dtype);
    g.block_tokens = to_int<std::uint32_t>(block_tokens, "block_tokens");
    g.max_tokens_per_sequence = to_int<std::uint32_t>(max_tokens_per_sequence, "max_tokens_per_sequence");
    g.validate();
    const vmmpp::erased::backing_choice backing{.device = to_int<int>(device, "device"),
                                                .peers = to_ints<int>(peers, "peers"),
                                                .unbacked = to_unbacked(unbacked)};
    const std::uint64_t budget_limit = to_int<std::uint64_t>(budget_bytes, "budget_bytes");
    std::shared_ptr<cache_base> cache;
    if (!budget.is_none()) {
        // A model of a budget shared with other caches: in this process, or across processes.
        if (model.is_none() || model_limit_bytes.is_none()) {
            throw vmmpp::invalid_argument("a cache under a budget needs model= (its name) and model_limit_bytes=");
        }
        if (budget_limit != 0) {
            throw vmmpp::invalid_argument(
                "budget_bytes is for a cache with a budget of its own; under budget= the model's limit is "
                "model_limit_bytes");
        }
        const std::string model_name = nb::cast<std::string>(model);
        const auto limit = to_int<std::size_t>(model_limit_bytes, "model_limit_bytes");
        if (nb::isinstance<vmmpp::budget>(budget)) {
            vmmpp::shared_budget share = nb::cast<vmmpp::budget&>(budget).register_model(model_name, limit);
            cache = vmmpp::erased::make_cache_in_budget(config, layout, g, backing, std::move(share));
        } else if (nb::isinstance<py_process_budget>(budget)) {
            vmmpp::process_quota quota = nb::cast<py_process_budget&>(budget).budget.register_model(model_name, limit);
            cache = vmmpp::erased::make_cache_in_process_budget(config, layout, g, backing, std::move(quota));
        } else {
            throw vmmpp::invalid_argument(std::string("budget must be a vmmpp.Budget or a vmmpp.ProcessBudget, not ") +
                                          Py_TYPE(budget.ptr())->tp_name);
        }
    } else if (!model.is_none() || !model_limit_bytes.is_none()) {
        throw vmmpp::invalid_argument("model= and model_limit_bytes= name a model of budget=, and no budget was given");
    } else {
        cache = vmmpp::erased::make_cache(config, layout, g, backing, budget_limit);
    }
    new (self) py_cache{std::move(cache), config, layout, dtype, nullptr};
}

nb::object slot_mapping(const py_cache& self, nb::handle seq_h, nb::handle first_h, nb::handle count_h) {
    cache_base& c = self.get();
    const auto seq = to_int<vmmpp::seq_id>(seq_h, "seq");
    const auto first = to_int<std::size_t>(first_h, "first");
    const bool to_the_end = count_h.is_none();
    const std::size_t asked = to_the_end ? 0 : to_int<std::size_t>(count_h, "count");
    std::vector<std::int64_t> out;
    locked(c, [&] {
        std::size_t count = asked;
        if (to_the_end) {
            const std::size_t tokens = c.tokens(seq);
            if (first > tokens) {
                throw vmmpp::invalid_argument("slot_mapping: first " + std::to_string(first) + " is past the " +
                                              std::to_string(tokens) + " tokens of sequence " + std::to_string(seq));
            }
            count = tokens - first;
        }
        out.resize(count);
        c.slot_mapping(seq, first, out);
    });
    return to_array("q", out.data(), out.size() * sizeof(std::int64_t));
}

nb::dict cache_stats(const py_cache& self) {
    cache_base& c = self.get();
    const auto [s, asleep, block_bytes] =
        locked(c, [&] { return std::tuple{c.stats(), c.asleep(), c.geometry().block_bytes()}; });
    nb::dict d;
    d["reserved_bytes"] = s.reserved_bytes;
    d["committed_bytes"] = s.committed_bytes;
    d["used_blocks"] = s.used_blocks;
    d["free_blocks"] = s.free_blocks;
    d["sequences"] = s.sequences;
    d["cow_copies"] = s.cow_copies;
    d["block_bytes"] = block_bytes;
    d["asleep"] = asleep;
    return d;
}

/// JSON of the caches in `caches` (a dict name -> KVCache) and `budget` (None, a Budget or a ProcessBudget).
std::string stats_json(nb::dict caches, nb::handle budget) {
    vmmpp::stats_snapshot snapshot{};
    for (auto [name, value] : caches) {
        const py_cache& pc = nb::cast<const py_cache&>(value);
        cache_base& c = pc.get();
        locked(c, [&] { c.add_to(snapshot, nb::cast<std::string>(name)); });
    }
    if (nb::isinstance<vmmpp::budget>(budget)) {
        snapshot.set_budget(nb::cast<vmmpp::budget&>(budget).stats());
    } else if (nb::isinstance<py_process_budget>(budget)) {
        const py_process_budget& pb = nb::cast<const py_process_budget&>(budget);
        snapshot.set_process_budget(pb.name, pb.budget.stats());
    } else if (!budget.is_none()) {
        throw vmmpp::invalid_argument(std::string("budget must be None, a vmmpp.Budget or a vmmpp.ProcessBudget, not ") +
                                      Py_TYPE(budget.ptr())->tp_name);
    }
    return vmmpp::to_json(snapshot);
}

nb::tuple eviction_tuple(nb::handle eviction_type, const vmmpp::eviction_result& r) {
    nb::list blocks;
    nb::list keys;
    for (std::size_t i = 0; i < r.blocks.size(); ++i) {
        blocks.append(r.blocks[i]);
        keys.append(nb::make_tuple(r.keys[i].hi, r.keys[i].lo));
    }
    return nb::borrow<nb::tuple>(eviction_type(blocks, keys, r.freed_page_bytes));
}

nb::object self_of(nb::handle self) { return nb::borrow(self); }

/// close() and the context manager (__enter__, __exit__ calling close) of a handle class: the
/// handle drops its reference (`member`), without the GIL, since the object's destructor may
/// take the cache's mutex and wait for copies. Objects still holding it keep it alive.
template <class Py, class Member>
nb::class_<Py>& def_close(nb::class_<Py>& cls, Member Py::*member, const char* doc) {
    auto close = [member](Py& self) {
        nb::gil_scoped_release unlocked;
        (self.*member).reset();
    };
    cls.def("close", close, doc);
    cls.def("__enter__", &self_of);
    cls.def("__exit__", [close](Py& self, nb::args) { close(self); });
    return cls;
}

} // namespace

NB_MODULE(_vmmpp, m) {
    m.doc() = "vmmpp's elastic KV cache (the extension module; import vmmpp instead)";

    // Errors. InvalidArgument is a ValueError too, so code that catches ValueError for bad
    // arguments keeps working; MemoryError stays Python's own for host allocation failures.
    errors.error = new_error(m, "Error", "error", PyExc_RuntimeError, "A failed vmmpp call (vmmpp::error).");
    {
        nb::object bases = nb::make_tuple(nb::handle(errors.error), nb::handle(PyExc_ValueError));
        errors.invalid_argument = new_error(m, "InvalidArgument", "invalid_argument", bases.ptr(),
                                            "An argument that can never succeed (vmmpp::invalid_argument); nothing changed.");
    }
    // The rest, each after its base: (class, name, status, base, doc).
    const struct {
        PyObject** type;
        const char* name;
        const char* status;
        PyObject* const* base;
        const char* doc;
    } subclasses[] = {
        {&errors.unknown_model, "UnknownModel", "invalid_argument", &errors.invalid_argument,
         "No model of this name is registered with the budget."},
        {&errors.no_such_segment, "NoSuchSegment", "invalid_argument", &errors.invalid_argument,
         "No process budget segment has this name."},
        {&errors.incompatible_segment, "IncompatibleSegment", "invalid_argument", &errors.invalid_argument,
         "A shared-memory object of this name is not a process budget vmmpp can use."},
        {&errors.model_in_use, "ModelInUse", "invalid_argument", &errors.invalid_argument,
         "Live processes still hold a share of the model."},
        {&errors.out_of_memory, "OutOfMemory", "out_of_memory", &errors.error,
         "Physical memory refused: .requested, .committed, .limit (0: none)."},
        {&errors.over_quota, "OverQuota", "over_quota", &errors.error,
         "A budget refused the memory: .which ('model <name>' or 'global'), .requested, .in_use, .limit."},
        {&errors.out_of_blocks, "OutOfBlocks", "out_of_blocks", &errors.error,
         "Too few free blocks: .needed, .free, .max_blocks."},
        {&errors.out_of_sequence_slots, "OutOfSequenceSlots", "out_of_sequence_slots", &errors.error,
         "sequence_contiguous: every slot in use: .slots, .slot_blocks."},
        {&errors.tier_full, "TierFull", "tier_full", &errors.error,
         "A host tier has no room for a swap-out: .needed, .free, .max_blocks; nothing changed."},
        {&errors.cache_asleep, "CacheAsleep", "error", &errors.error,
         "A call that needs the cache's memory while it sleeps: .operation; wake() it first."},
        {&errors.retired_memory, "RetiredMemory", "error", &errors.error,
         "Memory taken out of service after the driver failed to give it back: .offset, .bytes."},
        {&errors.cuda_error, "CudaError", "cuda_error", &errors.error, "A CUDA call failed: .call, .code, .code_name."},
        {&errors.cuda_unavailable, "CudaUnavailable", "cuda_unavailable", &errors.error,
         "No usable CUDA driver or device."},
        {&errors.untrusted_segment, "UntrustedSegment", "error", &errors.error,
         "A process budget segment owned or writable by another user: .owner_uid, .our_uid, .mode."},
    };
    for (const auto& e : subclasses) {
        *e.type = new_error(m, e.name, e.status, *e.base, e.doc);
    }
    nb::register_exception_translator(translate_error, nullptr);

    m.def("config_names", [] { return vmmpp::type_names<vmmpp::named_configs>(","); },
          "The configuration names KVCache takes, comma-separated (vmmpp::named_configs).");
    m.def("budget_config_names", [] { return vmmpp::type_names<vmmpp::erased::budget_configs>(","); },
          "The configuration names a cache under budget= takes, comma-separated.");
    m.def("layout_names", [] { return vmmpp::type_names<vmmpp::kv_layouts>(","); },
          "The layout names KVCache takes, comma-separated, the default (block_major) first.");
    m.def("process_budget_layout_names", [] { return vmmpp::type_names<vmmpp::split_kv_layouts>(","); },
          "The layout names a cache under a ProcessBudget takes, comma-separated.");

    // Eviction results as vmmpp_kv has them: a namedtuple.
    nb::object eviction = nb::module_::import_("collections")
                              .attr("namedtuple")("Eviction", nb::make_tuple("blocks", "keys", "freed_page_bytes"));
    eviction.attr("__module__") = "vmmpp";
    m.attr("Eviction") = eviction;
    // A cache's shape with attribute access, as vmmpp_kv's Geometry structure has it.
    nb::object geometry_type = nb::module_::import_("collections")
                                   .attr("namedtuple")("Geometry", nb::make_tuple("layers", "kv_heads", "head_dim",
                                                                                  "dtype", "block_tokens", "max_blocks",
                                                                                  "max_tokens_per_sequence",
                                                                                  "block_bytes"));
    geometry_type.attr("__module__") = "vmmpp";
    m.attr("Geometry") = geometry_type;

    nb::class_<vmmpp::budget>(m, "Budget",
                              "vmmpp::budget: one global byte limit shared by the caches made with budget=this "
                              "(each a model with a limit of its own), in this process.")
        .def("__init__",
             [](vmmpp::budget* self, nb::handle limit) {
                 new (self) vmmpp::budget(to_int<std::size_t>(limit, "global_limit"));
             },
             "global_limit"_a)
        .def("set_limit",
             [](vmmpp::budget& b, nb::handle limit) {
                 const auto bytes = to_int<std::size_t>(limit, "global_limit");
                 vmmpp::limit_change c;
                 {
                     nb::gil_scoped_release unlocked;  // asks every model's pools for spares, under their locks
                     c = b.set_limit(bytes);
                 }
                 return limit_change_dict(c);
             },
             "global_limit"_a, "Sets the global limit; returns the limit change (a dict).")
        .def("set_model_limit",
             [](vmmpp::budget& b, const std::string& name, nb::handle limit) {
                 const auto bytes = to_int<std::size_t>(limit, "limit");
                 vmmpp::limit_change c;
                 {
                     nb::gil_scoped_release unlocked;
                     c = b.set_model_limit(name, bytes);
                 }
                 return limit_change_dict(c);
             },
             "model"_a, "limit"_a, "Sets a model's limit; returns the limit change (a dict).")
        .def("stats", [](const vmmpp::budget& b) { return budget_stats_dict(b.stats()); },
             "{limit, committed, peak, denied, over, models: [{name, limit, committed, ...}]}.")
        .def("stats_json", [](nb::handle self) { return stats_json(nb::dict(), self); },
             "The budget's statistics as vmmpp::to_json writes them.");

    nb::class_<py_process_budget>(m, "ProcessBudget",
                                  "vmmpp::process_budget: one limit shared by the caches of several processes, "
                                  "in a POSIX shared-memory segment (vmmpp-budget lists and changes it).")
        .def_static(
            "create_or_open",
            [](const std::string& name, nb::handle limit) {
                const auto bytes = to_int<std::size_t>(limit, "global_limit");
                nb::gil_scoped_release unlocked;
                return py_process_budget{name, vmmpp::process_budget::create_or_open(name, bytes)};
            },
            "name"_a, "global_limit"_a, "The budget `name`, created with global_limit bytes if there is none.")
        .def_static(
            "open",
            [](const std::string& name) {
                nb::gil_scoped_release unlocked;
                return py_process_budget{name, vmmpp::process_budget::open(name)};
            },
            "name"_a, "The existing budget `name` (NoSuchSegment if there is none).")
        .def_ro("name", &py_process_budget::name)
        .def("set_limit",
             [](py_process_budget& b, nb::handle limit) {
                 const auto bytes = to_int<std::size_t>(limit, "global_limit");
                 vmmpp::limit_change c;
                 {
                     nb::gil_scoped_release unlocked;
                     c = b.budget.set_limit(bytes);
                 }
                 return limit_change_dict(c);
             },
             "global_limit"_a)
        .def("set_model_limit",
             [](py_process_budget& b, const std::string& name, nb::handle limit) {
                 const auto bytes = to_int<std::size_t>(limit, "limit");
                 vmmpp::limit_change c;
                 {
                     nb::gil_scoped_release unlocked;
                     c = b.budget.set_model_limit(name, bytes);
                 }
                 return limit_change_dict(c);
             },
             "model"_a, "limit"_a)
        .def("stats", [](const py_process_budget& b) { return budget_stats_dict(b.budget.stats()); })
        .def("stats_json", [](nb::handle self) { return stats_json(nb::dict(), self); })
        .def("remove", [](const py_process_budget& b) { return b.budget.remove(); },
             "Unlinks the segment (attached processes keep theirs); True if it was this one.");
    m.def(
        "remove_process_budget",
        [](const std::string& name) {
            nb::gil_scoped_release unlocked;
            return vmmpp::process_budget::remove(name);
        },
        "name"_a, "Unlinks the process budget `name` (attached processes keep theirs); True if there was one.");

    nb::class_<py_tensor>(m, "KVTensor",
                          "One layer's K or V (or one sequence's run): a DLPack producer for torch.from_dlpack, "
                          "numpy.from_dlpack, ... Consumers view the cache's memory in place; each export holds "
                          "the cache. Only blocks of live sequences are backed by memory.")
        .def_ro("layer", &py_tensor::layer)
        .def_prop_ro("part", [](const py_tensor& t) { return static_cast<int>(t.part); })
        .def("__dlpack_device__", [](const py_tensor& t) { return dlpack_device(*t.cache, t.managed_as_cuda); })
        .def("__dlpack__", &dlpack, nb::kw_only(), "stream"_a = nb::none(), "max_version"_a = nb::none(),
             "dl_device"_a = nb::none(), "copy"_a = nb::none());

    nb::class_<py_cache> kv_cache(m, "KVCache",
                         "A vmmpp::kv_cache. config: a name of config_names() ('host' runs without a GPU); "
                         "layout: a name of layout_names(). budget=Budget(...) or ProcessBudget with model= and "
                         "model_limit_bytes= charges it to a budget shared with other caches. unbacked='zeros' "
                         "(vmm configurations): blocks no sequence holds read as zeros instead of faulting.");
    def_close(kv_cache, &py_cache::cache, "Drops the handle; exports and prefix caches still alive keep the cache.")
        .def("__init__", &init_cache, nb::kw_only(), "layers"_a, "kv_heads"_a, "head_dim"_a, "max_blocks"_a,
             "dtype"_a = "f16", "block_tokens"_a = 16, "config"_a = "host", "layout"_a = "block_major",
             "device"_a = 0, "budget_bytes"_a = 0, "max_tokens_per_sequence"_a = 0, "peers"_a = nb::tuple(),
             "unbacked"_a = "fault", "budget"_a = nb::none(), "model"_a = nb::none(), "model_limit_bytes"_a = nb::none())
        .def_ro("config", &py_cache::config)
        .def_ro("layout", &py_cache::layout)
        .def_ro("dtype", &py_cache::dtype)
        .def_prop_ro("closed", [](const py_cache& c) { return !c.cache; })
        .def_prop_ro("geometry",
                     [geometry_type](const py_cache& c) {
                         const vmmpp::kv_geometry& g = c.get().geometry();  // fixed for the cache's life
                         return geometry_type(g.layers, g.kv_heads, g.head_dim, c.dtype, g.block_tokens, g.max_blocks,
                                              g.max_tokens_per_sequence, g.block_bytes());
                     },
                     "Geometry(layers, kv_heads, head_dim, dtype, block_tokens, max_blocks, "
                     "max_tokens_per_sequence, block_bytes), a namedtuple.")
        .def("add_sequence",
             [](const py_cache& self) {
                 cache_base& c = self.get();
                 return locked(c, [&] { return c.add_sequence(); });
             })
        .def("append",
             [](const py_cache& self, nb::handle seq, nb::handle n, nb::handle stream) {
                 cache_base& c = self.get();
                 const auto s = to_int<vmmpp::seq_id>(seq, "seq");
                 const auto tokens = to_int<std::size_t>(n, "n_tokens");
                 const bool on_stream = !stream.is_none();
                 const cudaStream_t st = to_stream(stream);
                 return locked(c, [&] { return on_stream ? c.append_on_stream(s, tokens, st) : c.append(s, tokens); })
                     .first;
             },
             "seq"_a, "n_tokens"_a, "stream"_a = nb::none(),
             "Appends n_tokens tokens; returns the index of the first new one. stream: where the new tokens are "
             "written (None: the cache's own stream).")
        .def("fork",
             [](const py_cache& self, nb::handle seq) {
                 cache_base& c = self.get();
                 const auto s = to_int<vmmpp::seq_id>(seq, "seq");
                 return locked(c, [&] { return c.fork(s); });
             },
             "seq"_a)
        .def("truncate",
             [](const py_cache& self, nb::handle seq, nb::handle n, nb::handle stream) {
                 cache_base& c = self.get();
                 const auto s = to_int<vmmpp::seq_id>(seq, "seq");
                 const auto tokens = to_int<std::size_t>(n, "n_tokens");
                 const cudaStream_t st = to_stream(stream);
                 locked(c, [&] { c.truncate(s, tokens, st); });
             },
             "seq"_a, "n_tokens"_a, "stream"_a = nb::none(),
             "Keeps the first n_tokens tokens; dropped blocks' memory goes back after the work queued on stream "
             "(None: the legacy default stream).")
        .def("free",
             [](const py_cache& self, nb::handle seq, nb::handle stream) {
                 cache_base& c = self.get();
                 const auto s = to_int<vmmpp::seq_id>(seq, "seq");
                 const cudaStream_t st = to_stream(stream);
                 locked(c, [&] { c.free(s, st); });
             },
             "seq"_a, "stream"_a = nb::none())
        .def("tokens",
             [](const py_cache& self, nb::handle seq) {
                 cache_base& c = self.get();
                 const auto s = to_int<vmmpp::seq_id>(seq, "seq");
                 return locked(c, [&] { return c.tokens(s); });
             },
             "seq"_a, "The sequence's length in tokens.")
        .def("lengths",
             [](const py_cache& self, nb::handle seqs) {
                 cache_base& c = self.get();
                 const std::vector<vmmpp::seq_id> ids = to_ints<vmmpp::seq_id>(seqs, "seqs");
                 std::vector<std::size_t> out(ids.size());
                 locked(c, [&] {
                     for (std::size_t i = 0; i < ids.size(); ++i) {
                         out[i] = c.tokens(ids[i]);
                     }
                 });
                 return out;
             },
             "seqs"_a, "The lengths of seqs, in order (a list).")
        .def("stats", &cache_stats)
        .def("stats_json",
             [](nb::handle self, const std::string& name) {
                 nb::dict caches;
                 caches[name.c_str()] = self;
                 return stats_json(caches, nb::none());
             },
             "name"_a = "kv", "The cache's statistics (its model's too, under a budget) as vmmpp::to_json writes them.")
        .def("slot_mapping", &slot_mapping, "seq"_a, "first"_a = 0, "count"_a = nb::none(),
             "array('q') of the slots (block * block_tokens + offset) of tokens [first, first + count).")
        .def("block_table",
             [](const py_cache& self, nb::handle seq) {
                 cache_base& c = self.get();
                 const auto s = to_int<vmmpp::seq_id>(seq, "seq");
                 std::vector<std::int32_t> table;
                 locked(c, [&] {
                     const auto t = c.block_table(s);
                     table.assign(t.begin(), t.end());
                 });
                 return to_array("i", table.data(), table.size() * sizeof(std::int32_t));
             },
             "seq"_a, "array('i') of the sequence's block ids, in token order.")
        .def("pack_block_tables",
             [](const py_cache& self, nb::handle seqs, nb::handle max_blocks_per_seq, nb::handle pad) {
                 cache_base& c = self.get();
                 const std::vector<vmmpp::seq_id> ids = to_ints<vmmpp::seq_id>(seqs, "seqs");
                 const auto width = to_int<std::uint32_t>(max_blocks_per_seq, "max_blocks_per_seq");
                 const auto fill = to_int<std::int32_t>(pad, "pad");
                 std::vector<std::int32_t> out(ids.size() * width);
                 locked(c, [&] { c.pack_block_tables(ids, width, out, fill); });
                 return to_array("i", out.data(), out.size() * sizeof(std::int32_t));
             },
             "seqs"_a, "max_blocks_per_seq"_a, "pad"_a = 0,
             "array('i') of a row-major [len(seqs), max_blocks_per_seq] block-table matrix, rows padded.")
        .def("address",
             [](const py_cache& self, nb::handle layer, nb::handle part, nb::handle block) {
                 cache_base& c = self.get();
                 const auto l = to_int<std::uint32_t>(layer, "layer");
                 const vmmpp::kv_part p = to_part(part);
                 const auto b = to_int<std::int32_t>(block, "block");
                 return reinterpret_cast<std::uintptr_t>(locked(c, [&] { return c.address(l, p, b); }));
             },
             "layer"_a, "part"_a, "block"_a)
        .def("synchronize",
             [](const py_cache& self) {
                 cache_base& c = self.get();
                 waiting(c, [&] { c.synchronize(); });
             },
             "Waits for the cache's device work and the GPU work freed memory waits for; that memory goes back.")
        .def("collect",
             [](const py_cache& self) {
                 cache_base& c = self.get();
                 return waiting(c, [&] { return c.collect(); });
             },
             "Gives back memory whose GPU work has completed (never waits for the GPU); returns the bytes.")
        .def("trim",
             [](const py_cache& self) {
                 cache_base& c = self.get();
                 return waiting(c, [&] { return c.trim(); });
             },
             "Gives back every committed page no block holds, spares included; returns the bytes.")
        .def("sleep_bytes",
             [](const py_cache& self) {
                 cache_base& c = self.get();
                 return locked(c, [&] { return c.sleep_bytes(); });
             })
        .def_prop_ro("asleep",
                     [](const py_cache& self) {
                         cache_base& c = self.get();
                         return locked(c, [&] { return c.asleep(); });
                     })
        .def("sleep",
             [](py_cache& self, nb::handle stream) {
                 cache_base& c = self.get();
                 const cudaStream_t st = to_stream(stream);
                 auto buffer = std::make_shared<sleep_buffer>();
                 vmmpp::sleep_result r;
                 try {
                     r = waiting(c, [&] {
                         *buffer = sleep_buffer(c.sleep_bytes(), c.device_accessible());
                         return c.sleep(buffer->span(), st);
                     });
                 } catch (...) {
                     // A failure while memory went back leaves the cache asleep on the buffer.
                     if (locked(c, [&] { return c.asleep(); })) {
                         self.slept = buffer;
                     }
                     throw;
                 }
                 self.slept = buffer;
                 return sleep_result_dict(r);
             },
             "stream"_a = nb::none(),
             "Copies the live blocks to host memory (page-locked for a GPU cache) and gives every device page "
             "back; sequences, tables and tensors stay. Returns {bytes_copied, ranges, blocks, pool_bytes}.")
        .def("wake",
             [](py_cache& self, nb::handle stream) {
                 cache_base& c = self.get();
                 const cudaStream_t st = to_stream(stream);
                 const vmmpp::sleep_result r = waiting(c, [&] { return c.wake(st); });
                 self.slept.reset();
                 return sleep_result_dict(r);
             },
             "stream"_a = nb::none(), "Commits the live blocks again at the same offsets and copies them back.")
        .def("dlpack_device",
             [](const py_cache& self, bool managed_as_cuda) { return dlpack_device(self.get(), managed_as_cuda); },
             "managed_as_cuda"_a = false)
        .def("tensor",
             [](const py_cache& self, nb::handle layer, nb::handle part, bool managed_as_cuda) {
                 self.get();
                 return py_tensor{self.cache, to_int<std::uint32_t>(layer, "layer"), to_part(part), managed_as_cuda};
             },
             "layer"_a, "part"_a, "managed_as_cuda"_a = false)
        .def("key",
             [](const py_cache& self, nb::handle layer, bool managed_as_cuda) {
                 self.get();
                 return py_tensor{self.cache, to_int<std::uint32_t>(layer, "layer"), vmmpp::kv_part::key,
                                  managed_as_cuda};
             },
             "layer"_a, "managed_as_cuda"_a = false)
        .def("value",
             [](const py_cache& self, nb::handle layer, bool managed_as_cuda) {
                 self.get();
                 return py_tensor{self.cache, to_int<std::uint32_t>(layer, "layer"), vmmpp::kv_part::value,
                                  managed_as_cuda};
             },
             "layer"_a, "managed_as_cuda"_a = false)
        .def("sequence",
             [](const py_cache& self, nb::handle seq, nb::handle layer, nb::handle part, bool managed_as_cuda) {
                 self.get();
                 return py_tensor{self.cache,   to_int<std::uint32_t>(layer, "layer"), to_part(part), managed_as_cuda,
                                  true,         to_int<vmmpp::seq_id>(seq, "seq")};
             },
             "seq"_a, "layer"_a, "part"_a, "managed_as_cuda"_a = false,
             "sequence_contiguous: seq's K or V of layer as one dense [1, tokens, kv_heads, head_dim] run (DLPack).")
        .def("span",
             [](const py_cache& self) {
                 const cache_base& c = self.get();
                 return nb::make_tuple(reinterpret_cast<std::uintptr_t>(c.base()), c.capacity(), c.device());
             },
             "(base address, capacity in bytes, device; -1 for host memory) of the cache's span.")
        .def("committed_extents",
             [](const py_cache& self) {
                 cache_base& c = self.get();
                 const auto extents = locked(c, [&] { return c.committed_extents(); });
                 nb::list out;
                 for (const vmmpp::committed_extent& e : extents) {
                     out.append(nb::make_tuple(e.offset, e.bytes, e.commit));
                 }
                 return out;
             },
             "[(offset, bytes, commit)] of the pool's committed extents, lowest offset first.");

    m.def(
        "copy_blocks",
        [](const py_cache& src, nb::handle src_blocks, const py_cache& dst, nb::handle dst_blocks, nb::handle stream) {
            cache_base& s = src.get();
            cache_base& d = dst.get();
            const std::vector<std::int32_t> from = to_ints<std::int32_t>(src_blocks, "src_blocks");
            const std::vector<std::int32_t> to = to_ints<std::int32_t>(dst_blocks, "dst_blocks");
            const cudaStream_t st = to_stream(stream);
            nb::gil_scoped_release unlocked;
            // Both caches' locks, in one order whatever the argument order (std::scoped_lock).
            if (&s == &d) {
                std::lock_guard lock(s.mutex);
                s.copy_blocks_to(from, d, to, st);
            } else {
                std::scoped_lock lock(s.mutex, d.mutex);
                s.copy_blocks_to(from, d, to, st);
            }
        },
        "src"_a, "src_blocks"_a, "dst"_a, "dst_blocks"_a, "stream"_a = nb::none(),
        "Copies blocks between two caches of the same configuration and layout (vmmpp::copy_blocks).");

    m.def("stats_json", &stats_json, "caches"_a, "budget"_a = nb::none(),
          "One JSON object (vmmpp::to_json) of the caches (a dict name -> KVCache) and a Budget or ProcessBudget.");

    nb::class_<py_prefix> prefix_cache(m, "PrefixCache",
                                       "vmmpp::prefix_cache over a KVCache: full blocks of finished requests stay "
                                       "cached by content key, and a prompt that starts the same way gets them back.");
    def_close(prefix_cache, &py_prefix::prefix, "Drops the handle; a host tier over it keeps the prefix cache.")
        .def(
            "__init__",
            [](py_prefix* self, const py_cache& cache, nb::handle max_cached_bytes, bool record_events, bool lend) {
                cache.get();
                vmmpp::prefix_cache_options options;
                options.max_cached_bytes = max_cached_bytes.is_none()
                                               ? std::numeric_limits<std::size_t>::max()
                                               : to_int<std::size_t>(max_cached_bytes, "max_cached_bytes");
                options.record_events = record_events;
                std::shared_ptr<prefix_base> prefix;
                {
                    nb::gil_scoped_release unlocked;  // takes the cache's mutex
                    prefix = vmmpp::erased::make_prefix_cache(cache.cache, options, lend);
                }
                new (self) py_prefix{cache.cache, std::move(prefix)};
            },
            "cache"_a, nb::kw_only(), "max_cached_bytes"_a = nb::none(), "record_events"_a = false, "lend"_a = false)
        .def(
            "publish",
            [](const py_prefix& self, nb::handle seq, nb::handle tokens, nb::handle extra) {
                prefix_base& p = self.get();
                const auto s = to_int<vmmpp::seq_id>(seq, "seq");
                const auto t = to_ints<std::int32_t>(tokens, "tokens");
                const auto e = to_ints<std::uint64_t>(extra, "extra");
                return locked(*self.cache, [&] { return p.publish(s, t, e); });
            },
            "seq"_a, "tokens"_a, "extra"_a = nb::tuple(), "Registers the full blocks of seq's tokens; returns how many were new.")
        .def(
            "lookup",
            [](const py_prefix& self, nb::handle tokens, nb::handle extra) {
                prefix_base& p = self.get();
                const auto t = to_ints<std::int32_t>(tokens, "tokens");
                const auto e = to_ints<std::uint64_t>(extra, "extra");
                return locked(*self.cache, [&] { return p.lookup(t, e); });
            },
            "tokens"_a, "extra"_a = nb::tuple(), "How many leading tokens are cached (whole blocks).")
        .def(
            "attach",
            [](const py_prefix& self, nb::handle tokens, nb::handle extra, nb::handle stream) {
                prefix_base& p = self.get();
                const auto t = to_ints<std::int32_t>(tokens, "tokens");
                const auto e = to_ints<std::uint64_t>(extra, "extra");
                const cudaStream_t st = to_stream(stream);
                const vmmpp::attached_sequence a = locked(*self.cache, [&] { return p.attach(t, e, st); });
                return nb::make_tuple(a.seq, a.cached_tokens);
            },
            "tokens"_a, "extra"_a = nb::tuple(), "stream"_a = nb::none(),
            "A new sequence holding the cached leading blocks: (seq, cached_tokens).")
        .def(
            "append",
            [](const py_prefix& self, nb::handle seq, nb::handle n, nb::handle stream) {
                prefix_base& p = self.get();
                const auto s = to_int<vmmpp::seq_id>(seq, "seq");
                const auto tokens = to_int<std::size_t>(n, "n_tokens");
                const bool on_stream = !stream.is_none();
                const cudaStream_t st = to_stream(stream);
                return locked(*self.cache, [&] { return p.append(s, tokens, st, on_stream); }).first;
            },
            "seq"_a, "n_tokens"_a, "stream"_a = nb::none(),
            "KVCache.append, evicting cached blocks no sequence holds when the cache refuses.")
        .def(
            "free",
            [](const py_prefix& self, nb::handle seq, nb::handle stream) {
                prefix_base& p = self.get();
                const auto s = to_int<vmmpp::seq_id>(seq, "seq");
                const cudaStream_t st = to_stream(stream);
                locked(*self.cache, [&] { p.free(s, st); });
            },
            "seq"_a, "stream"_a = nb::none())
        .def(
            "evict",
            [eviction](const py_prefix& self, nb::handle n) {
                prefix_base& p = self.get();
                const auto blocks = to_int<std::size_t>(n, "n_blocks");
                return eviction_tuple(eviction, locked(*self.cache, [&] { return p.evict(blocks); }));
            },
            "n_blocks"_a)
        .def(
            "evict_bytes",
            [eviction](const py_prefix& self, nb::handle n) {
                prefix_base& p = self.get();
                const auto bytes = to_int<std::size_t>(n, "n_bytes");
                return eviction_tuple(eviction, locked(*self.cache, [&] { return p.evict_bytes(bytes); }));
            },
            "n_bytes"_a)
        .def("clear",
             [eviction](const py_prefix& self) {
                 prefix_base& p = self.get();
                 return eviction_tuple(eviction, locked(*self.cache, [&] { return p.clear(); }));
             })
        .def("stats",
             [](const py_prefix& self) {
                 prefix_base& p = self.get();
                 const auto [s, block_bytes] = locked(*self.cache, [&] { return std::pair{p.stats(), p.block_bytes()}; });
                 nb::dict d;
                 d["hits"] = s.hits;
                 d["misses"] = s.misses;
                 d["evictions"] = s.evictions;
                 d["cached_blocks"] = s.cached_blocks;
                 d["cached_bytes"] = s.cached_bytes;
                 d["evictable_blocks"] = s.evictable_blocks;
                 d["evictable_bytes"] = s.evictable_bytes;
                 d["committed_bytes"] = s.committed_bytes;
                 d["packed_floor_bytes"] = s.packed_floor_bytes;
                 d["idle_footprint_ratio"] = s.idle_footprint_ratio;
                 d["block_bytes"] = block_bytes;
                 return d;
             })
        .def("lending_stats",
             [](const py_prefix& self) {
                 const vmmpp::lending_stats s = self.get().lending_stats();  // atomics: no lock
                 nb::dict d;
                 d["lends"] = s.lends;
                 d["lent_blocks"] = s.lent_blocks;
                 d["lent_bytes"] = s.lent_bytes;
                 d["busy"] = s.busy;
                 return d;
             })
        .def("drain_events",
             [](const py_prefix& self) {
                 prefix_base& p = self.get();
                 const auto events = locked(*self.cache, [&] { return p.drain_events(); });
                 nb::list out;
                 for (const vmmpp::prefix_event& e : events) {
                     out.append(nb::make_tuple(e.kind == vmmpp::prefix_event_kind::stored ? "stored" : "removed",
                                               e.block, nb::make_tuple(e.key.hi, e.key.lo),
                                               nb::make_tuple(e.parent.hi, e.parent.lo)));
                 }
                 return out;
             },
             "[(kind, block, (key_hi, key_lo), (parent_hi, parent_lo))], kind 'stored' or 'removed', oldest first.");

    nb::class_<py_tier> host_tier(m, "HostTier",
                                  "vmmpp::host_tier behind a PrefixCache: evicted blocks are copied to host memory "
                                  "instead of dropped, found again by attach, and sequences swap out and in.");
    def_close(host_tier, &py_tier::tier, "Waits for the tier's copies and frees its host memory.")
        .def(
            "__init__",
            [](py_tier* self, const py_prefix& prefix, nb::handle max_blocks, nb::handle stream) {
                prefix.get();
                const auto blocks = to_int<std::size_t>(max_blocks, "max_blocks");
                const cudaStream_t st = to_stream(stream);
                std::shared_ptr<tier_base> tier;
                {
                    nb::gil_scoped_release unlocked;  // takes the cache's mutex, registers host memory
                    tier = vmmpp::erased::make_host_tier(prefix.cache, prefix.prefix, blocks, st);
                }
                new (self) py_tier{prefix.cache, std::move(tier)};
            },
            "prefix_cache"_a, nb::kw_only(), "max_blocks"_a, "stream"_a = nb::none())
        .def(
            "attach",
            [](const py_tier& self, nb::handle tokens, nb::handle extra, nb::handle stream) {
                tier_base& t = self.get();
                const auto tk = to_ints<std::int32_t>(tokens, "tokens");
                const auto e = to_ints<std::uint64_t>(extra, "extra");
                const cudaStream_t st = to_stream(stream);
                const vmmpp::tiered_sequence a = locked(*self.cache, [&] { return t.attach(tk, e, st); });
                return nb::make_tuple(a.seq, a.cached_tokens, a.host_tokens);
            },
            "tokens"_a, "extra"_a = nb::tuple(), "stream"_a = nb::none(), "(seq, cached_tokens, host_tokens).")
        .def(
            "lookup",
            [](const py_tier& self, nb::handle tokens, nb::handle extra) {
                tier_base& t = self.get();
                const auto tk = to_ints<std::int32_t>(tokens, "tokens");
                const auto e = to_ints<std::uint64_t>(extra, "extra");
                return locked(*self.cache, [&] { return t.lookup(tk, e); });
            },
            "tokens"_a, "extra"_a = nb::tuple(), "(gpu_tokens, host_tokens).")
        .def(
            "swap_out",
            [](const py_tier& self, nb::handle seq, nb::handle stream) {
                tier_base& t = self.get();
                const auto s = to_int<vmmpp::seq_id>(seq, "seq");
                const cudaStream_t st = to_stream(stream);
                return locked(*self.cache, [&] { return t.swap_out(s, st); });
            },
            "seq"_a, "stream"_a = nb::none(), "Swaps seq out to host blocks; returns the swap id (TierFull: no room).")
        .def(
            "swap_in",
            [](const py_tier& self, nb::handle id, nb::handle stream) {
                tier_base& t = self.get();
                const auto swap_id = to_int<std::uint64_t>(id, "swap_id");
                const cudaStream_t st = to_stream(stream);
                return locked(*self.cache, [&] { return t.swap_in(swap_id, st); });
            },
            "swap_id"_a, "stream"_a = nb::none(), "A new sequence with the swapped-out tokens.")
        .def(
            "drop_swapped",
            [](const py_tier& self, nb::handle id) {
                tier_base& t = self.get();
                const auto swap_id = to_int<std::uint64_t>(id, "swap_id");
                locked(*self.cache, [&] { t.drop_swapped(swap_id); });
            },
            "swap_id"_a)
        .def(
            "swapped_tokens",
            [](const py_tier& self, nb::handle id) {
                tier_base& t = self.get();
                const auto swap_id = to_int<std::uint64_t>(id, "swap_id");
                return locked(*self.cache, [&] { return t.swapped_tokens(swap_id); });
            },
            "swap_id"_a)
        .def(
            "store_ahead",
            [](const py_tier& self, nb::handle n) {
                tier_base& t = self.get();
                const auto blocks = to_int<std::size_t>(n, "max_blocks");
                return locked(*self.cache, [&] { return t.store_ahead(blocks); });
            },
            "max_blocks"_a)
        .def("synchronize",
             [](const py_tier& self) {
                 tier_base& t = self.get();
                 waiting(*self.cache, [&] { t.synchronize(); });
             })
        .def("idle",
             [](const py_tier& self) {
                 tier_base& t = self.get();
                 return locked(*self.cache, [&] { return t.idle(); });
             })
        .def(
            "stream_waits_for_copies",
            [](const py_tier& self, nb::handle stream) {
                tier_base& t = self.get();
                const cudaStream_t st = to_stream(stream);
                locked(*self.cache, [&] { t.stream_waits_for_copies(st); });
            },
            "stream"_a)
        .def("stats", [](const py_tier& self) {
            tier_base& t = self.get();
            const vmmpp::host_tier_stats s = locked(*self.cache, [&] { return t.stats(); });
            nb::dict d;
            d["offloaded_blocks"] = s.offloaded_blocks;
            d["stored_ahead_blocks"] = s.stored_ahead_blocks;
            d["dropped_blocks"] = s.dropped_blocks;
            d["loaded_blocks"] = s.loaded_blocks;
            d["host_hits"] = s.host_hits;
            d["evicted_blocks"] = s.evicted_blocks;
            d["swapped_out"] = s.swapped_out;
            d["swapped_in"] = s.swapped_in;
            d["bytes_to_host"] = s.bytes_to_host;
            d["bytes_to_device"] = s.bytes_to_device;
            d["keyed_blocks"] = s.keyed_blocks;
            d["swapped_blocks"] = s.swapped_blocks;
            d["free_blocks"] = s.free_blocks;
            d["max_blocks"] = s.max_blocks;
            return d;
        });
}
