"""A small continuous-batching engine over a vmmpp KV cache (examples/serving).

Requests are admitted first come, first served; each step runs one packed batch: the prompts
admitted this step (prefill, causal attention over their own new K and V) and one token of every
running request (decode, attention over its paged blocks). K and V are written at the slots of
the cache's slot mapping and read back through its block tables (gather, then attention), on the
cache's own memory through DLPack. When the cache refuses a decode token's `append`
(over_quota, out_of_blocks, out_of_memory) the youngest running request is preempted: its
sequence freed, the request put back at the head of the queue, its prompt and the tokens it
generated recomputed when it is admitted again (vLLM's recompute preemption).

Sequences that finish with a step are freed right after the step is queued, before the engine
waits for its tokens: `free(seq, stream=...)` gives their memory back only once the GPU has
finished that step (the stream-ordered release), so the engine never waits for the GPU to free.

Prefix caching (PagedKV with a vmmpp_kv.PrefixCache, `--prefix-cache on` in bench_serving.py):
a request is admitted with `attach` of its context but the last token (so the last token's
logits are computed), which hands it a sequence holding the cached leading blocks; the engine
prefills only the rest, attending over the cached K and V plus the new tokens. After each step
is queued, the full blocks of every request in it are published (prompt and generated tokens),
and sequences are freed through the prefix cache, so their blocks stay cached for later turns.
Appends go through the prefix cache too: when the cache refuses, cached blocks no sequence holds
are evicted first, and the engine preempts only when nothing is left to evict. Cached blocks are
full and never written again (new tokens go to new blocks), so shared blocks stay unchanged.

Host tier (PagedKV with host_tier_blocks > 0, `--host-tier-blocks N` in bench_serving.py, issue 30):
a vmmpp_kv.HostTier behind the prefix cache, its copies on a stream of its own (a torch stream of
the lowest priority on a GPU). Cached blocks the prefix cache evicts are copied to host memory;
admission attaches through the tier, so a context whose prefix continues in host memory gets
those blocks copied back instead of prefilled. With preemption="swap" (`--preemption swap`) the
youngest running request is swapped out to the tier instead of freed, and when it is admitted
again it is swapped back in and decodes on from where it stopped (no token recomputed); when the
tier has no room for it (TierFull), or there is no tier, it is recomputed as before.

Two KV stores: PagedKV (a vmmpp cache: the engine) and DenseKV (contiguous per-sequence tensors,
no vmmpp: the reference). Both hand the attention the same padded [batch, tokens] K and V, so
under the same schedule the engine's tokens must equal the reference's bit for bit.
"""
import collections
import time

import torch

from kv_binding import VmmppError, vmmpp_kv
from model import causal_attention as _causal
from model import causal_attention_after as _causal_after

REFUSED = ("over_quota", "out_of_blocks", "out_of_memory")


class Refused(Exception):
    """The KV store has no room for an append (the engine preempts or waits)."""


def _refusal(error):
    if isinstance(error, VmmppError) and error.status in REFUSED:
        return Refused(str(error))
    return None


