"""Variants of FastLM's batch-1 decode step."""

import torch
import torch.nn.functional as F

from visprompt.runtime.fast_decode import FastLM


def make_step(dec: FastLM, static_len: bool, kvmode: str = "base", mv: str = "bmm"):
    """A batch-1 decode step as one function of (token [1] long, pos 0-d long, kv buffer, top int)."""
    layers = dec.layers
    H, KV, HD = dec.n_heads, dec.n_kv, dec.head_dim
    nq, nkv = dec._nq, dec._nkv
    eps, scale, gqa = dec.eps, dec.scale, dec.group > 1
    embed_w = dec.embed_tokens.weight
    norm_w = dec.norm_w

    def proj(pr, x):
        if mv == "mm":
            y = torch.mm(x, TT[id(pr)])
            if pr.bias is not None:
                y = y + pr.bias
            return y
        if pr.splits == 1:
            y = torch.mm(x, pr.t[0])
            return y if pr.bias is None else y + pr.bias
        if mv == "baddbmm":
            y = torch.baddbmm(ZB[id(pr)], x.expand(pr.splits, 1, x.shape[1]), pr.t).view(1, -1)
            return y if y.shape[1] == pr.out else y[:, : pr.out]
        y = torch.bmm(x.expand(pr.splits, 1, x.shape[1]), pr.t).view(1, -1)
        if y.shape[1] != pr.out:
            y = y[:, : pr.out]
        if pr.bias is not None:
            y = y + pr.bias
        return y

    def rope(x, cos, sin):
        return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin

    def step(token, pos, kv, cos_tab, sin_tab, top: int):
        x = F.embedding(token, embed_w)  # [1, D]
        cos = cos_tab.index_select(0, pos.view(1)).view(1, 1, HD)
        sin = sin_tab.index_select(0, pos.view(1)).view(1, 1, HD)
        if static_len:
            L = kv.shape[3]
            mask = (torch.arange(L) <= pos).view(1, 1, 1, L)
        for li, p in enumerate(layers):
            h = F.rms_norm(x, (x.shape[-1],), p.ln1, eps)
            y = proj(p.qkv, h)
            q = y[:, :nq].view(1, H, HD)
            k = y[:, nq : nq + nkv].view(1, KV, HD)
            v = y[:, nq + nkv :].view(1, KV, HD)
            q = rope(q, cos, sin)
            k = rope(k, cos, sin)
            if kvmode == "base":
                torch.ops.aten.index_put_(
                    kv,
                    [torch.full((2,), li), torch.arange(2), torch.zeros(2, dtype=torch.long), pos.view(1).expand(2)],
                    torch.stack([k[0], v[0]]),
                )
            else:
                kv[li, 0, 0].index_copy_(0, pos.view(1), k)
                kv[li, 1, 0].index_copy_(0, pos.view(1), v)
            if static_len:
                keys = kv[li, 0, :1].transpose(1, 2)
                vals = kv[li, 1, :1].transpose(1, 2)
                att = F.scaled_dot_product_attention(
                    q.unsqueeze(2), keys, vals, attn_mask=mask, scale=scale, enable_gqa=gqa
                )
            else:
                keys = kv[li, 0, :1, :top].transpose(1, 2)
                vals = kv[li, 1, :1, :top].transpose(1, 2)
                att = F.scaled_dot_product_attention(q.unsqueeze(2), keys, vals, scale=scale, enable_gqa=gqa)
            x = x + proj(p.o, att.reshape(1, -1))
            h = F.rms_norm(x, (x.shape[-1],), p.ln2, eps)
            gu = proj(p.gate_up, h)
            g, u = gu.split(p.gate_up.sizes, dim=-1)
            x = x + proj(p.down, F.silu(g) * u)
        x = F.rms_norm(x, (x.shape[-1],), norm_w, eps)
        return proj(dec.head, x)

    return step


class StepRunner:
    """Drives `step` for a batch-1 sequence held in dec (mirrors FastLM.decode's bookkeeping)."""

    def __init__(self, dec, fn):
        self.dec, self.fn = dec, fn

    @torch.inference_mode()
    def decode1(self, seq, token):
        dec = self.dec
        row = dec._row_of[seq]
        assert row == 0 and dec.n_active == 1
        n = int(dec.lengths[0])
        dec._reserve(1, n + 1)
        tok = torch.tensor([token], dtype=torch.long)
        pos = dec.lengths[0].clone()
        logits = self.fn(tok, pos, dec.kv, dec._cos, dec._sin, n + 1)
        dec.lengths[0] += 1
        return logits


TT = {}
ZB = {}


def add_zb(dec):
    for p in [*[q for L in dec.layers for q in (L.qkv, L.o, L.gate_up, L.down)], dec.head]:
        z = torch.zeros(p.t.shape[0], 1, p.t.shape[2])
        if p.bias is not None:
            z.view(-1)[: p.out] = p.bias
        ZB[id(p)] = z


def add_tt(dec):
    """A plain [in, out] contiguous copy of every projection (for the mm variant)."""
    for p in [*[q for L in dec.layers for q in (L.qkv, L.o, L.gate_up, L.down)], dec.head]:
        w = torch.cat([w for w, _ in p.parts]) if len(p.parts) > 1 else p.parts[0][0]
        TT[id(p)] = w.detach().t().contiguous()
