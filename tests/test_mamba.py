"""
Mamba2 layers (nanomoe/layers/mamba2.py) and hybrid models: the chunked SSD scan against the recurrence
written as a loop over time, generation with the recurrent state against the full forward pass,
finite-difference gradients, bf16 autocast and torch.compile. (Causality: test_model.py; a hybrid MoE killed
and resumed bit-exactly: test_reliability.py.) The generation tests run on the GPU with --device=cuda.
"""
import pytest
import torch

from conftest import assert_same_tensors
from model import GPT, GPTConfig
from moe_model import MoEConfig, MoEGPT
from nanomoe.layers.cache import GenerationCache, cache_values_per_token
from nanomoe.layers.mamba2 import Mamba2, ssd_chunked

# 3 layers, the first and last Mamba2: 4 heads of 16 = 32 * 2, state 8, chunk 4 (block 16 = 4 chunks)
MAMBA = dict(mamba_layers=[0, 2], mamba2_num_heads=4, mamba2_head_dim=16, mamba2_state_size=8,
             mamba2_chunk_size=4, mamba2_n_groups=2, mamba2_conv_kernel=3, mamba2_expand=2)
TINY = dict(block_size=16, vocab_size=32, n_layer=3, n_head=4, n_embd=32, dropout=0.0, **MAMBA)


def tiny(seed=0, moe=False, **overrides):
    torch.manual_seed(seed)
    args = {**TINY, **overrides}
    model = MoEGPT(MoEConfig(**args, n_experts=4, moe_top_k=2)) if moe else GPT(GPTConfig(**args))
    return model.eval()


def all_logits(model, idx):
    logits, _, _ = model(idx, idx)  # with targets: logits at every position
    return logits


def sequential_recurrence(x, dt, A, B, C, h):
    """The SSM as its definition reads, one time step after another, each head on its own:
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,  y_t = h_t C_t."""
    batch, T, H, P = x.shape
    y = torch.zeros_like(x)
    h = h.clone()
    for b in range(batch):
        for head in range(H):
            for t in range(T):
                decay = torch.exp(dt[b, t, head] * A[head])
                h[b, head] = decay * h[b, head] + dt[b, t, head] * torch.outer(x[b, t, head], B[b, t, head])
                y[b, t, head] = h[b, head] @ C[b, t, head]
    return y, h


