"""vmmpp.PrefixCache and vmmpp.HostTier on host caches: a published prompt is found again whole
blocks at a time (its bytes as written), extra keys make other keys, eviction reports what went,
events say the same, one prefix cache per cache; evicted blocks spill to the tier and come back,
and a sequence swaps out and in with its bytes (TierFull with its numbers when there is no room)."""
import unittest

import vmmpp

try:
    import numpy
except ImportError:
    numpy = None

GEOMETRY = dict(layers=2, kv_heads=2, head_dim=64, dtype="f32", block_tokens=16, max_blocks=512, config="host")
BLOCK_TOKENS = 16
ROOT_KEY = (0x6a09e667f3bcc908, 0xbb67ae8584caa73b)  # vmmpp::root_block_key


def prompt(n_tokens, start=1000):
    return list(range(start, start + n_tokens))


def write(cache, seq, value):
    """Writes `value` + token index into every K element of seq's tokens (layer 0)."""
    k = numpy.from_dlpack(cache.key(0))
    slots = numpy.asarray(cache.slot_mapping(seq))
    k[slots // BLOCK_TOKENS, slots % BLOCK_TOKENS] = (value + numpy.arange(len(slots), dtype=numpy.float32))[:, None, None]


def read(cache, seq):
    k = numpy.from_dlpack(cache.key(0))
    slots = numpy.asarray(cache.slot_mapping(seq))
    return k[slots // BLOCK_TOKENS, slots % BLOCK_TOKENS][:, 0, 0]


class PrefixCacheTest(unittest.TestCase):
    def test_publish_then_attach_shares_the_cached_blocks(self):
        with vmmpp.KVCache(**GEOMETRY) as c, vmmpp.PrefixCache(c, record_events=True) as pc:
            p = prompt(50)
            seq, cached = pc.attach(p)
            self.assertEqual(cached, 0)
            self.assertEqual(pc.append(seq, 50), 0)
            self.assertEqual(pc.publish(seq, p), 3)  # 3 full blocks of 50 tokens
            table = list(c.block_table(seq))
            pc.free(seq)
            self.assertEqual(pc.lookup(p), 48)
            self.assertEqual(pc.lookup(p, extra=(7,)), 0)  # other extra keys, other blocks
            again, cached = pc.attach(p + [5, 6])
            self.assertEqual(cached, 48)
            self.assertEqual(list(c.block_table(again)), table[:3])
            stats = pc.stats()
            self.assertEqual((stats["hits"], stats["misses"], stats["cached_blocks"]), (3, 3, 3))
            events = pc.drain_events()
            self.assertEqual([e[0] for e in events], ["stored"] * 3)
            self.assertEqual(events[0][3], ROOT_KEY)
            self.assertEqual(events[1][3], events[0][2])  # chained over the tokens
            pc.free(again)
            gone = pc.evict(1)
            self.assertIsInstance(gone, vmmpp.Eviction)
            self.assertEqual(gone.blocks, [table[2]])  # a prompt's tail goes first
            self.assertEqual(gone.keys, [events[2][2]])
            cleared = pc.clear()
            self.assertEqual(sorted(cleared.blocks), sorted(table[:2]))
            self.assertEqual(pc.lookup(p), 0)
            self.assertEqual(pc.lending_stats()["lends"], 0)

    def test_refusals(self):
        with vmmpp.KVCache(**GEOMETRY) as c, vmmpp.PrefixCache(c, max_cached_bytes=0) as pc:
            with self.assertRaisesRegex(vmmpp.InvalidArgument, "the cache has a prefix cache already"):
                vmmpp.PrefixCache(c)
            with self.assertRaisesRegex(vmmpp.InvalidArgument, "no one to lend to"):
                pc.close()
                vmmpp.PrefixCache(c, lend=True)
        with vmmpp.KVCache(**GEOMETRY, layout="sequence_contiguous", max_tokens_per_sequence=64) as c:
            with self.assertRaisesRegex(vmmpp.InvalidArgument, "sequence_contiguous layout gives each sequence"):
                vmmpp.PrefixCache(c)
        with vmmpp.KVCache(**GEOMETRY) as c, vmmpp.PrefixCache(c) as pc:
            with self.assertRaisesRegex(vmmpp.InvalidArgument, r"^tokens = 2147483648 is out of range"):
                pc.lookup([1, 2**31])
            with self.assertRaisesRegex(vmmpp.InvalidArgument, r"^extra = -1 is out of range"):
                pc.lookup([1], extra=[-1])


@unittest.skipIf(numpy is None, "NumPy is not installed")
class HostTierTest(unittest.TestCase):
    def test_evicted_blocks_spill_to_the_tier_and_come_back(self):
        with vmmpp.KVCache(**GEOMETRY) as c, vmmpp.PrefixCache(c) as pc, \
                vmmpp.HostTier(pc, max_blocks=16) as tier:
            p = prompt(64)
            seq, _, _ = tier.attach(p)
            pc.append(seq, 64)
            write(c, seq, 100.0)
            pc.publish(seq, p)
            pc.free(seq)
            self.assertEqual(len(pc.evict(4).blocks), 4)
            tier.synchronize()
            self.assertTrue(tier.idle())
            self.assertEqual(tier.lookup(p), (0, 64))
            seq, cached, from_host = tier.attach(p)
            self.assertEqual((cached, from_host), (64, 64))
            self.assertTrue((read(c, seq) == 100.0 + numpy.arange(64)).all())
            stats = tier.stats()
            self.assertEqual((stats["offloaded_blocks"], stats["loaded_blocks"], stats["max_blocks"]), (4, 4, 16))

    def test_swap_out_and_in_keep_the_bytes(self):
        with vmmpp.KVCache(**GEOMETRY) as c, vmmpp.PrefixCache(c) as pc, \
                vmmpp.HostTier(pc, max_blocks=4) as tier:
            seq = c.add_sequence()
            pc.append(seq, 40)
            write(c, seq, 7.0)
            swap_id = tier.swap_out(seq)
            self.assertEqual(tier.swapped_tokens(swap_id), 40)
            self.assertEqual(c.stats()["sequences"], 0)
            big = c.add_sequence()
            pc.append(big, 40)
            with self.assertRaises(vmmpp.TierFull) as e:  # 3 of the 4 host blocks hold the first
                tier.swap_out(big)
            self.assertEqual((e.exception.needed, e.exception.free, e.exception.max_blocks), (3, 1, 4))
            back = tier.swap_in(swap_id)
            self.assertTrue((read(c, back) == 7.0 + numpy.arange(40)).all())
            with self.assertRaisesRegex(vmmpp.InvalidArgument, "no swapped-out sequence"):
                tier.swap_in(swap_id)
            with self.assertRaisesRegex(vmmpp.InvalidArgument, "the prefix cache has a tier already"):
                vmmpp.HostTier(pc, max_blocks=4)

    def test_the_tier_keeps_its_prefix_cache_and_cache_alive(self):
        c = vmmpp.KVCache(**GEOMETRY)
        pc = vmmpp.PrefixCache(c)
        tier = vmmpp.HostTier(pc, max_blocks=4)
        c.close()
        pc.close()
        seq, cached, _ = tier.attach(prompt(20))  # the cache and the prefix cache work on
        self.assertEqual((cached, tier.lookup(prompt(20))), (0, (0, 0)))
        self.assertEqual(tier.stats()["max_blocks"], 4)
        tier.close()
        with self.assertRaisesRegex(vmmpp.InvalidArgument, "the host tier is closed"):
            tier.stats()


if __name__ == "__main__":
    unittest.main()
