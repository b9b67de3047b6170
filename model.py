"""
The dense GPT. GPT-2 architecture by default (learned positions, LayerNorm, GELU MLP, tied head), with
modern options behind config flags: RoPE, grouped-query attention, RMSNorm, SwiGLU, multi-head latent
attention (MLA, DeepSeek-V2), hashed n-gram ("F-gram") input embeddings, and Mamba2 layers in attention's
place in chosen layers (a hybrid; mamba2.py). Generation keeps a KVCache so a new token costs one position's
work instead of re-running the whole context.

Extension point for moe_model.py: GPT.make_ffn(layer_idx) builds the feed-forward block of each layer, and
GPT.extra_losses() returns whatever a subclass wants to add to the loss (the dense model adds nothing).
"""
import inspect
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError
from configurator import check_fields, dataclass_keys, setting
from mamba2 import Mamba2


@dataclass
class GPTConfig:
    # each field is a config key (train.py --n_layer=6); setting() declares its range and, for `runtime` ones,
    # that a run loading a checkpoint may change it (the others are what the saved weights are)
    block_size: int = setting(1024, "longest sequence the model sees", min=1)
    vocab_size: int = setting(50304, "GPT-2's 50257 rounded up to a multiple of 64 for speed", min=1)
    n_layer: int = setting(12, "transformer blocks", min=1)
    n_head: int = setting(12, "attention heads", min=1)
    n_kv_head: int | None = setting(None, "grouped-query attention: key/value heads (None = n_head)", min=1)
    n_embd: int = setting(768, "model width", min=1)
    dropout: float = setting(0.0, "dropout rate", runtime=True, min=0, below=1)
    bias: bool = setting(True, "biases in Linear and LayerNorm layers, like GPT-2")
    pos_emb: str = setting("learned", "'learned' (GPT-2) or 'rope'", choices=("learned", "rope"))
    rope_theta: float = setting(10000.0, "RoPE base", above=0)
    norm: str = setting("layernorm", "'layernorm' or 'rmsnorm'", choices=("layernorm", "rmsnorm"))
    mlp: str = setting("gelu", "'gelu' (4x hidden), 'gelu_tanh' (GPT-2's own tanh GELU) or 'swiglu'",
                       choices=("gelu", "gelu_tanh", "swiglu"))
    attn: str = setting("mha", "'mha' (multi-head, or grouped-query with n_kv_head) or 'mla' (multi-head latent "
                               "attention, DeepSeek-V2)", choices=("mha", "mla"))
    q_latent_dim: int = setting(0, "MLA: width of the compressed query latent (0 = no query compression)", min=0)
    kv_latent_dim: int = setting(256, "MLA: width of the compressed key/value latent (what the KV cache keeps)",
                                 min=1)
    d_rope: int = setting(32, "MLA: rotary dims of each query/key head, the key's shared by all heads (even, at "
                              "most the head size; 0 = none)", min=0)
    fgram_max_n: int = setting(0, "hashed n-gram input embeddings for n = 2..fgram_max_n (0 = off)", min=0)
    fgram_buckets: int = setting(4096, "rows of each F-gram table (n-grams are hashed into them)", min=1)
    # Mamba2 layers (mamba2.py) in attention's place: a hybrid model. The defaults fit n_embd=768 (2 x 768 =
    # 24 heads x 64); every mamba2_* setting is read only when mamba_layers names a layer
    mamba_layers: list[int] = setting([], "layers whose attention is a Mamba2 (SSD) layer, e.g. [0, 1, 2, 4] "
                                          "(empty = none)", min=0)
    mamba2_num_heads: int = setting(24, "Mamba2: heads (num_heads * head_dim = n_embd * mamba2_expand)", min=1)
    mamba2_head_dim: int = setting(64, "Mamba2: channels per head", min=1)
    mamba2_state_size: int = setting(64, "Mamba2: state numbers per channel (N)", min=1)
    mamba2_chunk_size: int = setting(64, "Mamba2: chunk length of the training scan (a sequence that is not a "
                                         "multiple is padded inside the layer)", runtime=True, min=1)
    mamba2_n_groups: int = setting(1, "Mamba2: groups of heads that share B and C (divides mamba2_num_heads)",
                                   min=1)
    mamba2_conv_kernel: int = setting(4, "Mamba2: width of the causal depthwise convolution", min=1)
    mamba2_expand: int = setting(2, "Mamba2: inner width = n_embd * mamba2_expand", min=1)

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Every field within its declared range, and shapes that fit together; else a UserError."""
        check_fields(self)
        kv = self.n_kv_head or self.n_head
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % kv:
            raise UserError(f"n_head={self.n_head} is not divisible by n_kv_head={kv}")
        hs = self.n_embd // self.n_head
        if self.pos_emb == "rope" and self.attn == "mha" and hs % 2:
            raise UserError(f"pos_emb='rope' needs an even head size, got n_embd/n_head={hs}")
        if self.attn == "mla":
            self.validate_mla(hs)
        if self.fgram_max_n == 1:
            raise UserError("fgram_max_n=1 has no n-grams to add (they start at n=2); use 0 for off or 2 or more")
        if self.mamba_layers:
            self.validate_mamba()

    def validate_mla(self, hs):
        if self.n_kv_head is not None:
            raise UserError(f"attn='mla' has no key/value heads to group: remove n_kv_head={self.n_kv_head} "
                            f"(MLA shares one latent across heads instead)")
        for name in ("q_latent_dim", "kv_latent_dim"):
            if getattr(self, name) > self.n_embd:
                raise UserError(f"{name}={getattr(self, name)} does not fit: the latent compresses the "
                                f"n_embd={self.n_embd} input, so it must be at most {self.n_embd}")
        if self.d_rope % 2:
            raise UserError(f"d_rope={self.d_rope} must be even (RoPE rotates pairs of dims)")
        if self.d_rope > hs:
            raise UserError(f"d_rope={self.d_rope} is larger than the head size n_embd/n_head={hs}")
        if self.pos_emb == "rope" and self.d_rope == 0:
            raise UserError("attn='mla' with pos_emb='rope' needs d_rope > 0 (MLA rotates only its d_rope dims)")

    def validate_mamba(self):
        layers = self.mamba_layers
        if len(set(layers)) != len(layers):
            raise UserError(f"mamba_layers={layers} names a layer twice; list each layer index once")
        if max(layers) >= self.n_layer:
            raise UserError(f"mamba_layers={layers} has layer {max(layers)}, but n_layer={self.n_layer} numbers "
                            f"the layers 0..{self.n_layer - 1}")
        inner, heads = self.n_embd * self.mamba2_expand, self.mamba2_num_heads * self.mamba2_head_dim
        if inner != heads:
            raise UserError(f"Mamba2 needs n_embd * mamba2_expand == mamba2_num_heads * mamba2_head_dim, got "
                            f"{self.n_embd} * {self.mamba2_expand} = {inner} vs {self.mamba2_num_heads} * "
                            f"{self.mamba2_head_dim} = {heads}; set mamba2_num_heads and mamba2_head_dim so their "
                            f"product is {inner}")
        if self.mamba2_num_heads % self.mamba2_n_groups:
            raise UserError(f"mamba2_num_heads={self.mamba2_num_heads} is not divisible by mamba2_n_groups="
                            f"{self.mamba2_n_groups} (each group of heads shares one B and C)")

    def is_mamba_layer(self, layer_idx):
        return layer_idx in self.mamba_layers

    @classmethod
    def from_dict(cls, d):
        """Build from a dict that may hold other keys (the training config); only our fields are taken."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def build_model(model_args):
    """The one way to make a model from settings (a training config, a checkpoint's model_args): an MoEGPT
    when n_experts > 0, else a dense GPT. Keys that are not model settings are ignored."""
    if model_args.get("n_experts", 0) > 0:
        from moe_model import MoEConfig, MoEGPT  # imported here: moe_model imports this file
        return MoEGPT(MoEConfig.from_dict(model_args))
    return GPT(GPTConfig.from_dict(model_args))


