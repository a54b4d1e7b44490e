#!/usr/bin/env python3
"""The host tier's C ABI (vmmpp_kv_tier_*) and vmmpp_kv.HostTier on host caches (ctest
`python_host_tier_capi`, label cpu, standard library only).

Blocks the prefix cache evicts are copied to the tier (offloaded, lookup finds them there) and
attach copies them back into fresh blocks holding the bytes first written; swap_out frees a
sequence and swap_in gives back its tokens and bytes after its blocks were reused; a full tier
raises TierFull (needed, free, max_blocks) with nothing changed; swap_in without room raises
OutOfBlocks and the sequence stays swapped out; the tier keeps its prefix cache alive; the
refusals name what is wrong. Every block's bytes are read at its address (ctypes.string_at). On a
GPU (torch for the streams and the views) the same paths on an elastic cache with a page-locked
tier, every value compared. Environment as test_kv_dlpack.py.
"""
import ctypes
import os
import sys
import unittest

from capi_test_support import import_vmmpp_kv

vmmpp_kv = import_vmmpp_kv()

# 2 layers x 2 heads x 8 dims x f32 x 4 tokens: 256 bytes of K (or V) of a layer per block.
BLOCK_TOKENS = 4
GEOMETRY = dict(layers=2, kv_heads=2, head_dim=8, dtype="f32", block_tokens=BLOCK_TOKENS, config="host",
                layout="block_major")
PART_BYTES = BLOCK_TOKENS * 2 * 8 * 4


def cache(max_blocks=16):
    return vmmpp_kv.KVCache(max_blocks=max_blocks, **GEOMETRY)


def prompt(n_tokens, start=1000):
    return list(range(start, start + n_tokens))


def block_bytes(c, block):
    """Every byte of `block`: each layer's K and V."""
    return b"".join(ctypes.string_at(c.address(layer, part, block), PART_BYTES)
                    for layer in range(2) for part in (vmmpp_kv.KEY, vmmpp_kv.VALUE))


def sequence_bytes(c, seq):
    return [block_bytes(c, b) for b in c.block_table(seq)]


def written(c, pc, tokens):
    """A sequence of len(tokens) tokens, its KV written (test pattern: differs per sequence id,
    token and element), published with the prefix cache."""
    s = c.add_sequence()
    pc.append(s, len(tokens))
    c.write_test_pattern(s)
    pc.publish(s, tokens)
    return s


