"""
The optimizer, built in one place for train.py, tools/ and the sharded-checkpoint reader: AdamW (the default),
or Muon for the hidden weight matrices with AdamW for the rest (optimizer='muon', docs/muon.md). Which
parameter gets weight decay, and which gets Muon, is decided by what the parameter is.

Muon (Keller Jordan's; torch.optim.Muon): keep a Nesterov momentum of the gradient, replace it by the nearest
semi-orthogonal matrix (5 Newton-Schulz steps: every singular value pushed towards 1) and step along that.
torch.optim.Muon takes 2-D parameters only; the experts' weights are stacked (E, out, in), and each expert is
its own linear map, so each gets its own orthogonalisation: the same Newton-Schulz, batched over E.
"""
import inspect

import torch
import torch.nn as nn
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS, _adjust_lr, muon

from nanomoe.errors import UserError
from nanomoe.layers.fgram import FGram
from nanomoe.layers.mamba2 import Mamba2

OPTIMIZERS = ("adamw", "muon")
# torch.optim.Muon's adjust_lr_fn: the update's size per matrix shape. 'match_rms_adamw' (Moonshot, "Muon is
# Scalable for LLM Training") scales lr by 0.2 * sqrt(max(out, in)), so an update's RMS is 0.2 * lr whatever the
# shape, about AdamW's: AdamW's learning rate and its decoupled weight decay (lr * weight_decay) mean the same
# on both. 'original' (Keller's, sqrt(max(1, out / in))) gives RMS lr / sqrt(in): a wider matrix would need
# another rate, and a wide expert (in = its hidden size) another than the attention's.
LR_RULE = "match_rms_adamw"


def decays(module, name):
    """Whether parameter `name` of `module` gets weight decay: the weight matrices do (linear layers,
    embeddings, the router, the experts' stacked weights); biases, norm gains, the F-gram scales and Mamba2's
    A_log and D do not (dt_bias ends in "bias": none, as Mamba2 does). Decided by kind, not by rank: the
    experts' stacked biases are 2-D and the F-gram tables are embeddings."""
    if name.endswith("bias") or isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return False
    if isinstance(module, FGram) and name == "scale":
        return False
    if isinstance(module, Mamba2) and name in ("A_log", "D"):
        return False
    return True


def is_hidden_matrix(module, name, param):
    """Whether Muon updates this parameter: a hidden layer's weight matrix, that is an nn.Linear's weight
    (attention, MLA, MLP, shared-expert and Mamba2 projections) or a stack of them (the experts' c_fc and
    c_proj, (E, out, in): a 3-D parameter that is not a convolution's). Not: the embeddings and the LM head
    (their rows are tokens, not directions of a hidden space: the caller leaves the head out), the router
    (a small matrix whose rows are the experts' scores), the F-gram tables, norms, biases, Mamba2's
    convolution and its A_log, D, dt_bias."""
    if isinstance(module, nn.Linear):
        return name == "weight"
    return param.ndim == 3 and not isinstance(module, nn.modules.conv._ConvNd) and not name.endswith("bias")


def build_optimizer(model, settings, device_type):
    """The optimizer a run's settings (train.py's keys, as a dict) ask for; checkpoints from before Muon have
    no 'optimizer' key: AdamW."""
    s = settings
    return configure_optimizers(model, s["weight_decay"], s["learning_rate"], (s["beta1"], s["beta2"]), device_type,
                                s.get("optimizer", "adamw"), s.get("muon_lr"), s.get("muon_momentum", 0.95))


def configure_optimizers(model, weight_decay, learning_rate, betas, device_type, optimizer="adamw", muon_lr=None,
                         muon_momentum=0.95):
    """The optimizer of model's trainable parameters.
    optimizer='adamw': AdamW, one group with weight_decay (decays()), one without. Fused where torch has the
    kernel (CUDA, CPU): it can also skip a step on the device (the training step's non-finite check sets
    optimizer.found_inf, no host sync).
    optimizer='muon': MuonAdamW, Muon on the hidden matrices (is_hidden_matrix()) at muon_lr (None: the
    learning rate), AdamW as above on the rest."""
    params = [p for p in model.parameters() if p.requires_grad]
    no_decay = {id(p) for m in model.modules() for name, p in m.named_parameters(recurse=False)
                if not decays(m, name)}
    muon_ids = set()
    if optimizer == "muon":
        head = {id(p) for p in model.lm_head.parameters()}  # tied to the token embedding: stays on AdamW
        muon_ids = {id(p) for m in model.modules() for name, p in m.named_parameters(recurse=False)
                    if is_hidden_matrix(m, name, p) and id(p) not in head}
    adamw = [p for p in params if id(p) not in muon_ids]
    groups = [{"params": [p for p in adamw if id(p) not in no_decay], "weight_decay": weight_decay},
              {"params": [p for p in adamw if id(p) in no_decay], "weight_decay": 0.0}]
    # FSDP with expert parallel (distributed/parallel.shard): FSDP's parameters are DTensors, the experts plain
    # tensors, and one fused update cannot take both kinds: each kind gets groups of its own
    sharded = {id(p) for p in params if hasattr(p, "to_local")}  # DTensor, without importing it
    if 0 < len(sharded) < len(params):
        groups = [{**g, "params": [p for p in g["params"] if (id(p) in sharded) == kind]}
                  for kind in (True, False) for g in groups]
    if optimizer == "adamw":
        fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))
    if sharded:  # train.py refuses fsdp with muon first; this guards the tools that build an optimizer too
        raise UserError("optimizer='muon' orthogonalises each whole weight matrix, but FSDP splits them over "
                        "the processes; use --fsdp=False (DDP and --ep_size work), or --optimizer=adamw")
    muon_group = {"params": [p for p in params if id(p) in muon_ids], "weight_decay": weight_decay, "muon": True,
                  "lr": learning_rate if muon_lr is None else muon_lr}
    return MuonAdamW([muon_group] + groups, learning_rate, betas, muon_momentum)


