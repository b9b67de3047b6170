"""
Mixture-of-Experts GPT. MoEGPT subclasses GPT and changes only what differs: chosen layers get an MoE
feed-forward block (a router + n_experts expert MLPs) instead of the dense MLP, and the model reports two
extra losses that keep the router healthy:

- balance loss (Switch Transformer), per MoE layer:  E * sum_i f_i * P_i
    f_i = fraction of the layer's top-k assignments that go to expert i   (sum_i f_i = 1)
    P_i = mean over tokens of the full softmax probability of expert i    (before any top-k renormalising)
  It is 1.0 when routing is perfectly balanced and E when every token goes to one expert. We average it
  over MoE layers (instead of pooling all layers' counts) so one layer's imbalance cannot hide another's.
- router z-loss (ST-MoE): mean over tokens of logsumexp(router logits)^2, averaged over MoE layers; it
  keeps the logits small, which keeps the float32 softmax well conditioned.

The file reads top-down: the config, the MoE block (route -> experts -> combine -> stats), the router, the
experts, the model. Expert weights are stacked into (E, ...) tensors and two implementations read them:
- 'loop' (Experts.forward_loop, here): the reference. For each expert: gather its tokens, run its MLP, scale
  by the routing weight, scatter-add into the output. Easy to read and to check.
- 'grouped' (moe_grouped.py): sort assignments by expert and run every expert in one grouped matrix
  multiply per projection, with static shapes (torch.compile(fullgraph=True) works). Tested equal to 'loop'.
'auto' takes 'grouped' where torch's grouped GEMM kernel runs (see moe_grouped.py), 'loop' elsewhere.

MoEGPT.from_dense turns a dense GPT into an MoEGPT by sparse upcycling (Komatsuzaki et al. 2022): every MoE
layer's experts start as copies of the dense MLP they replace and the router starts small and random. With
moe_renorm the top-k weights sum to 1, so the upcycled model computes exactly the dense model's function at
the start of training.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError
from configurator import setting
from model import GPT, MLP, GPTConfig, mlp_activation, mlp_hidden_size
from moe_grouped import compute_dtype, grouped_experts, grouped_kernel_available


@dataclass
class MoEConfig(GPTConfig):
    n_experts: int = setting(0, "experts per MoE layer (0 = a dense GPT; an MoEConfig needs at least 1)", min=0)
    moe_top_k: int = setting(2, "experts per token", min=1)
    moe_every: int = setting(1, "MoE in every N-th layer: 1 = all, 2 = every other one starting with the "
                                "second", min=1)
    expert_hidden: int | None = setting(None, "hidden size of each expert (None = the dense MLP's)", min=1)
    n_shared_experts: int = setting(0, "always-on experts every token goes through (DeepSeekMoE)", min=0)
    balance_loss_weight: float = setting(0.01, "weight of the balance loss", runtime=True, min=0)
    z_loss_weight: float = setting(0.001, "weight of the router z-loss", runtime=True, min=0)
    capacity_factor: float = setting(0.0, "0 = dropless; > 0: an expert serves at most ceil(k*T/E * factor) "
                                          "tokens", runtime=True, min=0)
    # with top-1, renormalising makes the gate always 1.0, so the router would learn only from the balance and
    # z losses: top-1 configs set it False
    moe_renorm: bool = setting(True, "renormalise the top-k routing weights to sum to 1", runtime=True)
    router_jitter: float = setting(0.0, "training only: multiply router inputs by U(1-eps, 1+eps) (Switch)",
                                   runtime=True, min=0, below=1)
    moe_impl: str = setting("auto", "'loop' (reference), 'grouped' (fast), 'auto' = grouped where the grouped "
                                    "GEMM kernel runs, else loop", runtime=True, choices=("auto", "loop", "grouped"))

    def validate(self):
        super().validate()
        if self.n_experts < 1:
            raise UserError(f"n_experts must be at least 1 for an MoE model, got {self.n_experts} "
                            f"(n_experts=0 is a dense GPT: build_model makes one)")
        if self.moe_top_k > self.n_experts:
            raise UserError(f"moe_top_k={self.moe_top_k} must be between 1 and n_experts={self.n_experts}")

    def is_moe_layer(self, layer_idx):
        return (layer_idx + 1) % self.moe_every == 0

    def hidden(self):
        return self.expert_hidden or mlp_hidden_size(self)


class MoE(nn.Module):
    """Router + experts (+ shared experts): the feed-forward block of an MoE layer. After each forward,
    self.stats holds this layer's balance loss, z-loss, per-expert load and dropped fraction."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.router = Router(config)
        self.experts = Experts(config)
        self.shared = None
        if config.n_shared_experts > 0:
            # n shared experts summed are one MLP with n times the hidden size (and one output bias);
            # the MoE block applies dropout once, to the sum
            self.shared = MLP(config, hidden=config.hidden() * config.n_shared_experts, dropout=False)
        self.dropout = nn.Dropout(config.dropout)
        self.stats = {}

    def forward(self, x):
        B, T, D = x.shape
        x_TD = x.reshape(B * T, D)  # every token on its own: routing does not look at the sequence

        # route: each token picks its top-k experts; capacity may drop some of those assignments
        logits_TE, probs_TE, expert_TK, weight_TK = self.route(x_TD)
        if self.config.capacity_factor > 0:
            keep_TK = self.capacity_mask(expert_TK)  # a dropped assignment contributes nothing
        else:
            keep_TK = torch.ones_like(expert_TK, dtype=torch.bool)

        # experts: the routing-weighted sum of each token's chosen experts
        if self.use_grouped(x_TD):
            y_TD = grouped_experts(self.experts, x_TD, expert_TK, weight_TK, keep_TK)
        else:
            y_TD = self.experts.forward_loop(x_TD, expert_TK, weight_TK, keep_TK)

        # combine: shared experts see every token
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)

        # stats. Balance loss: f from the (non-differentiable) choices, P from the full softmax (carries the
        # gradient)
        E = self.config.n_experts
        f_E = F.one_hot(expert_TK.flatten(), E).sum(0).float() / expert_TK.numel()  # static shape, unlike bincount
        P_E = probs_TE.mean(dim=0)
        self.stats = {"balance": E * (f_E * P_E).sum(),
                      "z": torch.logsumexp(logits_TE, dim=-1).square().mean(),
                      "expert_load": f_E, "dropped": 1.0 - keep_TK.float().mean()}
        return self.dropout(y_TD.view(B, T, D))

    def route(self, x_TD):
        """-> logits (T, E) fp32, probs (T, E), chosen experts (T, K), routing weights (T, K) fp32."""
        logits_TE = self.router(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        weight_TK, expert_TK = probs_TE.topk(self.config.moe_top_k, dim=-1)
        if self.config.moe_renorm:
            weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
        return logits_TE, probs_TE, expert_TK, weight_TK

    def capacity_mask(self, expert_TK):
        """True for the assignments an expert serves under the capacity limit. All top-1 choices queue
        before any top-2 choice, so a token loses its second expert before anyone loses their first."""
        T, K = expert_TK.shape
        E = self.config.n_experts
        capacity = math.ceil(K * T / E * self.config.capacity_factor)
        onehot_KTE = F.one_hot(expert_TK.t(), E)  # (K, T, E), slot-major: top-1 of all tokens first
        position_KTE = onehot_KTE.flatten(0, 1).cumsum(0).view(K, T, E) - 1  # place in its expert's queue
        position_TK = (position_KTE * onehot_KTE).sum(-1).t()  # (T, K)
        return position_TK < capacity

    def use_grouped(self, x_TD):
        """'auto' takes the grouped path where torch's grouped GEMM kernel takes the experts' matmuls (device,
        dtype, row sizes), the loop elsewhere."""
        impl = self.config.moe_impl
        if impl == "auto":
            in_features = (self.experts.c_fc.size(-1), self.experts.c_proj.size(-1))  # D and F
            return grouped_kernel_available(x_TD.device.type, compute_dtype(x_TD), in_features)
        return impl == "grouped"


class Router(nn.Module):
    """Scores every expert for every token, in float32 even under autocast (the softmax is sensitive)."""

    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(config.n_experts, config.n_embd) * 0.02)  # (E, D), no bias
        self.jitter = config.router_jitter

    def forward(self, x_TD):
        if self.training and self.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return F.linear(x_TD.float(), self.weight.float())  # (T, E) logits


