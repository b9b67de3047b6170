"""
Expert parallelism: each MoE layer's experts split over the `ep` ranks of a (dp, ep) DeviceMesh. A rank holds
E / ep_size experts; a token stays on the rank whose batch it came from for everything except its experts'
MLPs, where it travels to the rank holding each chosen expert and back:

    x_TD, expert_TK -> the A kept assignments, sorted by expert (so by destination rank too)
      -> all_to_all of the counts: how many rows each rank will receive, for each of its experts
      -> all_to_all of the rows x_AD -> x_RD: the rows for this rank's experts, from every rank of the ep group
      -> this rank's experts, the loop reference or the grouped path exactly as without EP (top-1, weight 1)
      -> all_to_all back -> out_AD, in the order the rows left -> * routing weight, scatter-add -> y_TD

Both token exchanges carry autograd (the backward of an all_to_all is the opposite all_to_all), so gradients
reach the experts on their ranks and the tokens and routing weights on theirs.

Who holds what: attention, embeddings, norms and the routers are the same on every rank and their gradients
are averaged over all ranks (DDP, which ignores the experts). Expert weights are the same only across the
ranks of one `dp` slice of the mesh (the ranks with the same ep coordinate): sync_expert_grads sums their
gradients over that group. With the same global batch, every parameter's gradient equals the one process's.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.tensor import DTensor, Replicate, Shard

from nanomoe.layers.grouped_experts import compute_dtype, grouped_experts


class ExpertParallel:
    """One MoE layer's share of the experts and the ep group that holds the others (moe_model.MoE calls it in
    place of its local experts step)."""

    def __init__(self, mesh, n_experts):
        self.mesh = mesh  # (dp, ep)
        self.group = mesh["ep"].get_group()
        self.size = mesh["ep"].size()
        self.n_local = n_experts // self.size
        self.first = mesh["ep"].get_local_rank() * self.n_local  # global id of this rank's first expert
        # the ranks holding the same experts (slicing a DeviceMesh is host work: done once, not every step)
        self.dp_group, self.dp_size = mesh["dp"].get_group(), mesh["dp"].size()

    def __call__(self, moe, x_TD, expert_TK, weight_TK, keep_TK):
        """MoE.forward's experts step: the routing-weighted sum of each token's kept experts, (T, D). One host
        sync: the all_to_all takes its splits as Python ints."""
        S, N, K = self.size, self.n_local, expert_TK.size(1)
        # every assignment sorted by expert, so by destination rank too; the ones capacity dropped get the key
        # E and sort last, so the first A (the kept ones) travel and no data-dependent nonzero is needed
        key_A = torch.where(keep_TK, expert_TK, S * N).flatten()  # token-major, as torch.where(keep_TK) was
        order_A = key_A.argsort(stable=True)

        # counts first (S ranks in the ep group, N experts on each): send_SN[s, n] rows go to rank s's expert n,
        # recv_SN[s, n] rows come from rank s for our expert n. A static-shape count (bincount reads the min
        # and max on the host)
        send_SN = torch.zeros(S * N + 1, dtype=torch.long, device=x_TD.device).scatter_add_(
            0, key_A, torch.ones_like(key_A))[:S * N].view(S, N)
        recv_SN = torch.empty_like(send_SN)
        dist.all_to_all_single(recv_SN, send_SN, group=self.group)
        send_splits, recv_splits = torch.stack([send_SN.sum(1), recv_SN.sum(1)]).tolist()  # the one sync
        order_A = order_A[:sum(send_splits)]
        token_A, slot_A = order_A // K, order_A % K

        # the rows, in the dtype the experts compute in (bf16 under autocast: half the bytes of float32). They
        # arrive grouped by source rank, and by expert within each source
        x_AD = x_TD[token_A].to(compute_dtype(x_TD))
        x_RD = all_to_all_single_autograd(x_AD, recv_splits, send_splits, self.group)
        local_R = torch.arange(N, device=x_TD.device).repeat(S).repeat_interleave(
            recv_SN.flatten(), output_size=sum(recv_splits))
        # x_RD: R rows for this rank's experts; local_R: which of them each row goes through
        out_RD = run_local_experts(moe, x_RD, local_R)
        out_AD = all_to_all_single_autograd(out_RD, send_splits, recv_splits, self.group)

        y_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
        y_TD.index_add_(0, token_A, out_AD.float() * weight_TK[token_A, slot_A].unsqueeze(1))
        return y_TD.to(x_TD.dtype)


def run_local_experts(moe, x_RD, local_R):
    """Row r through this rank's expert local_R[r], with the layer's own implementation (loop or grouped): each
    row is one assignment, so it is a top-1 routing with weight 1 (the real weight is applied at home)."""
    expert_R1 = local_R.unsqueeze(1)
    weight_R1 = torch.ones(expert_R1.shape, dtype=torch.float32, device=x_RD.device)
    keep_R1 = torch.ones_like(expert_R1, dtype=torch.bool)
    if moe.use_grouped(x_RD):
        return grouped_experts(moe.experts, x_RD, expert_R1, weight_R1, keep_R1)
    return moe.experts.forward_loop(x_RD, expert_R1, weight_R1, keep_R1)


# -----------------------------------------------------------------------------
# setting it up, and what training needs besides the forward

def shard_experts(model, mesh):
    """Keep this rank's slice of every MoE layer's stacked expert weights (E, ...) -> (E / ep, ...) and give the
    layer its ExpertParallel. Every rank built the same full model from the same seed, so the slices fit."""
    for moe in model.moe_layers():
        ep = ExpertParallel(mesh, moe.config.n_experts)
        for name, p in list(moe.experts.named_parameters()):
            local = p.detach()[ep.first:ep.first + ep.n_local].clone()
            setattr(moe.experts, name, nn.Parameter(local))
        moe.set_expert_parallel(ep)


def expert_param_names(model):
    """Names (as in model.named_parameters()) of the expert weights: those each rank holds a slice of."""
    return [name for name, _ in model.named_parameters() if ".mlp.experts." in name]


def mesh_of(model):
    layers = model.moe_layers() if hasattr(model, "moe_layers") else []
    return layers[0].expert_parallel.mesh if layers and layers[0].expert_parallel is not None else None


def sync_expert_grads(model, world_size):
    """After the last micro-step's backward: sum the expert gradients over the ranks that hold the same experts
    (the mesh's dp dim) and divide by the world size, as DDP averages the dense ones. Each rank's expert already
    holds the gradient of every token its ep group sent it, so the sum covers every token of the step."""
    ep = model.moe_layers()[0].expert_parallel
    names = set(expert_param_names(model))
    grads = [p.grad for name, p in model.named_parameters() if name in names]
    flat = torch.cat([g.flatten() for g in grads])  # one all-reduce instead of one per tensor
    if ep.dp_size > 1:
        dist.all_reduce(flat, group=ep.dp_group)
    flat /= world_size
    for g, synced in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(synced.view_as(g))


def clip_grad_norm_(model, max_norm):
    """torch.nn.utils.clip_grad_norm_ over the whole model, whose expert gradients are split over the ep group:
    the squared norm of the experts is summed over the group before it joins the dense part's (a DTensor's
    norm under FSDP, summed over its shards). -> the norm."""
    experts = set(expert_param_names(model))
    dense, expert = [], []
    for name, p in model.named_parameters():
        if p.grad is not None:
            (expert if name in experts else dense).append(p)
    expert_sq = torch.nn.utils.get_total_norm([p.grad for p in expert]).square()
    dist.all_reduce(expert_sq, group=model.moe_layers()[0].expert_parallel.group)
    dense_norm = torch.nn.utils.get_total_norm([p.grad for p in dense])
    if isinstance(dense_norm, DTensor):
        dense_norm = dense_norm.full_tensor()
    total = (dense_norm.square() + expert_sq).sqrt()
    for params in (dense, expert):  # FSDP's DTensors and the experts' plain tensors are scaled apart
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def global_view(model, state):
    """A checkpoint's {"model": ..., "optimizer": ...} state dicts (the optimizer's flattened: one entry per
    parameter and moment, "state.<name>.exp_avg") with each expert tensor and its Adam moments as a DTensor:
    Shard(0) over ep, Replicate over dp. torch.distributed.checkpoint then writes each slice once and can read
    it back into any other ep size. New dicts around the same tensors (no copy)."""
    mesh = mesh_of(model)
    if mesh is None:
        return state

    def wrap(t):
        return DTensor.from_local(t, mesh, [Replicate(), Shard(0)], run_check=False)
    return _map_expert_entries(model, state, wrap)


def local_view(model, state):
    """global_view undone: every expert tensor (and its Adam moments) of the state as this rank's slice again.
    The other entries stay as they are (FSDP's own DTensors under --fsdp with expert parallel)."""
    if mesh_of(model) is None:
        return state
    return _map_expert_entries(model, state, DTensor.to_local)


def _map_expert_entries(model, state, fn):
    names = set(expert_param_names(model))
    model_sd = {k: fn(v) if k in names else v for k, v in state["model"].items()}
    # Adam's step count is a scalar, the same on every rank: only the moments are slices
    optim_sd = {k: fn(v) if k.startswith("state.") and k[6:].rsplit(".", 1)[0] in names and not k.endswith(".step")
                else v for k, v in state["optimizer"].items()}
    return {"model": model_sd, "optimizer": optim_sd}
