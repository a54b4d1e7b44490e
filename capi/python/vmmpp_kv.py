"""vmmpp_kv: a vmmpp KV cache from Python, through the C ABI of vmmpp_kv_capi.h (ctypes).

    cache = vmmpp_kv.KVCache(layers=2, kv_heads=4, head_dim=64, max_blocks=256,
                             dtype="f16", config="elastic")      # or config="host": no GPU
    seq = cache.add_sequence()
    cache.append(seq, 37)
    slots = cache.slot_mapping(seq)                  # array('q'): block * block_tokens + offset
    k0 = torch.from_dlpack(cache.key(0))             # [max_blocks, block_tokens, kv_heads, head_dim]
    k0[slots // 16, slots % 16] = new_keys           # (slots as a tensor)

The library is VMMPP_KV_LIB (a build puts it in <build>/interop/libvmmpp_kv_capi.so), or
libvmmpp_kv_capi.so beside this file. Nothing here needs
NumPy or PyTorch. An exported tensor is a view of the cache: only blocks of live sequences are
backed by memory; touching any other block faults (see vmmpp/interop/dlpack.hpp). Exports keep
the cache alive after close().
"""
import array
import collections
import ctypes
import os
import re

DTYPES = {"f32": 0, "f16": 1, "bf16": 2, "fp8_e4m3": 3, "fp8_e5m2": 4}
KEY, VALUE = 0, 1
# DLPack device types (DLDeviceType)
KDL_CPU, KDL_CUDA, KDL_CUDA_HOST, KDL_CUDA_MANAGED = 1, 2, 3, 13
STATUS = {0: "ok", 1: "invalid_argument", 2: "out_of_memory", 3: "over_quota", 4: "out_of_blocks",
          5: "cuda_error", 6: "cuda_unavailable", 7: "error", 8: "out_of_sequence_slots", 9: "tier_full"}
# The layouts, as vmmpp::kv_layouts (vmmpp/kv/layout_list.hpp) lists them, kv_cache's default
# first. Spelled here so that it is known without loading the library; layout_names() asks the
# library, and capi/tests/test_kv_dlpack.py checks that the two agree.
LAYOUTS = ("block_major", "block_major_hnd", "layer_major", "layer_major_hnd", "packed_kv", "mla",
           "sequence_contiguous")
DEFAULT_LAYOUT = LAYOUTS[0]
# The named configurations, as vmmpp::named_configs (vmmpp/config_list.hpp) lists them, and those
# a process budget takes (the ones under a shared budget, and host). Spelled here too;
# config_names() and process_budget_config_names() ask the library, and
# capi/tests/test_kv_dlpack.py checks that they agree.
CONFIGS = ("static", "elastic", "elastic_mapped_ahead", "elastic_page", "gh200", "host")
PROCESS_BUDGET_CONFIGS = ("elastic", "elastic_mapped_ahead", "elastic_page", "host")
# Older names the library still accepts: alias -> the name in CONFIGS.
CONFIG_ALIASES = {"elastic_pages": "elastic_page"}


class VmmppError(RuntimeError):
    """A failed vmmpp call: `status` names the vmmpp error type (see STATUS)."""

    def __init__(self, status, message):
        super().__init__(f"{STATUS.get(status, status)}: {message}")
        self.status = STATUS.get(status, str(status))


class OutOfBlocks(VmmppError):
    """The cache has no free block id (status "out_of_blocks")."""


class OverQuota(VmmppError):
    """The budget refused the memory (status "over_quota")."""


class OutOfMemory(VmmppError):
    """The device or host refused the memory (status "out_of_memory")."""


class TierFull(VmmppError):
    """A host tier has no room for a swap-out (status "tier_full"): `needed` host blocks, `free`
    free or evictable of `max_blocks` (the rest hold swapped-out sequences). Nothing changed."""

    def __init__(self, status, message):
        super().__init__(status, message)
        # vmmpp::tier_full's message: "... N host blocks needed, F free or evictable of M (...)"
        m = re.search(r"(\d+) host blocks needed, (\d+) free or evictable of (\d+)", message)
        self.needed, self.free, self.max_blocks = (int(x) for x in m.groups()) if m else (None, None, None)


# The refusals of memory an engine answers by preempting or waiting; their status names.
REFUSALS = (OutOfBlocks, OverQuota, OutOfMemory)
_ERRORS = {"out_of_blocks": OutOfBlocks, "over_quota": OverQuota, "out_of_memory": OutOfMemory, "tier_full": TierFull}


class Geometry(ctypes.Structure):
    _fields_ = [("layers", ctypes.c_uint32), ("kv_heads", ctypes.c_uint32), ("head_dim", ctypes.c_uint32),
                ("dtype", ctypes.c_int32), ("block_tokens", ctypes.c_uint32), ("max_blocks", ctypes.c_uint32),
                ("max_tokens_per_sequence", ctypes.c_uint32)]


class Stats(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "reserved_bytes", "committed_bytes", "used_blocks", "free_blocks", "sequences", "cow_copies")]


class BudgetStats(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("limit", "committed", "peak", "denied")]


class Extent(ctypes.Structure):
    _fields_ = [("offset", ctypes.c_uint64), ("bytes", ctypes.c_uint64), ("commit", ctypes.c_uint64)]


