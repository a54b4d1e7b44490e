"""vmmpp.KVCache on the host backing (no GPU): the scheduler's operations in every layout, block
tables and slots as the layout says, DLPack views that NumPy reads and writes in place (and that
keep the cache alive), sleep and wake keeping the bytes, typed errors with their numbers, integers
and streams refused by name."""
import array
import json
import threading
import unittest

import vmmpp

try:
    import numpy
except ImportError:  # the DLPack cases need it; the rest run without
    numpy = None

# 2 layers x 2 heads x 64 dims x f32 x 16 tokens: a block is 32 KiB (K and V of every layer), 64
# of them per 2 MiB page of the host pool.
GEOMETRY = dict(layers=2, kv_heads=2, head_dim=64, dtype="f32", block_tokens=16, max_blocks=512, config="host")
BLOCK_TOKENS = 16
BLOCK_BYTES = 2 * 2 * 16 * 2 * 64 * 4
PAGE_BYTES = 2 << 20
PAGED_LAYOUTS = tuple(name for name in vmmpp.LAYOUTS if name != "sequence_contiguous")


def cache(**extra):
    geometry = dict(GEOMETRY, **extra)
    if geometry.get("layout") == "mla":  # one latent per token: one "head"
        geometry["kv_heads"] = 1
    return vmmpp.KVCache(**geometry)


class NamesTest(unittest.TestCase):
    def test_the_lists_come_from_the_library_in_its_order(self):
        self.assertEqual(vmmpp.CONFIGS, ("static", "elastic", "elastic_mapped_ahead", "elastic_page", "gh200", "host"))
        self.assertEqual(vmmpp.LAYOUTS, ("block_major", "block_major_hnd", "layer_major", "layer_major_hnd",
                                         "packed_kv", "mla", "sequence_contiguous"))
        self.assertEqual(vmmpp.BUDGET_CONFIGS, ("elastic", "elastic_mapped_ahead", "elastic_page", "host"))
        self.assertEqual(vmmpp.DEFAULT_LAYOUT, "block_major")

    def test_unknown_names_list_the_valid_ones(self):
        with self.assertRaisesRegex(vmmpp.InvalidArgument, "configuration.*'hots'.*host") as e:
            cache(config="hots")
        self.assertIsInstance(e.exception, ValueError)
        self.assertEqual(e.exception.status, "invalid_argument")
        with self.assertRaisesRegex(vmmpp.InvalidArgument, "layout.*block_major_hnd"):
            cache(layout="block_minor")
        with self.assertRaisesRegex(vmmpp.InvalidArgument, "unknown dtype 'f64'; the dtypes are f32, f16, bf16"):
            cache(dtype="f64")

    def test_unbacked_zeros_are_for_vmm_configurations(self):
        with self.assertRaisesRegex(vmmpp.InvalidArgument, "^unbacked reads as zeros need a vmm configuration "
                                                           r"\(elastic, elastic_mapped_ahead, elastic_page\), not 'host'$"):
            cache(unbacked="zeros")
        with self.assertRaisesRegex(vmmpp.InvalidArgument, "^unbacked 'zero' is not one of fault, zeros, zeros_writable$"):
            cache(unbacked="zero")
        with self.assertRaisesRegex(vmmpp.InvalidArgument, "^peer devices are given to vmm configurations only"):
            cache(peers=[1])

    def test_gpu_configurations_say_there_is_no_gpu_or_work(self):
        # The alias "elastic_pages" is accepted as vmmpp_kv accepts it. Without a GPU each one
        # raises CudaUnavailable (or CudaError), never anything untyped.
        for config in ("static", "elastic", "elastic_pages", "gh200"):
            with self.subTest(config=config):
                try:
                    with cache(config=config) as c:
                        self.assertIn(c.dlpack_device()[0], (vmmpp.KDL_CUDA, vmmpp.KDL_CUDA_MANAGED))
                except (vmmpp.CudaUnavailable, vmmpp.CudaError) as e:
                    self.assertIn(e.status, ("cuda_unavailable", "cuda_error"))