class PagedKV:
    """K and V in a vmmpp cache (any configuration and paged layout): per-layer views
    [max_blocks, block_tokens, kv_heads, head_dim] through DLPack. prefix_cache: a
    vmmpp_kv.PrefixCache over `cache` (prefix caching on), or None (off). host_tier_blocks > 0
    (prefix caching on): a vmmpp_kv.HostTier of that many blocks behind the prefix cache."""

    def __init__(self, cache, device, prefix_cache=None, host_tier_blocks=0, store_ahead_blocks=0):
        self.cache = cache
        self.prefix_cache = prefix_cache
        self.device = device
        g = cache.geometry
        self.block_tokens = g.block_tokens
        self.k = [torch.from_dlpack(cache.key(layer)) for layer in range(g.layers)]
        self.v = [torch.from_dlpack(cache.value(layer)) for layer in range(g.layers)]
        self.stream = torch.cuda.current_stream().cuda_stream if device.type == "cuda" else None
        self.tier, self.tier_stream = None, None
        # Blocks the tier copies ahead of their eviction after each step (host_tier::store_ahead):
        # evictions then copy nothing, and the tier's traffic is spread over the steps.
        self.store_ahead_blocks = store_ahead_blocks
        self.host_tokens = 0  # admitted tokens whose blocks the tier copied back
        if host_tier_blocks:
            if prefix_cache is None:
                raise ValueError("a host tier sits behind a prefix cache: give PagedKV a prefix_cache too")
            if device.type == "cuda":
                # Its own stream, the lowest priority (CUDA's is 0; lower numbers run first), so its
                # copies yield to the engine's kernels; held here, as long as the tier uses it.
                self.tier_stream = torch.cuda.Stream(device=device, priority=0)
            self.tier = vmmpp_kv.HostTier(prefix_cache, max_blocks=host_tier_blocks,
                                          stream=self.tier_stream.cuda_stream if self.tier_stream else None)

    def new_sequence(self):
        return self.cache.add_sequence()

    def admit(self, context):
        """A sequence for a request whose tokens are `context`, and how many of its leading
        tokens are already in it (cached blocks, on the GPU or copied back from the host tier;
        0 without prefix caching). The last token is never taken from the cache: the engine
        needs its logits."""
        if self.prefix_cache is None or len(context) <= self.block_tokens:
            return self.new_sequence(), 0
        if self.tier is not None:
            seq, cached, host = self.tier.attach(context[:-1], stream=self.stream)
            self.host_tokens += host
            return seq, cached
        return self.prefix_cache.attach(context[:-1], stream=self.stream)

    def end_step(self):
        """After a step's work is queued: the tier stores ahead its per-step budget of blocks."""
        if self.tier is not None and self.store_ahead_blocks:
            self.tier.store_ahead(self.store_ahead_blocks)

    def swap_out(self, seq):
        """Swap preemption: seq's blocks copied to the host tier and seq freed; the id swap_in
        takes, or None where there is no tier or it has no room (the caller frees and recomputes)."""
        if self.tier is None:
            return None
        try:
            return self.tier.swap_out(seq, stream=self.stream)
        except vmmpp_kv.TierFull:
            return None

    def swap_in(self, swap_id):
        """A new sequence with the tokens swap_out kept (this stream waits for their copies);
        Refused when the cache has no room (it stays swapped out)."""
        try:
            return self.tier.swap_in(swap_id, stream=self.stream)
        except vmmpp_kv.REFUSALS as e:
            raise Refused(str(e)) from None

    def drop_swapped(self, swap_id):
        self.tier.drop_swapped(swap_id)

    def room_blocks(self):
        """Blocks an append could get now: free ids and cached blocks no sequence holds (an
        estimate where the budget, not the ids, runs out first)."""
        return self.cache.stats()["free_blocks"] + self.prefix_cache.stats()["evictable_blocks"]

    def publish(self, seq, tokens):
        """Registers the full blocks among `tokens` (seq's tokens from the first, their K and V
        written or queued on this stream) with the prefix cache; nothing without one."""
        if self.prefix_cache is not None:
            self.prefix_cache.publish(seq, tokens)

    def append(self, seq, n):
        try:
            if self.prefix_cache is None:
                self.cache.append(seq, n)
            else:  # evicts cached blocks no sequence holds before refusing
                self.prefix_cache.append(seq, n)
        except VmmppError as e:
            raise (_refusal(e) or e) from None

    def free(self, seq):
        # Stream-ordered: the step just queued may still read these blocks. Through the prefix
        # cache, the sequence's published blocks stay cached.
        owner = self.cache if self.prefix_cache is None else self.prefix_cache
        owner.free(seq, stream=self.stream)

    def committed_bytes(self):
        return self.cache.stats()["committed_bytes"]

    def capacity_tokens(self):
        return self.cache.geometry.max_blocks * self.block_tokens

    def prepare(self, rows, decode_seqs, decode_lengths, cached_prefixes=()):
        """The step's KV plan. rows: (seq, first, count) in packed-batch order; cached_prefixes:
        (seq, cached_tokens) of each prefill whose leading tokens came from the prefix cache."""
        slots = []
        for seq, first, count in rows:
            slots.extend(self.cache.slot_mapping(seq, first, count))
        slots = torch.tensor(slots, dtype=torch.int64).to(self.device, non_blocking=True)
        plan = {"block": slots // self.block_tokens, "offset": slots % self.block_tokens}
        # Cached prefixes are whole blocks: their block ids, in order.
        plan["prefix_blocks"] = [
            torch.tensor(self.cache.block_table(seq)[:cached // self.block_tokens], dtype=torch.int64).to(
                self.device, non_blocking=True)
            for seq, cached in cached_prefixes]
        if decode_seqs:
            blocks = max(-(-n // self.block_tokens) for n in decode_lengths)
            # Padding points at a live block (mapped on every backing); the mask hides it.
            pad = self.cache.block_table(decode_seqs[0])[0]
            table = self.cache.pack_block_tables(decode_seqs, blocks, pad)
            plan["table"] = torch.frombuffer(table, dtype=torch.int32).view(len(decode_seqs), blocks).to(
                self.device, dtype=torch.int64, non_blocking=True)
            plan["tokens"] = blocks * self.block_tokens
        return plan

    def write(self, plan, layer, k, v):
        self.k[layer][plan["block"], plan["offset"]] = k
        self.v[layer][plan["block"], plan["offset"]] = v

    def gather(self, plan, layer):
        """Decode rows' K and V, [batch, tokens, kv_heads, head_dim] (unmasked)."""
        t = plan["table"]
        k = self.k[layer][t].flatten(1, 2)
        v = self.v[layer][t].flatten(1, 2)
        return k, v

    def gather_prefix(self, plan, layer, index):
        """The cached prefix of the index-th entry of prepare's cached_prefixes: K and V
        [cached_tokens, kv_heads, head_dim]."""
        blocks = plan["prefix_blocks"][index]
        return self.k[layer][blocks].flatten(0, 1), self.v[layer][blocks].flatten(0, 1)


class DenseKV:
    """The reference store: one contiguous [layers, capacity, kv_heads, head_dim] K and V per
    sequence, plain torch tensors, no vmmpp. Never refuses (capacity: max_tokens)."""

    def __init__(self, config, device, dtype, max_tokens, block_tokens=16):
        self.config, self.device, self.dtype = config, device, dtype
        self.block_tokens = block_tokens
        self.capacity = -(-max_tokens // block_tokens) * block_tokens
        self.seqs = {}
        self.next_id = 0

    def admit(self, context):
        """A new sequence and 0 cached tokens: the reference store caches no prefix."""
        return self.new_sequence(), 0

    def publish(self, seq, tokens):
        """Nothing to register: no prefix cache."""

    def end_step(self):
        """Nothing to do after a step: no host tier."""

    def swap_out(self, seq):
        """None: no host tier, the engine recomputes."""
        return None

    def new_sequence(self):
        c = self.config
        shape = (c.layers, self.capacity, c.kv_heads, c.head_dim)
        self.seqs[self.next_id] = [torch.zeros(shape, device=self.device, dtype=self.dtype),
                                   torch.zeros(shape, device=self.device, dtype=self.dtype), 0]
        self.next_id += 1
        return self.next_id - 1

    def append(self, seq, n):
        if self.seqs[seq][2] + n > self.capacity:
            raise Refused(f"dense sequence {seq} holds at most {self.capacity} tokens")
        self.seqs[seq][2] += n

    def free(self, seq):
        del self.seqs[seq]

    def capacity_tokens(self):
        return self.capacity

    def committed_bytes(self):
        return sum(2 * s[0].numel() * s[0].element_size() for s in self.seqs.values())

    def prepare(self, rows, decode_seqs, decode_lengths, cached_prefixes=()):
        if cached_prefixes:
            raise ValueError("DenseKV caches no prefix: every prefill starts at token 0")
        plan = {"rows": rows, "decode": decode_seqs}
        if decode_seqs:
            blocks = max(-(-n // self.block_tokens) for n in decode_lengths)
            plan["tokens"] = blocks * self.block_tokens
        return plan

    def write(self, plan, layer, k, v):
        at = 0
        for seq, first, count in plan["rows"]:
            self.seqs[seq][0][layer, first:first + count] = k[at:at + count]
            self.seqs[seq][1][layer, first:first + count] = v[at:at + count]
            at += count

    def gather(self, plan, layer):
        t = plan["tokens"]
        k = torch.stack([self.seqs[s][0][layer, :t] for s in plan["decode"]])
        v = torch.stack([self.seqs[s][1][layer, :t] for s in plan["decode"]])
        return k, v


def decode_attention(q, k, v, valid):
    """One query per sequence over its gathered K and V: q [B, H, D], k and v [B, T, KV, D],
    valid [B, T] (False past each sequence's length). Grouped-query heads without repeating K and
    V: [B, KV, group, D] @ [B, KV, D, T]."""
    b, h, d = q.shape
    kv = k.shape[2]
    mask = valid[:, :, None, None]
    # Positions past a sequence's end hold stale or uninitialised data (NaN included): zero them.
    k = k.masked_fill(~mask, 0).permute(0, 2, 3, 1)  # [B, KV, D, T]
    v = v.masked_fill(~mask, 0).transpose(1, 2)  # [B, KV, T, D]
    scores = (q.view(b, kv, h // kv, d) @ k).float() * d ** -0.5  # [B, KV, G, T]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).to(v.dtype)
    return (p @ v).reshape(b, h, d)


class Request:
    """One request: prompt token ids, how many tokens to generate, arrival time (seconds)."""

    def __init__(self, rid, prompt, max_new, arrival=0.0):
        self.rid, self.prompt, self.max_new, self.arrival = rid, list(prompt), max_new, arrival
        self.output = []
        self.seq = None
        self.cached_tokens = 0  # leading tokens its sequence got from the prefix cache when admitted
        self.published_blocks = 0  # full blocks of its sequence registered with the prefix cache
        self.first_token_at = None
        self.finished_at = None
        self.preemptions = 0
        self.swap_id = None  # while swapped out to the host tier (swap preemption)

    def context(self):
        return self.prompt + self.output


class Engine:
    """FCFS continuous batching, prefill and decode in one packed step. max_batch: running
    requests at most; max_prefill_tokens: prompt tokens admitted per step (at least one
    request). preemption: "recompute" (free the youngest request, recompute its context when
    admitted again) or "swap" (swap it out to the KV store's host tier and back in; recompute
    where the tier refuses or there is none)."""

    def __init__(self, model, kv, max_batch=256, max_prefill_tokens=8192, clock=time.perf_counter,
                 preemption="recompute"):
        if preemption not in ("recompute", "swap"):
            raise ValueError(f"preemption {preemption!r} is neither 'recompute' nor 'swap'")
        self.model, self.kv = model, kv
        self.max_batch, self.max_prefill_tokens = max_batch, max_prefill_tokens
        self.clock = clock
        self.preemption = preemption
        self.swapped_out = 0  # preemptions that swapped out
        self.recomputes = 0  # preemptions that freed, to recompute (recompute; swap without room)
        self.swapped_in = 0  # swapped-out requests admitted again
        self.swap_retries = 0  # swapped in, no room for their next token, swapped out again
        self.waiting = collections.deque()
        self.running = []
        self.finished = []
        self.rejected = []
        self.preemptions = 0
        self.steps = 0
        self.prefill_tokens = 0  # prompt tokens computed (cached ones excluded)
        self.decode_tokens = 0
        self.admitted_tokens = 0  # context tokens of admitted requests, cached or computed
        self.cached_tokens = 0  # of those, the ones the prefix cache held

    def submit(self, request):
        self.waiting.append(request)

    def idle(self):
        return not self.waiting and not self.running

    def _preempt(self, request):
        self.running.remove(request)
        if self.preemption == "swap":
            request.swap_id = self.kv.swap_out(request.seq)  # None: no room, recompute
        if request.swap_id is None:
            self.kv.free(request.seq)
            self.recomputes += 1
        else:
            self.swapped_out += 1
        request.seq = None
        request.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(request)

    def _schedule(self):
        """Decode room for the running requests (preempting the youngest when refused), then,
        if nothing was preempted, admission of waiting requests in order."""
        decode, preempted = [], False
        while len(decode) < len(self.running):
            r = self.running[len(decode)]
            try:
                self.kv.append(r.seq, 1)
                decode.append(r)
            except Refused:
                self._preempt(self.running[-1])
                preempted = True
        admitted = []
        budget = self.max_prefill_tokens
        while not preempted and self.waiting and len(self.running) + len(admitted) < self.max_batch:
            r = self.waiting[0]
            if r.swap_id is not None:
                if self._swap_in(r, decode):
                    continue
                if self.running or admitted:
                    break  # wait: running requests free memory
                if r.swap_id is not None:  # nothing else holds memory and it does not fit: recompute it
                    self.kv.drop_swapped(r.swap_id)
                    r.swap_id = None
            context = r.context()
            n = len(context)
            seq, cached = self.kv.admit(context)  # cached: leading tokens already in seq's blocks
            if admitted and n - cached > budget:
                self.kv.free(seq)
                break
            try:
                self.kv.append(seq, n - cached)
            except Refused:
                self.kv.free(seq)
                if n > self.kv.capacity_tokens():  # can never fit, whatever frees
                    self.rejected.append(self.waiting.popleft())
                    continue
                break  # wait: this engine's or (shared budget) another's requests free memory
            self.waiting.popleft()
            r.seq, r.cached_tokens = seq, cached
            r.published_blocks = cached // self.kv.block_tokens  # attached blocks are cached already
            self.admitted_tokens += n
            self.cached_tokens += cached
            admitted.append(r)
            budget -= n - cached
        return admitted, decode

    def _swap_in(self, r, decode):
        """Admits swapped-out r at the head of the queue with its tokens swapped back in: it
        decodes this step, as if it had never been preempted. False when the cache has no room
        (r waits, still swapped out)."""
        # Its tokens and this step's: without room for all, it would go out again at once.
        if self.kv.room_blocks() < -(-len(r.context()) // self.kv.block_tokens):
            return False
        try:
            seq = self.kv.swap_in(r.swap_id)
        except Refused:
            return False
        try:
            self.kv.append(seq, 1)  # this step's token
        except Refused:
            # No room for one more token (its last block is full): out again until memory frees;
            # recomputed where the tier has no room any more.
            r.swap_id = self.kv.swap_out(seq)
            if r.swap_id is None:
                self.kv.free(seq)
                self.recomputes += 1
            else:
                self.swap_retries += 1
            return False
        self.waiting.popleft()
        r.seq, r.swap_id = seq, None
        r.published_blocks = 0  # its blocks are new copies: publish registers what is not cached
        self.swapped_in += 1
        self.running.append(r)  # the youngest again
        decode.append(r)
        return True

    def step(self):
        """One engine step; returns the number of tokens it generated (0: nothing to do)."""
        admitted, decode = self._schedule()
        if not admitted and not decode:
            return 0
        model, device = self.model, self.model.device
        rows, tokens, positions, segments, cached_prefixes = [], [], [], [], []
        at = 0
        for r in admitted:
            ctx, cached = r.context(), r.cached_tokens
            rows.append((r.seq, cached, len(ctx) - cached))
            tokens.extend(ctx[cached:])
            positions.extend(range(cached, len(ctx)))
            # (first, end) in the packed batch, and which cached prefix it continues (or None)
            segments.append((at, at + len(ctx) - cached, len(cached_prefixes) if cached else None))
            if cached:
                cached_prefixes.append((r.seq, cached))
            at += len(ctx) - cached
        first_decode = at
        lengths = []
        for r in decode:
            n = len(r.prompt) + len(r.output)  # tokens in the cache, this step's included
            rows.append((r.seq, n - 1, 1))
            tokens.append(r.output[-1])
            positions.append(n - 1)
            lengths.append(n)
        plan = self.kv.prepare(rows, [r.seq for r in decode], lengths, cached_prefixes)
        tokens_t = torch.tensor(tokens, dtype=torch.int64).to(device, non_blocking=True)
        positions_t = torch.tensor(positions, dtype=torch.int64).to(device, non_blocking=True)
        if decode:
            valid = (torch.arange(plan["tokens"], device=device)[None, :] <
                     torch.tensor(lengths, dtype=torch.int64).to(device, non_blocking=True)[:, None])

        def store(layer, k, v):
            self.kv.write(plan, layer, k, v)

        def attend(layer, q, k, v):
            out = torch.empty_like(q)
            for a, b, prefix in segments:
                if prefix is None:
                    out[a:b] = _causal(q[a:b], k[a:b], v[a:b])
                else:  # new tokens after a cached prefix: attend over both
                    pk, pv = self.kv.gather_prefix(plan, layer, prefix)
                    out[a:b] = _causal_after(q[a:b], torch.cat((pk, k[a:b])), torch.cat((pv, v[a:b])))
            if decode:
                kk, vv = self.kv.gather(plan, layer)
                out[first_decode:] = decode_attention(q[first_decode:], kk, vv, valid)
            return out

        with torch.inference_mode():
            hidden = model.forward(tokens_t, positions_t, attend, store)
            last = [b - 1 for _, b, _ in segments] + list(range(first_decode, len(tokens)))
            next_tokens = model.logits(hidden[torch.tensor(last, device=device)]).argmax(-1)
        batch = admitted + decode
        # Every token of each request's context now has its K and V written or queued on this
        # stream (later readers queue behind): register its newly filled blocks.
        for r in batch:
            ctx = r.context()
            if len(ctx) // self.kv.block_tokens > r.published_blocks:
                self.kv.publish(r.seq, ctx)
                r.published_blocks = len(ctx) // self.kv.block_tokens
        # Free what finishes with this step while the GPU may still run it (stream-ordered).
        done = [r for r in batch if len(r.output) + 1 >= r.max_new]
        self.running = [r for r in self.running if r not in done]
        for r in done:
            self.kv.free(r.seq)
            r.seq = None
        self.kv.end_step()
        new_tokens = next_tokens.tolist()  # waits for the step
        now = self.clock()
        for r, t in zip(batch, new_tokens):
            r.output.append(t)
            if r.first_token_at is None:
                r.first_token_at = now
        for r in admitted:
            if r not in done:
                self.running.append(r)
        for r in done:
            r.finished_at = now
            self.finished.append(r)
        self.steps += 1
        self.prefill_tokens += first_decode  # computed prompt tokens: cached ones are not in the batch
        self.decode_tokens += len(decode)
        return len(batch)

    def run(self):
        """Steps until every submitted request is finished (or rejected)."""
        while not self.idle():
            if self.step() == 0:  # refused with nothing running, and nothing else frees here
                raise RuntimeError(f"{len(self.waiting)} requests wait for memory that no one will free")
