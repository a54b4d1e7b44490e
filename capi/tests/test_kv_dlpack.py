#!/usr/bin/env python3
"""kv_cache K/V through DLPack into NumPy (ctest `python_kv_dlpack`, label cpu).

A host_config cache is driven through the C ABI (capi/python/vmmpp_kv.py); the C side
writes known values through each sequence's slot mapping; numpy.from_dlpack views every
layer's K and V, and the values, shape, strides, dtype and data pointer must be what the layout
says, for layer_major and block_major (whose block stride is the whole block). Also: forks and
copy-on-write, NumPy writes landing in the cache, the DLPack structure's fields for every dtype,
the keep-alive, the capsule destructor, and refusals.

Needs NumPy >= 1.22 (numpy.from_dlpack): without it the test exits 77, which ctest reports as
skipped. Environment: VMMPP_KV_LIB (the C ABI library), VMMPP_KV_PYTHON_DIR (where vmmpp_kv.py is).
"""
import ctypes
import gc
import sys
import unittest

from capi_test_support import import_vmmpp_kv, numpy_with_dlpack

np = numpy_with_dlpack()
vmmpp_kv = import_vmmpp_kv()

LAYERS, HEADS, DIM, BLOCK_TOKENS, MAX_BLOCKS = 3, 2, 8, 4, 64
NP_DTYPES = {"f32": np.float32, "f16": np.float16}


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32), ("dtype", DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p), ("flags", ctypes.c_uint64), ("dl_tensor", DLTensor)]


class LegacyOnly:
    """A producer that ignores max_version: always the legacy capsule (as old exporters do)."""

    def __init__(self, tensor):
        self.tensor = tensor

    def __dlpack__(self, **kwargs):
        return self.tensor.__dlpack__()

    def __dlpack_device__(self):
        return self.tensor.__dlpack_device__()


def expected_token(writer, token):
    """[layers, 2, heads, dim] values the pattern gives a token written as sequence `writer`."""
    l, p, h, d = np.meshgrid(np.arange(LAYERS), np.arange(2), np.arange(HEADS), np.arange(DIM), indexing="ij")
    return (writer * 37 + token * 7 + l * 131 + p * 61 + h * 17 + d * 3) % 251


def make_cache(layout, dtype="f32", max_blocks=MAX_BLOCKS):
    return vmmpp_kv.KVCache(layers=LAYERS, kv_heads=HEADS, head_dim=DIM, max_blocks=max_blocks, dtype=dtype,
                            block_tokens=BLOCK_TOKENS, config="host", layout=layout)


