"""
A Mamba2 layer (Dao & Gu 2024, "Transformers are SSMs: ... structured state space duality"), in plain
PyTorch. model.py puts one in a block in attention's place for each layer that config.mamba_layers names;
the block's feed-forward half (dense MLP or MoE) stays.

Per head, a state h of head_dim x state_size numbers is carried along the sequence. At position t:

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T      decay the state, then write the input into it
    y_t = h_t C_t + D * x_t                                read the state out, plus a skip connection

x_t (head_dim numbers), B_t and C_t (state_size) and the step dt_t > 0 are computed from the input at t;
A < 0 and D are learned per head. Around that recurrence, the layer is

    in_proj   n_embd -> [z | x B C | dt]
    conv1d    a short causal depthwise convolution over x, B, C (a channel sees its last conv_kernel inputs), SiLU
    SSM       the recurrence above; the heads share B and C within each of n_groups groups
    gate      y = RMSNorm(y * SiLU(z)), each group's d_inner / n_groups channels normalised on their own
    c_proj    d_inner -> n_embd, where d_inner = num_heads * head_dim = n_embd * expand

Training computes the recurrence chunkwise (the paper's "SSD" algorithm, ssd_chunked): inside a chunk of
chunk_size positions, y is a masked matrix product much like causal attention (quadratic in chunk_size, no
step depends on another), and a short recurrence over the chunks carries the state from one to the next. A
sequence whose length is not a multiple of chunk_size is padded at its end with steps of dt = 0, which
neither decay the state nor write to it. Generation runs the recurrence itself one token at a time
(ssd_step): the GenerationCache holds the last conv_kernel - 1 conv inputs and the state, the same size
whatever the context, so a token costs the same at position 10 and at position 10,000.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanomoe.errors import UserError


def check_mamba_config(config):
    """Mamba2 settings that do not fit the rest of the model (GPTConfig.validate calls it): a UserError."""
    layers = config.mamba_layers
    if len(set(layers)) != len(layers):
        raise UserError(f"mamba_layers={layers} names a layer twice; list each layer index once")
    if max(layers) >= config.n_layer:
        raise UserError(f"mamba_layers={layers} has layer {max(layers)}, but n_layer={config.n_layer} numbers "
                        f"the layers 0..{config.n_layer - 1}")
    inner, heads = config.n_embd * config.mamba2_expand, config.mamba2_num_heads * config.mamba2_head_dim
    if inner != heads:
        raise UserError(f"Mamba2 needs n_embd * mamba2_expand == mamba2_num_heads * mamba2_head_dim, got "
                        f"{config.n_embd} * {config.mamba2_expand} = {inner} vs {config.mamba2_num_heads} * "
                        f"{config.mamba2_head_dim} = {heads}; set mamba2_num_heads and mamba2_head_dim so their "
                        f"product is {inner}")
    if config.mamba2_num_heads % config.mamba2_n_groups:
        raise UserError(f"mamba2_num_heads={config.mamba2_num_heads} is not divisible by mamba2_n_groups="
                        f"{config.mamba2_n_groups} (each group of heads shares one B and C)")


class Mamba2(nn.Module):
    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.layer_idx = layer_idx  # which entry of a GenerationCache is ours
        self.n_head, self.head_dim = config.mamba2_num_heads, config.mamba2_head_dim
        self.state_size, self.n_groups = config.mamba2_state_size, config.mamba2_n_groups
        self.chunk_size, self.conv_kernel = config.mamba2_chunk_size, config.mamba2_conv_kernel
        self.d_inner = self.n_head * self.head_dim  # = n_embd * mamba2_expand (GPTConfig.validate checks)
        self.conv_dim = self.d_inner + 2 * self.n_groups * self.state_size  # x, B and C go through the conv
        H = self.n_head
        self.in_proj = nn.Linear(config.n_embd, self.d_inner + self.conv_dim + H, bias=config.bias)  # [z | xBC | dt]
        # depthwise (groups = channels): each channel mixes only its own last conv_kernel positions
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.conv_kernel, groups=self.conv_dim)
        # A = -exp(A_log) < 0 keeps every decay exp(dt * A) in (0, 1). Mamba2's init: A from U(1, 16) and
        # dt from log-U(1e-3, 0.1) (dt_bias = softplus^-1(dt)), so heads start with memories of many lengths
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())
        dt = torch.empty(H).uniform_(math.log(1e-3), math.log(0.1)).exp()
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = nn.RMSNorm(self.d_inner, eps=config.norm_eps)
        # named like attention's output projection, so it gets GPT-2's scaled init for residual projections
        self.c_proj = nn.Linear(self.d_inner, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, u, cache=None):
        """u (B, T, n_embd) -> (B, T, n_embd). With a GenerationCache, u are the positions after the cached ones:
        the conv and the state continue from the cache, and the cache takes in the new ones."""
        Bsz, T, _ = u.shape
        H, P, N, G = self.n_head, self.head_dim, self.state_size, self.n_groups
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, H], dim=-1)
        xBC = F.silu(self.causal_conv(xBC, cache))
        x, B, C = xBC.split([self.d_inner, G * N, G * N], dim=-1)

        # the SSM in float32 (or the weights' float64) even under autocast: decays multiply along the sequence
        # and the state sums over it
        with torch.autocast(device_type=u.device.type, enabled=False):
            ssm = torch.promote_types(self.A_log.dtype, torch.float32)
            x_BTHP = x.to(ssm).view(Bsz, T, H, P)
            B_BTGN, C_BTGN = B.to(ssm).view(Bsz, T, G, N), C.to(ssm).view(Bsz, T, G, N)  # each serves H / G heads
            dt_BTH = F.softplus(dt.to(ssm) + self.dt_bias.to(ssm))
            A_H = -torch.exp(self.A_log.to(ssm))
            state_BHPN = cache.get(self.layer_idx, "ssm") if cache is not None else None
            if cache is not None and T == 1:  # a generation step: the recurrence itself, O(1) per token
                if state_BHPN is None:
                    state_BHPN = x_BTHP.new_zeros(Bsz, H, P, N)
                y, state_BHPN = ssd_step(x_BTHP[:, 0], dt_BTH[:, 0], A_H, B_BTGN[:, 0], C_BTGN[:, 0], state_BHPN)
                y_BTHP = y[:, None]
            else:
                y_BTHP, state_BHPN = ssd_chunked(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, self.chunk_size, state_BHPN)
            if cache is not None:
                cache.put(self.layer_idx, "ssm", state_BHPN)
            y_BTHP = y_BTHP + self.D.to(ssm)[:, None] * x_BTHP
            # gated RMSNorm: the gate SiLU(z) before the norm, and each group of heads (the n_groups that share
            # a B and C) normalised on its own, as Mamba2 does (its RMSNormGated with group_size = d_inner / G).
            # The weight in the scan's dtype too: FSDP's bf16 MixedPrecisionPolicy hands it over in bf16.
            gated = y_BTHP.reshape(Bsz, T, self.d_inner) * F.silu(z.to(ssm))
            weight = self.norm.weight.to(ssm)
            if G == 1:  # one group: rms_norm's fused weight (a weight of another dtype would leave that kernel)
                y = F.rms_norm(gated, (self.d_inner,), weight, self.norm.eps)
            else:
                y = F.rms_norm(gated.view(Bsz, T, G, -1), (self.d_inner // G,), eps=self.norm.eps) \
                    .view(Bsz, T, self.d_inner) * weight
        return self.dropout(self.c_proj(y.type_as(u)))

    def causal_conv(self, xBC, cache):
        """Depthwise causal convolution over time, (B, T, conv_dim) -> (B, T, conv_dim): position t sees inputs
        t - conv_kernel + 1 .. t, zeros before the sequence or, with a cache, the previous positions' inputs."""
        keep = self.conv_kernel - 1
        x_BCT = xBC.transpose(1, 2)
        past = cache.get(self.layer_idx, "conv") if cache is not None else None
        if past is None:
            past = x_BCT.new_zeros(x_BCT.size(0), self.conv_dim, keep)
        x_BCT = torch.cat([past, x_BCT], dim=-1)  # (B, conv_dim, keep + T)
        if cache is not None:
            cache.put(self.layer_idx, "conv", x_BCT[..., x_BCT.size(-1) - keep:])  # what the next position needs
        return self.conv1d(x_BCT).transpose(1, 2)  # no padding in conv1d: keep + T inputs give T outputs


