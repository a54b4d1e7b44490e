#!/usr/bin/env python3
"""The serving engine's greedy tokens against dense references (issue 17's correctness test).

  1. float32 (the bf16 weights upcast, TF32 off), caches small enough that the engine preempts
     (out_of_blocks, over_quota): every request's greedy tokens equal those of a per-prompt dense
     reference with a contiguous KV cache and no batching (model.reference_generate).
  2. bf16, the serving precision: the engine on vmmpp memory (elastic, elastic_pages, static)
     equals, bit for bit, the same engine on contiguous torch tensors (DenseKV, no vmmpp) under
     the same schedule; agreement with the per-prompt reference is printed (bf16 rounding
     differs with the batch's shape, so it is not asserted).

    VMMPP_KV_LIB=build/dev/interop/libvmmpp_kv_capi.so python3 examples/serving/test_serving.py
Exits 77 (skipped) without torch or a CUDA device (--device cpu runs it on host memory), 1 on a
mismatch.
"""
import argparse
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "..", "capi", "python")]

from test_support import SKIP, torch_on  # noqa: E402


def prompts(seed, n, vocab, shortest=5, longest=70, new=(8, 24)):
    lengths, tokens = random.Random(seed), random.Random(seed + 1000)  # lengths whatever the vocabulary
    shape = [(lengths.randint(shortest, longest), lengths.randint(*new)) for _ in range(n)]
    return [([tokens.randrange(vocab) for _ in range(p)], m) for p, m in shape]


def run_engine(engine_mod, model, kv, work, max_batch=256, max_prefill_tokens=8192):
    engine = engine_mod.Engine(model, kv, max_batch=max_batch, max_prefill_tokens=max_prefill_tokens)
    requests = [engine_mod.Request(i, p, n) for i, (p, n) in enumerate(work)]
    for r in requests:
        engine.submit(r)
    engine.run()
    assert not engine.rejected, f"{len(engine.rejected)} requests rejected"
    return [r.output for r in requests], engine


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--vocab", type=int, default=None, help="cut the vocabulary (faster on a CPU)")
    parser.add_argument("--max-blocks", type=int, default=8, help="blocks of the out_of_blocks cases")
    parser.add_argument("--f32-only", action="store_true")
    args = parser.parse_args()
    torch = torch_on(args.device)
    if torch is None:
        return SKIP
    import engine as E
    import model as M
    from kv_binding import vmmpp_kv

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    failures = []

    def check(ok, what):
        print(("ok   " if ok else "FAIL ") + what, flush=True)
        if not ok:
            failures.append(what)

    # 1. float32: engine with preemption against per-prompt dense references.
    cfg = M.preset("1b", layers=4, vocab=args.vocab)
    model = M.Llama(cfg, device, dtype=torch.float32, seed=1)
    work = prompts(2, 8, cfg.vocab)
    reference = [M.reference_generate(model, p, n) for p, n in work]
    block_bytes = cfg.kv_bytes_per_token(4) * 16
    cases = [("out_of_blocks", "elastic" if on_gpu else "host", dict(max_blocks=args.max_blocks)),
             ("out_of_blocks", "static" if on_gpu else "host", dict(max_blocks=args.max_blocks))]
    if on_gpu:
        # 4 MiB of budget: 16 blocks of 256 KiB; the cache could address 256.
        cases.append(("over_quota", "elastic_pages", dict(max_blocks=256, budget_bytes=4 << 20)))
        cases.append(("over_quota", "elastic", dict(max_blocks=256, budget_bytes=4 << 20)))
    for why, config, extra in cases:
        cache = vmmpp_kv.KVCache(layers=cfg.layers, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, dtype="f32",
                                 config=config, layout="block_major", device=0, **extra)
        out, engine = run_engine(E, model, E.PagedKV(cache, device), work)
        same = sum(a == b for a, b in zip(out, reference))
        check(same == len(work) and engine.preemptions > 0,
              f"f32 {config} ({why}, block {block_bytes >> 10} KiB): {same}/{len(work)} requests equal the dense "
              f"reference, {engine.preemptions} preemptions, {engine.steps} steps")
        del engine
        if on_gpu:
            torch.cuda.synchronize()
        cache.synchronize()
        check(cache.stats()["used_blocks"] == 0, f"f32 {config}: every block back after the run")
    del model
    if args.f32_only:
        print(f"{len(failures)} failures")
        return 1 if failures else 0

    # 2. bf16: vmmpp memory against contiguous tensors under the same schedule, bit for bit.
    cfg = M.preset("8b", layers=2, vocab=args.vocab)
    model = M.Llama(cfg, device, dtype=torch.bfloat16, seed=3)
    work = prompts(4, 12, cfg.vocab, longest=300, new=(8, 40))
    dense, _ = run_engine(E, model, E.DenseKV(cfg, device, torch.bfloat16, max_tokens=400), work, max_batch=8,
                          max_prefill_tokens=512)
    for config in (("elastic", "elastic_pages", "static") if on_gpu else ("host",)):
        for layout in ("block_major", "layer_major"):
            cache = vmmpp_kv.KVCache(layers=cfg.layers, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, dtype="bf16",
                                     config=config, layout=layout, device=0, max_blocks=512)
            out, engine = run_engine(E, model, E.PagedKV(cache, device), work, max_batch=8, max_prefill_tokens=512)
            same = sum(a == b for a, b in zip(out, dense))
            check(same == len(work) and engine.preemptions == 0,
                  f"bf16 {config} {layout}: {same}/{len(work)} requests equal the engine on dense KV "
                  f"({engine.steps} steps, batches of up to 8)")
            del engine
    reference = [M.reference_generate(model, p, n) for p, n in work]
    tokens = sum(len(r) for r in reference)
    agree = sum(x == y for a, b in zip(dense, reference) for x, y in zip(a, b))
    first = sum(a[0] == b[0] for a, b in zip(dense, reference))
    print(f"info bf16: {agree}/{tokens} tokens and {first}/{len(work)} first tokens equal the per-prompt "
          f"reference (batched bf16 rounds differently)")
    print(f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
