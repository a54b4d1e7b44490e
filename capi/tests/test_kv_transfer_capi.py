#!/usr/bin/env python3
"""The C ABI's transfer calls on host caches (ctest `python_kv_transfer_capi`, label cpu).

vmmpp_kv_copy_blocks moves blocks between two host_config caches and the bytes arrive (NumPy
reads them through DLPack); vmmpp_kv_committed_extents and vmmpp_kv_block_pieces describe what a
transfer engine registers and moves, and the pieces paired by vmmpp_pair_pieces move the same
bytes; the refusals name what is wrong: a dead block, piece lists of different sizes, caches of
different layouts, peers for a configuration without vmm, shared pages without vmm.

Needs NumPy >= 1.22 (exit 77, skipped, without it). Environment as test_kv_dlpack.py.
"""
import ctypes
import sys
import unittest

from capi_test_support import import_vmmpp_kv, numpy_with_dlpack

np = numpy_with_dlpack()
vmmpp_kv = import_vmmpp_kv()

# 2 layers x 2 heads x 64 dims x f32 x 16 tokens: a block is 32 KiB (block_major), 64 per 2 MiB page.
GEOMETRY = dict(layers=2, kv_heads=2, head_dim=64, dtype="f32", block_tokens=16, max_blocks=512, config="host")


def cache(layout="block_major", **extra):
    return vmmpp_kv.KVCache(**GEOMETRY, layout=layout, **extra)


def block_bytes(c, block):
    """Every K and V element of `block`, layer by layer, as one array."""
    return np.concatenate([np.from_dlpack(c.tensor(layer, part))[block].ravel()
                           for layer in range(GEOMETRY["layers"]) for part in (0, 1)])


class TransferCapiTest(unittest.TestCase):
    def test_copy_blocks_moves_the_bytes(self):
        for layout in ("block_major", "layer_major"):
            with self.subTest(layout=layout), cache(layout) as src, cache(layout) as dst:
                s = src.add_sequence()
                src.append(s, 16 * 70)  # crosses a page
                src.write_test_pattern(s)
                d = dst.add_sequence()
                dst.append(d, 16 * 3)
                other = list(dst.block_table(d))
                before = [block_bytes(dst, b).copy() for b in other]
                d2 = dst.add_sequence()
                dst.append(d2, 16 * 70)
                from_ids, to_ids = list(src.block_table(s)), list(dst.block_table(d2))
                vmmpp_kv.copy_blocks(src, from_ids, dst, to_ids)
                for a, b in zip(from_ids, to_ids):
                    np.testing.assert_array_equal(block_bytes(src, a), block_bytes(dst, b))
                for b, was in zip(other, before):
                    np.testing.assert_array_equal(block_bytes(dst, b), was)

    def test_extents_and_pieces_describe_the_blocks(self):
        with cache() as c:
            base, capacity, device = c.span()
            self.assertEqual(device, -1)
            self.assertGreaterEqual(capacity, 512 * 32 * 1024)
            self.assertEqual(c.committed_extents(), [])
            s = c.add_sequence()
            c.append(s, 16 * 100)
            extents = c.committed_extents()
            self.assertEqual(sum(e[1] for e in extents), c.stats()["committed_bytes"])
            self.assertEqual(len({e[2] for e in extents}), len(extents))  # one commit number each
            ids = list(c.block_table(s))
            pieces = c.block_pieces(ids)
            self.assertEqual(sum(n for _, n in pieces), 100 * 32 * 1024)
            for offset, n in pieces:  # each inside one extent
                self.assertTrue(any(o <= offset and offset + n <= o + b for o, b, _ in extents), (offset, n))
            c.free(s)
            self.assertEqual(c.committed_extents(), [])

    def test_paired_pieces_move_the_same_bytes(self):
        with cache() as src, cache() as dst:
            filler = src.add_sequence()
            src.append(filler, 16 * 10)
            s = src.add_sequence()
            src.append(s, 16 * 90)
            src.write_test_pattern(s)
            src.free(filler)  # the next cache's ids differ from these
            d = dst.add_sequence()
            dst.append(dst.add_sequence(), 16 * 5)
            dst.append(d, 16 * 90)
            from_ids, to_ids = list(src.block_table(s)), list(dst.block_table(d))
            pairs = vmmpp_kv.pair_pieces(dst.block_pieces(to_ids), src.block_pieces(from_ids))
            src_base, dst_base = src.span()[0], dst.span()[0]
            for local, remote, n in pairs:
                ctypes.memmove(dst_base + local, src_base + remote, n)
            for a, b in zip(from_ids, to_ids):
                np.testing.assert_array_equal(block_bytes(src, a), block_bytes(dst, b))

    def test_refusals_name_what_is_wrong(self):
        with cache() as c, cache("layer_major") as other:
            s = c.add_sequence()
            c.append(s, 16)
            live = list(c.block_table(s))[0]
            with self.assertRaisesRegex(vmmpp_kv.VmmppError, "invalid_argument"):
                c.block_pieces([live, live + 1])
            with self.assertRaisesRegex(vmmpp_kv.VmmppError, "100.*99|99.*100"):
                vmmpp_kv.pair_pieces([(0, 100)], [(0, 99)])
            # Review 2, G4: sizes whose sum wraps to the other list's total.
            with self.assertRaisesRegex(vmmpp_kv.VmmppError, "overflow"):
                vmmpp_kv.pair_pieces([(0, 2**64 - 4096), (1 << 20, 8192)], [(0, 4096)])
            # Review 2, G6: a destination block shared with a fork would change the fork's KV.
            with cache() as dst:
                d = dst.add_sequence()
                dst.append(d, 16)
                shared = list(dst.block_table(d))[0]
                dst.fork(d)
                with self.assertRaisesRegex(vmmpp_kv.VmmppError,
                                            f"destination block {shared} \\(entry 0\\) has reference count 2"):
                    vmmpp_kv.copy_blocks(c, [live], dst, [shared])
            t = other.add_sequence()
            other.append(t, 16)
            with self.assertRaisesRegex(vmmpp_kv.VmmppError, "configuration or layout"):
                vmmpp_kv.copy_blocks(c, [live], other, list(other.block_table(t)))
            with self.assertRaisesRegex(vmmpp_kv.VmmppError, "vmm"):
                c.send_shared_pages(0)
        with self.assertRaisesRegex(vmmpp_kv.VmmppError, "peer devices"):
            cache(peers=(1,))


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    sys.exit(0 if result.wasSuccessful() else 1)