class Experts(nn.Module):
    """n_experts MLPs with their weights stacked: c_fc (E, F or 2F, D) and c_proj (E, D, F), laid out like
    nn.Linear weights (out, in) so a dense MLP's weights copy straight in (sparse upcycling)."""

    def __init__(self, config):
        super().__init__()
        E, D, F_ = config.n_experts, config.n_embd, config.hidden()
        self.kind = config.mlp
        fc_out = 2 * F_ if self.kind == "swiglu" else F_
        self.c_fc = nn.Parameter(torch.randn(E, fc_out, D) * 0.02)
        # residual-stream projections get GPT-2's 1/sqrt(2 * n_layer) scaled init
        self.c_proj = nn.Parameter(torch.randn(E, D, F_) * 0.02 / math.sqrt(2 * config.n_layer))
        self.c_fc_bias = nn.Parameter(torch.zeros(E, fc_out)) if config.bias else None
        self.c_proj_bias = nn.Parameter(torch.zeros(E, D)) if config.bias else None

    def forward_loop(self, x_TD, expert_TK, weight_TK, keep_TK):
        """Reference: one expert at a time. keep_TK is False for assignments dropped by capacity."""
        y_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
        for e in range(self.c_fc.size(0)):
            token_idx, slot = torch.where((expert_TK == e) & keep_TK)
            # an expert with no tokens still runs (on zero rows), so all its parameters get a gradient
            out = self.expert_mlp(e, x_TD[token_idx])  # (n_e, D)
            y_TD.index_add_(0, token_idx, out.float() * weight_TK[token_idx, slot].unsqueeze(1))
        return y_TD.to(x_TD.dtype)

    def expert_mlp(self, e, x):
        """Expert e's MLP on x (n, D) -> (n, D)."""
        b_fc = self.c_fc_bias[e] if self.c_fc_bias is not None else None
        b_proj = self.c_proj_bias[e] if self.c_proj_bias is not None else None
        return F.linear(self.activation(F.linear(x, self.c_fc[e], b_fc)), self.c_proj[e], b_proj)

    def activation(self, h):
        return mlp_activation(h, self.kind)