def ssd_chunked(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, chunk_size, state_BHPN=None):
    """The recurrence h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t over a whole sequence, computed
    chunk by chunk. B batch, T time, H heads, P head_dim, N state_size; G groups of R = H / G heads sharing B
    and C (head h = g * R + r); per chunk, L positions l and s. state_BHPN: the state before the first
    position (None = zeros). -> (y (B, T, H, P), the state after the last position)."""
    Bsz, T, H, P = x_BTHP.shape
    G, N = B_BTGN.shape[2:]
    R = H // G
    pad = -T % chunk_size
    if pad:  # steps with dt = 0 at the end: exp(0 * A) = 1 and dt * x = 0 leave the state as it is
        x_BTHP, dt_BTH, B_BTGN, C_BTGN = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
                                          for t in (x_BTHP, dt_BTH, B_BTGN, C_BTGN))
    nc, L = (T + pad) // chunk_size, chunk_size
    xdt_BCLGRP = (x_BTHP * dt_BTH[..., None]).view(Bsz, nc, L, G, R, P)  # what each step writes is dt_t x_t
    B_BCLGN, C_BCLGN = B_BTGN.view(Bsz, nc, L, G, N), C_BTGN.view(Bsz, nc, L, G, N)
    logdecay_BCLH = (dt_BTH * A_H).view(Bsz, nc, L, H)  # log of each step's decay, <= 0
    cum_BCLH = logdecay_BCLH.cumsum(dim=2)  # log of the decay from the chunk's start through position l

    # 1. inside each chunk: y_l = sum over s <= l of (C_l . B_s) * decay(s -> l) * dt_s x_s, attention-like.
    # C . B is computed once per group, the decays per head
    decay_BCHLS = torch.exp(segment_sums(logdecay_BCLH.transpose(2, 3)))  # 0 where s is after l
    CB_BCGLS = torch.einsum("bclgn,bcsgn->bcgls", C_BCLGN, B_BCLGN)
    scores_BCGRLS = CB_BCGLS[:, :, :, None] * decay_BCHLS.view(Bsz, nc, G, R, L, L)
    y_BCLGRP = torch.einsum("bcgrls,bcsgrp->bclgrp", scores_BCGRLS, xdt_BCLGRP)

    # 2. what each chunk's own inputs leave in the state at its end (decayed from s to the chunk's last step)
    decay_to_end_BCSGR = decay_BCHLS[:, :, :, -1, :].transpose(2, 3).reshape(Bsz, nc, L, G, R)
    written_BCGRPN = torch.einsum("bcsgn,bcsgrp->bcgrpn", B_BCLGN, xdt_BCLGRP * decay_to_end_BCSGR[..., None])

    # 3. across chunks: the state entering each chunk. With g_c the chunk's total log-decay, the state after
    # chunk c is exp(g_c) * (state before it) + written_c: the same recurrence, one step per chunk, which we
    # also write as a (tiny, nc + 1 square) masked product instead of a Python loop
    if state_BHPN is None:
        state_BHPN = x_BTHP.new_zeros(Bsz, H, P, N)
    states_BZHPN = torch.cat([state_BHPN[:, None], written_BCGRPN.reshape(Bsz, nc, H, P, N)], dim=1)  # z=0: initial
    chunk_decay_BHZZ = torch.exp(segment_sums(F.pad(cum_BCLH[:, :, -1].transpose(1, 2), (1, 0))))
    states_BZHPN = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay_BHZZ, states_BZHPN)  # [z]: after chunk z - 1

    # 4. the entering state's part of each position's output, decayed from the chunk's start through l
    entering_BCGRPN = states_BZHPN[:, :-1].reshape(Bsz, nc, G, R, P, N)
    y_BCLGRP = y_BCLGRP + (torch.einsum("bclgn,bcgrpn->bclgrp", C_BCLGN, entering_BCGRPN)
                           * cum_BCLH.exp().view(Bsz, nc, L, G, R)[..., None])
    return y_BCLGRP.reshape(Bsz, nc * L, H, P)[:, :T], states_BZHPN[:, -1]