class Range(ctypes.Structure):
    _fields_ = [("offset", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


class PiecePair(ctypes.Structure):
    _fields_ = [("local_offset", ctypes.c_uint64), ("remote_offset", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


class BlockKey(ctypes.Structure):
    _fields_ = [("hi", ctypes.c_uint64), ("lo", ctypes.c_uint64)]


class PrefixStats(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "hits", "misses", "evictions", "cached_blocks", "cached_bytes", "evictable_blocks", "evictable_bytes",
        "committed_bytes", "packed_floor_bytes")] + [("idle_footprint_ratio", ctypes.c_double),
                                                     ("block_bytes", ctypes.c_uint64)]


class TierStats(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "offloaded_blocks", "dropped_blocks", "loaded_blocks", "host_hits", "evicted_blocks", "swapped_out",
        "swapped_in", "bytes_to_host", "bytes_to_device", "keyed_blocks", "swapped_blocks", "free_blocks",
        "max_blocks", "stored_ahead_blocks")]


class LendingStats(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("lends", "lent_blocks", "lent_bytes", "busy")]


class PrefixEvent(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("block", ctypes.c_int32), ("key_hi", ctypes.c_uint64),
                ("key_lo", ctypes.c_uint64), ("parent_hi", ctypes.c_uint64), ("parent_lo", ctypes.c_uint64)]


_lib = None


def load_library(path=None):
    """The C ABI library (loaded once per process)."""
    global _lib
    if _lib is not None:
        return _lib
    path = path or os.environ.get("VMMPP_KV_LIB") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "libvmmpp_kv_capi.so")
    lib = ctypes.CDLL(path)
    u32, i32, u64, i64, p = ctypes.c_uint32, ctypes.c_int32, ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p
    handle = ctypes.c_void_p
    signatures = {
        "vmmpp_kv_last_error": ([], ctypes.c_char_p),
        "vmmpp_kv_layout_names": ([], ctypes.c_char_p),
        "vmmpp_kv_config_names": ([], ctypes.c_char_p),
        "vmmpp_kv_process_budget_config_names": ([], ctypes.c_char_p),
        "vmmpp_kv_create": ([ctypes.POINTER(Geometry), ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, u64,
                             ctypes.POINTER(handle)], ctypes.c_int),
        "vmmpp_kv_destroy": ([handle], None),
        "vmmpp_kv_add_sequence": ([handle, ctypes.POINTER(u64)], ctypes.c_int),
        "vmmpp_kv_append": ([handle, u64, u64, ctypes.POINTER(u64)], ctypes.c_int),
        "vmmpp_kv_fork": ([handle, u64, ctypes.POINTER(u64)], ctypes.c_int),
        "vmmpp_kv_truncate": ([handle, u64, u64], ctypes.c_int),
        "vmmpp_kv_free": ([handle, u64], ctypes.c_int),
        "vmmpp_kv_truncate_on_stream": ([handle, u64, u64, ctypes.c_void_p], ctypes.c_int),
        "vmmpp_kv_free_on_stream": ([handle, u64, ctypes.c_void_p], ctypes.c_int),
        "vmmpp_kv_tokens": ([handle, u64, ctypes.POINTER(u64)], ctypes.c_int),
        "vmmpp_kv_stats_get": ([handle, ctypes.POINTER(Stats)], ctypes.c_int),
        "vmmpp_kv_slot_mapping": ([handle, u64, u64, u64, ctypes.POINTER(i64)], ctypes.c_int),
        "vmmpp_kv_block_table": ([handle, u64, ctypes.POINTER(i32), u64, ctypes.POINTER(u64)], ctypes.c_int),
        "vmmpp_kv_pack_block_tables": ([handle, ctypes.POINTER(u64), u64, u64, i32, ctypes.POINTER(i32)],
                                       ctypes.c_int),
        "vmmpp_kv_address": ([handle, u32, i32, i32, ctypes.POINTER(p)], ctypes.c_int),
        "vmmpp_kv_synchronize": ([handle], ctypes.c_int),
        "vmmpp_kv_trim": ([handle, ctypes.POINTER(ctypes.c_uint64)], ctypes.c_int),
        "vmmpp_kv_dlpack_device": ([handle, ctypes.c_int, ctypes.POINTER(i32), ctypes.POINTER(i32)], ctypes.c_int),
        "vmmpp_kv_export": ([handle, u32, i32, ctypes.c_int, ctypes.c_int, ctypes.POINTER(p)], ctypes.c_int),
        "vmmpp_kv_sequence_tensor": ([handle, u64, u32, i32, ctypes.POINTER(p), ctypes.POINTER(i64),
                                      ctypes.POINTER(i64)], ctypes.c_int),
        "vmmpp_kv_export_sequence": ([handle, u64, u32, i32, ctypes.c_int, ctypes.c_int, ctypes.POINTER(p)],
                                     ctypes.c_int),
        "vmmpp_dlpack_release": ([p, ctypes.c_int], None),
        "vmmpp_dlpack_capsule_name": ([ctypes.c_int], p),  # the static C string itself, not a copy
        "vmmpp_kv_live_exports": ([], u64),
        "vmmpp_kv_write_test_pattern": ([handle, u64, u64, u64], ctypes.c_int),
        "vmmpp_kv_create_in_process_budget": ([ctypes.POINTER(Geometry), ctypes.c_char_p, ctypes.c_char_p,
                                               ctypes.c_int, ctypes.c_char_p, u64, ctypes.c_char_p, u64,
                                               ctypes.POINTER(handle)], ctypes.c_int),
        "vmmpp_kv_process_budget_stats": ([ctypes.c_char_p, ctypes.POINTER(BudgetStats)], ctypes.c_int),
        "vmmpp_kv_process_budget_remove": ([ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)], ctypes.c_int),
        "vmmpp_kv_create_with_peers": ([ctypes.POINTER(Geometry), ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, u64,
                                        ctypes.POINTER(ctypes.c_int), u64, ctypes.POINTER(handle)], ctypes.c_int),
        "vmmpp_kv_span": ([handle, ctypes.POINTER(p), ctypes.POINTER(u64), ctypes.POINTER(i32)], ctypes.c_int),
        "vmmpp_kv_committed_extents": ([handle, ctypes.POINTER(Extent), u64, ctypes.POINTER(u64)], ctypes.c_int),
        "vmmpp_kv_block_pieces": ([handle, ctypes.POINTER(i32), u64, ctypes.POINTER(Range), u64, ctypes.POINTER(u64)],
                                  ctypes.c_int),
        "vmmpp_pair_pieces": ([ctypes.POINTER(Range), u64, ctypes.POINTER(Range), u64, ctypes.POINTER(PiecePair), u64,
                               ctypes.POINTER(u64)], ctypes.c_int),
        "vmmpp_kv_copy_blocks": ([handle, ctypes.POINTER(i32), handle, ctypes.POINTER(i32), u64, p], ctypes.c_int),
        "vmmpp_kv_send_shared_pages": ([handle, ctypes.c_int], ctypes.c_int),
        "vmmpp_import_pages": ([ctypes.c_int, ctypes.c_int, ctypes.POINTER(handle)], ctypes.c_int),
        "vmmpp_imported_pages_span": ([handle, ctypes.POINTER(p), ctypes.POINTER(u64), ctypes.POINTER(u64)],
                                      ctypes.c_int),
        "vmmpp_imported_pages_destroy": ([handle], None),
        "vmmpp_copy_piece_pairs": ([p, p, ctypes.POINTER(PiecePair), u64, p, ctypes.c_int], ctypes.c_int),
        "vmmpp_kv_prefix_create": ([handle, u64, ctypes.c_int, ctypes.POINTER(handle)], ctypes.c_int),
        "vmmpp_kv_prefix_create_lending": ([handle, u64, ctypes.c_int, ctypes.POINTER(handle)], ctypes.c_int),
        "vmmpp_kv_prefix_lending_stats_get": ([handle, ctypes.POINTER(LendingStats)], ctypes.c_int),
        "vmmpp_kv_prefix_destroy": ([handle], None),
        "vmmpp_kv_prefix_publish": ([handle, u64, ctypes.POINTER(i32), u64, ctypes.POINTER(u64), u64,
                                     ctypes.POINTER(u64)], ctypes.c_int),
        "vmmpp_kv_prefix_lookup": ([handle, ctypes.POINTER(i32), u64, ctypes.POINTER(u64), u64, ctypes.POINTER(u64)],
                                   ctypes.c_int),
        "vmmpp_kv_prefix_attach": ([handle, ctypes.POINTER(i32), u64, ctypes.POINTER(u64), u64, ctypes.POINTER(u64),
                                    ctypes.POINTER(u64)], ctypes.c_int),
        "vmmpp_kv_prefix_attach_on_stream": ([handle, ctypes.POINTER(i32), u64, ctypes.POINTER(u64), u64, p,
                                              ctypes.POINTER(u64), ctypes.POINTER(u64)], ctypes.c_int),
        "vmmpp_kv_prefix_append": ([handle, u64, u64, ctypes.POINTER(u64)], ctypes.c_int),
        "vmmpp_kv_prefix_append_on_stream": ([handle, u64, u64, p, ctypes.POINTER(u64)], ctypes.c_int),
        "vmmpp_kv_prefix_free": ([handle, u64], ctypes.c_int),
        "vmmpp_kv_prefix_free_on_stream": ([handle, u64, p], ctypes.c_int),
        "vmmpp_kv_prefix_evict": ([handle, u64, ctypes.POINTER(i32), ctypes.POINTER(BlockKey), u64,
                                   ctypes.POINTER(u64), ctypes.POINTER(u64)], ctypes.c_int),
        "vmmpp_kv_prefix_evict_bytes": ([handle, u64, ctypes.POINTER(i32), ctypes.POINTER(BlockKey), u64,
                                         ctypes.POINTER(u64), ctypes.POINTER(u64)], ctypes.c_int),
        "vmmpp_kv_prefix_clear": ([handle, ctypes.POINTER(i32), ctypes.POINTER(BlockKey), u64, ctypes.POINTER(u64),
                                   ctypes.POINTER(u64)], ctypes.c_int),
        "vmmpp_kv_prefix_stats_get": ([handle, ctypes.POINTER(PrefixStats)], ctypes.c_int),
        "vmmpp_kv_prefix_drain_events": ([handle, ctypes.POINTER(PrefixEvent), u64, ctypes.POINTER(u64),
                                          ctypes.POINTER(u64)], ctypes.c_int),
        "vmmpp_kv_tier_create": ([handle, u64, p, ctypes.POINTER(handle)], ctypes.c_int),
        "vmmpp_kv_tier_destroy": ([handle], None),
        "vmmpp_kv_tier_attach": ([handle, ctypes.POINTER(i32), u64, ctypes.POINTER(u64), u64, p, ctypes.POINTER(u64),
                                  ctypes.POINTER(u64), ctypes.POINTER(u64)], ctypes.c_int),
        "vmmpp_kv_tier_lookup": ([handle, ctypes.POINTER(i32), u64, ctypes.POINTER(u64), u64, ctypes.POINTER(u64),
                                  ctypes.POINTER(u64)], ctypes.c_int),
        "vmmpp_kv_tier_swap_out": ([handle, u64, p, ctypes.POINTER(u64)], ctypes.c_int),
        "vmmpp_kv_tier_swap_in": ([handle, u64, p, ctypes.POINTER(u64)], ctypes.c_int),
        "vmmpp_kv_tier_drop_swapped": ([handle, u64], ctypes.c_int),
        "vmmpp_kv_tier_swapped_tokens": ([handle, u64, ctypes.POINTER(u64)], ctypes.c_int),
        "vmmpp_kv_tier_synchronize": ([handle], ctypes.c_int),
        "vmmpp_kv_tier_store_ahead": ([handle, ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64)], ctypes.c_int),
        "vmmpp_kv_tier_idle": ([handle, ctypes.POINTER(ctypes.c_int)], ctypes.c_int),
        "vmmpp_kv_tier_stream_waits_for_copies": ([handle, p], ctypes.c_int),
        "vmmpp_kv_tier_stats_get": ([handle, ctypes.POINTER(TierStats)], ctypes.c_int),
    }
    missing = [name for name in signatures if not hasattr(lib, name)]
    if missing:  # a library older (or newer) than this module: say so, not an AttributeError later
        raise VmmppError("library_mismatch", f"{path} lacks {len(missing)} of this module's {len(signatures)} functions "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): the library "
                         f"and capi/python/vmmpp_kv.py come from different versions; rebuild vmmpp_kv_capi")
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = restype
    _lib = lib
    return lib