def random_scan_inputs(T, batch=2, H=4, P=3, N=5, G=2, seed=0):
    """x, dt, A, B and C per group (G groups of H / G heads), and an initial state, in float64."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    dt = torch.nn.functional.softplus(r(batch, T, H))  # steps > 0
    A = -torch.rand(H, generator=g, dtype=torch.float64) * 2 - 0.1  # decays < 1
    return r(batch, T, H, P), dt, A, r(batch, T, G, N), r(batch, T, G, N), r(batch, H, P, N)


def per_head(B_group, H):
    """Group g's B (or C) for each of its heads: heads g * H/G .. (g + 1) * H/G - 1."""
    return torch.stack([B_group[:, :, h // (H // B_group.size(2))] for h in range(H)], dim=2)


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("chunk", [1, 3, 4, 16])
def test_chunked_scan_equals_the_sequential_recurrence(chunk, groups):
    """T = 11: a multiple of no chunk size here but 1 (3 and 4 pad the last chunk; 16 is one padded chunk),
    from a non-zero initial state, 4 heads sharing B and C in 1, 2 or 4 groups, in float64."""
    x, dt, A, B, C, h0 = random_scan_inputs(T=11, G=groups)
    y, h = ssd_chunked(x, dt, A, B, C, chunk, h0)
    y_ref, h_ref = sequential_recurrence(x, dt, A, per_head(B, 4), per_head(C, 4), h0)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)
    y0, _ = ssd_chunked(x, dt, A, B, C, chunk)  # no initial state: zeros
    torch.testing.assert_close(y0, sequential_recurrence(x, dt, A, per_head(B, 4), per_head(C, 4),
                                                         torch.zeros_like(h0))[0])


def test_scan_gradients_match_finite_differences():
    inputs = [t.requires_grad_() for t in random_scan_inputs(T=5, batch=1, H=2, P=2, N=3, G=1)]
    assert torch.autograd.gradcheck(lambda *a: ssd_chunked(*a[:5], 2, a[5]), inputs)


def test_layer_gradients_match_finite_differences():
    """The whole layer (projections, conv, gated RMSNorm, scan) in float64, 6 positions in chunks of 4."""
    torch.manual_seed(0)
    layer = Mamba2(GPTConfig(**{**TINY, "n_embd": 8, "mamba2_num_heads": 2, "mamba2_head_dim": 8,
                                "mamba2_state_size": 3})).double()
    u = torch.randn(1, 6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (u,))


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("attn", ["mha", "mla"])
def test_recurrent_generation_equals_the_full_forward(attn, moe, device):
    """Prefill 5 positions, then one token at a time: each step's logits equal a full forward's; greedy
    decoding picks the same tokens; generate() with and without the cache samples the same 25 tokens, which
    passes block_size=16 (every step then re-prefills a new cache: the Mamba states start afresh too)."""
    extra = dict(attn="mla", kv_latent_dim=12, d_rope=4, pos_emb="rope") if attn == "mla" else {}
    model = tiny(moe=moe, **extra).to(device)
    seq = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    cache = GenerationCache(model.config.n_layer)
    steps = [model(seq[:, :5], cache=cache)[0]] + [model(seq[:, t:t + 1], cache=cache)[0] for t in range(5, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), all_logits(model, seq)[:, 4:], rtol=0, atol=1e-5)
    # the cache holds keys/values per token for the attention layer, a fixed-size state for the Mamba layers
    conv, ssm = cache.get(0, "conv"), cache.get(0, "ssm")
    assert conv.shape == (2, 32 * 2 + 2 * 2 * 8, 2) and ssm.shape == (2, 4, 16, 8) and ssm.dtype == torch.float32
    assert cache.nbytes() == 2 * 16 * cache_values_per_token(model.config) * 4 + 2 * (conv.numel() + ssm.numel()) * 4

    greedy, idx, cache = [], seq[:, :3], GenerationCache(model.config.n_layer)
    logits = model(idx, cache=cache)[0]
    for _ in range(10):
        greedy.append(logits[:, -1].argmax(-1, keepdim=True))
        logits = model(greedy[-1], cache=cache)[0]
    full = seq[:, :3]
    for _ in range(10):
        full = torch.cat([full, all_logits(model, full)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(torch.cat([seq[:, :3], *greedy], dim=1), full)

    prompt = seq[:, :5]
    torch.manual_seed(3)
    cached = model.generate(prompt, 25, kv_cache=True)
    torch.manual_seed(3)
    assert torch.equal(cached, model.generate(prompt, 25, kv_cache=False))


def test_several_new_positions_after_a_cache(device):
    """A chunk of new positions after cached ones (prefill in two parts) continues the conv and the state."""
    model = tiny().to(device)
    seq = torch.randint(0, 32, (1, 14), generator=torch.Generator().manual_seed(2)).to(device)
    cache = GenerationCache(model.config.n_layer)
    model(seq[:, :6], cache=cache)
    part = seq[:, 6:13]
    logits, _, _ = model(part, part, cache=cache)  # with targets: logits at each of the 7 new positions
    torch.testing.assert_close(logits, all_logits(model, seq[:, :13])[:, 6:], rtol=0, atol=1e-5)


def test_bf16_autocast_keeps_the_scan_in_float32():
    model = tiny()
    idx = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(1))
    cache = GenerationCache(model.config.n_layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss_bf16, _ = model(idx, idx)
        model(idx[:, :8], cache=cache)
        model(idx[:, 8:9], cache=cache)
    assert cache.get(0, "ssm").dtype == torch.float32
    assert abs(loss_bf16.item() - model(idx, idx)[1].item()) < 0.05


def test_bf16_weights_as_fsdp_gathers_them_compute_like_float32_ones(recwarn):
    """FSDP's bf16 MixedPrecisionPolicy runs the layer with every weight in bf16, the norm's too: the scan and
    its norm still run in float32 (on rms_norm's fused kernel, which a weight in another dtype than its input
    leaves with a warning), equal to float32 weights holding the same values."""
    torch.manual_seed(0)
    layer = Mamba2(GPTConfig(**TINY))
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(p.to(torch.bfloat16))  # values a bf16 copy holds exactly
    gathered = Mamba2(GPTConfig(**TINY)).to(torch.bfloat16)
    gathered.load_state_dict(layer.state_dict())
    u = torch.randn(2, 10, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = layer(u), gathered(u)
    assert not [str(w.message) for w in recwarn.list if "dtype" in str(w.message)]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.slow  # torch.compile's first trace takes seconds
def test_compiled_layer_equals_eager_output_and_gradients():
    torch.manual_seed(0)
    layer = Mamba2(GPTConfig(**TINY))
    u = torch.randn(2, 10, 32, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    eager_out, compiled_out = layer(u), compiled(u)
    torch.testing.assert_close(compiled_out, eager_out)
    g = torch.randn_like(eager_out)
    grads = torch.autograd.grad((eager_out * g).sum(), [u, *layer.parameters()])
    compiled_grads = torch.autograd.grad((compiled_out * g).sum(), [u, *layer.parameters()])
    for a, b in zip(grads, compiled_grads):
        torch.testing.assert_close(a, b)


def test_without_mamba_layers_the_model_is_unchanged():
    """mamba2_* settings alone change nothing: same parameter names, same initial weights."""
    plain = tiny(mamba_layers=[])
    other = tiny(mamba_layers=[], mamba2_num_heads=3)  # would not fit n_embd: not checked, as it is not used
    assert_same_tensors(plain.state_dict(), other.state_dict(), "mamba2_* settings without mamba_layers")
    assert not any("mamba" in k for k in plain.state_dict())
    hybrid = tiny()
    assert [hasattr(b, "mamba") for b in hybrid.transformer.h] == [True, False, True]
    assert not hasattr(hybrid.transformer.h[0], "attn")


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_gated_norm_normalises_each_group_of_heads_on_its_own(groups):
    """The reference Mamba2 (mamba_ssm's RMSNormGated, group_size = d_inner / n_groups) normalises each group's
    channels by their own root mean square; written out here from the layer's own pieces."""
    from model import GPTConfig as Config
    torch.manual_seed(0)
    config = Config(**{**TINY, "mamba2_n_groups": groups})
    layer = Mamba2(config, layer_idx=0).double()
    with torch.no_grad():
        layer.norm.weight.copy_(torch.rand(layer.d_inner, dtype=torch.float64) + 0.5)
    u = torch.randn(2, 16, config.n_embd, dtype=torch.float64)
    H, P, N, G = layer.n_head, layer.head_dim, layer.state_size, layer.n_groups
    z, xBC, dt = layer.in_proj(u).split([layer.d_inner, layer.conv_dim, H], dim=-1)
    x, B, C = torch.nn.functional.silu(layer.causal_conv(xBC, None)).split([layer.d_inner, G * N, G * N], dim=-1)
    x_BTHP = x.view(2, 16, H, P)
    y_BTHP, _ = ssd_chunked(x_BTHP, torch.nn.functional.softplus(dt + layer.dt_bias), -torch.exp(layer.A_log),
                            B.view(2, 16, G, N), C.view(2, 16, G, N), layer.chunk_size, None)
    gated = (y_BTHP + layer.D[:, None] * x_BTHP).reshape(2, 16, -1) * torch.nn.functional.silu(z)
    size = layer.d_inner // groups
    normed = torch.cat([g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + layer.norm.eps)
                        for g in gated.split(size, dim=-1)], dim=-1) * layer.norm.weight
    torch.testing.assert_close(layer(u), layer.c_proj(normed))
