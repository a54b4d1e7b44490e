"""A Llama-style decoder in plain PyTorch: RMSNorm, rotary embedding, grouped-query attention,
SwiGLU, seeded random weights. The shapes are those of real 1B- and 8B-class models (Llama 3.2
1B, Llama 3.1 8B); the layer count may be cut to fit time and memory.

The layer code takes a packed batch of tokens and two attention callbacks, so the serving engine
(paged KV in a vmmpp cache) and the dense reference (contiguous KV) run the same arithmetic and
differ only in where K and V live.
"""
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

PRESETS = {
    # Llama 3.2 1B: hidden 2048, 32 query heads, 8 KV heads of 64, SwiGLU 8192, 16 layers.
    "1b": dict(hidden=2048, heads=32, kv_heads=8, head_dim=64, intermediate=8192, vocab=128256, layers=16),
    # Llama 3.1 8B: hidden 4096, 32 query heads, 8 KV heads of 128, SwiGLU 14336, 32 layers.
    "8b": dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256, layers=32),
}


@dataclass(frozen=True)
class Config:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    layers: int
    rope_theta: float = 500000.0
    eps: float = 1e-5

    def kv_bytes_per_token(self, element_bytes=2):
        return self.layers * 2 * self.kv_heads * self.head_dim * element_bytes


def preset(name, layers=None, vocab=None):
    """The shapes of a named model; `layers` and `vocab` cut it down."""
    c = Config(**PRESETS[name])
    if layers is not None:
        c = replace(c, layers=layers)
    if vocab is not None:
        c = replace(c, vocab=vocab)
    return c


class Llama:
    """Seeded random weights (scaled 1/sqrt(fan_in), so activations stay O(1) at any depth) and
    the forward pieces. dtype: the weights' and activations' type (torch.bfloat16 for serving;
    the same bf16 weights upcast to float32 for the exact-equality test)."""

    def __init__(self, config, device, dtype=torch.bfloat16, seed=0):
        self.config = c = config
        self.device = device
        self.dtype = dtype
        g = torch.Generator(device=device)
        g.manual_seed(seed)

        def weight(rows, cols):  # generated in bf16 whatever dtype, so f32 runs use the same values
            w = torch.randn(rows, cols, generator=g, device=device, dtype=torch.float32) * cols ** -0.5
            return w.to(torch.bfloat16).to(dtype)

        self.embed = (torch.randn(c.vocab, c.hidden, generator=g, device=device)).to(torch.bfloat16).to(dtype)
        self.layers = []
        q, kv = c.heads * c.head_dim, c.kv_heads * c.head_dim
        for _ in range(c.layers):
            self.layers.append(dict(
                attn_norm=(1 + 0.1 * torch.randn(c.hidden, generator=g, device=device)).to(torch.bfloat16).to(dtype),
                wqkv=weight(q + 2 * kv, c.hidden),
                wo=weight(c.hidden, q),
                mlp_norm=(1 + 0.1 * torch.randn(c.hidden, generator=g, device=device)).to(torch.bfloat16).to(dtype),
                w_gate_up=weight(2 * c.intermediate, c.hidden),
                w_down=weight(c.hidden, c.intermediate),
            ))
        self.norm = torch.ones(c.hidden, device=device, dtype=dtype)
        self.lm_head = weight(c.vocab, c.hidden)
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, device=device, dtype=torch.float32) / c.head_dim))
        self.inv_freq = inv_freq

    def rms_norm(self, x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.config.eps)).to(x.dtype) * w

    def rope(self, x, positions):
        """Rotary embedding (half-split, as Llama) of x [N, heads, head_dim] at positions [N]."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        cos, sin = freqs.cos()[:, None, :], freqs.sin()[:, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    def forward(self, tokens, positions, attend, store):
        """Hidden states of a packed batch: tokens and positions [N]. For each layer,
        store(layer, k, v) keeps the new K and V ([N, kv_heads, head_dim]) and
        attend(layer, q, k, v) returns the attention output [N, heads, head_dim]."""
        c = self.config
        x = self.embed[tokens]
        q_size, kv_size = c.heads * c.head_dim, c.kv_heads * c.head_dim
        for i, w in enumerate(self.layers):
            h = self.rms_norm(x, w["attn_norm"])
            qkv = h @ w["wqkv"].t()
            q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
            q = self.rope(q.reshape(-1, c.heads, c.head_dim), positions)
            k = self.rope(k.reshape(-1, c.kv_heads, c.head_dim), positions)
            v = v.reshape(-1, c.kv_heads, c.head_dim)
            store(i, k, v)
            o = attend(i, q, k, v)
            x = x + o.reshape(-1, q_size) @ w["wo"].t()
            h = self.rms_norm(x, w["mlp_norm"])
            gate, up = (h @ w["w_gate_up"].t()).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ w["w_down"].t()
        return self.rms_norm(x, self.norm)

    def logits(self, hidden):
        return hidden @ self.lm_head.t()


def causal_attention(q, k, v):
    """Causal self-attention of one sequence's new tokens: q [T, H, D], k and v [T, KV, D]."""
    group = q.shape[1] // k.shape[1]  # KV heads repeated: the flash kernel takes no GQA with every build
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       is_causal=True)
    return o[0].transpose(0, 1)


def causal_attention_after(q, k, v):
    """Causal attention of one sequence's T new tokens after P tokens whose K and V are cached
    (prefix caching): q [T, H, D], k and v [P + T, KV, D] (the cached ones first). New token i,
    at position P + i, attends to keys 0 .. P + i. is_causal would align the mask top-left (token
    i to keys 0 .. i), so the mask is explicit."""
    t, s = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    keys = torch.arange(s, device=q.device)
    mask = keys[None, :] <= (s - t + torch.arange(t, device=q.device))[:, None]  # [T, P + T]
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       attn_mask=mask)
    return o[0].transpose(0, 1)


def reference_generate(model, prompt, n_new):
    """Greedy tokens of one prompt with a dense, contiguous KV cache (no vmmpp, no batching):
    the reference the engine must match."""
    c = model.config
    total = len(prompt) + n_new
    kc = torch.zeros(c.layers, total, c.kv_heads, c.head_dim, device=model.device, dtype=model.dtype)
    vc = torch.zeros_like(kc)
    length = [0]

    def store(layer, k, v):
        n = k.shape[0]
        kc[layer, length[0]:length[0] + n] = k
        vc[layer, length[0]:length[0] + n] = v

    def attend_prefill(layer, q, k, v):
        return causal_attention(q, k, v)

    def attend_decode(layer, q, k, v):
        end = length[0] + 1
        kk, vv = kc[layer, :end].transpose(0, 1)[None], vc[layer, :end].transpose(0, 1)[None]
        group = c.heads // c.kv_heads
        kk, vv = kk.repeat_interleave(group, dim=1), vv.repeat_interleave(group, dim=1)
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kk, vv)
        return o[0].transpose(0, 1)

    out = []
    with torch.inference_mode():
        tokens = torch.tensor(prompt, device=model.device)
        h = model.forward(tokens, torch.arange(len(prompt), device=model.device), attend_prefill, store)
        length[0] = len(prompt)
        out.append(int(model.logits(h[-1:]).argmax(-1)))
        while len(out) < n_new:
            pos = torch.tensor([length[0]], device=model.device)
            h = model.forward(torch.tensor(out[-1:], device=model.device), pos, attend_decode, store)
            length[0] += 1
            out.append(int(model.logits(h).argmax(-1)))
    return out