def layout_names(library=None):
    """The layouts the library accepts (vmmpp::kv_layouts), its default first."""
    return tuple(load_library(library).vmmpp_kv_layout_names().decode().split(","))


def config_names(library=None):
    """The configurations KVCache accepts (vmmpp::named_configs), in vmmpp/config.hpp's order;
    the aliases of CONFIG_ALIASES are accepted too."""
    return tuple(load_library(library).vmmpp_kv_config_names().decode().split(","))


def process_budget_config_names(library=None):
    """The configurations ProcessBudgetCache accepts (and the aliases of CONFIG_ALIASES)."""
    return tuple(load_library(library).vmmpp_kv_process_budget_config_names().decode().split(","))


def _check(status):
    if status != 0:
        raise _ERRORS.get(STATUS.get(status), VmmppError)(status, _lib.vmmpp_kv_last_error().decode(errors="replace"))


# PyCapsule_New(pointer, name, destructor) of the running interpreter. The name and the
# destructor come from the C library, so they outlive every capsule.
_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
_capsule_new.restype = ctypes.py_object


def _capsule(pointer, versioned):
    lib = _lib
    name = lib.vmmpp_dlpack_capsule_name(1 if versioned else 0)
    destructor = ctypes.cast(lib.vmmpp_dlpack_capsule_destructor, ctypes.c_void_p)
    try:
        return _capsule_new(pointer, name, destructor)
    except BaseException:
        lib.vmmpp_dlpack_release(pointer, 1 if versioned else 0)
        raise


def test_pattern(seq, token, layer, part, head, dim):
    """The value vmmpp_kv_write_test_pattern writes (an integer, exact in f32, f16 and bf16)."""
    return (seq * 37 + token * 7 + layer * 131 + part * 61 + head * 17 + dim * 3) % 251


