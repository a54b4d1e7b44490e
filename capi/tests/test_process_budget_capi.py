#!/usr/bin/env python3
"""The C ABI's cross-process budget (vmmpp_kv_create_in_process_budget, used by bench_serving.py
replay), on host memory: caches of two processes charged to one vmmpp::process_budget.

  1. this process commits one 2 MiB page of a 4 MiB budget; a child process commits the other;
  2. the budget reports 4 MiB; this process's next page is refused (over_quota) and its sequence
     is unchanged;
  3. the child frees and exits: the page is this process's now;
  4. a child killed while holding a page: its share is taken back by the next refused commit;
  5. an unknown configuration or layout is invalid_argument.

    VMMPP_KV_LIB=build/dev/interop/libvmmpp_kv_capi.so python3 capi/tests/test_process_budget_capi.py
Standard library only. Exits 0 when every check passes, 1 otherwise.
"""
import os
import signal
import subprocess
import sys

from capi_test_support import import_vmmpp_kv

vmmpp_kv = import_vmmpp_kv()

PAGE = 2 << 20
# 2 layers x K,V x 8 heads x 64 x f32 = 8 KiB a token: a 2 MiB page is 256 tokens (16 blocks).
GEOMETRY = dict(layers=2, kv_heads=8, head_dim=64, dtype="f32", max_blocks=256, config="host", layout="block_major")
PAGE_TOKENS = 256


def cache(budget, model):
    return vmmpp_kv.ProcessBudgetCache(budget_name=budget, model=model, model_limit_bytes=2 * PAGE,
                                       global_limit_bytes=2 * PAGE, **GEOMETRY)


def child(budget, die):
    c = cache(budget, "b")
    seq = c.add_sequence()
    c.append(seq, PAGE_TOKENS)
    print("held", flush=True)
    if die:
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.readline()
    c.free(seq)
    c.synchronize()
    print("freed", flush=True)


def main():
    failures = []

    def check(ok, what):
        print(("ok   " if ok else "FAIL ") + what, flush=True)
        if not ok:
            failures.append(what)

    budget = f"vmmpp_serving_test_{os.getpid()}"
    vmmpp_kv.remove_process_budget(budget)
    try:
        a = cache(budget, "a")
        seq = a.add_sequence()
        a.append(seq, PAGE_TOKENS)
        check(vmmpp_kv.process_budget_stats(budget)["committed"] == PAGE, "this process holds one page")

        for die in (False, True):
            p = subprocess.Popen([sys.executable, __file__, "--child", budget] + (["--die"] if die else []),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            check(p.stdout.readline().strip() == "held", f"child ({'killed' if die else 'freeing'}) holds a page")
            if not die:
                s = vmmpp_kv.process_budget_stats(budget)
                check(s["committed"] == 2 * PAGE and s["limit"] == 2 * PAGE, "the budget counts both processes")
                try:
                    a.append(seq, PAGE_TOKENS)
                    check(False, "a third page is refused")
                except vmmpp_kv.VmmppError as e:
                    check(e.status == "over_quota" and a.tokens(seq) == PAGE_TOKENS,
                          f"a third page is refused ({e.status}), the sequence unchanged")
                p.stdin.write("\n")
                p.stdin.flush()
                check(p.stdout.readline().strip() == "freed", "child freed its page")
            p.wait()
            # The child's page is free (it gave it back, or it died and the refused commit takes its share back).
            a.append(seq, PAGE_TOKENS)
            check(a.tokens(seq) == 2 * PAGE_TOKENS and vmmpp_kv.process_budget_stats(budget)["committed"] == 2 * PAGE,
                  f"after the child {'died' if die else 'freed'}, this process commits the page")
            a.truncate(seq, PAGE_TOKENS)
            a.synchronize()
            check(vmmpp_kv.process_budget_stats(budget)["committed"] == PAGE, "truncate gives the page back")
        a.free(seq)
        a.synchronize()
        check(vmmpp_kv.process_budget_stats(budget)["committed"] == 0, "free gives everything back")
        for bad in (dict(GEOMETRY, config="static"), dict(GEOMETRY, layout="mla")):
            try:
                vmmpp_kv.ProcessBudgetCache(budget_name=budget, model="c", model_limit_bytes=PAGE, **bad)
                check(False, f"{bad['config']}/{bad['layout']} refused")
            except vmmpp_kv.VmmppError as e:
                check(e.status == "invalid_argument", f"{bad['config']}/{bad['layout']} refused: {e}")
    finally:
        vmmpp_kv.remove_process_budget(budget)
    print(f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], "--die" in sys.argv)
    else:
        sys.exit(main())
