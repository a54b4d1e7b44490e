#!/usr/bin/env python3
"""The C ABI's configurations are vmmpp::named_configs (ctest `python_kv_configs_capi`, label cpu).

  1. the Python module's CONFIGS and PROCESS_BUDGET_CONFIGS are the names the library reports
     (vmmpp_kv_config_names, vmmpp_kv_process_budget_config_names), the latter a subset, and the
     aliases (elastic_pages) stand for a listed name without being listed;
  2. every configuration the library reports, and every alias, makes a cache (vmmpp_kv_create)
     that takes a sequence, on a machine that can run it: host always; the GPU ones everywhere
     or, without a CUDA driver or device, nowhere (each refused with cuda_unavailable, not an
     unknown name); the same for the process-budget configurations (their quota swapped for a
     vmmpp::process_budget's);
  3. an unknown name is invalid_argument, the message listing every valid name; a configuration
     the process budget does not take (static) likewise; peers given to a configuration that is
     not vmm are refused, naming the vmm ones;
  4. a library that lacks functions the module binds (another version's) is refused at load with
     status library_mismatch, naming what it lacks.

    VMMPP_KV_LIB=build/dev/interop/libvmmpp_kv_capi.so python3 capi/tests/test_kv_configs_capi.py
Standard library only. Exits 0 when every check passes, 1 otherwise.
"""
import os
import subprocess
import sys

from capi_test_support import import_vmmpp_kv

vmmpp_kv = import_vmmpp_kv()

# 1 layer x K,V x 2 heads x 32 x f16 x 4 tokens a block, 64 blocks: 64 KiB of span.
GEOMETRY = dict(layers=1, kv_heads=2, head_dim=32, dtype="f16", block_tokens=4, max_blocks=64)


def outcome(make):
    """"ok" if `make()` gives a cache that takes a sequence of 5 tokens, else the error's status."""
    try:
        with make() as cache:
            seq = cache.add_sequence()
            cache.append(seq, 5)
            if cache.tokens(seq) != 5:
                return "wrong token count"
            cache.free(seq)
            cache.synchronize()
        return "ok"
    except vmmpp_kv.VmmppError as e:
        return e.status