class KVTensor:
    """One layer's K or V: a DLPack producer (__dlpack__, __dlpack_device__), for
    torch.from_dlpack, numpy.from_dlpack, cupy.from_dlpack... Each __dlpack__ call makes a new
    export; consumers view the cache's memory in place."""

    def __init__(self, cache, layer, part, managed_as_cuda=False):
        self._cache = cache
        self.layer = layer
        self.part = part
        self.managed_as_cuda = managed_as_cuda
        self.last_capsule_versioned = None  # what the last __dlpack__ returned (for tests)

    def __dlpack_device__(self):
        return self._cache.dlpack_device(self.managed_as_cuda)

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        if copy:
            raise BufferError("vmmpp exports views of the KV cache; copy=True is not supported")
        device = self.__dlpack_device__()
        if dl_device is not None and tuple(dl_device) != device:
            raise BufferError(f"the KV cache is on DLPack device {device}, not {tuple(dl_device)}")
        if stream is not None and stream != -1 and device[0] != KDL_CPU:
            # The cache's own device work (copy-on-write) is on its stream: finish it, so the
            # consumer's stream sees it whatever stream that is.
            self._cache.synchronize()
        versioned = max_version is not None and tuple(max_version)[0] >= 1
        pointer = ctypes.c_void_p()
        self._export(versioned, pointer)
        capsule = _capsule(pointer, versioned)
        self.last_capsule_versioned = versioned
        return capsule

    def _export(self, versioned, pointer):
        _check(_lib.vmmpp_kv_export(self._cache._handle_or_raise(), self.layer, self.part, 1 if versioned else 0,
                                    1 if self.managed_as_cuda else 0, ctypes.byref(pointer)))


class SequenceTensor(KVTensor):
    """sequence_contiguous: one sequence's K or V of a layer as a dense [1, tokens, kv_heads,
    head_dim] run (a DLPack producer like KVTensor). The shape is the sequence's token count when
    __dlpack__ is called: export again after appending."""

    def __init__(self, cache, seq, layer, part, managed_as_cuda=False):
        super().__init__(cache, layer, part, managed_as_cuda)
        self.seq = seq

    def _export(self, versioned, pointer):
        _check(_lib.vmmpp_kv_export_sequence(self._cache._handle_or_raise(), self.seq, self.layer, self.part,
                                             1 if versioned else 0, 1 if self.managed_as_cuda else 0,
                                             ctypes.byref(pointer)))


class _OwnedHandle:
    """A C handle freed once, by `_destroy` (a C ABI function's name): on close(), on leaving a
    `with` block, or when the object is collected."""
    _destroy = None

    def close(self):
        if self._handle is not None:
            getattr(_lib, self._destroy)(self._handle)
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_handle", None) is not None and _lib is not None:
            self.close()


