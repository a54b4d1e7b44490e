#!/usr/bin/env python3
"""The prefix cache's C ABI (vmmpp_kv_prefix_*) and vmmpp_kv.PrefixCache on host caches (ctest
`python_prefix_capi`, label cpu, standard library only).

A prompt published and its sequence freed stays cached: lookup and attach find exactly its full
blocks, the attached sequence's block table is the cached blocks (their KV bytes as written),
extra keys make other keys, eviction gives the blocks back to the cache and reports them (ids,
keys, freed pages; LRU: a prompt's tail first, whole pages first), stats and events say the same
counts, the bound is kept by free, append evicts when the cache refuses, and the refusals name
what is wrong (unknown sequence, too many tokens, sequence_contiguous, a second prefix cache,
null arguments). With lend=True an idle child process's cached pages go to this process's
refused growth through the child's budget watcher (vmmpp_kv_prefix_create_lending), never its
live ones. Environment as test_kv_dlpack.py.
"""
import ctypes
import os
import struct
import subprocess
import sys
import unittest

from capi_test_support import import_vmmpp_kv

vmmpp_kv = import_vmmpp_kv()

# 2 layers x 2 heads x 64 dims x f32 x 16 tokens: a block is 32 KiB in every split layout
# (K and V), 64 of them per 2 MiB page of the host pool.
GEOMETRY = dict(layers=2, kv_heads=2, head_dim=64, dtype="f32", block_tokens=16, max_blocks=512, config="host")
BLOCK_TOKENS = 16
BLOCK_BYTES = 2 * 2 * 16 * 2 * 64 * 4
PAGE_BYTES = 2 << 20
BLOCKS_PER_PAGE = PAGE_BYTES // BLOCK_BYTES
ROOT_KEY = (0x6a09e667f3bcc908, 0xbb67ae8584caa73b)  # vmmpp::root_block_key
PAGED_LAYOUTS = tuple(name for name in vmmpp_kv.LAYOUTS if name != "sequence_contiguous")


PAGE_TOKENS = BLOCKS_PER_PAGE * BLOCK_TOKENS


def lending_shape(budget):
    """A host cache of one model of the 3-page process budget `budget`."""
    return dict(layers=2, kv_heads=2, head_dim=64, dtype="f32", block_tokens=16, max_blocks=512, config="host",
                layout="block_major", budget_name=budget, global_limit_bytes=3 * PAGE_BYTES,
                model_limit_bytes=3 * PAGE_BYTES)


def ask(child, line):
    child.stdin.write(line + "\n")
    child.stdin.flush()
    return child.stdout.readline().strip()


def lender(budget, lend):
    """The child of the lending test: model a caches 2 pages of a prompt, says "ready", then
    answers "check" (cached tokens, lent blocks, lent bytes) and "grow" (a live sequence of one
    block) until its stdin closes."""
    with vmmpp_kv.ProcessBudgetCache(model="a", **lending_shape(budget)) as a, \
            vmmpp_kv.PrefixCache(a, lend=lend) as pa:
        p = prompt(2 * PAGE_TOKENS)
        s = written_sequence(a, pa, p)
        pa.publish(s, p)
        pa.free(s)
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() == "grow":
                pa.append(a.add_sequence(), BLOCK_TOKENS)
                print("ok", flush=True)
            else:
                st = pa.lending_stats()
                print(pa.lookup(p), st["lent_blocks"], st["lent_bytes"], flush=True)


def cache(layout="block_major", **extra):
    geometry = dict(GEOMETRY, **extra)
    return vmmpp_kv.KVCache(**geometry, layout=layout)


def prompt(n_tokens, start=1000):
    return list(range(start, start + n_tokens))


def written_sequence(c, pc, tokens):
    """A sequence of len(tokens) tokens (appended through the prefix cache), its KV written."""
    s = c.add_sequence()
    assert pc.append(s, len(tokens)) == 0
    c.write_test_pattern(s)
    return s