def model_keys(skip=()):
    """{name: Key} of every model setting, dense and MoE: config keys of train.py and bench.py."""
    from moe_model import MoEConfig  # imported here: moe_model imports this file
    return dataclass_keys(MoEConfig, skip)


def check_same_model(saved_args, wanted, explicit, source, crop=False):
    """The model comes from saved weights (a checkpoint, a Hugging Face folder): a model setting the run gives
    explicitly (in `explicit`) that differs from the saved one does not fit them, unless it is a runtime
    setting. Settings the saved model does not have (MoE settings of a dense GPT-2) are not compared. With
    crop, block_size may be smaller (the caller crops); it is never larger."""
    keys = model_keys()
    if "block_size" in explicit and wanted["block_size"] > saved_args["block_size"]:
        raise UserError(f"block_size={wanted['block_size']} is larger than the {source}'s "
                        f"{saved_args['block_size']} (use --block_size={saved_args['block_size']} or less)")
    differ = [f"{k}: config {wanted[k]!r} vs {source} {saved_args[k]!r}" for k in keys
              if k in explicit and k in saved_args and not keys[k].runtime and wanted[k] != saved_args[k]
              and not (crop and k == "block_size")]
    if differ:
        raise UserError(f"the {source} has another model shape ({'; '.join(differ)}); remove those settings "
                        f"to use the {source}'s")


