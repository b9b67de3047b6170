"""
Multi-head latent attention (MLA, DeepSeek-V2): keys and values of all heads come from one small latent per
token, which is all a generation cache keeps of them. model.py uses it in attention's place with attn='mla'.
"""
import torch
import torch.nn as nn

from nanomoe.errors import UserError
from nanomoe.layers.attention import add_rope_buffers, apply_rope, causal_attention, rope_tables


def check_mla_config(config):
    """MLA settings that do not fit the rest of the model (GPTConfig.validate calls it): a UserError."""
    hs = config.n_embd // config.n_head
    if config.n_kv_head is not None:
        raise UserError(f"attn='mla' has no key/value heads to group: remove n_kv_head={config.n_kv_head} "
                        f"(MLA shares one latent across heads instead)")
    for name in ("q_latent_dim", "kv_latent_dim"):
        if getattr(config, name) > config.n_embd:
            raise UserError(f"{name}={getattr(config, name)} does not fit: the latent compresses the "
                            f"n_embd={config.n_embd} input, so it must be at most {config.n_embd}")
    if config.d_rope % 2:
        raise UserError(f"d_rope={config.d_rope} must be even (RoPE rotates pairs of dims)")
    if config.d_rope > hs:
        raise UserError(f"d_rope={config.d_rope} is larger than the head size n_embd/n_head={hs}")
    if config.pos_emb == "rope" and config.d_rope == 0:
        raise UserError("attn='mla' with pos_emb='rope' needs d_rope > 0 (MLA rotates only its d_rope dims)")


class MultiHeadLatentAttention(nn.Module):
    """MLA (DeepSeek-V2, section 2.1), in the plain (non-absorbed) form. With h the layer input, per token:
        c_kv = RMSNorm(W_dkv h)                       the key/value latent (kv_latent_dim): all the cache keeps
        k_rope = RoPE(W_kr h)                         one d_rope rotary key shared by every head: cached too
        k_i = [W_uk_i c_kv ; k_rope],  v_i = W_uv_i c_kv
        c_q = RMSNorm(W_dq h) (or h when q_latent_dim = 0),  q_i = [W_uq_i c_q ; RoPE(W_qr_i c_q)]
        o_i = softmax(q_i k_i^T / sqrt(head_size)) v_i,   out = W_o [o_1 ... o_nh]
    Each query/key head has head_size = n_embd / n_head dims, the last d_rope of them rotary; each value head
    head_size. W_dkv and W_kr share one matmul (kv_a_proj), as do W_uk and W_uv (kv_b_proj) and W_uq and
    W_qr (q_b_proj, or q_proj without query compression)."""

    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.head_size = config.n_embd // config.n_head
        self.d_rope = config.d_rope
        self.d_nope = self.head_size - config.d_rope  # the content (position-free) part of a query/key head
        self.kv_latent_dim = config.kv_latent_dim
        C, nh, hs = config.n_embd, self.n_head, self.head_size
        if config.q_latent_dim:
            self.q_a_proj = nn.Linear(C, config.q_latent_dim, bias=config.bias)
            self.q_a_norm = nn.RMSNorm(config.q_latent_dim, eps=config.norm_eps)
            self.q_b_proj = nn.Linear(config.q_latent_dim, nh * hs, bias=config.bias)
        else:
            self.q_proj = nn.Linear(C, nh * hs, bias=config.bias)
        self.kv_a_proj = nn.Linear(C, config.kv_latent_dim + config.d_rope, bias=config.bias)  # [c_kv | k_rope]
        self.kv_a_norm = nn.RMSNorm(config.kv_latent_dim, eps=config.norm_eps)
        self.kv_b_proj = nn.Linear(config.kv_latent_dim, nh * (self.d_nope + hs), bias=config.bias)  # [k | v] per head
        self.c_proj = nn.Linear(nh * hs, C, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        if self.d_rope:
            add_rope_buffers(self, self.d_rope, config)

    def forward(self, x, cache=None):
        B, T, C = x.size()
        nh, hs, dr = self.n_head, self.head_size, self.d_rope
        q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x))) if hasattr(self, "q_a_proj") else self.q_proj(x)
        q_nope, q_rope = q.view(B, T, nh, hs).transpose(1, 2).split([self.d_nope, dr], dim=-1)  # (B, nh, T, .)
        c_kv, k_rope = self.kv_a_proj(x).split([self.kv_latent_dim, dr], dim=-1)
        c_kv = self.kv_a_norm(c_kv)  # (B, T, latent)
        k_rope = k_rope.unsqueeze(1)  # (B, 1, T, d_rope): one rotary key for all heads
        if dr:
            cos, sin = rope_tables(self, T, cache)
            q_rope, k_rope = apply_rope(q_rope, cos, sin), apply_rope(k_rope, cos, sin)
        if cache is not None:
            c_kv, k_rope = cache.append(self.layer_idx, c_kv=c_kv, k_rope=k_rope)  # S = cached + new positions
        S = c_kv.size(1)
        # non-absorbed: up-project the latent of every position to per-head keys and values
        k_nope, v = self.kv_b_proj(c_kv).view(B, S, nh, self.d_nope + hs).transpose(1, 2).split([self.d_nope, hs], -1)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, nh, T, hs)
        k = torch.cat([k_nope, k_rope.expand(B, nh, S, dr)], dim=-1)  # (B, nh, S, hs)
        y = causal_attention(q, k, v, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, nh * hs)
        return self.resid_dropout(self.c_proj(y))
