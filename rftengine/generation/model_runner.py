"""The Llama/Qwen2/Mistral decoder over the static KV cache: `prefill` and `decode_forward`.

The arithmetic mirrors the Hugging Face modules op for op (RMSNorm normalises in fp32, casts back,
then scales; RoPE tables in fp32 cast to the model dtype; softmax scale head_dim ** -0.5) so that
rollout logits match the trainer's forward as closely as different kernels allow. Prefill attends
with SDPA; decode attention (SDPA or flash-attn, neither repeating the cache for grouped-query
attention) lives in `attention.DecodeAttention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rftengine.generation.attention import DecodeAttention
from rftengine.generation.kv_cache import StaticKVCache
from rftengine.generation.weights import DecoderWeights, Layer, Linear


def linear(x: torch.Tensor, p: Linear) -> torch.Tensor:
    y = F.linear(x, p.weight, p.bias)
    if p.lora is None:
        return y
    # LoRA as PEFT computes it, B(A(x)) * scale, never merged into W (weights.py says why)
    return y.add_(F.linear(F.linear(x, p.lora.a), p.lora.b, p.lora.bias), alpha=p.lora.scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotary_tables(positions: torch.Tensor, w: DecoderWeights, dtype: torch.dtype):
    """cos, sin ``[..., head_dim]`` for integer ``positions`` ``[...]``."""
    freqs = positions[..., None].float() * w.inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * w.rope_scale).to(dtype), (emb.sin() * w.rope_scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[..., heads, head_dim]``, cos/sin ``[..., 1, head_dim]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def mlp(x: torch.Tensor, layer: Layer, w: DecoderWeights) -> torch.Tensor:
    return linear(w.act(linear(x, layer.gate)) * linear(x, layer.up), layer.down)


def qkv(x: torch.Tensor, layer: Layer, w: DecoderWeights, cos, sin):
    """Projected, rotated q ``[..., heads, D]`` and k, v ``[..., kv_heads, D]``."""
    lead = x.shape[:-1]
    q = linear(x, layer.q).view(*lead, w.heads, w.head_dim)
    k = linear(x, layer.k).view(*lead, w.kv_heads, w.head_dim)
    v = linear(x, layer.v).view(*lead, w.kv_heads, w.head_dim)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


def prefill_mask(prompt_mask: torch.Tensor, window: int | None) -> torch.Tensor:
    """``[b, 1, P, P]`` bool: causal, real keys only, within the sliding window.

    Every query also sees itself, so a left-padding query never has an all-masked row (its
    output would be NaN and would reach the cache through the next layer's keys/values).
    """
    plen = prompt_mask.shape[1]
    i = torch.arange(plen, device=prompt_mask.device)
    allowed = i[None, :] <= i[:, None]
    if window is not None:
        allowed &= i[:, None] - i[None, :] < window
    eye = i[None, :] == i[:, None]
    return ((allowed[None] & prompt_mask[:, None, :]) | eye)[:, None]


def prefill(
    w: DecoderWeights, cache: StaticKVCache, ids: torch.Tensor, prompt_mask: torch.Tensor,
    row0: int, copies: int | torch.Tensor,
) -> torch.Tensor:
    """Run padded prompts once and store their keys/values for ``copies`` samples each.

    Args:
        ids: ``[b, P]`` int64 prompt ids, padded on the left or on the right (not both).
        prompt_mask: ``[b, P]`` bool, True at real tokens.
        row0: first cache row; prompt i fills the next ``copies`` rows (int), or ``copies`` is
            the ``[m]`` int64 prompt index of each row from row0 on; columns ``[0, P)``
            (`StaticKVCache.write_prompts`).

    Returns:
        ``[b, V]`` logits of each prompt's last real token, in the model dtype.
    """
    b, plen = ids.shape
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp_(min=0)
    h = F.embedding(ids, w.embed)
    cos, sin = rotary_tables(positions, w, h.dtype)
    cos, sin = cos[:, :, None], sin[:, :, None]
    masks = {}
    for i, layer in enumerate(w.layers):
        x = rms_norm(h, layer.input_norm, w.eps)
        q, k, v = qkv(x, layer, w, cos, sin)
        cache.write_prompts(i, row0, k, v, copies)
        if layer.window not in masks:
            masks[layer.window] = prefill_mask(prompt_mask, layer.window)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=masks[layer.window], scale=w.scaling, enable_gqa=w.heads != w.kv_heads,
        )
        h = h + linear(a.transpose(1, 2).reshape(b, plen, -1), layer.o)
        h = h + mlp(rms_norm(h, layer.post_norm, w.eps), layer, w)
    # the last real token: column P-1 when left-padded, len-1 when right-padded
    last = plen - 1 - prompt_mask.flip(1).to(torch.int8).argmax(1)
    h = h[torch.arange(b, device=h.device), last]
    return linear(rms_norm(h, w.norm, w.eps), w.lm_head)


def decode_forward(
    w: DecoderWeights, cache: StaticKVCache, tokens: torch.Tensor, slot: torch.Tensor,
    positions: torch.Tensor, live: int, attention: str = "sdpa",
) -> torch.Tensor:
    """One token per row: write its keys/values at column ``slot`` and return next-token logits.

    Args:
        tokens: ``[n]`` int64, the last sampled token of cache rows ``0 .. n-1``.
        slot: ``[n]`` int64 cache column of each row's token (``[1]``: the same for every row).
        positions: ``[n]`` int64 RoPE position of each row's token.
        live: columns of the cache attention reads (``cache.live_length(max(slot))``, static per graph).
        attention: decode attention backend, ``"sdpa"`` or ``"flash"`` (`attention.select_attention`).

    Returns:
        ``[n, V]`` logits in the model dtype.
    """
    n = tokens.shape[0]
    h = F.embedding(tokens, w.embed)
    cos, sin = rotary_tables(positions, w, h.dtype)
    cos, sin = cos[:, None], sin[:, None]
    cache.valid[:n].scatter_(1, slot.view(-1, 1).expand(n, 1), True)
    attend = DecodeAttention(attention, cache, n, slot, live)
    for i, layer in enumerate(w.layers):
        x = rms_norm(h, layer.input_norm, w.eps)
        q, k, v = qkv(x, layer, w, cos, sin)
        cache.write_token(i, n, slot, k, v)
        h = h + linear(attend(i, q, layer.window, w.scaling), layer.o)
        h = h + mlp(rms_norm(h, layer.post_norm, w.eps), layer, w)
    return linear(rms_norm(h, w.norm, w.eps), w.lm_head)