class HostTierCapiTest(unittest.TestCase):
    def test_evicted_blocks_spill_to_the_tier_and_attach_copies_them_back(self):
        with cache() as c, vmmpp_kv.PrefixCache(c) as pc, vmmpp_kv.HostTier(pc, max_blocks=8) as tier:
            p = prompt(3 * BLOCK_TOKENS + 2)  # 3 full blocks and 2 tokens
            s = written(c, pc, p)
            before = sequence_bytes(c, s)[:3]
            pc.free(s)
            self.assertEqual(tier.lookup(p), (12, 0))
            self.assertEqual(len(pc.evict(2).blocks), 2)  # the tail's 2 blocks (LRU: a prompt's tail first)
            st = tier.stats()
            self.assertEqual((st["offloaded_blocks"], st["keyed_blocks"], st["free_blocks"], st["max_blocks"]),
                             (2, 2, 6, 8))
            self.assertEqual(st["bytes_to_host"], 2 * pc.stats()["block_bytes"])
            self.assertEqual(tier.lookup(p), (4, 8))
            pc.clear()
            self.assertEqual(tier.lookup(p), (0, 12))
            self.assertEqual(tier.stats()["offloaded_blocks"], 3)
            self.assertEqual(c.stats()["used_blocks"], 0)
            # Attach: every full block from the host, in fresh GPU blocks, with the bytes first written.
            seq, cached, host = tier.attach(p)
            self.assertEqual((cached, host), (12, 12))
            self.assertEqual(c.tokens(seq), 12)
            self.assertEqual(sequence_bytes(c, seq), before)
            st = tier.stats()
            self.assertEqual((st["loaded_blocks"], st["host_hits"]), (3, 3))
            self.assertEqual(st["bytes_to_device"], 3 * pc.stats()["block_bytes"])
            # They are cached on the GPU again: a second attach finds them there.
            self.assertEqual(tier.lookup(p), (12, 0))
            seq2, cached2, host2 = tier.attach(p)
            self.assertEqual((cached2, host2), (12, 0))
            self.assertEqual(list(c.block_table(seq2)), list(c.block_table(seq)))
            # A prompt that diverges after the first block finds that block only.
            other = p[:BLOCK_TOKENS] + prompt(2 * BLOCK_TOKENS, start=5000)
            self.assertEqual(tier.lookup(other), (4, 0))
            pc.free(seq)
            pc.free(seq2)

    def test_store_ahead_copies_the_next_victims_and_their_eviction_copies_nothing(self):
        with cache() as c, vmmpp_kv.PrefixCache(c) as pc, vmmpp_kv.HostTier(pc, max_blocks=8) as tier:
            p = prompt(3 * BLOCK_TOKENS)
            s = written(c, pc, p)
            before = sequence_bytes(c, s)
            pc.free(s)
            self.assertEqual(tier.store_ahead(2), 2)
            self.assertEqual(tier.store_ahead(5), 1)
            self.assertEqual(tier.store_ahead(5), 0)
            st = tier.stats()
            self.assertEqual((st["stored_ahead_blocks"], st["keyed_blocks"], st["offloaded_blocks"]), (3, 3, 0))
            pc.clear()
            self.assertEqual(tier.stats()["offloaded_blocks"], 0)  # already kept: no copy
            seq, cached, host = tier.attach(p)
            self.assertEqual((cached, host), (12, 12))
            self.assertEqual(sequence_bytes(c, seq), before)
            pc.free(seq)

    def test_extra_keys_chain_the_tiers_keys_too(self):
        with cache() as c, vmmpp_kv.PrefixCache(c) as pc, vmmpp_kv.HostTier(pc, max_blocks=8) as tier:
            p = prompt(2 * BLOCK_TOKENS)
            s = c.add_sequence()
            pc.append(s, len(p))
            c.write_test_pattern(s)
            pc.publish(s, p, extra=(7,))
            pc.free(s)
            pc.clear()
            self.assertEqual(tier.lookup(p, extra=(7,)), (0, 8))
            self.assertEqual(tier.lookup(p), (0, 0))
            self.assertEqual(tier.lookup(p, extra=(8,)), (0, 0))

    def test_a_tier_too_small_keeps_the_newest_victims(self):
        with cache() as c, vmmpp_kv.PrefixCache(c) as pc, vmmpp_kv.HostTier(pc, max_blocks=2) as tier:
            p = prompt(4 * BLOCK_TOKENS)
            pc.free(written(c, pc, p))
            pc.clear()  # 4 victims, room for 2
            st = tier.stats()
            self.assertEqual((st["offloaded_blocks"], st["dropped_blocks"], st["keyed_blocks"]), (2, 2, 2))
            # LRU evicts a prompt's tail first, so the last victims, the ones kept, are its head.
            self.assertEqual(tier.lookup(p), (0, 8))
            # Newer victims take the room of the older ones.
            q = prompt(2 * BLOCK_TOKENS, start=3000)
            pc.free(written(c, pc, q))
            pc.clear()
            st = tier.stats()
            self.assertEqual((st["offloaded_blocks"], st["evicted_blocks"], st["keyed_blocks"]), (4, 2, 2))
            self.assertEqual(tier.lookup(q), (0, 8))
            self.assertEqual(tier.lookup(p), (0, 0))

    def test_swap_out_and_in_keep_tokens_and_bytes(self):
        with cache() as c, vmmpp_kv.PrefixCache(c) as pc, vmmpp_kv.HostTier(pc, max_blocks=8) as tier:
            s = c.add_sequence()
            pc.append(s, 3 * BLOCK_TOKENS + 1)  # 4 blocks, the last partly filled; not published
            c.write_test_pattern(s)
            before = sequence_bytes(c, s)
            swap_id = tier.swap_out(s)
            self.assertEqual(c.stats()["used_blocks"], 0)
            self.assertEqual(c.stats()["sequences"], 0)
            self.assertEqual(tier.swapped_tokens(swap_id), 13)
            st = tier.stats()
            self.assertEqual((st["swapped_out"], st["swapped_blocks"], st["free_blocks"]), (1, 4, 4))
            # Another sequence takes (and overwrites) the freed blocks meanwhile.
            other = c.add_sequence()
            c.append(other, 4 * BLOCK_TOKENS)
            c.write_test_pattern(other)
            seq = tier.swap_in(swap_id)
            self.assertEqual(c.tokens(seq), 13)
            self.assertEqual(sequence_bytes(c, seq), before)
            self.assertTrue(set(c.block_table(seq)).isdisjoint(c.block_table(other)))
            st = tier.stats()
            self.assertEqual((st["swapped_in"], st["swapped_blocks"], st["free_blocks"]), (1, 0, 8))
            # The id is used up.
            with self.assertRaisesRegex(vmmpp_kv.VmmppError, "no swapped-out sequence") as e:
                tier.swap_in(swap_id)
            self.assertEqual(e.exception.status, "invalid_argument")
            # The sequence grows on as any other.
            pc.append(seq, 5)
            self.assertEqual(c.tokens(seq), 18)
            pc.free(seq)
            c.free(other)

    def test_swap_out_keeps_published_blocks_cached(self):
        with cache() as c, vmmpp_kv.PrefixCache(c) as pc, vmmpp_kv.HostTier(pc, max_blocks=8) as tier:
            p = prompt(2 * BLOCK_TOKENS + 1)
            s = written(c, pc, p)
            swap_id = tier.swap_out(s)
            self.assertEqual(tier.lookup(p), (8, 0))  # its full blocks stay cached on the GPU
            self.assertEqual(pc.stats()["evictable_blocks"], 2)
            tier.drop_swapped(swap_id)
            self.assertEqual(tier.stats()["free_blocks"], 8)
            with self.assertRaisesRegex(vmmpp_kv.VmmppError, "no swapped-out sequence"):
                tier.swapped_tokens(swap_id)

    def test_a_full_tier_raises_tier_full_and_changes_nothing(self):
        with cache() as c, vmmpp_kv.PrefixCache(c) as pc, vmmpp_kv.HostTier(pc, max_blocks=3) as tier:
            # A cached host block is given up for a swap-out.
            p = prompt(BLOCK_TOKENS)
            pc.free(written(c, pc, p))
            pc.clear()
            self.assertEqual(tier.lookup(p), (0, 4))
            a = c.add_sequence()
            pc.append(a, 2 * BLOCK_TOKENS)
            c.write_test_pattern(a)
            first = tier.swap_out(a)
            self.assertEqual(tier.stats()["keyed_blocks"], 1)  # 2 free blocks were enough
            b = c.add_sequence()
            pc.append(b, 2 * BLOCK_TOKENS)
            c.write_test_pattern(b)
            b_bytes = sequence_bytes(c, b)
            with self.assertRaises(vmmpp_kv.TierFull) as e:
                tier.swap_out(b)
            self.assertEqual(e.exception.status, "tier_full")
            self.assertEqual((e.exception.needed, e.exception.free, e.exception.max_blocks), (2, 1, 3))
            self.assertIn("2 host blocks needed, 1 free or evictable of 3", str(e.exception))
            # Nothing changed but the cached host block given up for room: b is live, with its bytes.
            self.assertEqual(c.tokens(b), 8)
            self.assertEqual(sequence_bytes(c, b), b_bytes)
            st = tier.stats()
            self.assertEqual((st["swapped_out"], st["swapped_blocks"], st["keyed_blocks"], st["evicted_blocks"]),
                             (1, 2, 0, 1))
            self.assertEqual(tier.swapped_tokens(first), 8)
            # Once the first swapped sequence comes back, b fits.
            a2 = tier.swap_in(first)
            second = tier.swap_out(b)
            self.assertEqual(sequence_bytes(c, tier.swap_in(second)), b_bytes)
            c.free(a2)

    def test_swap_in_without_room_leaves_the_sequence_swapped_out(self):
        with cache(max_blocks=4) as c, vmmpp_kv.PrefixCache(c) as pc, vmmpp_kv.HostTier(pc, max_blocks=8) as tier:
            s = c.add_sequence()
            pc.append(s, 2 * BLOCK_TOKENS)
            c.write_test_pattern(s)
            before = sequence_bytes(c, s)
            swap_id = tier.swap_out(s)
            hog = c.add_sequence()
            pc.append(hog, 3 * BLOCK_TOKENS)  # 1 block left, 2 needed
            with self.assertRaises(vmmpp_kv.OutOfBlocks) as e:
                tier.swap_in(swap_id)
            self.assertEqual(e.exception.status, "out_of_blocks")
            self.assertIsInstance(e.exception, vmmpp_kv.VmmppError)
            self.assertEqual(c.stats()["sequences"], 1)  # no sequence left behind
            self.assertEqual(tier.swapped_tokens(swap_id), 8)
            pc.free(hog)
            seq = tier.swap_in(swap_id)
            self.assertEqual(sequence_bytes(c, seq), before)
            pc.free(seq)

    def test_attach_without_gpu_room_for_host_hits_keeps_the_gpu_hits(self):
        with cache(max_blocks=4) as c, vmmpp_kv.PrefixCache(c) as pc, vmmpp_kv.HostTier(pc, max_blocks=8) as tier:
            p = prompt(3 * BLOCK_TOKENS)
            pc.free(written(c, pc, p))
            self.assertEqual(len(pc.evict(2).blocks), 2)  # the tail's 2 to the host, the first stays
            self.assertEqual(tier.lookup(p), (4, 8))
            hog = c.add_sequence()
            pc.append(hog, 2 * BLOCK_TOKENS)  # with the cached first block held: 1 block free, 2 needed
            seq, cached, host = tier.attach(p)
            self.assertEqual((cached, host), (4, 0))
            self.assertEqual(c.tokens(seq), 4)
            self.assertEqual(tier.stats()["loaded_blocks"], 0)
            pc.free(seq)
            pc.free(hog)

    def test_the_tier_keeps_its_prefix_cache_alive(self):
        with cache() as c:
            pc = vmmpp_kv.PrefixCache(c)
            tier = vmmpp_kv.HostTier(pc, max_blocks=8)
            p = prompt(2 * BLOCK_TOKENS)
            s = written(c, pc, p)
            before = sequence_bytes(c, s)
            pc.free(s)
            pc.close()  # the handle goes; the prefix cache stays for the tier, with its cached blocks
            self.assertEqual(tier.lookup(p), (8, 0))
            with self.assertRaisesRegex(vmmpp_kv.VmmppError, "has a prefix cache already"):
                vmmpp_kv.PrefixCache(c)
            seq, cached, _ = tier.attach(p)
            self.assertEqual(cached, 8)
            self.assertEqual(sequence_bytes(c, seq), before)
            swap_id = tier.swap_out(seq)  # frees through the prefix cache: its blocks stay cached
            self.assertEqual(c.stats()["used_blocks"], 2)
            tier.drop_swapped(swap_id)
            tier.close()  # and the prefix cache with it: its cached blocks go back
            self.assertEqual(c.stats()["used_blocks"], 0)
            with vmmpp_kv.PrefixCache(c) as again, vmmpp_kv.HostTier(again, max_blocks=1):
                pass
            tier.close()  # twice is fine

    def test_refusals_name_what_is_wrong(self):
        with cache() as c, vmmpp_kv.PrefixCache(c) as pc:
            with self.assertRaisesRegex(vmmpp_kv.VmmppError, "max_blocks must not be zero") as e:
                vmmpp_kv.HostTier(pc, max_blocks=0)
            self.assertEqual(e.exception.status, "invalid_argument")
            with vmmpp_kv.HostTier(pc, max_blocks=4) as tier:
                with self.assertRaisesRegex(vmmpp_kv.VmmppError, "the prefix cache has a tier already"):
                    vmmpp_kv.HostTier(pc, max_blocks=4)
                with self.assertRaisesRegex(vmmpp_kv.VmmppError, "no swapped-out sequence 42"):
                    tier.swap_in(42)
                with self.assertRaisesRegex(vmmpp_kv.VmmppError, "no swapped-out sequence 42"):
                    tier.drop_swapped(42)
                with self.assertRaises(vmmpp_kv.VmmppError) as e:
                    tier.swap_out(12345)
                self.assertEqual(e.exception.status, "invalid_argument")
                tier.synchronize()  # host memory: nothing queued
                self.assertTrue(tier.idle())
                tier.stream_waits_for_copies(None)
            with vmmpp_kv.HostTier(pc, max_blocks=4):  # the first one gone, a new one is fine
                pass
        lib = vmmpp_kv.load_library()
        out = ctypes.c_void_p()
        self.assertEqual(lib.vmmpp_kv_tier_create(None, 4, None, ctypes.byref(out)), 1)
        self.assertEqual(lib.vmmpp_kv_last_error().decode(), "vmmpp_kv_tier_create: argument prefix is null")
        self.assertEqual(lib.vmmpp_kv_tier_stats_get(None, None), 1)
        lib.vmmpp_kv_tier_destroy(None)  # ignored