class KVCache(_OwnedHandle):
    """A vmmpp::kv_cache. config: one of CONFIGS (or an alias of CONFIG_ALIASES): "host" (no
    GPU; under a budget of budget_bytes when it is not 0), "elastic", "elastic_mapped_ahead",
    "elastic_page" (vmm, under a budget of budget_bytes, 0: the whole span), "static"
    (cudaMalloc), "gh200" (managed; these two refuse budget_bytes); layout: one of LAYOUTS, block_major (kv_cache's
    default) unless given (sequence_contiguous needs max_tokens_per_sequence)."""

    def __init__(self, *, layers, kv_heads, head_dim, max_blocks, dtype="f16", block_tokens=16, config="host",
                 layout=DEFAULT_LAYOUT, device=0, budget_bytes=0, max_tokens_per_sequence=0, peers=(), library=None):
        lib = load_library(library)
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        self.geometry = Geometry(layers, kv_heads, head_dim, DTYPES[dtype], block_tokens, max_blocks,
                                 max_tokens_per_sequence)
        self.dtype = dtype
        self.config = config
        self.layout = layout
        self._handle = None
        handle = ctypes.c_void_p()
        peer_ids = (ctypes.c_int * max(1, len(peers)))(*peers)
        _check(lib.vmmpp_kv_create_with_peers(ctypes.byref(self.geometry), config.encode(), layout.encode(), device,
                                              budget_bytes, peer_ids, len(peers), ctypes.byref(handle)))
        self._handle = handle

    # close() drops the handle; exports still alive keep the cache's memory.
    _destroy = "vmmpp_kv_destroy"

    def _handle_or_raise(self):
        if self._handle is None:
            raise ValueError("the KV cache is closed")
        return self._handle

    # --- the scheduler's operations ---
    def add_sequence(self):
        seq = ctypes.c_uint64()
        _check(_lib.vmmpp_kv_add_sequence(self._handle_or_raise(), ctypes.byref(seq)))
        return seq.value

    def append(self, seq, n_tokens):
        """Appends n_tokens tokens; returns the index of the first new one."""
        first = ctypes.c_uint64()
        _check(_lib.vmmpp_kv_append(self._handle_or_raise(), seq, n_tokens, ctypes.byref(first)))
        return first.value

    def fork(self, seq):
        child = ctypes.c_uint64()
        _check(_lib.vmmpp_kv_fork(self._handle_or_raise(), seq, ctypes.byref(child)))
        return child.value

    def truncate(self, seq, n_tokens, stream=None):
        """Keeps the first n_tokens tokens. `stream` (a cudaStream_t as an int, e.g.
        torch.cuda.current_stream().cuda_stream): the dropped blocks' memory goes back only once the
        work queued on it has completed; None: the legacy default stream's work."""
        if stream is None:
            _check(_lib.vmmpp_kv_truncate(self._handle_or_raise(), seq, n_tokens))
        else:
            _check(_lib.vmmpp_kv_truncate_on_stream(self._handle_or_raise(), seq, n_tokens, ctypes.c_void_p(stream)))

    def free(self, seq, stream=None):
        """Frees the sequence; `stream` as for truncate (the kernels that still read its blocks)."""
        if stream is None:
            _check(_lib.vmmpp_kv_free(self._handle_or_raise(), seq))
        else:
            _check(_lib.vmmpp_kv_free_on_stream(self._handle_or_raise(), seq, ctypes.c_void_p(stream)))

    def tokens(self, seq):
        n = ctypes.c_uint64()
        _check(_lib.vmmpp_kv_tokens(self._handle_or_raise(), seq, ctypes.byref(n)))
        return n.value

    def stats(self):
        s = Stats()
        _check(_lib.vmmpp_kv_stats_get(self._handle_or_raise(), ctypes.byref(s)))
        return {name: getattr(s, name) for name, _ in Stats._fields_}

    # --- what kernels read ---
    def slot_mapping(self, seq, first=0, count=None):
        """array('q') of the slots of tokens [first, first + count) (default: to the end)."""
        if count is None:
            count = self.tokens(seq) - first
        out = array.array("q", bytes(8 * count))
        pointer = (ctypes.c_int64 * count).from_buffer(out) if count else None
        _check(_lib.vmmpp_kv_slot_mapping(self._handle_or_raise(), seq, first, count, pointer))
        return out

    def block_table(self, seq):
        """array('i') of the sequence's block ids, in token order."""
        count = ctypes.c_uint64()
        _check(_lib.vmmpp_kv_block_table(self._handle_or_raise(), seq, None, 0, ctypes.byref(count)))
        n = count.value
        out = array.array("i", bytes(4 * n))
        if n:
            _check(_lib.vmmpp_kv_block_table(self._handle_or_raise(), seq, (ctypes.c_int32 * n).from_buffer(out), n,
                                             ctypes.byref(count)))
        return out

    def pack_block_tables(self, seqs, max_blocks_per_seq, pad=0):
        """array('i') of a row-major [len(seqs), max_blocks_per_seq] block-table matrix."""
        seqs = list(seqs)
        n = len(seqs) * max_blocks_per_seq
        out = array.array("i", bytes(4 * n))
        ids = (ctypes.c_uint64 * len(seqs))(*seqs)
        _check(_lib.vmmpp_kv_pack_block_tables(self._handle_or_raise(), ids, len(seqs), max_blocks_per_seq, pad,
                                               (ctypes.c_int32 * n).from_buffer(out) if n else None))
        return out

    def address(self, layer, part, block):
        out = ctypes.c_void_p()
        _check(_lib.vmmpp_kv_address(self._handle_or_raise(), layer, part, block, ctypes.byref(out)))
        return out.value or 0

    def synchronize(self):
        """Waits for the cache's own device work and for the GPU work that freed memory waits
        for; that memory goes back (blocks, as cudaFree would)."""
        _check(_lib.vmmpp_kv_synchronize(self._handle_or_raise()))

    def trim(self):
        """Gives back every committed page no block holds, the spares an elastic cache keeps for
        its next growth included; returns the bytes."""
        freed = ctypes.c_uint64()
        _check(_lib.vmmpp_kv_trim(self._handle_or_raise(), ctypes.byref(freed)))
        return freed.value

    def dlpack_device(self, managed_as_cuda=False):
        device_type, device_id = ctypes.c_int32(), ctypes.c_int32()
        _check(_lib.vmmpp_kv_dlpack_device(self._handle_or_raise(), 1 if managed_as_cuda else 0,
                                           ctypes.byref(device_type), ctypes.byref(device_id)))
        return (device_type.value, device_id.value)

    def tensor(self, layer, part, managed_as_cuda=False):
        return KVTensor(self, layer, part, managed_as_cuda)

    def key(self, layer, managed_as_cuda=False):
        return KVTensor(self, layer, KEY, managed_as_cuda)

    def value(self, layer, managed_as_cuda=False):
        return KVTensor(self, layer, VALUE, managed_as_cuda)

    def sequence(self, seq, layer, part, managed_as_cuda=False):
        """sequence_contiguous: seq's K (part 0) or V (part 1) of `layer` as a dense run (DLPack)."""
        return SequenceTensor(self, seq, layer, part, managed_as_cuda)

    def sequence_tensor(self, seq, layer, part):
        """sequence_contiguous: (address, shape, strides in elements) of seq's dense run."""
        data = ctypes.c_void_p()
        shape, strides = (ctypes.c_int64 * 4)(), (ctypes.c_int64 * 4)()
        _check(_lib.vmmpp_kv_sequence_tensor(self._handle_or_raise(), seq, layer, part, ctypes.byref(data),
                                             shape, strides))
        return data.value or 0, tuple(shape), tuple(strides)

    # --- moving blocks (vmmpp/interop/nixl.hpp) ---
    def span(self):
        """(base address, capacity in bytes, device; -1 for host memory) of the cache's span."""
        base, capacity, device = ctypes.c_void_p(), ctypes.c_uint64(), ctypes.c_int32()
        _check(_lib.vmmpp_kv_span(self._handle_or_raise(), ctypes.byref(base), ctypes.byref(capacity),
                                  ctypes.byref(device)))
        return base.value or 0, capacity.value, device.value

    def committed_extents(self):
        """[(offset, bytes, commit)] of the pool's committed extents, lowest offset first: the
        regions a transfer engine registers (one physical handle each on vmm)."""
        handle = self._handle_or_raise()
        extents = _read_list(Extent, lambda out, cap, count: _lib.vmmpp_kv_committed_extents(handle, out, cap, count))
        return [(e.offset, e.bytes, e.commit) for e in extents]

    def block_pieces(self, blocks):
        """[(offset, bytes)] holding `blocks` (live ids), in list order, each inside one extent."""
        ids = (ctypes.c_int32 * max(1, len(blocks)))(*blocks)
        return [(r.offset, r.bytes) for r in _read_list(Range, lambda out, cap, count: _lib.vmmpp_kv_block_pieces(
            self._handle_or_raise(), ids, len(blocks), out, cap, count))]

    def send_shared_pages(self, socket_fd):
        """vmm configurations: sends every committed handle over a connected Unix socket."""
        _check(_lib.vmmpp_kv_send_shared_pages(self._handle_or_raise(), socket_fd))

    def write_test_pattern(self, seq, first=0, count=None):
        """Writes test_pattern values for tokens [first, first + count) (host-accessible caches)."""
        if count is None:
            count = self.tokens(seq) - first
        _check(_lib.vmmpp_kv_write_test_pattern(self._handle_or_raise(), seq, first, count))


class ProcessBudgetCache(KVCache):
    """A KVCache whose memory is charged to model `model` (limit model_limit_bytes) of the
    cross-process budget `budget_name` (created with global_limit_bytes if none exists, joined
    otherwise). config: one of PROCESS_BUDGET_CONFIGS, "elastic", "elastic_mapped_ahead",
    "elastic_page" (vmm; alias "elastic_pages") or "host"; a refused commit raises
    VmmppError with status "over_quota"."""

    def __init__(self, *, layers, kv_heads, head_dim, max_blocks, budget_name, model, model_limit_bytes,
                 global_limit_bytes=0, dtype="f16", block_tokens=16, config="elastic", layout=DEFAULT_LAYOUT,
                 device=0, library=None):
        lib = load_library(library)
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        self.geometry = Geometry(layers, kv_heads, head_dim, DTYPES[dtype], block_tokens, max_blocks, 0)
        self.dtype = dtype
        self.config = config
        self.layout = layout
        self._handle = None
        handle = ctypes.c_void_p()
        _check(lib.vmmpp_kv_create_in_process_budget(ctypes.byref(self.geometry), config.encode(), layout.encode(),
                                                     device, budget_name.encode(), global_limit_bytes or model_limit_bytes,
                                                     model.encode(), model_limit_bytes, ctypes.byref(handle)))
        self._handle = handle