class MoEGPT(GPT):
    def make_ffn(self, layer_idx):
        if self.config.is_moe_layer(layer_idx):
            return MoE(self.config)
        return super().make_ffn(layer_idx)

    def moe_layers(self):
        return [block.mlp for block in self.transformer.h if isinstance(block.mlp, MoE)]

    def extra_losses(self):
        """Averages over MoE layers of the balance loss and z-loss, their weighted sum ('aux_loss', added to
        the cross-entropy), and per-layer expert load (L_moe, E) and dropped fraction (L_moe,)."""
        stats = [layer.stats for layer in self.moe_layers()]
        if not stats:
            return {}
        balance = torch.stack([s["balance"] for s in stats]).mean()
        z = torch.stack([s["z"] for s in stats]).mean()
        return {"aux_loss": self.config.balance_loss_weight * balance + self.config.z_loss_weight * z,
                "balance": balance, "z": z,
                "expert_load": torch.stack([s["expert_load"] for s in stats]),
                "dropped": torch.stack([s["dropped"] for s in stats])}

    def num_active_params(self):
        """A token goes through k of the E experts of each MoE layer: the other E - k do no work for it."""
        inactive = 0
        for layer in self.moe_layers():
            per_expert = sum(p[0].numel() for p in layer.experts.parameters())
            inactive += (self.config.n_experts - self.config.moe_top_k) * per_expert
        return self.get_num_params() - inactive

    @classmethod
    def from_dense(cls, dense, moe_config, router_std=0.02):
        """Sparse upcycling: an MoEGPT whose non-MLP weights are the dense GPT's, whose MoE layers' experts are
        each a copy of the dense MLP they replace and whose routers start at N(0, router_std). Layers that
        stay dense (moe_every > 1) keep their MLP."""
        dc = asdict(dense.config)
        differ = [f"{k}: dense {dc[k]!r} vs MoE config {getattr(moe_config, k)!r}" for k in dc
                  if k != "dropout" and getattr(moe_config, k) != dc[k]]
        if differ:
            raise UserError(f"cannot upcycle: the MoE config's shape differs from the dense model's "
                            f"({'; '.join(differ)})")
        if moe_config.hidden() != mlp_hidden_size(dense.config):
            raise UserError(f"cannot upcycle with expert_hidden={moe_config.expert_hidden}: experts copy the dense "
                            f"MLP, so expert_hidden must be None (= {mlp_hidden_size(dense.config)})")
        if moe_config.n_shared_experts:
            raise UserError("cannot upcycle with n_shared_experts > 0 (the dense MLP would be counted twice); "
                            "use n_shared_experts=0")
        moe = cls(moe_config)
        dense_sd = dense.state_dict()
        # experts: (E, out, in) stacks of the dense nn.Linear (out, in) weights, (E, out) stacks of biases
        copy_of = {"experts.c_fc": "c_fc.weight", "experts.c_proj": "c_proj.weight",
                   "experts.c_fc_bias": "c_fc.bias", "experts.c_proj_bias": "c_proj.bias"}
        sd = {}
        for name, p in moe.state_dict().items():
            if name in dense_sd:  # embeddings, attention, norms, head, and the MLPs of layers that stay dense
                sd[name] = dense_sd[name]
                continue
            prefix, _, leaf = name.partition(".mlp.")
            if leaf in copy_of:
                sd[name] = dense_sd[prefix + ".mlp." + copy_of[leaf]].unsqueeze(0).expand_as(p).clone()
            elif leaf == "router.weight":
                sd[name] = torch.randn_like(p) * router_std
            else:
                raise RuntimeError(f"upcycling has no rule for the MoE parameter {name}; teach MoEGPT.from_dense "
                                   f"about it")
        moe.load_state_dict(sd)
        return moe
