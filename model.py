"""
The dense GPT: nanoGPT's model with options. GPT-2 by default (learned positions, LayerNorm, GELU MLP, tied
head: GPT-2's own weights compute transformers' logits); behind config flags: RoPE, grouped-query attention,
QK-norm, RMSNorm, SwiGLU, and three optional layers from nanomoe/layers/: multi-head latent attention
(mla.py), hashed n-gram input embeddings (fgram.py) and Mamba2 in attention's place in chosen layers
(mamba2.py). Generation keeps a GenerationCache (cache.py), so a new token costs one position's work instead
of the whole context's.

Two hooks let a subclass change what it needs and nothing else (moe_model.py does): make_ffn(layer_idx)
builds each layer's feed-forward block, and extra_losses() returns what it adds to the loss (the dense model
adds nothing). nanomoe/factory.py builds the right class from a dict of settings.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanomoe.errors import UserError
from nanomoe.layers.attention import add_rope_buffers, apply_rope, causal_attention, rope_tables
from nanomoe.layers.cache import GenerationCache
from nanomoe.layers.fgram import FGram, check_fgram_config
from nanomoe.layers.mamba2 import Mamba2, check_mamba_config
from nanomoe.layers.mla import MultiHeadLatentAttention, check_mla_config
from nanomoe.settings import check_fields, setting


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
    norm_eps: float = setting(1e-5, "eps of every norm (Llama 2, Mixtral: 1e-5; Qwen, DeepSeek: 1e-6)", above=0)
    qk_norm: bool = setting(False, "RMSNorm on each head's queries and keys before RoPE (Qwen3; mha only)")
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
    # Mamba2 layers (layers/mamba2.py) in attention's place: a hybrid model. The defaults fit n_embd=768 (2 x 768 =
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
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % (self.n_kv_head or self.n_head):
            raise UserError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.pos_emb == "rope" and self.attn == "mha" and (self.n_embd // self.n_head) % 2:
            raise UserError(f"pos_emb='rope' needs an even head size, got n_embd/n_head={self.n_embd // self.n_head}")
        if self.attn == "mla":
            check_mla_config(self)
            if self.qk_norm:
                raise UserError("qk_norm=True normalises each head's keys, which MLA builds from a shared latent "
                                "(its latent is normalised already); use attn='mha' or qk_norm=False")
        check_fgram_config(self)
        if self.mamba_layers:
            check_mamba_config(self)

    def is_mamba_layer(self, layer_idx):
        return layer_idx in self.mamba_layers

    @classmethod
    def from_dict(cls, d):
        """Build from a dict that may hold other keys (the training config); only our fields are taken."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def make_norm(config):
    # eps: config.norm_eps, 1e-5 unless set (nn.RMSNorm's default would be float32's machine epsilon)
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def mlp_hidden_size(config):
    # SwiGLU has three matrices instead of two; 2/3 of 4x keeps the parameter count of the GELU MLP
    if config.mlp == "swiglu":
        return 64 * math.ceil(4 * config.n_embd * 2 / 3 / 64)
    return 4 * config.n_embd


def make_attention(config, layer_idx):
    if config.attn == "mla":
        return MultiHeadLatentAttention(config, layer_idx)
    return CausalSelfAttention(config, layer_idx)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.layer_idx = layer_idx  # which entry of a GenerationCache is ours
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head or config.n_head
        self.head_size = config.n_embd // config.n_head
        # queries for every head, keys and values for the (possibly fewer) kv heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_size, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm
        if self.qk_norm:  # Qwen3: each head's queries and keys RMS-normalised, with gains, before RoPE
            self.q_norm = nn.RMSNorm(self.head_size, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_size, eps=config.norm_eps)
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
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
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
        self.mlp = ffn  # a dense MLP, or whatever GPT.make_ffn returns for this layer

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

    def start_step(self, batches, ctx, reduce_mean):
        """Called by the training step (train.train_step) before an optimizer step's first micro-step, with
        that step's micro-batches on this process and reduce_mean (a tensor's mean over the processes). The
        dense model needs nothing; a subclass may route the batches ahead (moe_model.py)."""

    def end_step(self, expert_load, skipped, reduce_mean):
        """Called by the training step after each optimizer step (skipped: a bool tensor, the update was
        skipped). The dense model needs nothing; a subclass may move state that is not a parameter."""

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
        extra is the dict of extra_losses() (empty for the dense model). With a GenerationCache, idx are the
        positions after the cached ones, and the cache takes in theirs."""
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
        The model sees the last block_size tokens. With kv_cache, the first step fills a GenerationCache
        (prefill) and each later step runs only the new token; once the context is longer than block_size, every step
        re-prefills the last block_size tokens into a new cache (learned positions shift and each window starts
        afresh: the Mamba layers' states too), which computes exactly what kv_cache=False does, at its cost."""
        block_size = self.config.block_size
        cache = None
        for _ in range(max_new_tokens):
            if not kv_cache:
                logits, _, _ = self(idx[:, -block_size:])
            elif cache is None or cache.pos >= block_size:  # first step, or the window is full: (re-)prefill
                cache = GenerationCache(self.config.n_layer)
                logits, _, _ = self(idx[:, -block_size:], cache=cache)
            else:
                logits, _, _ = self(idx[:, -1:], cache=cache)
            logits = logits[:, -1, :vocab_size] / max(temperature, 1e-8)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                # masked_fill, not logits[mask] = ...: a boolean index makes the host wait for the GPU each token
                logits = logits.masked_fill(logits < v[:, [-1]], -float("inf"))
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
            yield idx_next

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, vocab_size=None, kv_cache=True):
        """Append max_new_tokens sampled tokens to idx (B, T) and return the (B, T + max_new_tokens) result."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, vocab_size, kv_cache))
        return torch.cat([idx] + new, dim=1)