class GpuHostTierTest(unittest.TestCase):
    """On a GPU (skipped without one, or without torch for the streams and the views): an elastic
    cache's tier in page-locked memory on a torch stream of its own; a tier without a stream is
    refused; evicted blocks come back and a swapped-out sequence comes back with every K and V
    value written through DLPack, after their GPU blocks were overwritten."""

    def setUp(self):
        if "san.so" in os.environ.get("LD_PRELOAD", ""):  # capi/tests/CMakeLists.txt preloads libasan, libtsan
            self.skipTest("a sanitizer build: torch under the sanitizer runtime is no test of ours")
        # Asked of the library first: a machine without a GPU (and a sanitizer build's
        # interpreter) never imports torch here.
        try:
            vmmpp_kv.KVCache(max_blocks=1, **dict(GEOMETRY, config="elastic")).close()
        except vmmpp_kv.VmmppError as e:
            if e.status == "cuda_unavailable":
                self.skipTest("no CUDA driver or device")
            raise
        try:
            import torch
        except ImportError:
            self.skipTest("no torch")
        self.torch = torch

    def test_spill_attach_and_swap_keep_every_value(self):
        torch = self.torch
        with vmmpp_kv.KVCache(max_blocks=16, **dict(GEOMETRY, config="elastic")) as c, \
                vmmpp_kv.PrefixCache(c) as pc:
            with self.assertRaisesRegex(vmmpp_kv.VmmppError, "give the tier a stream of its own") as e:
                vmmpp_kv.HostTier(pc, max_blocks=8)
            self.assertEqual(e.exception.status, "invalid_argument")
            tier_stream = torch.cuda.Stream(priority=0)
            tier = vmmpp_kv.HostTier(pc, max_blocks=8, stream=tier_stream.cuda_stream)
            views = [torch.from_dlpack(c.tensor(layer, part)) for layer in range(2) for part in (0, 1)]

            def values(seq, n_blocks):
                table = torch.tensor(list(c.block_table(seq))[:n_blocks], device="cuda")
                return [v[table].clone() for v in views]

            def overwrite_every_block(value):  # a sequence over the whole cache, then freed
                hog = c.add_sequence()
                pc.append(hog, 16 * BLOCK_TOKENS)
                table = torch.tensor(list(c.block_table(hog)), device="cuda")
                for v in views:
                    v[table] = value
                pc.free(hog)

            p = prompt(3 * BLOCK_TOKENS + 1)
            s = c.add_sequence()
            pc.append(s, len(p))
            table = torch.tensor(list(c.block_table(s)), device="cuda")
            g = torch.Generator(device="cuda").manual_seed(30)
            for v in views:
                v[table] = torch.randn(v[table].shape, generator=g, device="cuda")
            written = values(s, 3)
            pc.publish(s, p)
            pc.free(s)
            pc.clear()  # the 3 full blocks to the host, after the writes (the free's fence)
            self.assertEqual(tier.stats()["offloaded_blocks"], 3)
            overwrite_every_block(-1.0)
            seq, cached, host = tier.attach(p)  # the legacy default stream waits for the copies
            self.assertEqual((cached, host), (12, 12))
            for got, want in zip(values(seq, 3), written):
                self.assertTrue(torch.equal(got, want))
            pc.append(seq, 1)
            for v in views:  # the 13th token
                v[int(c.block_table(seq)[3]), 0] = 7.0
            whole = values(seq, 4)
            swap_id = tier.swap_out(seq)  # after the writes queued on the legacy default stream
            pc.clear()
            overwrite_every_block(-2.0)
            seq = tier.swap_in(swap_id)
            self.assertEqual(c.tokens(seq), 13)
            for got, want in zip(values(seq, 4), whole):
                self.assertTrue(torch.equal(got[:3], want[:3]) and torch.equal(got[3, 0], want[3, 0]))
            st = tier.stats()
            self.assertEqual((st["loaded_blocks"], st["swapped_out"], st["swapped_in"]), (3, 1, 1))
            pc.free(seq)
            tier.synchronize()
            self.assertTrue(tier.idle())
            tier.close()
            torch.cuda.synchronize()


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    sys.exit(0 if result.wasSuccessful() else 1)