def main():
    failures = []

    def check(ok, what):
        print(("ok   " if ok else "FAIL ") + what, flush=True)
        if not ok:
            failures.append(what)

    configs = vmmpp_kv.config_names()
    process_configs = vmmpp_kv.process_budget_config_names()
    print(f"library configurations: {','.join(configs)}; process budget: {','.join(process_configs)}")
    # 1. One list.
    check(vmmpp_kv.CONFIGS == configs, f"vmmpp_kv.CONFIGS {vmmpp_kv.CONFIGS} are the library's")
    check(vmmpp_kv.PROCESS_BUDGET_CONFIGS == process_configs,
          f"vmmpp_kv.PROCESS_BUDGET_CONFIGS {vmmpp_kv.PROCESS_BUDGET_CONFIGS} are the library's")
    check(set(process_configs) <= set(configs), "the process-budget configurations are named configurations")
    check(len(set(configs)) == len(configs) and "host" in configs and "elastic_mapped_ahead" in configs,
          "the names are unique, host and elastic_mapped_ahead among them")
    for alias, name in vmmpp_kv.CONFIG_ALIASES.items():
        check(alias not in configs and name in configs, f"alias {alias} stands for the listed {name}")

    # 2. Every configuration and alias makes a cache where it can run.
    outcomes = {name: outcome(lambda name=name: vmmpp_kv.KVCache(config=name, **GEOMETRY))
                for name in configs + tuple(vmmpp_kv.CONFIG_ALIASES)}
    print(f"vmmpp_kv_create: {outcomes}")
    check(outcomes.get("host") == "ok", "host makes a cache")
    gpu = {name: status for name, status in outcomes.items() if name != "host"}
    statuses = set(gpu.values())
    check(statuses in ({"ok"}, {"cuda_unavailable"}),
          f"the GPU configurations all make a cache, or all are cuda_unavailable: {gpu}")
    for alias, name in vmmpp_kv.CONFIG_ALIASES.items():
        check(outcomes[alias] == outcomes[name], f"alias {alias} does what {name} does ({outcomes[alias]})")

    budget = f"vmmpp_configs_test_{os.getpid()}"
    vmmpp_kv.remove_process_budget(budget)
    try:
        process_outcomes = {
            name: outcome(lambda name=name: vmmpp_kv.ProcessBudgetCache(
                budget_name=budget, model=f"m_{name}", model_limit_bytes=64 << 20, global_limit_bytes=1 << 30,
                config=name, layout="block_major", **GEOMETRY))
            for name in process_configs + tuple(vmmpp_kv.CONFIG_ALIASES)}
    finally:
        vmmpp_kv.remove_process_budget(budget)
    print(f"vmmpp_kv_create_in_process_budget: {process_outcomes}")
    check(process_outcomes.get("host") == "ok", "host makes a cache in a process budget")
    process_gpu = {name: status for name, status in process_outcomes.items() if name != "host"}
    check(set(process_gpu.values()) == statuses,
          f"the GPU configurations do in a process budget what they do alone: {process_gpu}")

    # 3. Refusals name the valid names.
    def refusal(make):
        try:
            make().close()
        except vmmpp_kv.VmmppError as e:
            return e.status, str(e)
        return "ok", ""

    status, message = refusal(lambda: vmmpp_kv.KVCache(config="nonsense", **GEOMETRY))
    check(status == "invalid_argument" and "unknown configuration 'nonsense'" in message,
          f"an unknown configuration is refused: {message}")
    check(all(name in message for name in configs), "the refusal lists every configuration")
    vmmpp_kv.remove_process_budget(budget)
    try:
        status, message = refusal(lambda: vmmpp_kv.ProcessBudgetCache(
            budget_name=budget, model="m", model_limit_bytes=64 << 20, config="static", layout="block_major",
            **GEOMETRY))
    finally:
        vmmpp_kv.remove_process_budget(budget)
    check(status == "invalid_argument" and "'static'" in message and all(n in message for n in process_configs),
          f"static is refused in a process budget, the valid ones listed: {message}")
    status, message = refusal(lambda: vmmpp_kv.KVCache(config="host", peers=(1,), **GEOMETRY))
    check(status == "invalid_argument" and "peer devices" in message and "elastic_page" in message,
          f"peers are refused on host: {message}")

    # 3b. budget_bytes: a host cache takes it as a budget of its own (it was ignored before); the
    # configurations charged to no budget refuse it rather than ignore it.
    check(outcome(lambda: vmmpp_kv.KVCache(config="host", budget_bytes=1, **GEOMETRY)) == "over_quota",
          "a host cache with a budget of 1 byte refuses its first page")
    check(outcome(lambda: vmmpp_kv.KVCache(config="host", budget_bytes=1 << 30, **GEOMETRY)) == "ok",
          "a host cache with a budget of 1 GiB takes the sequence")
    status, message = refusal(lambda: vmmpp_kv.KVCache(config="static", budget_bytes=1 << 20, **GEOMETRY))
    check(status == "invalid_argument" and "charged to no budget" in message,
          f"budget_bytes is refused for static: {message}")

    # 4. A library that lacks functions the module binds (another version's) is named as such at
    # load, not an AttributeError later: libc stands in for it, in a child (the library loads once).
    probe = ("import sys, vmmpp_kv\n"
             "try:\n    vmmpp_kv.load_library()\nexcept vmmpp_kv.VmmppError as e:\n"
             "    print(e.status, e)\n    sys.exit(0)\nsys.exit(3)\n")
    env = dict(os.environ, VMMPP_KV_LIB="libc.so.6",
               PYTHONPATH=os.path.dirname(vmmpp_kv.__file__) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    check(child.returncode == 0 and child.stdout.startswith("library_mismatch")
          and "different versions" in child.stdout and "vmmpp_kv_last_error" in child.stdout,
          f"a library of another version is refused by name: rc {child.returncode}, {child.stdout}{child.stderr}")

    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