def process_budget_stats(budget_name):
    """{"limit", "committed", "peak", "denied"} of the process budget `budget_name`, over every process."""
    lib = load_library()
    s = BudgetStats()
    _check(lib.vmmpp_kv_process_budget_stats(budget_name.encode(), ctypes.byref(s)))
    return {name: getattr(s, name) for name, _ in BudgetStats._fields_}


def remove_process_budget(budget_name):
    """Unlinks the process budget `budget_name`; True if there was one."""
    lib = load_library()
    removed = ctypes.c_int()
    _check(lib.vmmpp_kv_process_budget_remove(budget_name.encode(), ctypes.byref(removed)))
    return bool(removed.value)


def _read_list(struct, call):
    """Items of a C call that fills out[capacity] and reports *count (asked twice if needed)."""
    count = ctypes.c_uint64()
    capacity = 64
    while True:
        out = (struct * capacity)()
        _check(call(out, capacity, ctypes.byref(count)))
        if count.value <= capacity:
            return list(out[:count.value])
        capacity = count.value


def pair_pieces(local, remote):
    """[(local_offset, remote_offset, bytes)]: two piece lists of the same bytes lined up."""
    a = (Range * max(1, len(local)))(*local)
    b = (Range * max(1, len(remote)))(*remote)
    return [(q.local_offset, q.remote_offset, q.bytes) for q in _read_list(
        PiecePair, lambda out, cap, count: load_library().vmmpp_pair_pieces(a, len(local), b, len(remote), out, cap,
                                                                            count))]


def copy_blocks(src, src_blocks, dst, dst_blocks, stream=None):
    """vmmpp::copy_blocks between two caches of one configuration and layout, on `stream`."""
    n = len(src_blocks)
    a = (ctypes.c_int32 * max(1, n))(*src_blocks)
    b = (ctypes.c_int32 * max(1, len(dst_blocks)))(*dst_blocks)
    if len(dst_blocks) != n:
        raise ValueError(f"{n} source blocks but {len(dst_blocks)} destination blocks")
    _check(load_library().vmmpp_kv_copy_blocks(src._handle_or_raise(), a, dst._handle_or_raise(), b, n,
                                               ctypes.c_void_p(stream)))


COPY_ONE_BY_ONE = 1


def copy_piece_pairs(local_base, remote_base, pairs, stream=None, one_by_one=False):
    """Queues the copies of [(local_offset, remote_offset, bytes)] on `stream`: one batch
    (cudaMemcpyBatchAsync), or one cudaMemcpyAsync each."""
    array_ = (PiecePair * max(1, len(pairs)))(*pairs)
    _check(load_library().vmmpp_copy_piece_pairs(ctypes.c_void_p(local_base), ctypes.c_void_p(remote_base), array_,
                                                 len(pairs), ctypes.c_void_p(stream),
                                                 COPY_ONE_BY_ONE if one_by_one else 0))


class ImportedPages(_OwnedHandle):
    """Another process's vmm pages (sent by KVCache.send_shared_pages) mapped here for `device`,
    at the owner's offsets. close() unmaps them, so the owner's memory can go back."""

    def __init__(self, socket_fd, device):
        lib = load_library()
        self._handle = None
        handle = ctypes.c_void_p()
        _check(lib.vmmpp_import_pages(socket_fd, device, ctypes.byref(handle)))
        self._handle = handle
        base, capacity, mapped = ctypes.c_void_p(), ctypes.c_uint64(), ctypes.c_uint64()
        _check(lib.vmmpp_imported_pages_span(handle, ctypes.byref(base), ctypes.byref(capacity), ctypes.byref(mapped)))
        self.base, self.capacity, self.mapped_bytes = base.value or 0, capacity.value, mapped.value

    _destroy = "vmmpp_imported_pages_destroy"


PREFIX_STORED, PREFIX_REMOVED = 0, 1
PREFIX_EVENT_KINDS = {PREFIX_STORED: "stored", PREFIX_REMOVED: "removed"}
NO_BOUND = 2**64 - 1  # max_cached_bytes of a PrefixCache without a bound


# What an eviction gave up: `blocks` (ids, in eviction order), `keys` ((hi, lo) each, in the same
# order) and `freed_page_bytes` (bytes of pool pages no live or cached block touches any more).
Eviction = collections.namedtuple("Eviction", ["blocks", "keys", "freed_page_bytes"])


def _int32s(values):
    values = list(values)
    return (ctypes.c_int32 * max(1, len(values)))(*values), len(values)


def _uint64s(values):
    values = list(values)
    return (ctypes.c_uint64 * max(1, len(values)))(*values), len(values)


