#!/usr/bin/env python3
"""bench_serving.py lend on host memory (--device cpu, a tiny model and workload): with
elastic_lend the idle model A lends its cached pages to the busy model B (A lent > 0 bytes, its
cache emptied, B preempted no more than without lending), with elastic (no lend) A lends nothing
and keeps its cache; every turn of both rounds of A and of B completes. A check of the path
(processes, budget, lending, report), not of timings.

    VMMPP_KV_LIB=build/dev/interop/libvmmpp_kv_capi.so python3 examples/serving/test_serving_lend.py
Exits 77 (skipped) without torch; ctest serving_lend_cpu (label cpu). About two minutes on two cores.
"""
import json
import os
import subprocess
import sys
import tempfile
import unittest

SKIP = 77
HERE = os.path.dirname(os.path.abspath(__file__))

# 1b:1 has 2 KiB of KV a token, so a 2 MiB host page holds 1024 tokens: a 6 MiB budget is 3
# pages. A's workload caches about 2 of them; B's contexts fill about 4 MiB, more than a static
# half and more than what A leaves it unless A lends.
TINY = ["--device", "cpu", "--model", "1b:1", "--vocab", "1024", "--kv-mib", "6", "--systems", "2",
        "--system-tokens", "512", "--sessions", "4", "--turns", "2", "--user", "64:128", "--answer", "8:16",
        "--start-spread", "0", "--idle-sessions", "4", "--idle-turns", "1", "--idle-user", "128:256",
        "--idle-answer", "8:16", "--idle-start-spread", "0", "--repeats", "1", "--modes", "elastic,elastic_lend"]


class LendTest(unittest.TestCase):
    def test_idle_models_cache_goes_to_the_busy_one_only_with_lend(self):
        with tempfile.TemporaryDirectory() as out:
            subprocess.run([sys.executable, os.path.join(HERE, "bench_serving.py"), "lend", "--out", out] + TINY,
                           check=True, timeout=900)
            with open(os.path.join(out, "lend.json")) as f:
                report = json.load(f)
            self.assertTrue(os.path.exists(os.path.join(out, "lend.md")))
        runs = {r["mode"]: r for r in report["runs"]}
        self.assertEqual(sorted(runs), ["elastic", "elastic_lend"])
        for r in runs.values():
            self.assertEqual(r["B"]["completed"], r["B"]["turns"], r["mode"])
            self.assertEqual(r["A"]["phase1"]["completed"], r["A"]["phase1"]["turns"], r["mode"])
            self.assertEqual(r["A"]["phase3"]["completed"], r["A"]["phase3"]["turns"], r["mode"])
            self.assertGreater(r["A"]["cached_mib_before"], 0, r["mode"])  # A idled with a warm cache
        lent, kept = runs["elastic_lend"], runs["elastic"]
        self.assertGreater(lent["A"]["lent_mib"], 0)
        self.assertGreater(lent["A"]["lends"], 0)
        self.assertLess(lent["A"]["cached_mib_after"], lent["A"]["cached_mib_before"])
        self.assertLessEqual(lent["B"]["preemptions"], kept["B"]["preemptions"])
        self.assertEqual(kept["A"]["lent_mib"], 0)
        self.assertEqual(kept["A"]["lends"], 0)
        self.assertEqual(kept["A"]["cached_mib_after"], kept["A"]["cached_mib_before"])  # A kept its cache


if __name__ == "__main__":
    try:
        import torch  # noqa: F401
    except ImportError:
        print("no torch: skipping")
        sys.exit(SKIP)
    unittest.main()