class IntegersTest(unittest.TestCase):
    """What ctypes let through: max_blocks=2**33 wrapped to 0, layers=-1 became 2**32 - 1."""

    def test_out_of_range_integers_are_refused_by_name(self):
        with self.assertRaisesRegex(vmmpp.InvalidArgument,
                                    r"^max_blocks = 8589934592 is out of range: it must lie in \[0, 4294967295\]$"):
            cache(max_blocks=2**33)
        with self.assertRaisesRegex(vmmpp.InvalidArgument, r"^layers = -1 is out of range"):
            cache(layers=-1)
        with self.assertRaisesRegex(vmmpp.InvalidArgument, r"^budget_bytes = 18446744073709551616 is out of range"):
            cache(budget_bytes=2**64)
        with self.assertRaisesRegex(vmmpp.InvalidArgument, "^head_dim must be an integer, not float$"):
            cache(head_dim=64.0)
        with cache() as c:
            seq = c.add_sequence()
            with self.assertRaisesRegex(vmmpp.InvalidArgument, "^n_tokens = -1 is out of range"):
                c.append(seq, -1)
            with self.assertRaisesRegex(vmmpp.InvalidArgument, "^seq must be an integer, not str$"):
                c.tokens("0")
            with self.assertRaisesRegex(vmmpp.InvalidArgument, r"^block = 2147483648 is out of range"):
                c.address(0, 0, 2**31)
            with self.assertRaisesRegex(vmmpp.InvalidArgument, r"^part 2 is neither 0 \(KEY\) nor 1 \(VALUE\)$"):
                c.tensor(0, 2)

    def test_numpy_integers_are_integers(self):
        if numpy is None:
            self.skipTest("NumPy is not installed")
        with cache(max_blocks=numpy.uint32(64)) as c:
            seq = c.add_sequence()
            self.assertEqual(c.append(numpy.int64(seq), numpy.int32(20)), 0)
            self.assertEqual(c.tokens(seq), 20)