def ssd_step(x_BHP, dt_BH, A_H, B_BGN, C_BGN, state_BHPN):
    """One position of the recurrence: -> (y (B, H, P), the new state (B, H, P, N))."""
    R = x_BHP.size(1) // B_BGN.size(1)
    B_BHN, C_BHN = B_BGN.repeat_interleave(R, dim=1), C_BGN.repeat_interleave(R, dim=1)  # each head its group's
    decay_BH = torch.exp(dt_BH * A_H)
    state_BHPN = decay_BH[..., None, None] * state_BHPN + (dt_BH[..., None] * x_BHP)[..., None] * B_BHN[:, :, None, :]
    return torch.einsum("bhpn,bhn->bhp", state_BHPN, C_BHN), state_BHPN


def segment_sums(a):
    """a (..., L) -> (..., L, L) holding a[j+1] + ... + a[i] at [i, j] for j <= i (0 on the diagonal) and -inf
    above it, so exp() of it is the decay from step j to step i, and 0 where j comes after i. Built as sums of
    masked copies rather than as a difference of two cumulative sums, which loses precision when they grow."""
    L = a.size(-1)
    below = torch.ones(L, L, dtype=torch.bool, device=a.device).tril(-1)
    a_LL = a[..., :, None].expand(*a.shape, L).masked_fill(~below, 0)  # [i, j] = a[i] where i > j
    sums = a_LL.cumsum(dim=-2)  # [i, j] = sum of a[k] for j < k <= i
    return sums.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=a.device).tril(), float("-inf"))