def make_norm(config):
    if config.norm == "rmsnorm":
        # eps 1e-5, as Llama 2 and Mixtral use (nn.RMSNorm's default would be float32's machine epsilon)
        return nn.RMSNorm(config.n_embd, eps=1e-5)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


def mlp_hidden_size(config):
    # SwiGLU has three matrices instead of two; 2/3 of 4x keeps the parameter count of the GELU MLP
    if config.mlp == "swiglu":
        return 64 * math.ceil(4 * config.n_embd * 2 / 3 / 64)
    return 4 * config.n_embd


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


class KVCache:
    """What generation keeps between steps so that each new token costs one position's work. Per layer, an
    attention layer appends the per-token tensors it needs again (MHA/GQA: keys and values; MLA: the
    compressed latent and the rope key) with append(); a layer with a fixed-size recurrent state (a Mamba2
    block, say) reads and replaces it with get()/put() under the same interface. pos counts the positions
    already processed; ids keeps the last few token ids for the F-gram hash."""

    def __init__(self, n_layer):
        self.layers = [{} for _ in range(n_layer)]
        self.pos = 0
        self.ids = None

    def append(self, layer, **tensors):
        """Add the new positions' tensors (time on dim -2) to the layer's and return each one's whole history."""
        store = self.layers[layer]
        for name, t in tensors.items():
            store[name] = torch.cat([store[name], t], dim=-2) if name in store else t
        return [store[name] for name in tensors]

    def get(self, layer, name, default=None):
        return self.layers[layer].get(name, default)

    def put(self, layer, name, value):
        self.layers[layer][name] = value

    def nbytes(self):
        """Bytes of the layers' tensors (what grows with the context)."""
        return sum(t.numel() * t.element_size() for store in self.layers for t in store.values())