class OperationsTest(unittest.TestCase):
    def test_append_fork_truncate_free_in_every_layout(self):
        for layout in vmmpp.LAYOUTS:
            extra = dict(max_tokens_per_sequence=256) if layout == "sequence_contiguous" else {}
            with self.subTest(layout=layout), cache(layout=layout, **extra) as c:
                seq = c.add_sequence()
                self.assertEqual(c.append(seq, 37), 0)
                self.assertEqual(c.append(seq, 3), 37)
                self.assertEqual(c.tokens(seq), 40)
                table = c.block_table(seq)
                self.assertIsInstance(table, array.array)
                self.assertEqual(len(table), 3)
                slots = c.slot_mapping(seq)
                self.assertEqual(list(slots), [table[t // BLOCK_TOKENS] * BLOCK_TOKENS + t % BLOCK_TOKENS
                                               for t in range(40)])
                self.assertEqual(list(c.slot_mapping(seq, 38)), list(slots)[38:])
                self.assertEqual(list(c.slot_mapping(seq, 5, 2)), list(slots)[5:7])
                stats = c.stats()
                self.assertEqual((stats["used_blocks"], stats["sequences"], stats["asleep"]), (3, 1, False))
                self.assertEqual(stats["block_bytes"], c.geometry.block_bytes)
                self.assertEqual(c.geometry[:3], (2, 1 if layout == "mla" else 2, 64))
                self.assertGreaterEqual(stats["committed_bytes"], 3 * stats["block_bytes"])
                if layout != "sequence_contiguous":
                    child = c.fork(seq)
                    self.assertEqual(list(c.block_table(child)), list(table))
                    c.append(child, 1)  # its last block is shared and partly full: copied on write
                    self.assertEqual(c.stats()["cow_copies"], 1)
                    self.assertNotEqual(c.block_table(child)[2], table[2])
                    self.assertEqual(c.lengths([seq, child]), [40, 41])
                    c.free(child)
                c.truncate(seq, 16)
                self.assertEqual(list(c.block_table(seq)), list(table)[:1])
                c.free(seq, stream=None)
                self.assertEqual(c.stats()["used_blocks"], 0)
                self.assertGreaterEqual(c.collect(), 0)
                c.trim()
                self.assertEqual(c.stats()["committed_bytes"], 0)

    def test_pack_block_tables_pads_rows(self):
        with cache() as c:
            a, b = c.add_sequence(), c.add_sequence()
            c.append(a, 40)
            c.append(b, 10)
            packed = c.pack_block_tables([a, b], 4, pad=-1)
            self.assertEqual(list(packed), list(c.block_table(a)) + [-1] + list(c.block_table(b)) + [-1] * 3)
            with self.assertRaises(vmmpp.InvalidArgument):
                c.pack_block_tables([a], 2)  # 3 blocks do not fit a row of 2

    def test_refusals_carry_their_numbers(self):
        with cache(max_blocks=4) as c:
            seq = c.add_sequence()
            c.append(seq, 3 * BLOCK_TOKENS)
            with self.assertRaises(vmmpp.OutOfBlocks) as e:
                c.append(seq, 2 * BLOCK_TOKENS)
            # needed: the blocks the sequence would hold (5), against 1 free of 4
            self.assertEqual((e.exception.needed, e.exception.free, e.exception.max_blocks), (5, 1, 4))
            self.assertEqual(e.exception.status, "out_of_blocks")
            self.assertIsInstance(e.exception, vmmpp.REFUSALS)
            self.assertEqual(c.tokens(seq), 3 * BLOCK_TOKENS)  # unchanged
            with self.assertRaisesRegex(vmmpp.InvalidArgument,
                                        f"^slot_mapping: first 50 is past the 48 tokens of sequence {seq}$"):
                c.slot_mapping(seq, 50)
            with self.assertRaisesRegex(vmmpp.InvalidArgument, "sequence 99"):
                c.free(99)
        with cache(layout="mla") as c:
            with self.assertRaisesRegex(vmmpp.InvalidArgument, "mla"):
                c.address(0, vmmpp.VALUE, 0)  # one latent, no V

    def test_streams_are_none_ints_or_objects_with_cuda_stream(self):
        class Stream:
            cuda_stream = 0

        with cache() as c:
            seq = c.add_sequence()
            c.append(seq, 40, stream=Stream())
            c.truncate(seq, 20, stream=0)
            with self.assertRaisesRegex(vmmpp.InvalidArgument, "^stream must be an integer, not str$"):
                c.free(seq, stream="default")
            with self.assertRaisesRegex(vmmpp.InvalidArgument, "^stream = -1 is out of range"):
                c.free(seq, stream=-1)
            c.free(seq, stream=None)

    def test_a_closed_cache_says_so(self):
        c = cache()
        c.close()
        self.assertTrue(c.closed)
        with self.assertRaisesRegex(vmmpp.InvalidArgument, "the KV cache is closed"):
            c.add_sequence()

    def test_threads_share_a_cache(self):
        with cache(max_blocks=4096) as c:
            def work():
                for _ in range(50):
                    s = c.add_sequence()
                    c.append(s, 33)
                    c.free(s)

            threads = [threading.Thread(target=work) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            self.assertEqual((c.stats()["sequences"], c.stats()["used_blocks"]), (0, 0))

    def test_stats_json_names_the_cache(self):
        with cache() as c:
            c.append(c.add_sequence(), 20)
            snap = json.loads(c.stats_json("llama"))
            self.assertEqual(snap["pools"][0]["name"], "llama")
            self.assertEqual(snap["pools"][0]["cache"]["used_blocks"], 2)


class SleepTest(unittest.TestCase):
    @unittest.skipIf(numpy is None, "NumPy is not installed")
    def test_sleep_gives_memory_back_and_wake_brings_the_bytes_back(self):
        with cache() as c:
            seq = c.add_sequence()
            c.append(seq, 100)
            k = numpy.from_dlpack(c.key(1))
            rows = numpy.asarray(c.slot_mapping(seq))
            k[rows // BLOCK_TOKENS, rows % BLOCK_TOKENS] = numpy.arange(100, dtype=numpy.float32)[:, None, None]
            self.assertEqual(c.sleep_bytes(), 7 * BLOCK_BYTES)
            slept = c.sleep()
            self.assertEqual((slept["bytes_copied"], slept["blocks"]), (7 * BLOCK_BYTES, 7))
            self.assertTrue(c.asleep)
            self.assertEqual(c.stats()["committed_bytes"], 0)
            with self.assertRaises(vmmpp.CacheAsleep) as e:
                c.append(seq, 1)
            self.assertEqual(e.exception.operation, "append")
            self.assertEqual(list(c.block_table(seq)), list(range(7)))  # reads stay valid
            woke = c.wake()
            self.assertEqual(woke["bytes_copied"], 7 * BLOCK_BYTES)
            self.assertFalse(c.asleep)
            k = numpy.from_dlpack(c.key(1))
            self.assertTrue((k[rows // BLOCK_TOKENS, rows % BLOCK_TOKENS][:, 0, 0] == numpy.arange(100)).all())


@unittest.skipIf(numpy is None, "NumPy is not installed")
class DLPackTest(unittest.TestCase):
    def test_numpy_views_the_cache_in_place(self):
        for layout in PAGED_LAYOUTS:
            with self.subTest(layout=layout), cache(layout=layout) as c:
                seq = c.add_sequence()
                c.append(seq, 20)
                self.assertEqual(c.dlpack_device(), (vmmpp.KDL_CPU, 0))
                k = numpy.from_dlpack(c.key(0))
                self.assertEqual(k.shape[:2], (512, BLOCK_TOKENS))
                heads = 1 if layout == "mla" else 2
                self.assertEqual(k.dtype, numpy.float32)
                block = c.block_table(seq)[1]
                self.assertEqual(k[block].__array_interface__["data"][0], c.address(0, vmmpp.KEY, block))
                self.assertEqual(k.shape[2:], (heads, 64))
                k[block, 3, heads - 1, 5] = 42.0
                self.assertEqual(numpy.from_dlpack(c.tensor(0, vmmpp.KEY))[block, 3, heads - 1, 5], 42.0)

    def test_an_export_keeps_the_cache_alive(self):
        c = cache()
        seq = c.add_sequence()
        c.append(seq, 16)
        v = numpy.from_dlpack(c.value(1))
        c.close()
        v[0, 0, 0, 0] = 7.0  # the memory is still the cache's
        self.assertEqual(v[0, 0, 0, 0], 7.0)

    def test_sequence_contiguous_runs(self):
        with cache(layout="sequence_contiguous", max_tokens_per_sequence=64) as c:
            seq = c.add_sequence()
            c.append(seq, 20)
            run = numpy.from_dlpack(c.sequence(seq, 0, vmmpp.KEY))
            self.assertEqual(run.shape, (1, 20, 2, 64))
            self.assertEqual(run.__array_interface__["data"][0], c.address(0, vmmpp.KEY, c.block_table(seq)[0]))

    def test_refusals(self):
        with cache() as c:
            t = c.key(0)
            with self.assertRaisesRegex(BufferError, "copy=True"):
                t.__dlpack__(copy=True)
            with self.assertRaisesRegex(BufferError, r"is on DLPack device \(1, 0\), not \(2, 0\)"):
                t.__dlpack__(dl_device=(2, 0))
            with self.assertRaisesRegex(vmmpp.InvalidArgument, "layer"):
                numpy.from_dlpack(c.key(2))


if __name__ == "__main__":
    unittest.main()
