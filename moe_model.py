"""
Mixture-of-Experts GPT. MoEGPT subclasses GPT and changes only what differs: chosen layers get an MoE
feed-forward block (a router + n_experts expert MLPs) instead of the dense MLP, and the model reports two
extra losses that keep the router healthy:

- balance loss (Switch Transformer), per MoE layer:  E * sum_i f_i * P_i
    f_i = fraction of the layer's T*k top-k assignments that go to expert i   (sum_i f_i = 1)
    P_i = mean over tokens of the score distribution of expert i: the full softmax (before any top-k
          renormalising), or with sigmoid scores each token's scores divided by their sum
  It is 1.0 when routing is perfectly balanced and at most E/k when it collapses onto k experts (E for top-1).
  We average it over MoE layers (instead of pooling all layers' counts) so one layer's imbalance cannot hide
  another's. Hugging Face's Mixtral/Qwen-MoE load_balancing_loss_func counts f per top-k slot: for one layer
  its number is k times ours (ours = theirs / k, and it pools the layers), so to port a weight multiply it by k.
  balance_scope='global' (Qwen 2025) counts f over the whole optimizer step (every micro-step, every rank):
  MoEGPT.start_step routes the step's micro-batches once without gradients before the first backward, so
  each micro-step's loss E * sum_i f_i(step) * P_i(micro-batch) sums to the loss of the concatenated batch.
- router z-loss (ST-MoE): mean over tokens of logsumexp(router logits)^2, averaged over MoE layers; it
  keeps the logits small, which keeps the float32 softmax well conditioned.

balance_mode='aux' adds balance_loss_weight * balance to the loss; 'aux_free' (DeepSeek-V3) instead adds a
per-expert bias to the scores used to *choose* the top-k (the gate weights come from the unbiased scores)
and, after each optimizer step, moves it by bias_update_rate towards balance (MoEGPT.end_step); 'none' does
neither. The balance number is computed and logged in every mode, so runs compare.

The file reads top-down: the config, the MoE block (route -> experts -> combine -> stats), the router, the
experts, the model. Expert weights are stacked into (E, ...) tensors and two implementations read them:
- 'loop' (Experts.forward_loop, here): the reference, and the code to learn from. For each expert: gather
  its tokens, run its MLP, scale by the routing weight, scatter-add into the output.
- 'grouped' (nanomoe/layers/grouped_experts.py): the fast path. Sort the assignments by expert and run every
  expert in one grouped matrix multiply per projection, with static shapes (torch.compile(fullgraph=True)
  works). Tested equal to 'loop', outputs and gradients.
Which runs by default: moe_impl='auto' takes 'grouped' wherever torch's grouped GEMM kernel runs (CUDA and
the CPU, for float32, bf16 and fp16 eager and bf16 compiled: the table in grouped_experts.py), else 'loop'.
With expert parallelism (nanomoe/distributed/expert_parallel.py) the tokens travel to the experts' processes
and the same two implementations run there.

MoEGPT.from_dense turns a dense GPT into an MoEGPT by sparse upcycling (Komatsuzaki et al. 2022): every MoE
layer's experts start as copies of the dense MLP they replace and the router starts small and random. With
k > 1 the renormalised top-k weights sum to 1, so the upcycled model computes exactly the dense model's
function at the start of training (with top-1 the gate is the router's probability, so it does not).
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from model import GPT, MLP, GPTConfig, mlp_activation, mlp_hidden_size
from nanomoe.errors import UserError
from nanomoe.layers.grouped_experts import compute_dtype, expert_counts, grouped_experts, grouped_kernel_available
from nanomoe.layers.moe_stages import stage
from nanomoe.settings import setting


@dataclass
class MoEConfig(GPTConfig):
    n_experts: int = setting(0, "experts per MoE layer (0 = a dense GPT; an MoEConfig needs at least 1)", min=0)
    moe_top_k: int = setting(2, "experts per token", min=1)
    moe_every: int = setting(1, "MoE in every N-th layer: 1 = all, 2 = every other one starting with the "
                                "second", min=1)
    first_dense_layers: int = setting(0, "the first N layers keep the dense MLP (DeepSeek-V3's "
                                         "first_k_dense_replace)", min=0)
    expert_hidden: int | None = setting(None, "hidden size of each expert (None = the dense MLP's)", min=1)
    n_shared_experts: int = setting(0, "always-on experts every token goes through (DeepSeekMoE)", min=0)
    balance_loss_weight: float = setting(0.01, "weight of the balance loss (= Hugging Face's * moe_top_k)",
                                         runtime=True, min=0)
    balance_mode: str = setting("aux", "'aux' (balance loss), 'aux_free' (DeepSeek-V3 bias on the choice) or "
                                       "'none'", choices=("aux", "aux_free", "none"))
    balance_scope: str = setting("micro", "balance loss f counted per 'micro'-batch or over the 'global' step "
                                          "(all micro-steps and ranks)", runtime=True, choices=("micro", "global"))
    bias_update_rate: float = setting(1e-3, "aux_free: bias step per optimizer step", runtime=True, min=0)
    router_score: str = setting("softmax", "'softmax' or 'sigmoid' (DeepSeek-V3) expert scores",
                                choices=("softmax", "sigmoid"))
    z_loss_weight: float = setting(0.001, "weight of the router z-loss", runtime=True, min=0)
    capacity_factor: float = setting(0.0, "0 = dropless; > 0: an expert serves at most ceil(k*T/E * factor) "
                                          "tokens", runtime=True, min=0)
    # with top-1, renormalising makes the gate always 1.0, so the router would learn only from the balance and
    # z losses: None renormalises only when k > 1, and True with k = 1 is refused
    moe_renorm: bool | None = setting(None, "renormalise the top-k routing weights to sum to 1 (None = when "
                                            "moe_top_k > 1)", runtime=True)
    router_jitter: float = setting(0.0, "training only: multiply router inputs by U(1-eps, 1+eps) (Switch)",
                                   runtime=True, min=0, below=1)
    moe_impl: str = setting("auto", "'loop' (reference), 'grouped' (fast), 'auto' = grouped where the grouped "
                                    "GEMM kernel runs, else loop", runtime=True, choices=("auto", "loop", "grouped"))

    def validate(self):
        super().validate()
        if self.n_experts < 1:
            raise UserError(f"n_experts must be at least 1 for an MoE model, got {self.n_experts} "
                            f"(n_experts=0 is a dense GPT: build_model makes one)")
        if self.n_experts >= 1024:  # torch's CUDA grouped GEMM (CUTLASS and cuBLASLt) takes under 1024 groups
            raise UserError(f"n_experts={self.n_experts} is more than the 1023 experts per layer that torch's "
                            f"grouped GEMM runs on a GPU; use --n_experts=1023 or fewer")
        if self.first_dense_layers and not any(map(self.is_moe_layer, range(self.n_layer))):
            raise UserError(f"first_dense_layers={self.first_dense_layers} leaves no MoE layer of n_layer="
                            f"{self.n_layer} (moe_every={self.moe_every}); use fewer first_dense_layers")
        if self.moe_top_k > self.n_experts:
            raise UserError(f"moe_top_k={self.moe_top_k} must be between 1 and n_experts={self.n_experts}")
        if self.moe_renorm and self.moe_top_k == 1:
            raise UserError("moe_renorm=True with moe_top_k=1 makes every gate 1.0, so the router would learn nothing "
                            "from the cross-entropy; leave moe_renorm unset or None (it renormalises only when k > 1)")
        if self.balance_scope == "global" and self.balance_mode != "aux":
            raise UserError(f"balance_scope='global' counts the balance loss over the step, but "
                            f"balance_mode={self.balance_mode!r} adds no balance loss; use balance_mode='aux'")
        if self.balance_scope == "global" and (self.dropout > 0 or self.router_jitter > 0):
            raise UserError(f"balance_scope='global' needs dropout=0 and router_jitter=0 (got {self.dropout} and "
                            f"{self.router_jitter}): its counting pass must route exactly like the training pass")

    def renormalises(self):
        return self.moe_renorm if self.moe_renorm is not None else self.moe_top_k > 1

    def is_moe_layer(self, layer_idx):
        return layer_idx >= self.first_dense_layers and (layer_idx + 1) % self.moe_every == 0

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
        # aux-loss-free balancing: a per-expert bias on the scores that choose the top-k. A buffer (saved in
        # checkpoints, never seen by the optimizer), moved by MoEGPT.end_step after each optimizer step
        self.register_buffer("expert_bias", torch.zeros(config.n_experts) if config.balance_mode == "aux_free"
                             else None)
        # set by other code, through set_global_load and set_expert_parallel (below)
        self.global_load = None  # balance_scope='global': f of the whole step (E,), for the balance loss
        self.expert_parallel = None  # experts split over processes: what sends tokens to them and back
        self.stats = {}  # after each forward: this layer's balance, balance_loss, z, expert_load, dropped
        self.step_counts = None  # aux_free: assignments per expert (E,) counted since the last optimizer step

    def forward(self, x):
        B, T, D = x.shape
        x_TD = x.reshape(B * T, D)  # every token on its own: routing does not look at the sequence

        # each stage runs in a profiler range (nanomoe/layers/moe_stages.py): tools.bench --bench_profile=True
        # route: each token picks its top-k experts; capacity may drop some of those assignments
        with stage("router"):
            logits_TE, probs_TE, expert_TK, weight_TK = self.route(x_TD)
        with stage("count"):
            counts_E = expert_counts(expert_TK, self.config.n_experts)  # on the device: the load, and grouped's offsets
            if self.config.capacity_factor > 0:
                keep_TK = self.capacity_mask(expert_TK)  # a dropped assignment contributes nothing
            else:
                keep_TK = torch.ones_like(expert_TK, dtype=torch.bool)

        # experts: the routing-weighted sum of each token's chosen experts
        if self.expert_parallel is not None:  # tokens travel to their experts' processes and back
            y_TD = self.expert_parallel(self, x_TD, expert_TK, weight_TK, keep_TK)
        elif self.use_grouped(x_TD):
            y_TD = grouped_experts(self.experts, x_TD, expert_TK, weight_TK, keep_TK, counts_E)
        else:
            y_TD = self.experts.forward_loop(x_TD, expert_TK, weight_TK, keep_TK)

        # combine: shared experts see every token
        if self.shared is not None:
            with stage("experts"):
                y_TD = y_TD + self.shared(x_TD)

        # stats. Balance loss: f from the (non-differentiable) choices, P from the score distribution (carries
        # the gradient). With balance_scope='global' the loss takes f of the whole step, the log this batch's
        with stage("stats"):
            E = self.config.n_experts
            f_E = counts_E.float() / expert_TK.numel()
            if self.training and self.expert_bias is not None:  # aux-free: the step's exact counts (MoEGPT.end_step)
                self.step_counts = counts_E if self.step_counts is None else self.step_counts + counts_E
            P_E = probs_TE.mean(dim=0)
            balance = E * (f_E * P_E).sum()
            if self.training and self.global_load is not None:
                balance_loss = E * (self.global_load * P_E).sum()
            else:
                balance_loss = balance
            self.stats = {"balance": balance, "balance_loss": balance_loss,
                          "z": torch.logsumexp(logits_TE, dim=-1).square().mean(),
                          "expert_load": f_E, "dropped": 1.0 - keep_TK.float().mean()}
        return self.dropout(y_TD.view(B, T, D))

    def route(self, x_TD):
        """-> logits (T, E) fp32, probs (T, E) (each token's scores as a distribution), chosen experts (T, K),
        routing weights (T, K) fp32."""
        logits_TE = self.router(x_TD)
        if self.config.router_score == "sigmoid":
            scores_TE = logits_TE.sigmoid()  # each expert scored on its own (DeepSeek-V3)
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        else:
            scores_TE = probs_TE = logits_TE.softmax(dim=-1)
        # aux-free balancing: the bias decides which experts are chosen, never how much their outputs weigh
        choice_TE = scores_TE if self.expert_bias is None else scores_TE + self.expert_bias
        top_TK, expert_TK = choice_TE.topk(self.config.moe_top_k, dim=-1)
        # without a bias the chosen scores are the weights; with one, the unbiased scores are gathered
        weight_TK = top_TK if self.expert_bias is None else scores_TE.gather(-1, expert_TK)
        if self.config.renormalises():
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

    def set_global_load(self, f_E):
        """balance_scope='global': the load f (E,) of the whole optimizer step, which the balance loss takes
        in place of this batch's during training (MoEGPT.start_step); None after the step."""
        self.global_load = f_E

    def set_expert_parallel(self, dispatch):
        """The experts live on several processes: dispatch(moe, x_TD, expert_TK, weight_TK, keep_TK) -> y_TD
        replaces the local experts step (nanomoe/distributed/expert_parallel.shard_experts sets it)."""
        self.expert_parallel = dispatch


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
            with stage("permute"):
                token_idx, slot = torch.where((expert_TK == e) & keep_TK)
                x_nD = x_TD[token_idx]
            with stage("experts"):
                # an expert with no tokens still runs (on zero rows), so all its parameters get a gradient
                out_nD = self.expert_mlp(e, x_nD)
            with stage("combine"):
                y_TD.index_add_(0, token_idx, out_nD.float() * weight_TK[token_idx, slot].unsqueeze(1))
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
        aux_loss = self.config.z_loss_weight * z
        if self.config.balance_mode == "aux":  # scope 'global': f of the whole step (the logged balance: this batch's)
            balance_loss = torch.stack([s["balance_loss"] for s in stats]).mean()
            aux_loss = aux_loss + self.config.balance_loss_weight * balance_loss
        return {"aux_loss": aux_loss, "balance": balance, "z": z,
                "expert_load": torch.stack([s["expert_load"] for s in stats]),
                "dropped": torch.stack([s["dropped"] for s in stats])}

    def start_step(self, batches, ctx, reduce_mean):
        """Called before an optimizer step's first micro-step with the step's (x, y) micro-batches on this
        process. balance_scope='global': route them all once without gradients (eval mode routes like training,
        as dropout = router_jitter = 0 there), average the load over processes (reduce_mean), and give each
        layer f of the whole step for its balance loss. Other modes do not read `batches`."""
        if self.config.balance_mode != "aux" or self.config.balance_scope != "global":
            return
        was_training = self.training
        self.eval()
        with torch.no_grad(), ctx:
            loads = [self(x)[2]["expert_load"] for x, _ in batches]  # each (L_moe, E)
        self.train(was_training)
        load_LE = reduce_mean(torch.stack(loads).mean(0))  # equal batches: the mean of the means
        for layer, f_E in zip(self.moe_layers(), load_LE):
            layer.set_global_load(f_E)

    @torch.no_grad()
    def end_step(self, expert_load, skipped, reduce_mean):
        """Called after the optimizer step with this process's expert load (L_moe, E) averaged over the step's
        micro-steps and `skipped` (a bool tensor: the update was skipped). balance_mode='aux_free': every layer's
        bias moves by bias_update_rate towards balance, sign(mean load - load), from the load of the whole step
        over all processes (step_loads: whole counts; reduce_mean, so every process holds the same bias); a
        skipped step changes nothing."""
        for layer in self.moe_layers():
            layer.set_global_load(None)
        if self.config.balance_mode != "aux_free":
            return
        keep = (~skipped).float() if isinstance(skipped, torch.Tensor) else float(not skipped)
        for layer, f_E in zip(self.moe_layers(), self.step_loads(expert_load, reduce_mean)):
            # the sign of (mean - load) on exact integers: an expert at exactly the mean load stays where it is
            # (the sign of float fractions, whose mean is rounded, moved it either way)
            direction = torch.sign(f_E.sum() - self.config.n_experts * f_E)
            layer.expert_bias.add_(self.config.bias_update_rate * direction.to(layer.expert_bias) * keep)

    def step_loads(self, expert_load, reduce_mean):
        """The step's load per layer (L_moe, E) over all processes, as whole assignment counts: each layer's
        counts since the last step, summed over the processes (their mean times the world size, rounded: exact
        below 2**24 assignments per expert and step). A caller that moved no layer in training mode gets its
        expert_load fractions instead."""
        layers = self.moe_layers()
        if any(layer.step_counts is None for layer in layers):
            return reduce_mean(expert_load.float())
        counts_LE = torch.stack([layer.step_counts for layer in layers])
        for layer in layers:
            layer.step_counts = None
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return torch.round(reduce_mean(counts_LE.float()).double() * world)

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
            elif leaf == "expert_bias":
                sd[name] = torch.zeros_like(p)
            else:
                raise RuntimeError(f"upcycling has no rule for the MoE parameter {name}; teach MoEGPT.from_dense "
                                   f"about it")
        moe.load_state_dict(sd)
        return moe


def load_stats(expert_load_LE):
    """One eval's expert-load summary from the per-layer load f (L_moe, E), each row summing to 1. Loads are
    relative to balanced (f * E: 1 = an even share): load_max / load_min are the extremes over all layers and
    experts, load_cv the coefficient of variation (std / mean) of each layer's load averaged over layers, and
    dead_experts the share of (layer, expert) pairs with f < 1/(4E)."""
    load = torch.as_tensor(expert_load_LE).float()
    E = load.size(-1)
    rel = load * E
    return {"load_max": rel.max(), "load_min": rel.min(), "load_cv": rel.std(dim=-1, unbiased=False).mean(),
            "dead_experts": (load < 1 / (4 * E)).float().mean()}
