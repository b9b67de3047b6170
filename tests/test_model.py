"""
The dense GPT (model.py) on tiny configs: causality (every attention, embedding and layer option, dense and
MoE), the modern options (RoPE, GQA, QK-norm, RMSNorm, SwiGLU), weight tying, parameter counts and the MFU formula,
generation past block_size, crop_block_size. Invalid settings are in test_reliability.py's table, where a
person meets them. The tests that take `device` run on the GPU with --device=cuda.
"""
import math

import pytest
import torch
import torch.nn as nn

from model import GPT, GPTConfig
from moe_model import MoEConfig, MoEGPT
from nanomoe.checkpoint import model_from_checkpoint, model_state
from nanomoe.errors import UserError

TINY = dict(block_size=16, vocab_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0)

VARIANTS = {
    "gpt2": {},
    "rope": dict(pos_emb="rope"),
    "gqa": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "rmsnorm": dict(norm="rmsnorm", bias=False),
    "swiglu": dict(mlp="swiglu"),
    "gelu_tanh": dict(mlp="gelu_tanh"),
    "all": dict(pos_emb="rope", n_kv_head=2, qk_norm=True, norm="rmsnorm", mlp="swiglu", bias=False, norm_eps=1e-6),
}


def tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides}))


def all_logits(model, idx):
    # with targets the model returns logits for every position (without, only for the last one)
    logits, _, _ = model(idx, idx)
    return logits


MLA = dict(attn="mla", kv_latent_dim=12, d_rope=4)
# 3 layers, the first and last Mamba2 (4 heads of 16 = 32 * 2, chunks of 4)
HYBRID = dict(n_layer=3, mamba_layers=[0, 2], mamba2_num_heads=4, mamba2_head_dim=16, mamba2_state_size=8,
              mamba2_chunk_size=4, mamba2_n_groups=2, mamba2_conv_kernel=3)
CAUSAL = {**{name: VARIANTS[name] for name in ("gpt2", "rope", "all")},
          "mla": MLA, "mla-q-rope": dict(MLA, q_latent_dim=16, pos_emb="rope"),
          "fgram": dict(fgram_max_n=4, fgram_buckets=64), "hybrid-moe": dict(HYBRID, n_experts=4)}


@pytest.mark.parametrize("variant", CAUSAL)
def test_causal(variant, device):
    """Changing token t changes no logit before t, and changes the ones from t on."""
    overrides = CAUSAL[variant]
    torch.manual_seed(0)
    model = (MoEGPT(MoEConfig(**{**TINY, **overrides})) if "n_experts" in overrides else tiny_gpt(**overrides)).eval()
    if "fgram_max_n" in overrides:  # trained tables: zero ones would hide a leak from the future
        for table in model.transformer.fgram.tables:
            torch.nn.init.normal_(table)
    model.to(device)
    idx = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    changed = idx.clone()
    t = 7
    changed[:, t] = (idx[:, t] + 1) % 32
    before, after = all_logits(model, idx), all_logits(model, changed)
    assert torch.allclose(before[:, :t], after[:, :t], atol=1e-6)  # the past cannot see the future
    assert not torch.allclose(before[:, t:], after[:, t:])  # ...but position t and later do see token t


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_shapes_and_overfits_one_batch(variant, device):
    model = tiny_gpt(**VARIANTS[variant]).to(device)
    cfg = model.config
    hs = cfg.n_embd // cfg.n_head
    kv = cfg.n_kv_head or cfg.n_head
    block = model.transformer.h[0]
    # queries for every head, keys and values only for the kv heads
    assert block.attn.c_attn.weight.shape == ((cfg.n_head + 2 * kv) * hs, cfg.n_embd)
    assert isinstance(block.ln_1, nn.RMSNorm if cfg.norm == "rmsnorm" else nn.LayerNorm)
    hidden = 4 * cfg.n_embd if cfg.mlp == "gelu" else 64 * math.ceil(4 * cfg.n_embd * 2 / 3 / 64)
    assert block.mlp.c_fc.weight.shape == ((2 if cfg.mlp == "swiglu" else 1) * hidden, cfg.n_embd)
    assert ("wpe" in model.transformer) == (cfg.pos_emb == "learned")

    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, 32, (4, 16), generator=gen).to(device)
    y = torch.randint(0, 32, (4, 16), generator=gen).to(device)
    logits, loss, extra = model(x, y)
    assert logits.shape == (4, 16, 32) and extra == {}
    assert loss.item() == pytest.approx(math.log(32), abs=0.2)  # small init: close to uniform

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = loss.item()
    for _ in range(30):
        _, loss, _ = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 1.5, (first, loss.item())


