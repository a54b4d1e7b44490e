#!/usr/bin/env python3
"""The host tier in the serving engine (issue 30): greedy tokens equal with the tier off and on,
with recompute and with swap preemption.

A shared-prefix multi-turn workload (workload.py) runs through the engine with prefix caching on,
float32 (the bf16 weights upcast, TF32 off), sessions in closed loops without a clock, on a cache
too small for every session's prefix (the prefix cache evicts, the engine preempts), in four
runs: {no tier, a vmmpp_kv.HostTier behind the prefix cache} x {recompute, swap preemption}.
  - every turn's greedy tokens are the same in all four (and equal those of a roomy cache);
  - the tier was used: with it, evicted blocks went to host memory (offloaded > 0) and came back
    at admission (loaded > 0, the engine's host tokens > 0); with swap preemption, preempted
    requests were swapped out and back in (swapped_in > 0, no recompute of theirs);
  - without a tier, swap preemption recomputes (nothing swapped);
  - after each run every block is back (clear the prefix cache, close the tier).
On a GPU the configuration is elastic (the tier's copies on a torch stream of its own); with
--device cpu, host (the tier in host memory, no stream).

    VMMPP_KV_LIB=build/dev/interop/libvmmpp_kv_capi.so python3 examples/serving/test_serving_tier.py --device cpu
Exits 77 (skipped) without torch, or without a CUDA device unless --device cpu; 1 on a mismatch.
ctest serving_tier_cpu (label cpu, --device cpu) and serving_tier_greedy (label gpu).
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "..", "capi", "python")]

from test_support import SKIP, torch_on  # noqa: E402

import workload as W  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--vocab", type=int, default=1024, help="cut the vocabulary (faster on a CPU)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=6)
    parser.add_argument("--turns", type=int, default=3)
    args = parser.parse_args()
    torch = torch_on(args.device)
    if torch is None:
        return SKIP
    import engine as E
    import model as M
    from kv_binding import vmmpp_kv

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    config = "elastic" if on_gpu else "host"
    failures = []

    def check(ok, what):
        print(("ok   " if ok else "FAIL ") + what, flush=True)
        if not ok:
            failures.append(what)

    cfg = M.preset("1b", layers=args.layers, vocab=args.vocab)
    model = M.Llama(cfg, device, dtype=torch.float32, seed=1)

    def workload():  # a fresh one per run: sessions record their prompts and answers
        return W.shared_prefix_workload(30, cfg.vocab, systems=3, system_tokens=48, sessions=args.sessions,
                                        turns=args.turns, user_tokens=(3, 20), answer_tokens=(6, 18),
                                        start_spread_s=0.0)

    first = workload()
    contexts = [len(first.system_prompts[s.system]) + sum(len(t.user) + t.max_new for t in s.turns)
                for s in first.sessions]  # each session's last context, in tokens
    longest_blocks, all_blocks = -(-max(contexts) // 16), sum(-(-c // 16) for c in contexts)
    # Small: not every session's prefix fits (the prefix cache evicts, the engine preempts); the
    # tier holds all of them, swapped-out requests included.
    small, roomy, tier_blocks = max(longest_blocks + 2, all_blocks // 3), 4 * all_blocks + 64, 2 * all_blocks

    def run(max_blocks, host_tier_blocks, preemption, store_ahead=0):
        cache = vmmpp_kv.KVCache(layers=cfg.layers, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, dtype="f32",
                                 config=config, layout="block_major", device=0, max_blocks=max_blocks)
        pc = vmmpp_kv.PrefixCache(cache)
        kv = E.PagedKV(cache, device, prefix_cache=pc, host_tier_blocks=host_tier_blocks, store_ahead_blocks=store_ahead)
        engine = E.Engine(model, kv, max_batch=8, max_prefill_tokens=512, preemption=preemption)
        work = workload()
        driver = W.SessionDriver(work, engine, lambda rid, prompt, n, arrival: E.Request(rid, prompt, n, arrival))
        driver.run()
        assert not engine.rejected, f"{len(engine.rejected)} requests rejected"
        tier = kv.tier.stats() if kv.tier is not None else None
        prefix = pc.stats()
        name = f"{max_blocks} blocks, tier {host_tier_blocks or 'off'}, {preemption}, store ahead {store_ahead}"
        print(f"info {name}: {len(driver.answers())} turns, {engine.steps} steps, {engine.prefill_tokens} prompt "
              f"tokens computed, {engine.cached_tokens}/{engine.admitted_tokens} admitted tokens cached "
              f"({kv.host_tokens} from the host tier), {engine.preemptions} preemptions ({engine.swapped_out} "
              f"swapped out, {engine.swapped_in} in, {engine.swap_retries} in and out again), prefix evictions {prefix['evictions']}"
              + (f", tier {tier}" if tier else ""), flush=True)
        if on_gpu:
            torch.cuda.synchronize()
        if kv.tier is not None:
            check(tier["swapped_blocks"] == 0, f"{name}: no sequence left swapped out")
            kv.tier.close()
        pc.clear()
        cache.synchronize()
        check(cache.stats()["used_blocks"] == 0, f"{name}: every block back")
        return driver.answers(), engine, kv, tier, prefix

    reference, *_ = run(roomy, 0, "recompute")
    check(len(reference) == args.sessions * args.turns, f"roomy: {len(reference)} turns answered")
    # {no tier, tier} x {recompute, swap}, and the tier storing 4 blocks ahead a step, with swap.
    runs = [(0, "recompute", 0), (0, "swap", 0), (tier_blocks, "recompute", 0), (tier_blocks, "swap", 0),
            (tier_blocks, "swap", 4)]
    for tier_blocks_or_off, preemption, ahead in runs:
        answers, engine, kv, tier, prefix = run(small, tier_blocks_or_off, preemption, ahead)
        name = f"small cache, tier {'on' if tier_blocks_or_off else 'off'}, {preemption}, store ahead {ahead}"
        same = sum(answers.get(key) == tokens for key, tokens in reference.items())
        check(same == len(reference), f"{name}: {same}/{len(reference)} turns' greedy tokens equal the roomy "
                                      f"cache's")
        check(prefix["evictions"] > 0 and engine.preemptions > 0,
              f"{name}: under pressure ({prefix['evictions']} evictions, {engine.preemptions} preemptions)")
        if tier is None:
            check(engine.swapped_out == engine.swapped_in == 0 and engine.recomputes == engine.preemptions,
                  f"{name}: nothing swapped without a tier")
            continue
        kept = tier["offloaded_blocks"] + tier["stored_ahead_blocks"]  # at eviction, or copied ahead of it
        check(kept > 0 and tier["loaded_blocks"] > 0 and kv.host_tokens > 0,
              f"{name}: evicted blocks went to the host ({kept}) and came back "
              f"({tier['loaded_blocks']}, {kv.host_tokens} tokens)")
        if ahead:
            check(tier["stored_ahead_blocks"] > 0, f"{name}: blocks stored ahead ({tier['stored_ahead_blocks']})")
        if preemption == "swap":
            retries = engine.swap_retries  # swapped in without room for a token, out again
            check(engine.swapped_in > 0 and engine.swapped_in == engine.swapped_out == engine.preemptions
                  and engine.recomputes == 0 and tier["swapped_in"] == engine.swapped_in + retries
                  and tier["swapped_out"] == engine.swapped_out + retries,
                  f"{name}: every preemption swapped out and back in, none recomputed ({engine.preemptions} "
                  f"preemptions, {engine.recomputes} recomputed, {tier['swapped_out']} swapped out, "
                  f"{tier['swapped_in']} in, {retries} in and out again)")
        else:
            check(tier["swapped_out"] == 0, f"{name}: recompute preemption swaps nothing")
    print(f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