class PrefixCache(_OwnedHandle):
    """vmmpp::prefix_cache over a KVCache (not sequence_contiguous): full blocks of requests kept
    by content key after their sequences end, so a request whose prompt starts the same way gets
    them back. Token ids are int32, extra keys (model revision, adapter, tenant salt) uint64.

        with vmmpp_kv.PrefixCache(cache, max_cached_bytes=64 << 20, record_events=True) as pc:
            seq = cache.add_sequence(); pc.append(seq, len(prompt))   # write the KV, then
            pc.publish(seq, prompt); pc.free(seq)                      # its full blocks stay cached
            seq, cached = pc.attach(prompt2)                            # cached leading tokens
            pc.append(seq, len(prompt2) - cached)

    It keeps the cache alive (close() the cache first if you like) and takes the cache's lock.
    One per cache. max_cached_bytes bounds the bytes of cached blocks no sequence holds (None: no
    bound). lend=True lends the cached blocks no sequence holds to the other models and processes
    of the cache's budget (a ProcessBudgetCache): one refused by the global limit evicts about
    what it needs of them, whole pages, before it gets over_quota; another process's request is
    served by this process's budget watcher with no call here. Live blocks are never lent. The
    reclaim evicts under the cache's lock, which every call here takes (vmmpp_kv_prefix_create_lending)."""

    def __init__(self, cache, *, max_cached_bytes=None, record_events=False, lend=False):
        lib = load_library()
        self._handle = None
        self.cache = cache
        self.max_blocks = cache.geometry.max_blocks  # no eviction gives up more
        handle = ctypes.c_void_p()
        create = lib.vmmpp_kv_prefix_create_lending if lend else lib.vmmpp_kv_prefix_create
        _check(create(cache._handle_or_raise(), NO_BOUND if max_cached_bytes is None else max_cached_bytes,
                      1 if record_events else 0, ctypes.byref(handle)))
        self._handle = handle

    _destroy = "vmmpp_kv_prefix_destroy"

    def _handle_or_raise(self):
        if self._handle is None:
            raise ValueError("the prefix cache is closed")
        return self._handle

    def publish(self, seq, tokens, extra=()):
        """Registers the full blocks among seq's first len(tokens) tokens (their KV written) under
        keys chained over `tokens` and `extra`; returns how many blocks were new."""
        t, n = _int32s(tokens)
        e, n_extra = _uint64s(extra)
        registered = ctypes.c_uint64()
        _check(_lib.vmmpp_kv_prefix_publish(self._handle_or_raise(), seq, t, n, e, n_extra, ctypes.byref(registered)))
        return registered.value

    def lookup(self, tokens, extra=()):
        """How many leading tokens of `tokens` are cached (whole blocks)."""
        t, n = _int32s(tokens)
        e, n_extra = _uint64s(extra)
        cached = ctypes.c_uint64()
        _check(_lib.vmmpp_kv_prefix_lookup(self._handle_or_raise(), t, n, e, n_extra, ctypes.byref(cached)))
        return cached.value

    def attach(self, tokens, extra=(), stream=None):
        """(seq, cached_tokens): a new sequence holding the cached leading blocks of `tokens`,
        to be read by work on `stream` (a cudaStream_t as an int; None: the legacy default
        stream): blocks compaction moved are read there only after their copies."""
        t, n = _int32s(tokens)
        e, n_extra = _uint64s(extra)
        seq, cached = ctypes.c_uint64(), ctypes.c_uint64()
        _check(_lib.vmmpp_kv_prefix_attach_on_stream(self._handle_or_raise(), t, n, e, n_extra,
                                                     ctypes.c_void_p(stream), ctypes.byref(seq), ctypes.byref(cached)))
        return seq.value, cached.value

    def append(self, seq, n_tokens, stream=None):
        """KVCache.append, evicting cached blocks no sequence holds when the cache refuses; returns
        the index of the first new token. `stream`: a cudaStream_t as an int, or None."""
        first = ctypes.c_uint64()
        if stream is None:
            _check(_lib.vmmpp_kv_prefix_append(self._handle_or_raise(), seq, n_tokens, ctypes.byref(first)))
        else:
            _check(_lib.vmmpp_kv_prefix_append_on_stream(self._handle_or_raise(), seq, n_tokens,
                                                         ctypes.c_void_p(stream), ctypes.byref(first)))
        return first.value

    def free(self, seq, stream=None):
        """KVCache.free, then the bound is kept (its cached blocks stay, up to max_cached_bytes)."""
        if stream is None:
            _check(_lib.vmmpp_kv_prefix_free(self._handle_or_raise(), seq))
        else:
            _check(_lib.vmmpp_kv_prefix_free_on_stream(self._handle_or_raise(), seq, ctypes.c_void_p(stream)))

    def _evict(self, call, capacity):
        blocks = (ctypes.c_int32 * max(1, capacity))()
        keys = (BlockKey * max(1, capacity))()
        count, freed = ctypes.c_uint64(), ctypes.c_uint64()
        _check(call(blocks, keys, capacity, ctypes.byref(count), ctypes.byref(freed)))
        n = count.value
        if n > capacity:  # cannot happen: no eviction gives up more than max_blocks
            raise RuntimeError(f"{n} blocks evicted, room for {capacity}")
        return Eviction(list(blocks[:n]), [(k.hi, k.lo) for k in keys[:n]], freed.value)

    def evict(self, n_blocks):
        """Evicts n_blocks cached blocks no sequence holds (or all there are): an Eviction."""
        handle = self._handle_or_raise()
        return self._evict(lambda b, k, cap, count, freed: _lib.vmmpp_kv_prefix_evict(handle, n_blocks, b, k, cap,
                                                                                      count, freed),
                           min(n_blocks, self.max_blocks))

    def evict_bytes(self, n_bytes):
        """Evicts whole page groups until n_bytes of pages hold no block (or none is left): an Eviction."""
        handle = self._handle_or_raise()
        return self._evict(lambda b, k, cap, count, freed: _lib.vmmpp_kv_prefix_evict_bytes(handle, n_bytes, b, k, cap,
                                                                                            count, freed),
                           self.max_blocks)

    def clear(self):
        """Evicts every cached block no sequence holds: an Eviction."""
        handle = self._handle_or_raise()
        return self._evict(lambda b, k, cap, count, freed: _lib.vmmpp_kv_prefix_clear(handle, b, k, cap, count, freed),
                           self.max_blocks)

    def stats(self):
        """{"hits", "misses", "evictions", "cached_blocks", "cached_bytes", "evictable_blocks",
        "evictable_bytes", "committed_bytes", "packed_floor_bytes", "idle_footprint_ratio",
        "block_bytes"}."""
        s = PrefixStats()
        _check(_lib.vmmpp_kv_prefix_stats_get(self._handle_or_raise(), ctypes.byref(s)))
        return {name: getattr(s, name) for name, _ in PrefixStats._fields_}

    def lending_stats(self):
        """{"lends", "lent_blocks", "lent_bytes", "busy"}: what lending gave others (zeros without lend)."""
        s = LendingStats()
        _check(_lib.vmmpp_kv_prefix_lending_stats_get(self._handle_or_raise(), ctypes.byref(s)))
        return {name: getattr(s, name) for name, _ in LendingStats._fields_}

    def drain_events(self):
        """The events queued since the last drain (record_events), oldest first, as tuples
        (kind, block, (key_hi, key_lo), (parent_hi, parent_lo)), kind "stored" or "removed"."""
        events = []
        capacity = 64
        while True:
            out = (PrefixEvent * capacity)()
            count, left = ctypes.c_uint64(), ctypes.c_uint64()
            _check(_lib.vmmpp_kv_prefix_drain_events(self._handle_or_raise(), out, capacity, ctypes.byref(count),
                                                     ctypes.byref(left)))
            events += [(PREFIX_EVENT_KINDS[e.kind], e.block, (e.key_hi, e.key_lo), (e.parent_hi, e.parent_lo))
                       for e in out[:count.value]]
            if left.value == 0:
                return events
            capacity = left.value


