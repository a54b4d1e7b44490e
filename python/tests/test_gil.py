"""The GIL is let go of while a call waits: another Python thread runs while KVCache.sleep and
wake copy a large host cache (the calls hold the cache's lock, not the interpreter)."""
import sys
import threading
import time
import unittest

import vmmpp

# 2 MiB blocks (2 layers x 8 heads x 128 dims x f32 x 128 tokens x K and V), 48 of them live:
# sleep and wake each copy 96 MiB (60-100 ms each on a shared 2-core machine).
GEOMETRY = dict(layers=2, kv_heads=8, head_dim=128, dtype="f32", block_tokens=128, max_blocks=128, config="host")


class GilTest(unittest.TestCase):
    def test_other_threads_run_while_sleep_and_wake_copy(self):
        interval = sys.getswitchinterval()
        sys.setswitchinterval(0.001)  # a thread that holds the GIL keeps it at most ~1 ms past a switch request
        try:
            with vmmpp.KVCache(**GEOMETRY) as c:
                c.append(c.add_sequence(), 48 * 128)
                calls = []
                done = threading.Event()

                def worker():
                    for _ in range(3):
                        for call in (c.sleep, c.wake):
                            start = time.perf_counter()
                            call()
                            calls.append((start, time.perf_counter()))
                    done.set()

                ticks = []
                thread = threading.Thread(target=worker)
                thread.start()
                while not done.is_set():
                    ticks.append(time.perf_counter())
                thread.join()
        finally:
            sys.setswitchinterval(interval)
        # Calls long enough to judge: this thread must have run well inside each of them (with
        # the GIL held throughout, it could run only in the first switch interval of a call).
        long_calls = [(a, b) for a, b in calls if b - a > 0.02]
        if not long_calls:
            self.skipTest(f"the copies took under 20 ms here ({max(b - a for a, b in calls) * 1000:.1f} ms)")
        for a, b in long_calls:
            inside = [t for t in ticks if a + 0.005 < t < b - 0.001]
            self.assertTrue(inside, f"no other thread ran during a {1000 * (b - a):.1f} ms call")


if __name__ == "__main__":
    unittest.main()
