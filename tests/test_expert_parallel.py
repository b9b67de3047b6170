"""
Expert parallelism (expert_parallel.py) against the same model unsharded, in-process: 2 ranks (ep=2) and 4
ranks (ep=2 x dp=2) on gloo, started by torch.multiprocessing. Each rank also computes the reference itself
(the full model on every rank's batch, as one process would): its outputs, losses and expert load on this
rank's batch must match, and every parameter's gradient, the expert ones gathered over the ep group.
"""
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import expert_parallel
import parallel
from moe_model import MoEConfig, MoEGPT

# 8 experts, top-1, 5 tokens per rank: most experts get no token from a rank, some from no rank at all (and no
# expert's mean load over 2 or 4 ranks is exactly 1/8, where the aux-free bias's sign would hang on rounding)
SHAPE = dict(block_size=5, vocab_size=32, n_layer=2, n_head=2, n_embd=16, n_experts=8, moe_top_k=1, moe_every=1,
             dropout=0.0, balance_mode="aux")
# (expert implementation, routing settings): both implementations, the step-wide balance loss (f counted over
# every rank's batch), and the aux-free bias (moved by the load of all ranks)
VARIANTS = [("loop", {}), ("grouped", {}), ("loop", {"balance_scope": "global", "balance_loss_weight": 1.0}),
            ("grouped", {"balance_mode": "aux_free", "bias_update_rate": 0.1})]


def _batches(world_size):
    g = torch.Generator().manual_seed(7)
    return [(torch.randint(0, 32, (1, 5), generator=g), torch.randint(0, 32, (1, 5), generator=g))
            for _ in range(world_size)]


def _rank(rank, world_size, ep_size, init_file, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    proc = SimpleNamespace(ddp=True, world_size=world_size, rank=rank, local_rank=rank, device_type="cpu",
                           sharding=("ep",))
    cfg = SimpleNamespace(fsdp=False, ep_size=ep_size)
    batches = _batches(world_size)
    one = SimpleNamespace(ddp=False)
    out = {}
    for impl, routing in VARIANTS:
        torch.manual_seed(0)
        ref = MoEGPT(MoEConfig(**{**SHAPE, **routing}, moe_impl=impl))
        model = MoEGPT(MoEConfig(**{**SHAPE, **routing}, moe_impl=impl))
        model.load_state_dict(ref.state_dict())
        # the reference: one process, every rank's batch, the gradient DDP would average
        ref.start_step(batches, nullcontext(), one)
        ref_extra = None
        for r, (x, y) in enumerate(batches):
            logits, loss, extra = ref(x, y)
            ((loss + extra["aux_loss"]) / world_size).backward()
            if r == rank:
                ref_logits, ref_loss, ref_extra = logits.detach(), loss.detach(), extra
        ddp = parallel.shard(model, cfg, proc)
        model.start_step(batches[rank:rank + 1], nullcontext(), proc)
        x, y = batches[rank]
        logits, loss, extra = ddp(x, y)
        (loss + extra["aux_loss"]).backward()
        parallel.sync_gradients(model, proc)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss, ref_loss)
        for k in ("aux_loss", "balance", "z", "expert_load"):
            torch.testing.assert_close(extra[k], ref_extra[k], msg=lambda m: f"{impl} {k}: {m}")
        ep_group = expert_parallel.mesh_of(model)["ep"].get_group()
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            grad = p.grad
            if ".mlp.experts." in name:  # this rank's slice: gather the ep group's into the full (E, ...) tensor
                parts = [torch.empty_like(grad) for _ in range(ep_size)]
                dist.all_gather(parts, grad.contiguous(), group=ep_group)
                grad = torch.cat(parts)
            torch.testing.assert_close(grad, ref_params[name].grad, rtol=1e-4, atol=1e-7,
                                       msg=lambda m: f"{impl} {name}: {m}")
        # the norm the clip sees is the whole model's
        ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
        torch.testing.assert_close(parallel.clip_gradients(model, 1e9, proc), ref_norm)
        # aux-free: the bias moves by every rank's load, the same on every rank and as in one process
        ref.end_step(torch.stack([ref(x)[2]["expert_load"] for x, _ in batches]).mean(0), False, one)
        model.end_step(extra["expert_load"].detach(), False, proc)
        for ref_layer, layer in zip(ref.moe_layers(), model.moe_layers()):
            if layer.expert_bias is not None:
                torch.testing.assert_close(layer.expert_bias, ref_layer.expert_bias, rtol=0, atol=0)
                assert layer.expert_bias.abs().sum() > 0
                everyone = [torch.empty_like(layer.expert_bias) for _ in range(world_size)]
                dist.all_gather(everyone, layer.expert_bias)
                assert all(torch.equal(b, layer.expert_bias) for b in everyone)
        out[(impl, str(routing))] = extra["expert_load"]
    results[rank] = out
    dist.destroy_process_group()


def _spawn(tmp_path, world_size, ep_size):
    results = mp.Manager().dict()
    # fork: the children start with this process's imports (spawn would import torch again in each)
    mp.start_processes(_rank, args=(world_size, ep_size, str(tmp_path / "init"), results), nprocs=world_size,
                       start_method="fork")
    return dict(results)


@pytest.mark.parametrize("world_size, ep_size", [(2, 2), (4, 2)], ids=["ep2", "ep2xdp2"])
def test_expert_parallel_equals_unsharded(tmp_path, world_size, ep_size):
    results = _spawn(tmp_path, world_size, ep_size)
    assert sorted(results) == list(range(world_size))
    # the case of experts without tokens really happened: on each rank, in each layer, some expert got none
    for rank_loads in results.values():
        assert all((load == 0).any(dim=-1).all() for load in rank_loads.values())
