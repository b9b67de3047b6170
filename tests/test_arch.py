"""
The attention variants, the generation cache and F-gram embeddings (nanomoe/layers/) on tiny configs:
generation with the cache equals generation without it (MHA/GQA with QK-norm/MLA x learned/RoPE x dense/MoE,
across block_size), MLA against the paper's equations written out, cache bytes per token, the F-gram hash and its
zero-initialised tables. (Causality: test_model.py; resume bit-exact with MLA and F-gram: test_reliability.py.)
The cache tests run on the GPU with --device=cuda.
"""
import math

import pytest
import torch

from model import GPT, GPTConfig
from moe_model import MoEConfig, MoEGPT
from nanomoe.layers.cache import GenerationCache, cache_values_per_token
from nanomoe.layers.fgram import ngram_hash

TINY = dict(block_size=16, vocab_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
MLA = dict(attn="mla", kv_latent_dim=12, d_rope=4)
ATTN = {"mha": {}, "gqa": dict(n_kv_head=2, qk_norm=True), "mla": MLA, "mla_q": dict(MLA, q_latent_dim=16)}


def tiny(seed=0, moe=False, **overrides):
    torch.manual_seed(seed)
    args = {**TINY, **overrides}
    return (MoEGPT(MoEConfig(**args, n_experts=4, moe_top_k=2)) if moe else GPT(GPTConfig(**args))).eval()


def all_logits(model, idx):
    logits, _, _ = model(idx, idx)  # with targets: logits at every position
    return logits


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
@pytest.mark.parametrize("attn", ["mha", "gqa", "mla"])
def test_generation_with_cache_equals_without(attn, pos_emb, moe, device):
    """Token for token (sampling with a fixed seed), 5 prompt + 20 new tokens: past block_size=16 each step
    re-prefills. The cached logits of every position equal a full forward's."""
    model = tiny(moe=moe, pos_emb=pos_emb, fgram_max_n=3 if attn == "mla" else 0, **ATTN[attn]).to(device)
    prompt = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(1)).to(device)
    torch.manual_seed(3)
    cached = model.generate(prompt, 20, kv_cache=True)
    torch.manual_seed(3)
    plain = model.generate(prompt, 20, kv_cache=False)
    assert torch.equal(cached, plain)

    seq = cached[:, :16]
    cache = GenerationCache(model.config.n_layer)
    steps = [model(seq[:, :5], cache=cache)[0]] + [model(seq[:, t:t + 1], cache=cache)[0] for t in range(5, 16)]
    assert torch.allclose(torch.cat(steps, dim=1), all_logits(model, seq)[:, 4:], atol=1e-5)
    assert cache.nbytes() == 2 * 16 * cache_values_per_token(model.config) * 4  # float32


def test_cache_handles_several_new_positions_at_once(device):
    """A chunk of new positions after the cached ones (S > T > 1) uses the bottom-right causal mask."""
    model = tiny(**MLA, pos_emb="rope").to(device)
    seq = torch.randint(0, 32, (1, 12)).to(device)
    cache = GenerationCache(model.config.n_layer)
    model(seq[:, :4], cache=cache)
    chunk = seq[:, 4:9]
    logits, _, _ = model(chunk, chunk, cache=cache)  # with targets: logits at each of the 5 new positions
    assert torch.allclose(logits, all_logits(model, seq[:, :9])[:, 4:], atol=1e-5)
    last, _, _ = model(seq[:, 9:10], cache=cache)
    assert torch.allclose(last[:, -1], all_logits(model, seq[:, :10])[:, -1], atol=1e-5)