def first_key(c, block):
    """Layer 0's K element [token 0, head 0, dim 0] of `block` (f32), read at the block's address."""
    return struct.unpack("f", ctypes.string_at(c.address(0, vmmpp_kv.KEY, block), 4))[0]


class PrefixCapiTest(unittest.TestCase):
    def test_publish_lookup_attach_share_the_blocks(self):
        for layout in PAGED_LAYOUTS:
            # mla: one latent of 128 per token (kv_heads 1), half a split layout's block.
            shape = dict(kv_heads=1, head_dim=128) if layout == "mla" else {}
            with self.subTest(layout=layout), cache(layout, **shape) as c, vmmpp_kv.PrefixCache(c) as pc:
                p = prompt(5 * BLOCK_TOKENS + 7)  # 5 full blocks and 7 tokens
                s = written_sequence(c, pc, p)
                table = list(c.block_table(s))
                self.assertEqual(len(table), 6)
                self.assertEqual(pc.lookup(p), 0)
                self.assertEqual(pc.publish(s, p), 5)
                self.assertEqual(pc.publish(s, p), 0)  # already registered
                self.assertEqual(pc.lookup(p), 80)
                self.assertEqual(pc.lookup(p[:47]), 32)
                self.assertEqual(pc.lookup(p[:15]), 0)
                self.assertEqual(pc.lookup(p[:20] + [7] + p[21:]), 16)  # diverges in block 1
                self.assertEqual(pc.lookup([7] + p[1:]), 0)  # the first token differs: nothing
                self.assertEqual(pc.lookup([]), 0)
                expected = [first_key(c, b) for b in table[:5]]
                pc.free(s)
                st = c.stats()
                self.assertEqual((st["sequences"], st["used_blocks"]), (0, 5))  # the tail block went back
                ps = pc.stats()
                self.assertEqual((ps["hits"], ps["misses"], ps["evictions"]), (0, 0, 0))
                self.assertEqual((ps["cached_blocks"], ps["evictable_blocks"]), (5, 5))
                block_bytes = BLOCK_BYTES // 2 if layout == "mla" else BLOCK_BYTES
                self.assertEqual(ps["block_bytes"], block_bytes)
                self.assertEqual((ps["cached_bytes"], ps["evictable_bytes"]), (5 * block_bytes, 5 * block_bytes))

                seq, cached = pc.attach(p + [1, 2, 3])  # 90 tokens: 5 full blocks, all cached
                self.assertEqual(cached, 80)
                self.assertEqual(c.tokens(seq), 80)
                self.assertEqual(list(c.block_table(seq)), table[:5])
                self.assertEqual([first_key(c, b) for b in table[:5]], expected)  # the KV written for s
                self.assertEqual(expected[0], float(vmmpp_kv.test_pattern(s, 0, 0, 0, 0, 0)))
                ps = pc.stats()
                self.assertEqual((ps["hits"], ps["misses"], ps["evictable_blocks"]), (5, 0, 0))
                self.assertEqual(pc.append(seq, 10), 80)
                self.assertEqual(c.tokens(seq), 90)

                # A prompt sharing 3 blocks: 3 hits, 2 misses (88 tokens, 5 full blocks), attached
                # for reads on a stream (NULL here: the legacy default stream, as attach's default).
                other = p[:48] + [5] * 40
                s2, cached2 = pc.attach(other, stream=0)
                self.assertEqual(cached2, 48)
                self.assertEqual(list(c.block_table(s2)), table[:3])
                ps = pc.stats()
                self.assertEqual((ps["hits"], ps["misses"]), (8, 2))
                pc.append(s2, 40)
                c.write_test_pattern(s2, 48)
                self.assertEqual(pc.publish(s2, other), 2)  # blocks 3 and 4 of the new prompt
                self.assertEqual(pc.lookup(other), 80)
                self.assertEqual(pc.stats()["cached_blocks"], 7)
                pc.free(s2)
                pc.free(seq)
                self.assertEqual(c.stats()["used_blocks"], 7)
                self.assertEqual(pc.stats()["evictable_blocks"], 7)

    def test_extra_keys_make_other_keys(self):
        with cache() as c, vmmpp_kv.PrefixCache(c) as pc:
            p = prompt(5 * BLOCK_TOKENS)
            s = written_sequence(c, pc, p)
            self.assertEqual(pc.publish(s, p, extra=(1, 2)), 5)
            self.assertEqual(pc.lookup(p, extra=(1, 2)), 80)
            self.assertEqual(pc.lookup(p), 0)
            self.assertEqual(pc.lookup(p, extra=(2, 1)), 0)
            self.assertEqual(pc.lookup(p, extra=(1,)), 0)
            self.assertEqual(pc.lookup(p, extra=(1, 2, 0)), 0)
            self.assertEqual(pc.publish(s, p), 0)  # its blocks are cached under the other keys already
            self.assertEqual(pc.lookup(p), 0)
            t = written_sequence(c, pc, p)  # the same tokens, another adapter
            self.assertEqual(pc.publish(t, p, extra=(2**64 - 1,)), 5)
            self.assertEqual(pc.lookup(p, extra=[2**64 - 1]), 80)
            seq, cached = pc.attach(p, extra=(1, 2))
            self.assertEqual((cached, list(c.block_table(seq))), (80, list(c.block_table(s))))
            seq2, cached2 = pc.attach(p, extra=(2**64 - 1,))
            self.assertEqual((cached2, list(c.block_table(seq2))), (80, list(c.block_table(t))))
            self.assertNotEqual(list(c.block_table(s)), list(c.block_table(t)))
            self.assertEqual(pc.stats()["cached_blocks"], 10)

    def test_eviction_gives_blocks_back_and_reports_them(self):
        with cache() as c, vmmpp_kv.PrefixCache(c, record_events=True) as pc:
            p = prompt(5 * BLOCK_TOKENS)
            s = written_sequence(c, pc, p)
            table = list(c.block_table(s))
            self.assertEqual(c.stats()["committed_bytes"], PAGE_BYTES)
            pc.publish(s, p)
            stored = pc.drain_events()
            self.assertEqual(len(stored), 5)
            self.assertEqual([e[0] for e in stored], ["stored"] * 5)
            self.assertEqual([e[1] for e in stored], table)
            self.assertEqual(stored[0][3], ROOT_KEY)
            for i in range(1, 5):
                self.assertEqual(stored[i][3], stored[i - 1][2])  # chained on the block before
            self.assertEqual(len({e[2] for e in stored}), 5)
            key_of = {e[1]: e[2] for e in stored}
            self.assertEqual(pc.drain_events(), [])

            # Held by a sequence: nothing to evict.
            ev = pc.evict(5)
            self.assertEqual(ev, vmmpp_kv.Eviction([], [], 0))
            pc.free(s)
            # Least recently used first: the prompt's tail.
            ev = pc.evict(2)
            self.assertEqual(ev.blocks, [table[4], table[3]])
            self.assertEqual(ev.keys, [key_of[table[4]], key_of[table[3]]])
            self.assertEqual(ev.freed_page_bytes, 0)
            self.assertEqual(pc.drain_events(),
                             [("removed", b, key_of[b], ROOT_KEY) for b in (table[4], table[3])])
            self.assertEqual(pc.lookup(p), 48)
            self.assertEqual(c.stats()["used_blocks"], 3)
            ps = pc.stats()
            self.assertEqual((ps["evictions"], ps["cached_blocks"], ps["evictable_blocks"]), (2, 3, 3))

            ev = pc.clear()
            self.assertEqual(sorted(ev.blocks), sorted(table[:3]))
            self.assertEqual(ev.freed_page_bytes, PAGE_BYTES)  # the page holds no block now
            self.assertEqual([e[0] for e in pc.drain_events()], ["removed"] * 3)
            self.assertEqual(pc.lookup(p), 0)
            self.assertEqual(c.stats()["used_blocks"], 0)
            c.synchronize()
            self.assertEqual(c.stats()["committed_bytes"], 0)
            ps = pc.stats()
            self.assertEqual((ps["evictions"], ps["cached_blocks"], ps["cached_bytes"]), (5, 0, 0))
            self.assertEqual(pc.clear(), vmmpp_kv.Eviction([], [], 0))

    def test_evict_bytes_takes_whole_pages_oldest_first(self):
        with cache() as c, vmmpp_kv.PrefixCache(c, record_events=True) as pc:
            p = prompt(2 * BLOCKS_PER_PAGE * BLOCK_TOKENS)  # two pages of blocks
            s = written_sequence(c, pc, p)
            table = list(c.block_table(s))
            self.assertEqual(c.stats()["committed_bytes"], 2 * PAGE_BYTES)
            self.assertEqual(pc.publish(s, p), 2 * BLOCKS_PER_PAGE)
            events = pc.drain_events()  # more than the 64 one call of the module asks for
            self.assertEqual([e[1] for e in events], table)
            pc.free(s)
            ev = pc.evict_bytes(1)  # one page: the prompt's tail, touched first, is the oldest
            self.assertEqual(ev.blocks, sorted(table[BLOCKS_PER_PAGE:]))
            self.assertEqual(ev.freed_page_bytes, PAGE_BYTES)
            self.assertEqual(len(ev.keys), BLOCKS_PER_PAGE)
            self.assertEqual(pc.lookup(p), BLOCKS_PER_PAGE * BLOCK_TOKENS)
            c.synchronize()
            self.assertEqual(c.stats()["committed_bytes"], PAGE_BYTES)
            self.assertEqual(len(pc.drain_events()), BLOCKS_PER_PAGE)
            ps = pc.stats()
            self.assertEqual((ps["cached_blocks"], ps["evictions"]), (BLOCKS_PER_PAGE, BLOCKS_PER_PAGE))
            self.assertEqual((ps["committed_bytes"], ps["packed_floor_bytes"], ps["idle_footprint_ratio"]),
                             (PAGE_BYTES, PAGE_BYTES, 1.0))

    def test_events_off_by_default(self):
        with cache() as c, vmmpp_kv.PrefixCache(c) as pc:
            p = prompt(3 * BLOCK_TOKENS)
            s = written_sequence(c, pc, p)
            pc.publish(s, p)
            pc.free(s)
            self.assertEqual(len(pc.clear().blocks), 3)
            self.assertEqual(pc.drain_events(), [])

    def test_bound_is_kept_by_free(self):
        with cache() as c, vmmpp_kv.PrefixCache(c, max_cached_bytes=3 * BLOCK_BYTES) as pc:
            p = prompt(5 * BLOCK_TOKENS)
            s = written_sequence(c, pc, p)
            self.assertEqual(pc.publish(s, p), 5)
            self.assertEqual(pc.stats()["evictions"], 0)  # held by s: nothing over the bound
            pc.free(s)
            ps = pc.stats()
            self.assertEqual((ps["cached_blocks"], ps["evictable_bytes"], ps["evictions"]), (3, 3 * BLOCK_BYTES, 2))
            self.assertEqual(pc.lookup(p), 48)
            self.assertEqual(c.stats()["used_blocks"], 3)
        with cache() as c, vmmpp_kv.PrefixCache(c, max_cached_bytes=0) as pc:
            p = prompt(5 * BLOCK_TOKENS)
            s = written_sequence(c, pc, p)
            pc.publish(s, p)
            self.assertEqual(pc.lookup(p), 80)
            pc.free(s)
            self.assertEqual(pc.lookup(p), 0)
            self.assertEqual(c.stats()["used_blocks"], 0)
            self.assertEqual(pc.stats()["evictions"], 5)

    def test_append_evicts_when_the_cache_refuses(self):
        with cache(max_blocks=8) as c, vmmpp_kv.PrefixCache(c) as pc:
            p = prompt(5 * BLOCK_TOKENS)
            s = written_sequence(c, pc, p)
            pc.publish(s, p)
            pc.free(s)
            t = c.add_sequence()
            with self.assertRaisesRegex(vmmpp_kv.VmmppError, "out_of_blocks"):
                c.append(t, 6 * BLOCK_TOKENS)  # the cache alone: 3 free blocks
            self.assertEqual(pc.append(t, 6 * BLOCK_TOKENS), 0)
            self.assertEqual(c.tokens(t), 6 * BLOCK_TOKENS)
            ps = pc.stats()
            self.assertEqual((ps["evictions"], ps["cached_blocks"]), (3, 2))
            self.assertEqual(pc.lookup(p), 32)  # the head stays
            with self.assertRaisesRegex(vmmpp_kv.VmmppError, "out_of_blocks"):
                pc.append(t, 3 * BLOCK_TOKENS)  # 2 evictable, 3 needed
            self.assertEqual(c.tokens(t), 6 * BLOCK_TOKENS)
            self.assertEqual(pc.stats()["cached_blocks"], 0)  # it evicted what it could first

    def test_lending_gives_an_idle_processs_cached_pages_to_another(self):
        # A budget of 3 pages: a child process (model a) caches 2 pages of a prompt and waits
        # on its stdin, making no call; this process (model b) takes them page by page when the
        # global limit refuses it, through the child's budget watcher, and is refused once only
        # a's live page is left. Without lend, b is refused at once and a keeps its cache.
        for lend in (True, False):
            budget = f"vmmpp_lend_test_{os.getpid()}_{int(lend)}"
            vmmpp_kv.remove_process_budget(budget)
            child = subprocess.Popen([sys.executable, __file__, "--lender", budget, str(int(lend))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                self.assertEqual(child.stdout.readline().strip(), "ready")
                with vmmpp_kv.ProcessBudgetCache(model="b", **lending_shape(budget)) as b:
                    t = b.add_sequence()
                    b.append(t, PAGE_TOKENS)  # the free page
                    if not lend:
                        with self.assertRaisesRegex(vmmpp_kv.VmmppError, "^over_quota"):
                            b.append(t, PAGE_TOKENS)
                        self.assertEqual(ask(child, "check"), f"{2 * PAGE_TOKENS} 0 0")
                        continue
                    b.append(t, PAGE_TOKENS)  # one of a's cached pages
                    self.assertEqual(ask(child, "check"), f"{PAGE_TOKENS} {BLOCKS_PER_PAGE} {PAGE_BYTES}")  # the tail went
                    self.assertEqual(ask(child, "grow"), "ok")  # a's own growth takes its last cached page
                    with self.assertRaisesRegex(vmmpp_kv.VmmppError, "^over_quota"):
                        b.append(t, PAGE_TOKENS)  # only a's live page is left
                    self.assertEqual(ask(child, "check"), f"0 {BLOCKS_PER_PAGE} {PAGE_BYTES}")
                    self.assertEqual(b.tokens(t), 2 * PAGE_TOKENS)
            finally:
                child.stdin.close()
                self.assertEqual(child.wait(timeout=30), 0)
                child.stdout.close()
                vmmpp_kv.remove_process_budget(budget)
        with cache() as c:
            with self.assertRaisesRegex(vmmpp_kv.VmmppError,
                                        "^invalid_argument: vmmpp_kv_prefix_create_lending: the cache's memory is "
                                        "not charged to a budget shared with other models"):
                vmmpp_kv.PrefixCache(c, lend=True)

    def test_refusals_name_what_is_wrong(self):
        with cache() as c, vmmpp_kv.PrefixCache(c) as pc:
            p = prompt(2 * BLOCK_TOKENS)
            with self.assertRaisesRegex(vmmpp_kv.VmmppError, r"^invalid_argument: unknown sequence 12345 "):
                pc.publish(12345, p)
            with self.assertRaisesRegex(vmmpp_kv.VmmppError, r"^invalid_argument: unknown sequence 777 "):
                pc.free(777)
            with self.assertRaisesRegex(vmmpp_kv.VmmppError, r"^invalid_argument: unknown sequence 778 "):
                pc.append(778, 1)
            s = written_sequence(c, pc, p[:20])
            with self.assertRaisesRegex(vmmpp_kv.VmmppError,
                                        rf"^invalid_argument: publish of 32 tokens of sequence {s}: it has 20$"):
                pc.publish(s, p)
            self.assertEqual(pc.stats()["cached_blocks"], 0)
            with self.assertRaisesRegex(vmmpp_kv.VmmppError,
                                        "^invalid_argument: vmmpp_kv_prefix_create: the cache has a prefix cache "
                                        "already"):
                vmmpp_kv.PrefixCache(c)
            # The C ABI's null checks and the last error.
            lib = vmmpp_kv.load_library()
            cached = ctypes.c_uint64()
            self.assertEqual(lib.vmmpp_kv_prefix_lookup(None, None, 0, None, 0, ctypes.byref(cached)), 1)
            self.assertEqual(lib.vmmpp_kv_last_error(), b"vmmpp_kv_prefix_lookup: argument prefix is null")
            self.assertEqual(lib.vmmpp_kv_prefix_publish(pc._handle, s, None, 4, None, 0, None), 1)
            self.assertEqual(lib.vmmpp_kv_last_error(), b"vmmpp_kv_prefix_publish: argument tokens is null")
            self.assertEqual(lib.vmmpp_kv_prefix_evict(pc._handle, 1, None, None, 1, None, None), 1)
            self.assertEqual(lib.vmmpp_kv_last_error(), b"vmmpp_kv_prefix_evict: argument blocks is null")
            # Every null check names its argument (the cache's own calls too).
            self.assertEqual(lib.vmmpp_kv_fork(c._handle, s, None), 1)
            self.assertEqual(lib.vmmpp_kv_last_error(), b"vmmpp_kv_fork: argument child is null")
            self.assertEqual(lib.vmmpp_kv_tokens(None, s, ctypes.byref(cached)), 1)
            self.assertEqual(lib.vmmpp_kv_last_error(), b"vmmpp_kv_tokens: argument kv is null")
            count = ctypes.c_uint64(99)
            self.assertEqual(lib.vmmpp_kv_prefix_drain_events(pc._handle, None, 0, ctypes.byref(count), None), 0)
            self.assertEqual(count.value, 0)
        # One prefix cache per cache, but another once the first is closed.
        with cache() as c:
            vmmpp_kv.PrefixCache(c).close()
            with vmmpp_kv.PrefixCache(c) as pc:
                self.assertEqual(pc.lookup(prompt(32)), 0)
            closed = vmmpp_kv.PrefixCache(c)
            closed.close()
            with self.assertRaisesRegex(ValueError, "closed"):
                closed.lookup([1])
        with cache("sequence_contiguous", max_tokens_per_sequence=256, max_blocks=64) as c:
            with self.assertRaisesRegex(vmmpp_kv.VmmppError,
                                        "^invalid_argument: vmmpp_kv_prefix_create: the sequence_contiguous layout "
                                        "gives each sequence its own blocks, so no block can be shared; a prefix "
                                        "cache needs one of block_major, "):
                vmmpp_kv.PrefixCache(c)
            s = c.add_sequence()
            self.assertEqual(c.append(s, 10), 0)

    def test_prefix_cache_keeps_its_cache_alive(self):
        c = cache()
        pc = vmmpp_kv.PrefixCache(c)
        p = prompt(3 * BLOCK_TOKENS)
        s = written_sequence(c, pc, p)
        table = list(c.block_table(s))
        pc.publish(s, p)
        pc.free(s)
        c.close()  # the handle goes; the cache stays for the prefix cache
        self.assertEqual(pc.lookup(p), 48)
        seq, cached = pc.attach(p)
        self.assertEqual(cached, 48)
        self.assertEqual(pc.stats()["hits"], 3)
        pc.free(seq)
        self.assertEqual(sorted(pc.clear().blocks), sorted(table))
        pc.close()
        pc.close()  # twice is fine


if __name__ == "__main__" and sys.argv[1:2] == ["--lender"]:
    lender(sys.argv[2], sys.argv[3] == "1")
    sys.exit(0)
if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    sys.exit(0 if result.wasSuccessful() else 1)