def cache_values_per_token(config):
    """Numbers a KVCache keeps per token, all attention layers together: keys and values of the kv heads
    (MHA/GQA), or the latent and the shared rope key (MLA); Mamba layers keep a fixed-size state instead.
    Times the dtype's bytes, it is the cache's bytes per token."""
    n_attn = config.n_layer - len(config.mamba_layers)
    if config.attn == "mla":
        return n_attn * (config.kv_latent_dim + config.d_rope)
    return n_attn * 2 * (config.n_kv_head or config.n_head) * (config.n_embd // config.n_head)


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


def make_attention(config, layer_idx):
    return MultiHeadLatentAttention(config, layer_idx) if config.attn == "mla" else CausalSelfAttention(config, layer_idx)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.layer_idx = layer_idx  # which entry of a KVCache is ours
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head or config.n_head
        self.head_size = config.n_embd // config.n_head
        # queries for every head, keys and values for the (possibly fewer) kv heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_size, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.use_rope = config.pos_emb == "rope"
        if self.use_rope:
            add_rope_buffers(self, self.head_size, config)

    def forward(self, x, cache=None):
        B, T, C = x.size()
        hs = self.head_size
        q, k, v = self.c_attn(x).split([self.n_head * hs, self.n_kv_head * hs, self.n_kv_head * hs], dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, n_kv, T, hs)
        v = v.view(B, T, self.n_kv_head, hs).transpose(1, 2)
        if self.use_rope:
            cos, sin = rope_tables(self, T, cache)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(self.layer_idx, k=k, v=v)  # (B, n_kv, S, hs): the cache keeps only the kv heads
        if self.n_kv_head != self.n_head:
            # each kv head serves n_head / n_kv_head query heads
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = causal_attention(q, k, v, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


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
            self.q_a_norm = nn.RMSNorm(config.q_latent_dim, eps=1e-5)
            self.q_b_proj = nn.Linear(config.q_latent_dim, nh * hs, bias=config.bias)
        else:
            self.q_proj = nn.Linear(C, nh * hs, bias=config.bias)
        self.kv_a_proj = nn.Linear(C, config.kv_latent_dim + config.d_rope, bias=config.bias)  # [c_kv | k_rope]
        self.kv_a_norm = nn.RMSNorm(config.kv_latent_dim, eps=1e-5)
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


def mlp_activation(h, kind):
    """The MLP's nonlinearity on its first projection h: GELU (exact, or GPT-2's tanh approximation), or
    SwiGLU on h = [gate | up]."""
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h, approximate="tanh" if kind == "gelu_tanh" else "none")


class MLP(nn.Module):
    def __init__(self, config, hidden=None, dropout=True):
        super().__init__()
        hidden = hidden or mlp_hidden_size(config)
        self.kind = config.mlp
        # SwiGLU's gate and up projections share one matmul: c_fc outputs [gate | up]
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if self.kind == "swiglu" else hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout) if dropout else nn.Identity()

    def forward(self, x):
        return self.dropout(self.c_proj(mlp_activation(self.c_fc(x), self.kind)))


class FGram(nn.Module):
    """Hashed n-gram input embeddings ("F-gram"): for n = 2..fgram_max_n, the last n token ids at each
    position are hashed into one of fgram_buckets rows of that n's table, and scale_n * row is added to the
    token embedding. Causal by construction (only the current and earlier ids). The tables start at zero, so
    a new model computes what it would without them; the scales start at 1 so the tables get gradients."""

    def __init__(self, config):
        super().__init__()
        self.ns = list(range(2, config.fgram_max_n + 1))
        self.buckets = config.fgram_buckets
        # plain zero tensors, not nn.Embedding: they draw no random numbers, so the rest of the model gets the
        # same initial weights from the same seed as without them
        self.tables = nn.ParameterList([nn.Parameter(torch.zeros(config.fgram_buckets, config.n_embd))
                                        for _ in self.ns])
        self.scale = nn.Parameter(torch.ones(len(self.ns)))

    def forward(self, idx, cache=None):
        """idx (B, T) -> (B, T, n_embd). With a cache, the hash also reads the ids before idx kept there."""
        T = idx.size(1)
        ids = idx if cache is None or cache.ids is None else torch.cat([cache.ids, idx], dim=1)
        if cache is not None:
            cache.ids = ids[:, -(self.ns[-1] - 1):]  # the next step's n-grams need the last n_max - 1 ids
        out = 0
        for i, n in enumerate(self.ns):
            rows = ngram_hash(ids, n, self.buckets)[:, -T:]
            out = out + self.scale[i] * F.embedding(rows, self.tables[i])
        return out