def rms(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate(x, pos, theta=10000.0):
    """RoPE on the halves of x (T, d) at positions pos, written out per frequency."""
    d = x.size(-1)
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = pos[:, None].float() * freq[None, :]
    a, b = x[:, : d // 2], x[:, d // 2:]
    return torch.cat([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()], dim=-1)


def mla_by_the_paper(attn, h):
    """DeepSeek-V2 equations (9)-(19) for one sequence h (T, C), head by head, with attn's weights."""
    T = h.size(0)
    nh, hs, dr, L = attn.n_head, attn.head_size, attn.d_rope, attn.kv_latent_dim
    dn = hs - dr
    pos = torch.arange(T)
    w_a = attn.kv_a_proj.weight
    c_kv = rms(h @ w_a[:L].T + attn.kv_a_proj.bias[:L], attn.kv_a_norm.weight)  # (9)
    k_r = rotate(h @ w_a[L:].T + attn.kv_a_proj.bias[L:], pos)  # (14), shared by all heads
    if hasattr(attn, "q_a_proj"):
        c_q = rms(h @ attn.q_a_proj.weight.T + attn.q_a_proj.bias, attn.q_a_norm.weight)  # (12)
        w_q, b_q = attn.q_b_proj.weight, attn.q_b_proj.bias
    else:
        c_q, w_q, b_q = h, attn.q_proj.weight, attn.q_proj.bias
    w_b, b_b = attn.kv_b_proj.weight, attn.kv_b_proj.bias
    outs = []
    for i in range(nh):
        rows_q = slice(i * hs, (i + 1) * hs)
        q_i = c_q @ w_q[rows_q].T + b_q[rows_q]
        q_i = torch.cat([q_i[:, :dn], rotate(q_i[:, dn:], pos)], dim=-1)  # (13), (15), (16)
        base = i * (dn + hs)
        k_c = c_kv @ w_b[base:base + dn].T + b_b[base:base + dn]  # (10)
        v_c = c_kv @ w_b[base + dn:base + dn + hs].T + b_b[base + dn:base + dn + hs]  # (11)
        k_i = torch.cat([k_c, k_r], dim=-1)  # (17)
        scores = q_i @ k_i.T / math.sqrt(hs)
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        outs.append(torch.softmax(scores, dim=-1) @ v_c)  # (18)
    return torch.cat(outs, dim=-1) @ attn.c_proj.weight.T + attn.c_proj.bias  # (19)


@pytest.mark.parametrize("attn", ["mla", "mla_q"])
def test_mla_equals_the_papers_equations_output_and_gradients(attn):
    model = tiny(pos_emb="rope", **ATTN[attn])
    layer = model.transformer.h[0].attn
    for p in layer.parameters():  # non-trivial norms and biases
        torch.nn.init.normal_(p, std=0.3)
    h = torch.randn(1, 10, 32, requires_grad=True)
    ours = layer(h)
    ref = mla_by_the_paper(layer, h[0])[None]
    assert torch.allclose(ours, ref, atol=1e-5)
    g = torch.randn_like(ours)
    grads = torch.autograd.grad((ours * g).sum(), [h, *layer.parameters()])
    ref_grads = torch.autograd.grad((ref * g).sum(), [h, *layer.parameters()])
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-4)


def test_cache_bytes_per_token_at_gpt2_shape_as_the_readme_says():
    """GPT-2 small (12 layers, 12 heads of 64), 2-byte dtype: MHA 36,864 B, GQA with 4 kv heads 12,288 B,
    MLA with kv_latent_dim=256, d_rope=32: 6,912 B per token."""
    assert cache_values_per_token(GPTConfig()) * 2 == 36864
    assert cache_values_per_token(GPTConfig(n_kv_head=4)) * 2 == 12288
    assert cache_values_per_token(GPTConfig(attn="mla", kv_latent_dim=256, d_rope=32)) * 2 == 6912


def test_ngram_hash_depends_only_on_the_last_n_ids():
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 50, (1, 20), generator=gen)
    b = torch.randint(0, 50, (1, 20), generator=gen)
    b[0, 13:16] = a[0, 13:16]  # the same 3-gram ending at position 15, different everywhere else
    ha, hb = ngram_hash(a, 3, 1000), ngram_hash(b, 3, 1000)
    assert ha[0, 15] == hb[0, 15]
    assert ha.min() >= 0 and ha.max() < 1000
    # near the start, positions before the sequence count as padding: [x] differs from [y, x]
    assert ngram_hash(torch.tensor([[7]]), 2, 1000)[0, 0] != ngram_hash(torch.tensor([[3, 7]]), 2, 1000)[0, 1]
    # a cached step hashes from the last n-1 ids alone: the same bucket as over the whole sequence
    assert ngram_hash(a[:, -3:], 3, 1000)[0, -1] == ha[0, -1]
    assert len(set(ha[0].tolist())) > 15  # distinct n-grams mostly land in distinct buckets


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_zero_initialised_fgram_leaves_the_initial_model_unchanged(moe):
    x = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(1))
    plain, with_fgram = tiny(moe=moe), tiny(moe=moe, fgram_max_n=3)
    assert torch.equal(plain(x, x)[1], with_fgram(x, x)[1])
    assert with_fgram.get_num_params() == plain.get_num_params() + 2  # the tables are embeddings; + 2 scales
    loss = with_fgram(x, x)[1]
    loss.backward()
    assert with_fgram.transformer.fgram.tables[0].grad.abs().sum() > 0  # the scales let the tables learn