def test_weight_tying_survives_checkpoint():
    model = tiny_gpt()
    assert model.lm_head.weight is model.transformer.wte.weight
    ckpt = model_state(model)
    loaded = model_from_checkpoint(ckpt)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    idx = torch.randint(0, 32, (1, 16))
    assert torch.equal(all_logits(model.eval(), idx), all_logits(loaded.eval(), idx))


def test_num_params_by_hand():
    model = tiny_gpt()
    C, V, L = 32, 32, 2
    # per layer: ln_1 + ln_2 (2C each), c_attn (3C*C + 3C), attn c_proj (C*C + C), c_fc (4C*C + 4C),
    # mlp c_proj (4C*C + C) = 12C^2 + 13C; plus wte (tied with lm_head) and ln_f
    per_layer = 12 * C * C + 13 * C
    assert model.get_num_params() == L * per_layer + V * C + 2 * C
    assert model.get_num_params(non_embedding=False) == model.get_num_params() + 16 * C  # + wpe
    assert model.num_active_params() == model.get_num_params()


@pytest.mark.parametrize("variant", ["gpt2", "rope"])
def test_generate_past_block_size(variant, device):
    model = tiny_gpt(**VARIANTS[variant]).eval().to(device)
    prompt = torch.randint(0, 32, (2, 20)).to(device)  # longer than block_size=16
    with pytest.raises(UserError, match="longer than block_size"):
        model(prompt)
    out = model.generate(prompt, max_new_tokens=5, top_k=10)
    assert out.shape == (2, 25)
    assert torch.equal(out[:, :20], prompt)
    assert out.min() >= 0 and out.max() < 32


def test_generate_stream_matches_generate(device):
    model = tiny_gpt().eval().to(device)
    prompt = torch.randint(0, 32, (1, 3)).to(device)
    torch.manual_seed(5)
    whole = model.generate(prompt, 6, temperature=0.9)
    torch.manual_seed(5)
    streamed = torch.cat([prompt, *model.generate_stream(prompt, 6, temperature=0.9)], dim=1)
    assert torch.equal(whole, streamed)


@pytest.mark.parametrize("variant", ["gpt2", "rope"])
def test_crop_block_size(variant):
    model = tiny_gpt(**VARIANTS[variant]).eval()
    idx = torch.randint(0, 32, (2, 8))
    before = all_logits(model, idx)
    model.crop_block_size(8)
    assert model.config.block_size == 8
    if variant == "gpt2":
        assert model.transformer.wpe.weight.shape == (8, 32)
    else:
        assert model.transformer.h[0].attn.rope_cos.shape == (8, 4)
    # the first 8 positions compute exactly what they did before
    assert torch.allclose(all_logits(model, idx), before, atol=1e-6)
    with pytest.raises(UserError, match="longer than block_size=8"):
        model(torch.randint(0, 32, (1, 9)))
    with pytest.raises(UserError, match="larger than"):
        model.crop_block_size(16)


def test_generate_samples_only_ids_the_tokenizer_has():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():
        model.lm_head.weight[50:] += 5.0  # the padded rows would win almost every draw
    out = model.generate(torch.zeros(4, 1, dtype=torch.long), 20, vocab_size=50)
    assert out[:, 1:].max() < 50
    assert model.generate(torch.zeros(4, 1, dtype=torch.long), 20)[:, 1:].max() >= 50  # unlimited: they do