def set_lr(optimizer, lr, learning_rate, muon_lr):
    """This step's learning rate on every group: the schedule's lr (train.get_lr) on AdamW's, and on Muon's the
    same fraction of muon_lr (None: learning_rate itself, the rate the match_rms_adamw scale transfers).
    train.check_run refuses learning_rate=0 with a muon_lr, where that fraction has no meaning."""
    muon_now = lr if muon_lr is None else muon_lr * (lr / learning_rate)  # exactly muon_lr at the peak
    for g in optimizer.param_groups:
        g["lr"] = muon_now if g.get("muon") else lr


class MuonAdamW(torch.optim.AdamW):
    """Muon on the param groups marked "muon", AdamW on the others, as one optimizer: one state dict in the
    checkpoint, one list of param_groups for the LR schedule, one step for the non-finite skip and the
    GradScaler. AdamW's groups run torch's own AdamW step (unfused: the non-finite skip then reads its flag on
    the host, see train.step_unless); Muon's run torch.optim.Muon's update, batched over the experts of a
    stacked (E, out, in) weight (muon_stacked), with the same hyperparameters."""

    def __init__(self, groups, lr, betas, momentum):
        for g in groups:
            g.setdefault("muon", False)
            if g["muon"]:  # torch.optim.Muon's defaults (eps too: AdamW's would fill it in otherwise)
                g.update(momentum=momentum, nesterov=True, ns_coefficients=(DEFAULT_A, DEFAULT_B, DEFAULT_C),
                         eps=EPS, ns_steps=DEFAULT_NS_STEPS, adjust_lr_fn=LR_RULE)
        super().__init__(groups, lr=lr, betas=betas)

    def __setstate__(self, state):
        # Adam's __setstate__ upgrades the "step" of old torch versions' states; Muon's states have no step
        torch.optim.Optimizer.__setstate__(self, state)

    @torch.no_grad()
    def step(self, closure=None):
        groups = self.param_groups
        self.param_groups = [g for g in groups if not g["muon"]]  # what AdamW's own step walks
        try:
            super().step()
        finally:
            self.param_groups = groups
        for g in groups:
            if not g["muon"]:
                continue
            params = [p for p in g["params"] if p.grad is not None]
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            hyper = {k: g[k] for k in ("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "ns_steps",
                                       "eps", "adjust_lr_fn")}
            flat = [i for i, p in enumerate(params) if p.ndim == 2]
            muon([params[i] for i in flat], [params[i].grad for i in flat], [bufs[i] for i in flat],
                 has_complex=False, **hyper)  # torch.optim.Muon's own update
            for p, buf in zip(params, bufs):
                if p.ndim == 3:
                    muon_stacked(p, p.grad, buf, **hyper)


def muon_stacked(param_EOI, grad_EOI, buf_EOI, *, lr, weight_decay, momentum, nesterov, ns_coefficients, ns_steps,
                 eps, adjust_lr_fn):
    """torch.optim.Muon's update (torch/optim/_muon.py, _single_tensor_muon) of E matrices stacked in one
    (E, out, in) parameter, each as its own matrix: the momentum and the decay are elementwise anyway, the
    orthogonalisation is batched over E and the shape-aware rate reads one matrix's (out, in)."""
    buf_EOI.lerp_(grad_EOI, 1 - momentum)
    update_EOI = grad_EOI.lerp(buf_EOI, momentum) if nesterov else buf_EOI
    update_EOI = newton_schulz(update_EOI, ns_coefficients, ns_steps, eps)
    param_EOI.mul_(1 - lr * weight_decay)
    param_EOI.add_(update_EOI, alpha=-_adjust_lr(lr, adjust_lr_fn, param_EOI.shape[-2:]))


def newton_schulz(G_EOI, ns_coefficients, ns_steps, eps):
    """torch.optim.Muon's Newton-Schulz orthogonalisation (_zeropower_via_newtonschulz) of each matrix of a
    stack (E, out, in), in bfloat16 as there: the quintic X <- aX + (bA + cA^2)X with A = XX^T, on the wide
    orientation (the Gram matrix is the smaller one), after scaling each matrix to Frobenius norm 1 (so every
    singular value is at most 1). Each matrix has its own norm: one expert's large gradient does not shrink
    another's update."""
    a, b, c = ns_coefficients
    X = G_EOI.bfloat16()
    tall = G_EOI.size(-2) > G_EOI.size(-1)
    if tall:
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(ns_steps):
        gram = X @ X.mT
        X = torch.baddbmm(X, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), X, beta=a)
    return X.mT if tall else X


def describe(optimizer):
    """One line: which optimizer updates how many tensors and parameters (printed at the start of a run)."""
    if not isinstance(optimizer, MuonAdamW):
        return None
    parts = []
    for muon_, name in ((True, "muon"), (False, "adamw")):
        ps = [p for g in optimizer.param_groups if g["muon"] == muon_ for p in g["params"]]
        stacked = sum(p.size(0) for p in ps if p.ndim == 3)
        what = f" ({sum(p.ndim == 2 for p in ps)} matrices + {stacked} expert matrices in "\
               f"{sum(p.ndim == 3 for p in ps)} stacks)" if muon_ else ""
        parts.append(f"{name} {len(ps)} tensors, {sum(p.numel() for p in ps):,} parameters{what}")
    return "optimizer: " + "; ".join(parts)
