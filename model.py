"""
The dense GPT. GPT-2 architecture by default (learned positions, LayerNorm, GELU MLP, tied head), with
modern options behind config flags: RoPE, grouped-query attention, RMSNorm, SwiGLU.

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
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise UserError(f"pos_emb='rope' needs an even head size, got n_embd/n_head={self.n_embd // self.n_head}")

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


def apply_rope(x, cos, sin):
    # x: (B, nh, T, hs); rotate each pair (x1, x2) of the two halves by the position's angle
    x1, x2 = x.float().chunk(2, dim=-1)
    T = x.size(2)
    cos, sin = cos[:T], sin[:T]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
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
            cos, sin = rope_cache(self.head_size, config.block_size, config.rope_theta)
            # not saved in checkpoints: rebuilt from the config, and crop_block_size can slice them
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x):
        B, T, C = x.size()
        hs = self.head_size
        q, k, v = self.c_attn(x).split([self.n_head * hs, self.n_kv_head * hs, self.n_kv_head * hs], dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, n_kv, T, hs)
        v = v.view(B, T, self.n_kv_head, hs).transpose(1, 2)
        if self.use_rope:
            q, k = apply_rope(q, self.rope_cos, self.rope_sin), apply_rope(k, self.rope_cos, self.rope_sin)
        if self.n_kv_head != self.n_head:
            # each kv head serves n_head / n_kv_head query heads
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
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
    def __init__(self, config, ffn):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = ffn  # a dense MLP, or whatever GPT.make_ffn returns for this layer (an MoE layer)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
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
            h=nn.ModuleList([Block(config, self.make_ffn(i)) for i in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        if config.pos_emb == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
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
        """All parameters; with non_embedding, position embeddings are not counted (token embeddings are
        counted once because they are tied to the head, which does real work)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def num_active_params(self):
        """Parameters that do work for one token. The dense model uses all of them."""
        return self.get_num_params()

    def forward(self, idx, targets=None):
        """idx (B, T) token ids -> (logits, loss, extra). loss is the cross-entropy (None without targets);
        extra is the dict of extra_losses() (empty for the dense model)."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise UserError(f"sequence of length {T} is longer than block_size={self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, n_embd)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(T, device=idx.device))
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x)
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
            if block.attn.use_rope:
                block.attn.rope_cos = block.attn.rope_cos[:block_size]
                block.attn.rope_sin = block.attn.rope_sin[:block_size]

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on weight matrices (linear layers, embeddings, the router, the experts'
        stacked weights) and none on biases and norm gains, decided by what a parameter is rather than by its
        rank (the experts' stacked biases are 2-D). Fused where torch has the kernel (CUDA, CPU): it can also
        skip a step on the device (train.py's non-finite check sets optimizer.found_inf, no host sync)."""
        no_decay = {id(p) for m in self.modules() for name, p in m.named_parameters(recurse=False)
                    if name.endswith("bias") or isinstance(m, (nn.LayerNorm, nn.RMSNorm))}
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
                  {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]
        fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def flops_per_token(self):
        """Training FLOPs per token: 6 per active parameter (fwd + bwd) plus attention (PaLM appendix B)."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        return 6 * self.num_active_params() + 12 * L * H * Q * T

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops):
        """Model FLOPs utilisation: achieved training FLOP/s over the hardware's peak (None if unknown)."""
        if not peak_flops or dt <= 0:
            return None
        return self.flops_per_token() * tokens_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, vocab_size=None):
        """Yield (B, 1) next-token tensors one by one; idx (B, T) is the conditioning context. vocab_size
        limits sampling to the tokenizer's ids (GPT-2's 50257 of the model's padded 50304 rows)."""
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _, _ = self(idx_cond)
            logits = logits[:, -1, :vocab_size] / max(temperature, 1e-8)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
            yield idx_next

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, vocab_size=None):
        """Append max_new_tokens sampled tokens to idx (B, T) and return the (B, T + max_new_tokens) result."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, vocab_size))
        return torch.cat([idx] + new, dim=1)
