"""
What every attention layer shares (model.CausalSelfAttention, mla.MultiHeadLatentAttention): causal scaled
dot-product attention that also takes keys from a generation cache, and rotary position embeddings (RoPE).
"""
import torch
import torch.nn.functional as F


def causal_attention(q, k, v, dropout_p=0.0):
    """softmax(q k^T / sqrt(d)) v where query i (of the last T positions) sees keys up to its own position.
    q (B, nh, T, d), k (B, nh, S, d), v (B, nh, S, dv) with S >= T: the first S - T keys come from a cache."""
    T, S = q.size(2), k.size(2)
    if T == S:  # training, and the first step of generation
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if T == 1:  # one new token sees everything cached
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def rope_cache(head_size, length, theta):
    """cos/sin tables (length, head_size/2) for rotary position embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def add_rope_buffers(module, dim, config):
    """module.rope_cos/rope_sin: the tables for `dim` rotary dims and every position up to block_size. Not saved
    in checkpoints: rebuilt from the config, and crop_block_size can slice them."""
    cos, sin = rope_cache(dim, config.block_size, config.rope_theta)
    module.register_buffer("rope_cos", cos, persistent=False)
    module.register_buffer("rope_sin", sin, persistent=False)


def rope_tables(module, T, cache):
    """module's cos/sin rows for T new positions, which start after the ones a cache holds."""
    pos = cache.pos if cache is not None else 0
    return module.rope_cos[pos:pos + T], module.rope_sin[pos:pos + T]


def apply_rope(x, cos, sin):
    # x: (B, nh, T, hs); rotate each pair (x1, x2) of the two halves by the position's angle
    x1, x2 = x.float().chunk(2, dim=-1)
    T = x.size(2)
    cos, sin = cos[:T], sin[:T]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.type_as(x)