class HostTier(_OwnedHandle):
    """vmmpp::host_tier behind a PrefixCache: a second tier in host memory. The prefix cache's
    evicted blocks are copied to it (when it has room) instead of being dropped; attach gets a
    prompt's GPU hits, then its next blocks found here copied back; swap_out/swap_in preempt a
    sequence to host memory and back instead of recomputing it.

        tier_stream = torch.cuda.Stream(priority=0)   # its own; 0 is the lowest priority CUDA has
        with vmmpp_kv.HostTier(pc, max_blocks=4096, stream=tier_stream.cuda_stream) as tier:
            seq, cached, from_host = tier.attach(prompt, stream=engine_stream)
            pc.append(seq, len(prompt) - cached)
            ...
            swap_id = tier.swap_out(seq, stream=engine_stream)     # TierFull: free and recompute instead
            ...
            seq = tier.swap_in(swap_id, stream=engine_stream)      # OutOfBlocks...: retry later

    max_blocks: host blocks (each one of the cache's blocks), committed now: page-locked for a
    GPU cache, plain host memory for a "host" one. stream: a cudaStream_t (an int) of the tier's
    own, on which every copy runs; required for a GPU cache (not the default stream), ignored for
    a "host" one. One per prefix cache; it keeps the prefix cache alive. Its calls take the
    cache's lock."""

    def __init__(self, prefix_cache, *, max_blocks, stream=None):
        lib = load_library()
        self._handle = None
        self.prefix_cache = prefix_cache
        handle = ctypes.c_void_p()
        _check(lib.vmmpp_kv_tier_create(prefix_cache._handle_or_raise(), max_blocks, ctypes.c_void_p(stream),
                                        ctypes.byref(handle)))
        self._handle = handle

    _destroy = "vmmpp_kv_tier_destroy"

    def _handle_or_raise(self):
        if self._handle is None:
            raise ValueError("the host tier is closed")
        return self._handle

    def attach(self, tokens, extra=(), stream=None):
        """(seq, cached_tokens, host_tokens): PrefixCache.attach, then the prompt's next full
        blocks found in the tier copied back (host_tokens of the cached_tokens); `stream` (the
        engine's, an int; None: the legacy default stream) waits for the copies."""
        t, n = _int32s(tokens)
        e, n_extra = _uint64s(extra)
        seq, cached, host = ctypes.c_uint64(), ctypes.c_uint64(), ctypes.c_uint64()
        _check(_lib.vmmpp_kv_tier_attach(self._handle_or_raise(), t, n, e, n_extra, ctypes.c_void_p(stream),
                                         ctypes.byref(seq), ctypes.byref(cached), ctypes.byref(host)))
        return seq.value, cached.value, host.value

    def lookup(self, tokens, extra=()):
        """(gpu_tokens, host_tokens): leading tokens of `tokens` cached on the GPU, then in the tier."""
        t, n = _int32s(tokens)
        e, n_extra = _uint64s(extra)
        gpu, host = ctypes.c_uint64(), ctypes.c_uint64()
        _check(_lib.vmmpp_kv_tier_lookup(self._handle_or_raise(), t, n, e, n_extra, ctypes.byref(gpu),
                                         ctypes.byref(host)))
        return gpu.value, host.value

    def swap_out(self, seq, stream=None):
        """Copies seq's blocks to the tier and frees it (through the prefix cache, on `stream`);
        returns the id swap_in takes. Raises TierFull when the tier has no room (nothing changed)."""
        swap_id = ctypes.c_uint64()
        _check(_lib.vmmpp_kv_tier_swap_out(self._handle_or_raise(), seq, ctypes.c_void_p(stream),
                                           ctypes.byref(swap_id)))
        return swap_id.value

    def swap_in(self, swap_id, stream=None):
        """A new sequence with the swapped-out tokens, copied back; `stream` waits for the copies.
        Raises OutOfBlocks, OverQuota or OutOfMemory when the GPU has no room (it stays swapped out)."""
        seq = ctypes.c_uint64()
        _check(_lib.vmmpp_kv_tier_swap_in(self._handle_or_raise(), swap_id, ctypes.c_void_p(stream),
                                          ctypes.byref(seq)))
        return seq.value

    def drop_swapped(self, swap_id):
        """Gives up a swapped-out sequence (its host blocks go back)."""
        _check(_lib.vmmpp_kv_tier_drop_swapped(self._handle_or_raise(), swap_id))

    def swapped_tokens(self, swap_id):
        n = ctypes.c_uint64()
        _check(_lib.vmmpp_kv_tier_swapped_tokens(self._handle_or_raise(), swap_id, ctypes.byref(n)))
        return n.value

    def store_ahead(self, max_blocks):
        """Copies up to `max_blocks` cached blocks next to be evicted to the host ahead of their
        eviction (then evicted with no copy); returns how many."""
        stored = ctypes.c_uint64()
        _check(_lib.vmmpp_kv_tier_store_ahead(self._handle_or_raise(), max_blocks, ctypes.byref(stored)))
        return stored.value

    def synchronize(self):
        """Waits for every copy the tier has queued."""
        _check(_lib.vmmpp_kv_tier_synchronize(self._handle_or_raise()))

    def idle(self):
        """Whether every copy the tier has queued has completed (never waits)."""
        idle = ctypes.c_int()
        _check(_lib.vmmpp_kv_tier_idle(self._handle_or_raise(), ctypes.byref(idle)))
        return bool(idle.value)

    def stream_waits_for_copies(self, stream):
        """Makes `stream` (an int) wait for every copy the tier has queued."""
        _check(_lib.vmmpp_kv_tier_stream_waits_for_copies(self._handle_or_raise(), ctypes.c_void_p(stream)))

    def stats(self):
        """{"offloaded_blocks", "dropped_blocks", "loaded_blocks", "host_hits", "evicted_blocks",
        "swapped_out", "swapped_in", "bytes_to_host", "bytes_to_device", "keyed_blocks",
        "swapped_blocks", "free_blocks", "max_blocks", "stored_ahead_blocks"}."""
        s = TierStats()
        _check(_lib.vmmpp_kv_tier_stats_get(self._handle_or_raise(), ctypes.byref(s)))
        return {name: getattr(s, name) for name, _ in TierStats._fields_}


def live_exports():
    """Exports made and not yet deleted by their consumer, in this process."""
    return load_library().vmmpp_kv_live_exports()