def ngram_hash(ids, n, buckets):
    """(B, T) ids -> (B, T) bucket of the n-gram ending at each position: a polynomial hash modulo the
    prime 2^31 - 1 of its n ids (+1; positions before the start count as 0), then modulo buckets."""
    T = ids.size(1)
    padded = F.pad(ids + 1, (n - 1, 0))  # (B, n - 1 + T)
    h = torch.zeros_like(ids)
    for j in range(n):  # h < 2^31, so h * 1000003 + id fits in int64
        h = (h * 1_000_003 + padded[:, j:j + T]) % 2_147_483_647
    return h % buckets


class Block(nn.Module):
    def __init__(self, config, ffn, layer_idx=0):
        super().__init__()
        self.ln_1 = make_norm(config)
        # the sequence mixer: attention, or in the layers config.mamba_layers names a Mamba2 layer
        self.is_mamba = config.is_mamba_layer(layer_idx)
        if self.is_mamba:
            self.mamba = Mamba2(config, layer_idx)
        else:
            self.attn = make_attention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = ffn  # a dense MLP, or whatever GPT.make_ffn returns for this layer (an MoE layer)

    def forward(self, x, cache=None):
        mixer = self.mamba if self.is_mamba else self.attn
        x = x + mixer(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        config.validate()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, self.make_ffn(i), i) for i in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        if config.pos_emb == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        if config.fgram_max_n:
            self.transformer["fgram"] = FGram(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the output head reuses the token embedding (https://paperswithcode.com/method/weight-tying)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 scales the init of the projections that write into the residual stream by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def make_ffn(self, layer_idx):
        """The feed-forward block of layer layer_idx. Subclasses override this to use other FFNs."""
        return MLP(self.config)

    def extra_losses(self):
        """Losses and stats a subclass adds after a forward pass; 'aux_loss' (if present) is added to the
        cross-entropy by the training loop."""
        return {}

    def start_step(self, batches, ctx, proc):
        """Called by train.py before each optimizer step's first micro-step (batches: that step's micro-batches
        on this process, read only if needed). The dense model needs nothing; see MoEGPT."""

    def end_step(self, expert_load, skipped, proc):
        """Called by train.py after each optimizer step. The dense model needs nothing; see MoEGPT."""

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """All parameters; with non_embedding, position and F-gram embeddings (lookups, no FLOPs) are not
        counted (token embeddings are counted once because they are tied to the head, which does real work)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        if non_embedding and "fgram" in self.transformer:
            n -= sum(t.numel() for t in self.transformer.fgram.tables)
        return n

    def num_active_params(self):
        """Parameters that do work for one token. The dense model uses all of them."""
        return self.get_num_params()

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) token ids -> (logits, loss, extra). loss is the cross-entropy (None without targets);
        extra is the dict of extra_losses() (empty for the dense model). With a KVCache, idx are the positions
        after the cached ones, and the cache takes in theirs."""
        B, T = idx.size()
        pos = cache.pos if cache is not None else 0
        if pos + T > self.config.block_size:
            raise UserError(f"sequence of length {pos + T} is longer than block_size={self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, n_embd)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(pos, pos + T, device=idx.device))
        if "fgram" in self.transformer:
            x = x + self.transformer.fgram(idx, cache)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, cache)
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        else:
            # generation needs only the last position: skip the head on the others
            logits = self.lm_head(x[:, [-1], :])
            loss = None
        return logits, loss, self.extra_losses()

    def crop_block_size(self, block_size):
        """Shrink the context length (e.g. to fine-tune a 1024-context checkpoint at 256)."""
        if block_size > self.config.block_size:
            raise UserError(f"block_size={block_size} is larger than the model's {self.config.block_size}")
        self.config.block_size = block_size
        if "wpe" in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        for block in self.transformer.h:
            if hasattr(block, "attn") and hasattr(block.attn, "rope_cos"):
                block.attn.rope_cos = block.attn.rope_cos[:block_size]
                block.attn.rope_sin = block.attn.rope_sin[:block_size]

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on weight matrices (linear layers, embeddings, the router, the experts'
        stacked weights) and none on biases and norm gains, decided by what a parameter is rather than by its
        rank (the experts' stacked biases are 2-D). Fused where torch has the kernel (CUDA, CPU): it can also
        skip a step on the device (train.py's non-finite check sets optimizer.found_inf, no host sync)."""
        no_decay = {id(p) for m in self.modules() for name, p in m.named_parameters(recurse=False)
                    if name.endswith("bias") or isinstance(m, (nn.LayerNorm, nn.RMSNorm))
                    or (isinstance(m, FGram) and name == "scale")
                    or (isinstance(m, Mamba2) and name in ("A_log", "D"))}  # (dt_bias ends in "bias"): as Mamba2 does
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
                  {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]
        # FSDP with expert parallel (parallel.shard): FSDP's parameters are DTensors, the experts plain tensors,
        # and one fused update cannot take both kinds: each kind gets groups of its own
        sharded = {id(p) for p in params if hasattr(p, "to_local")}  # DTensor, without importing it
        if 0 < len(sharded) < len(params):
            groups = [{**g, "params": [p for p in g["params"] if (id(p) in sharded) == kind]}
                      for kind in (True, False) for g in groups]
        fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def flops_per_token(self):
        """Training FLOPs per token: 6 per active parameter (fwd + bwd) plus attention (PaLM appendix B) in the
        attention layers, plus the Mamba layers' scan: per head, scores and values over a chunk (chunk_size
        * (state + head_dim)) and the state written and read (2 * head_dim * state), times 6 like a weight."""
        cfg = self.config
        n_mamba = len(cfg.mamba_layers)
        L, H, Q, T = cfg.n_layer - n_mamba, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        N, P = cfg.mamba2_state_size, cfg.mamba2_head_dim
        scan = cfg.mamba2_num_heads * (min(cfg.mamba2_chunk_size, T) * (N + P) + 2 * P * N)
        return 6 * self.num_active_params() + 12 * L * H * Q * T + 6 * n_mamba * scan

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops):
        """Model FLOPs utilisation: achieved training FLOP/s over the hardware's peak (None if unknown)."""
        if not peak_flops or dt <= 0:
            return None
        return self.flops_per_token() * tokens_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, vocab_size=None, kv_cache=True):
        """Yield (B, 1) next-token tensors one by one; idx (B, T) is the conditioning context. vocab_size
        limits sampling to the tokenizer's ids (GPT-2's 50257 of the model's padded 50304 rows).
        The model sees the last block_size tokens. With kv_cache, the first step fills a KVCache (prefill) and
        each later step runs only the new token; once the context is longer than block_size, every step
        re-prefills the last block_size tokens into a new cache (learned positions shift and each window starts
        afresh: the Mamba layers' states too), which computes exactly what kv_cache=False does, at its cost."""
        block_size = self.config.block_size
        cache = None
        for _ in range(max_new_tokens):
            if not kv_cache:
                logits, _, _ = self(idx[:, -block_size:])
            elif cache is None or cache.pos >= block_size:  # first step, or the window is full: (re-)prefill
                cache = KVCache(self.config.n_layer)
                logits, _, _ = self(idx[:, -block_size:], cache=cache)
            else:
                logits, _, _ = self(idx[:, -1:], cache=cache)
            logits = logits[:, -1, :vocab_size] / max(temperature, 1e-8)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
            yield idx_next

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, vocab_size=None, kv_cache=True):
        """Append max_new_tokens sampled tokens to idx (B, T) and return the (B, T + max_new_tokens) result."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, vocab_size, kv_cache))
        return torch.cat([idx] + new, dim=1)