class KVDLPackTest(unittest.TestCase):
    def setUp(self):
        gc.collect()
        self.exports_before = vmmpp_kv.live_exports()

    def tearDown(self):
        gc.collect()
        self.assertEqual(vmmpp_kv.live_exports(), self.exports_before, "an export was never deleted")

    def views(self, cache):
        """{(layer, part): ndarray} of every K and V."""
        return {(l, p): np.from_dlpack(cache.tensor(l, p)) for l in range(LAYERS) for p in (0, 1)}

    def check_sequences(self, cache, views, writers):
        """Every token of every sequence reads as written; writers[seq][t] wrote token t."""
        for seq, tokens in writers.items():
            table = cache.block_table(seq)
            self.assertEqual(len(table), -(-len(tokens) // BLOCK_TOKENS))
            slots = cache.slot_mapping(seq)
            for t, writer in enumerate(tokens):
                block, offset = table[t // BLOCK_TOKENS], t % BLOCK_TOKENS
                self.assertEqual(slots[t], block * BLOCK_TOKENS + offset)
                want = expected_token(writer, t)
                for (l, p), view in views.items():
                    np.testing.assert_array_equal(view[block, offset], want[l, p],
                                                  err_msg=f"seq {seq} token {t} layer {l} part {p}")

    def test_values_shape_strides_both_layouts(self):
        for layout in ("layer_major", "block_major"):
            for dtype in ("f32", "f16"):
                with self.subTest(layout=layout, dtype=dtype), make_cache(layout, dtype) as cache:
                    writers = {}
                    for n in (5, 9, 1, 16):
                        seq = cache.add_sequence()
                        cache.append(seq, n)
                        cache.write_test_pattern(seq)
                        writers[seq] = [seq] * n
                    views = self.views(cache)
                    item = np.dtype(NP_DTYPES[dtype]).itemsize
                    block_tensor = BLOCK_TOKENS * HEADS * DIM * item
                    block_stride = block_tensor if layout == "layer_major" else 2 * LAYERS * block_tensor
                    for (l, p), view in views.items():
                        self.assertEqual(view.dtype, NP_DTYPES[dtype])
                        self.assertEqual(view.shape, (MAX_BLOCKS, BLOCK_TOKENS, HEADS, DIM))
                        self.assertEqual(view.strides, (block_stride, HEADS * DIM * item, DIM * item, item))
                        self.assertEqual(view.__array_interface__["data"][0], cache.address(l, p, 0))
                    self.check_sequences(cache, views, writers)
                    # The blocks of one token range, seen from two layers, are distinct memory.
                    self.assertFalse(np.shares_memory(views[(0, 0)][0], views[(0, 1)][0]))
                    del views

    def test_fork_copy_on_write_and_truncate(self):
        for layout in ("layer_major", "block_major"):
            with self.subTest(layout=layout), make_cache(layout) as cache:
                parent = cache.add_sequence()
                cache.append(parent, 6)  # last block half full
                cache.write_test_pattern(parent)
                child = cache.fork(parent)
                self.assertEqual(list(cache.block_table(child)), list(cache.block_table(parent)))
                first = cache.append(child, 3)  # copies the shared half-full block
                self.assertEqual(first, 6)
                cache.write_test_pattern(child, first, 3)
                self.assertEqual(cache.stats()["cow_copies"], 1)
                self.assertNotEqual(cache.block_table(child)[-1], cache.block_table(parent)[-1])
                views = self.views(cache)
                self.check_sequences(cache, views, {parent: [parent] * 6, child: [parent] * 6 + [child] * 3})
                cache.truncate(child, 2)
                self.check_sequences(cache, views, {parent: [parent] * 6, child: [parent] * 2})
                packed = np.frombuffer(cache.pack_block_tables([parent, child], 3, pad=-1), dtype=np.int32)
                self.assertEqual(list(packed[:3]), list(cache.block_table(parent)) + [-1])
                self.assertEqual(list(packed[3:]), list(cache.block_table(child)) + [-1, -1])
                del views

    def test_numpy_writes_land_in_the_cache(self):
        with make_cache("block_major") as cache:
            seq = cache.add_sequence()
            cache.append(seq, 3)
            k1 = cache.key(1)
            view = np.from_dlpack(k1)
            if not k1.last_capsule_versioned:
                # NumPy < 2.1 asks for the legacy capsule, which it must import read-only.
                self.assertFalse(view.flags.writeable)
                self.skipTest(f"numpy {np.__version__} imports legacy capsules only (read-only)")
            self.assertTrue(view.flags.writeable)
            slots = np.frombuffer(cache.slot_mapping(seq), dtype=np.int64)
            view[slots // BLOCK_TOKENS, slots % BLOCK_TOKENS] = 42.5
            # The child's copy-on-write copy (made by C++) carries what NumPy wrote.
            child = cache.fork(seq)
            cache.append(child, 1)
            block = cache.block_table(child)[0]
            self.assertNotEqual(block, cache.block_table(seq)[0])
            np.testing.assert_array_equal(view[block, :3], 42.5)
            # Another export (legacy: read-only) sees the same memory.
            legacy = np.from_dlpack(LegacyOnly(k1))
            self.assertFalse(legacy.flags.writeable)
            np.testing.assert_array_equal(legacy[slots // BLOCK_TOKENS, slots % BLOCK_TOKENS], 42.5)
            del view, legacy

    def test_dlpack_fields_every_dtype(self):
        codes = {"f32": (2, 32), "f16": (2, 16), "bf16": (4, 16), "fp8_e4m3": (10, 8), "fp8_e5m2": (12, 8)}
        lib = vmmpp_kv.load_library()
        for dtype, (code, bits) in codes.items():
            for versioned in (0, 1):
                with self.subTest(dtype=dtype, versioned=versioned), make_cache("layer_major", dtype) as cache:
                    pointer = ctypes.c_void_p()
                    status = lib.vmmpp_kv_export(cache._handle, 2, 1, versioned, 0, ctypes.byref(pointer))
                    self.assertEqual(status, 0, lib.vmmpp_kv_last_error())
                    try:
                        if versioned:
                            managed = DLManagedTensorVersioned.from_address(pointer.value)
                            self.assertEqual((managed.major, managed.minor), (1, 1))
                            self.assertEqual(managed.flags, 0)
                        else:
                            managed = DLManagedTensor.from_address(pointer.value)
                        t = managed.dl_tensor
                        self.assertIsNotNone(managed.deleter)
                        self.assertEqual((t.dtype.code, t.dtype.bits, t.dtype.lanes), (code, bits, 1))
                        self.assertEqual((t.device.device_type, t.device.device_id), (vmmpp_kv.KDL_CPU, 0))
                        self.assertEqual(t.ndim, 4)
                        self.assertEqual(t.byte_offset, 0)
                        self.assertEqual(t.data, cache.address(2, 1, 0))
                        self.assertEqual([t.shape[i] for i in range(4)], [MAX_BLOCKS, BLOCK_TOKENS, HEADS, DIM])
                        self.assertEqual([t.strides[i] for i in range(4)], [BLOCK_TOKENS * HEADS * DIM, HEADS * DIM,
                                                                            DIM, 1])
                    finally:
                        lib.vmmpp_dlpack_release(pointer, versioned)

    def test_device(self):
        with make_cache("layer_major") as cache:
            self.assertEqual(cache.key(0).__dlpack_device__(), (vmmpp_kv.KDL_CPU, 0))
            self.assertEqual(cache.key(0, managed_as_cuda=True).__dlpack_device__(), (vmmpp_kv.KDL_CPU, 0))

    def test_keep_alive_and_capsule_destructor(self):
        cache = make_cache("layer_major")
        seq = cache.add_sequence()
        cache.append(seq, 7)
        cache.write_test_pattern(seq)
        table = list(cache.block_table(seq))
        view = np.from_dlpack(cache.value(2))
        self.assertEqual(vmmpp_kv.live_exports(), self.exports_before + 1)
        # A capsule nobody consumes: its destructor deletes the export.
        capsule = cache.key(0).__dlpack__()
        self.assertEqual(vmmpp_kv.live_exports(), self.exports_before + 2)
        del capsule
        self.assertEqual(vmmpp_kv.live_exports(), self.exports_before + 1)
        capsule = cache.key(0).__dlpack__(max_version=(1, 0))
        self.assertEqual(vmmpp_kv.live_exports(), self.exports_before + 2)
        del capsule
        self.assertEqual(vmmpp_kv.live_exports(), self.exports_before + 1)
        # The handle goes; the export keeps the cache (and its memory) alive.
        cache.close()
        del cache
        gc.collect()
        np.testing.assert_array_equal(view[table[1], 2], expected_token(seq, 6)[2, 1])
        del view
        gc.collect()
        self.assertEqual(vmmpp_kv.live_exports(), self.exports_before)

    def test_memory_follows_sequences(self):
        with make_cache("block_major", max_blocks=4096) as cache:  # a 6 MiB span of 2 MiB pages
            self.assertEqual(cache.stats()["committed_bytes"], 0)
            seq = cache.add_sequence()
            cache.append(seq, 600 * BLOCK_TOKENS)
            self.assertGreater(cache.stats()["committed_bytes"], 0)
            view = np.from_dlpack(cache.key(0))
            cache.write_test_pattern(seq, 0, 1)
            np.testing.assert_array_equal(view[cache.block_table(seq)[0], 0], expected_token(seq, 0)[0, 0])
            cache.free(seq)
            self.assertEqual(cache.stats()["committed_bytes"], 0)  # the pages went back
            del view
            # The stream-ordered forms (a host cache has no GPU work to wait for: stream 0 is fine).
            seq = cache.add_sequence()
            cache.append(seq, 300 * BLOCK_TOKENS)
            cache.truncate(seq, 100 * BLOCK_TOKENS, stream=0)
            self.assertEqual(cache.tokens(seq), 100 * BLOCK_TOKENS)
            cache.free(seq, stream=0)
            cache.synchronize()  # nothing was waiting on a host cache
            self.assertEqual(cache.stats()["committed_bytes"], 0)
            with self.assertRaises(vmmpp_kv.VmmppError) as e:
                cache.free(seq, stream=0)
            self.assertEqual(e.exception.status, "invalid_argument")

    def test_refusals(self):
        with make_cache("layer_major") as cache:
            with self.assertRaises(vmmpp_kv.VmmppError) as e:
                cache.key(LAYERS).__dlpack__()
            self.assertEqual(e.exception.status, "invalid_argument")
            with self.assertRaises(vmmpp_kv.VmmppError):
                cache.tensor(0, 2).__dlpack__()
            with self.assertRaises(BufferError):
                cache.key(0).__dlpack__(copy=True)
            with self.assertRaises(BufferError):
                cache.key(0).__dlpack__(dl_device=(vmmpp_kv.KDL_CUDA, 0))
            with self.assertRaises(vmmpp_kv.VmmppError) as e:
                cache.write_test_pattern(12345, 0, 1)
            self.assertEqual(e.exception.status, "invalid_argument")
            seq = cache.add_sequence()
            cache.append(seq, 1)
            # Review 2: first + count wrapped to 0, so nothing was written and the call said OK.
            with self.assertRaisesRegex(vmmpp_kv.VmmppError, "past 2\\^64") as e:
                cache.write_test_pattern(seq, 1, 2**64 - 1)
            self.assertEqual(e.exception.status, "invalid_argument")
            cache.free(seq)
            seq = cache.add_sequence()
            with self.assertRaises(vmmpp_kv.VmmppError) as e:
                cache.append(seq, MAX_BLOCKS * BLOCK_TOKENS + 1)
            self.assertEqual(e.exception.status, "out_of_blocks")
        with self.assertRaises(vmmpp_kv.VmmppError):
            vmmpp_kv.KVCache(layers=0, kv_heads=1, head_dim=1, max_blocks=1)
        with self.assertRaises(vmmpp_kv.VmmppError):
            vmmpp_kv.KVCache(layers=1, kv_heads=1, head_dim=1, max_blocks=1, config="nonsense")
        with self.assertRaises(vmmpp_kv.VmmppError):
            vmmpp_kv.KVCache(layers=1, kv_heads=1, head_dim=1, max_blocks=1, layout="diagonal")
        with make_cache("layer_major", "fp8_e4m3") as cache:
            seq = cache.add_sequence()
            cache.append(seq, 1)
            with self.assertRaises(vmmpp_kv.VmmppError):
                cache.write_test_pattern(seq)

    def test_layouts_are_the_librarys(self):
        """One list: the Python module's LAYOUTS are vmmpp::kv_layouts as the library reports
        them, the default (block_major, as kv_cache's) first; each makes a cache; an unknown name
        is refused with the valid ones in the message."""
        self.assertEqual(vmmpp_kv.LAYOUTS, vmmpp_kv.layout_names())
        self.assertEqual(vmmpp_kv.DEFAULT_LAYOUT, "block_major")
        for layout in vmmpp_kv.LAYOUTS:
            with vmmpp_kv.KVCache(layers=LAYERS, kv_heads=1, head_dim=DIM, max_blocks=MAX_BLOCKS,
                                  block_tokens=BLOCK_TOKENS, config="host", layout=layout,
                                  max_tokens_per_sequence=4 * BLOCK_TOKENS) as cache:
                seq = cache.add_sequence()
                cache.append(seq, BLOCK_TOKENS + 1)
                self.assertEqual(cache.tokens(seq), BLOCK_TOKENS + 1)
        with vmmpp_kv.KVCache(layers=LAYERS, kv_heads=HEADS, head_dim=DIM, max_blocks=MAX_BLOCKS,
                              dtype="f32", block_tokens=BLOCK_TOKENS, config="host") as default, \
                make_cache("block_major") as block_major:
            self.assertEqual(default.layout, "block_major")
            self.assertEqual(np.from_dlpack(default.key(0)).strides, np.from_dlpack(block_major.key(0)).strides)
        with self.assertRaises(vmmpp_kv.VmmppError) as e:
            vmmpp_kv.KVCache(layers=1, kv_heads=1, head_dim=1, max_blocks=1, config="host", layout="diagonal")
        self.assertEqual(e.exception.status, "invalid_argument")
        for layout in vmmpp_kv.LAYOUTS:
            self.assertIn(layout, str(e.exception))

    def test_block_tables_whose_size_overflows_are_refused(self):
        """Review F1: 2 x 2^63 wrapped to 0 in the C ABI and in pack_block_tables, and the rows
        were written far past the caller's buffer."""
        with make_cache("layer_major") as cache:
            seqs = [cache.add_sequence(), cache.add_sequence()]
            cache.append(seqs[0], 5)
            ids = (ctypes.c_uint64 * 2)(*seqs)
            out = (ctypes.c_int32 * 4)(-7, -7, -7, -7)
            for max_blocks in (1 << 63, MAX_BLOCKS + 1):
                with self.assertRaises(vmmpp_kv.VmmppError) as e:
                    vmmpp_kv._check(vmmpp_kv._lib.vmmpp_kv_pack_block_tables(
                        cache._handle_or_raise(), ids, 2, max_blocks, 0, out))
                self.assertEqual(e.exception.status, "invalid_argument")
            self.assertEqual(list(out), [-7, -7, -7, -7])


if __name__ == "__main__":
    print(f"numpy {np.__version__}, python {sys.version.split()[0]}")
    result = unittest.main(exit=False, verbosity=2).result
    sys.exit(0 if result.wasSuccessful() else 1)
