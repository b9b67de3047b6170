"""
Training on several processes equals training in one: DDP (train.py under torchrun), FSDP2 (--fsdp), expert
parallel (--ep_size) and both, and sharded checkpoints moved between world sizes and layouts. CPU processes
on gloo, started by torchrun (train.py as a person runs it) or forked by torch.multiprocessing (the pieces
train.py uses: distributed/parallel.shard, train.train_step).

The equivalence tests are the heart of it: N ranks, each drawing its own batches, must take exactly the
optimizer steps that one process takes when it is fed every rank's batches as its micro-steps. For train.py
the reference is that one process written out plainly (same initial weights, same batches, loss /
accumulation steps, clip, AdamW); its parameters must match the N-rank run's checkpoint.
"""
import os
import shutil
import signal
import subprocess
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import REPO, HostSyncs, assert_ok, read_metrics, run_script, torchrun
from moe_model import MoEConfig, MoEGPT
from nanomoe.checkpoint import SHARDED, OutDirLock, load_checkpoint
from nanomoe.data import TokenData
from nanomoe.distributed import expert_parallel, parallel
from nanomoe.distributed.checkpoint import consolidate
from nanomoe.factory import build_model
from nanomoe.optim import build_optimizer, configure_optimizers
from train import step_unless, train_step

pytestmark = pytest.mark.slow  # processes and collectives: `pytest -m 'not slow'` skips them for a quick loop


def one_process(t):
    """The reduce_mean of one process: a tensor's mean over itself."""
    return t


def fork_ranks(fn, world_size, *args):
    """fn(rank, world_size, init_file, results, *args) on world_size forked processes joined by gloo; -> the
    results dict. fork: the children start with this process's imports (spawn would import torch in each)."""
    import tempfile
    results = mp.Manager().dict()
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(fn, args=(world_size, os.path.join(folder, "init"), results, *args), nprocs=world_size,
                           start_method="fork")
    return dict(results)


def join_gloo(rank, world_size, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)


# ============================================================================= train.py under torchrun: DDP

TINY = ["--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32", "--eval_iters=2",
        "--decay_lr=False", "--dropout=0.0"]
DENSE = ["--block_size=32", "--batch_size=4", "--gradient_accumulation_steps=4", "--qk_norm=True"]
# 8 tokens per micro-step cannot reach 16 experts with top-1 routing: on every rank, in every backward, at
# least half the experts get no token, and DDP must still find a gradient for all their weights
MOE_SPARSE = ["--n_experts=16", "--moe_top_k=1", "--block_size=8", "--batch_size=1",
              "--gradient_accumulation_steps=4"]


def records(out_dir, kind):
    return [rec for rec in read_metrics(out_dir) if rec["type"] == kind]


def data_args(data_root):
    return [f"--data_root={data_root}", "--dataset=shakespeare_char"]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ddp")


def train_2ranks(runs_dir, data_root, name, model_args):
    """Two optimizer steps on two ranks; the eval at iter 2 saves the checkpoint the tests compare with."""
    out = runs_dir / name
    r = torchrun(runs_dir, *TINY, *model_args, *data_args(data_root), f"--out_dir={out}", "--max_iters=2",
                 "--eval_interval=2")
    return out, r


@pytest.fixture(scope="module")
def dense_run(runs_dir, shakespeare_data):
    return train_2ranks(runs_dir, shakespeare_data, "dense", DENSE)


@pytest.fixture(scope="module")
def moe_run(runs_dir, shakespeare_data):
    return train_2ranks(runs_dir, shakespeare_data, "moe", MOE_SPARSE)


def reference_steps(ckpt, world_size, steps):
    """One process doing what the 2-rank run did, on the union of the ranks' batches: the same initial weights
    (train.py seeds with `seed` before building the model), each rank's micro-batches from its generator
    (seeded seed + rank) as micro-steps of this process, each micro-step's loss / gradient_accumulation_steps,
    then clip and AdamW. The MoE balance loss and z-loss are per micro-batch here as there (or, with
    balance_scope='global', per step over both ranks' batches), so they need not be turned off for the
    equivalence to be exact."""
    c = ckpt["config"]
    torch.manual_seed(c["seed"])
    model = build_model(ckpt["model_args"])
    optimizer = build_optimizer(model, c, "cpu")
    data = TokenData(c["data_root"], c["dataset"], ckpt["model_args"]["block_size"])
    gens = [torch.Generator().manual_seed(c["seed"] + rank) for rank in range(world_size)]
    accum = c["gradient_accumulation_steps"]
    losses, loads = [], []
    for _ in range(steps):
        # rank 0's micro-batches, then rank 1's; the MoE step hooks see them all (balance_scope='global': f of
        # the whole step; aux_free: the step's mean load)
        batches = [data.get_batch("train", c["batch_size"], gen, "cpu") for gen in gens
                   for _ in range(accum // world_size)]
        model.start_step(batches, nullcontext(), one_process)
        step_losses, step_loads = [], []
        for x, y in batches:
            _, loss, extra = model(x, y)
            ((loss + extra.get("aux_loss", 0)) / accum).backward()
            step_losses.append(loss.item())
            if "expert_load" in extra:
                step_loads.append(extra["expert_load"])
        torch.nn.utils.clip_grad_norm_(model.parameters(), c["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.end_step(torch.stack(step_loads).mean(0) if step_loads else None, torch.tensor(False), one_process)
        losses.append(sum(step_losses) / len(step_losses))
        loads += step_loads
    return model, optimizer, losses, loads


def assert_same_as_one_process(out_dir, steps=2, moment_atol=1e-9, param_atol=1e-5):
    """moment_atol: expert parallel runs each expert's matmul on other rows than one process does, which rounds
    differently (float32 matmul results depend on the batch's size): Adam's moments then agree to ~1e-8.
    param_atol: see test_muon_two_ranks_equal_one_process_on_both_batches."""
    ckpt = load_checkpoint(out_dir / "ckpt.pt")
    assert ckpt["iter_num"] == steps
    model, optimizer, losses, loads = reference_steps(ckpt, world_size=2, steps=steps)
    # Adam's first moment is a running mean of the synced (all-reduced, clipped) gradients: they agree up to
    # float32 rounding (the all-reduce adds the micro-batches' gradients in another order)
    # (Muon's momentum buffer likewise, under optimizer='muon')
    ref_state = optimizer.state_dict()["state"]
    for i, state in ckpt["optimizer"]["state"].items():
        first_moment = "momentum_buffer" if "momentum_buffer" in state else "exp_avg"
        torch.testing.assert_close(state[first_moment], ref_state[i][first_moment], rtol=1e-4, atol=moment_atol)
    # the parameters too, a little less tightly: Adam divides by sqrt(v) + 1e-8, so for a gradient entry near
    # 1e-8 (idle experts have some) a 1e-10 rounding difference moves the update by ~1e-6. A missing or doubled
    # micro-batch would move parameters by ~lr = 6e-4.
    ref = model.state_dict()
    assert ref.keys() == ckpt["model"].keys()
    for name, p in ref.items():
        torch.testing.assert_close(ckpt["model"][name], p, rtol=0, atol=param_atol, msg=lambda m: f"{name}: {m}")
    logged = [rec["loss"] for rec in records(out_dir, "train")]
    assert logged == pytest.approx(losses, abs=param_atol)  # the log shows the mean over both ranks
    return loads


def test_dense_two_ranks_run_and_only_rank0_writes(dense_run):
    out, r = dense_run
    assert_ok(r)
    # the global batch: 4 micro-steps (2 per rank) x 4 sequences x 32 tokens, printed once
    assert r.stdout.count("tokens per iteration: 512 (4 micro-steps x 4 sequences x 32 tokens, "
                          "2 on each of 2 processes)") == 1, r.stdout
    assert "2 process(es)" in r.stdout
    assert r.stdout.count("saved checkpoint") == 1  # one eval with a save (at iter 2), by one rank
    assert sorted(os.listdir(out)) == [".lock", "best.pt", "ckpt.pt", "metrics.jsonl"]
    assert [rec["iter"] for rec in records(out, "train")] == [0, 1]  # one line per iteration, not per rank
    assert [rec["iter"] for rec in records(out, "eval")] == [0, 2]
    assert records(out, "train")[0]["tokens"] == 512


def test_dense_two_ranks_equal_one_process_on_both_batches(dense_run):
    out, r = dense_run
    assert_ok(r)
    assert_same_as_one_process(out)


def test_moe_experts_without_tokens_still_sync(moe_run):
    out, r = moe_run
    assert_ok(r)
    assert "model: MoEGPT" in r.stdout and r.stdout.count("saved checkpoint") == 1
    loads = assert_same_as_one_process(out)
    # the case really happened: every micro-batch left experts idle in every MoE layer
    assert loads and all((load == 0).any(dim=-1).all() for load in loads)
    train = records(out, "train")
    assert len(train[-1]["expert_load"]) == 2 and len(train[-1]["expert_load"][0]) == 16


def test_hybrid_with_global_balance_two_ranks_equal_one_process_on_both_batches(runs_dir, shakespeare_data):
    """A Mamba2 layer (layer 0; block 10 = chunks of 4, the last padded) before an attention layer, MoE FFNs
    (top-2 of 4) with the global-batch balance loss: DDP all-reduces the Mamba2 parameters' gradients like any
    other's, and f is counted over all 4 micro-batches of both ranks (all-reduced) while P stays per
    micro-batch: the same gradient as one process computing the balance loss over the union of the batches
    (a weight of 1.0 makes its gradient visible)."""
    out, r = train_2ranks(runs_dir, shakespeare_data, "hybrid",
                          ["--n_experts=4", "--moe_top_k=2", "--block_size=10", "--batch_size=2",
                           "--gradient_accumulation_steps=4", "--mamba_layers=[0]", "--mamba2_num_heads=4",
                           "--mamba2_head_dim=16", "--mamba2_state_size=8", "--mamba2_chunk_size=4",
                           "--balance_scope=global", "--balance_loss_weight=1.0"])
    assert_ok(r)
    assert "transformer.h.0.mamba.A_log" in load_checkpoint(out / "ckpt.pt")["model"]
    # the two ranks' batches go through the Mamba2 scan apart, one process's together: float32 sums in another
    # order leave an Adam moment of ~1e-6 off by 1.2e-9 (measured, 1 entry of 1,632); a lost micro-batch would
    # move the moments by ~1e-4 and the parameters by ~lr
    assert_same_as_one_process(out, moment_atol=1e-8)


def _aux_free_rank(rank, world_size, init_file, results):
    join_gloo(rank, world_size, init_file)
    torch.manual_seed(0)
    model = MoEGPT(MoEConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8, n_experts=4,
                             balance_mode="aux_free", bias_update_rate=0.1))
    # each rank saw different tokens: rank 0's load leans to expert 0, rank 1's to expert 3
    load = torch.tensor([[0.4, 0.3, 0.2, 0.1]]) if rank == 0 else torch.tensor([[0.1, 0.15, 0.25, 0.5]])
    model.end_step(load, torch.tensor(False), parallel.reduce_mean(SimpleNamespace(ddp=True, device_type="cpu",
                                                                                  world_size=2)))
    results[rank] = model.moe_layers()[0].expert_bias.tolist()
    dist.destroy_process_group()


def test_aux_free_bias_is_the_same_on_every_rank():
    # the bias moves by the load of both ranks together (all-reduced): mean load [0.25, 0.225, 0.225, 0.3]
    results = fork_ranks(_aux_free_rank, 2)
    assert results[0] == results[1] == pytest.approx([0.0, 0.1, 0.1, -0.1])


def test_resume_two_ranks(dense_run, shakespeare_data, tmp_path):
    out, r = dense_run
    assert_ok(r)
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)  # the other tests keep reading the original
    r = torchrun(tmp_path, *TINY, *DENSE, *data_args(shakespeare_data), f"--out_dir={resumed}",
                 "--init_from=resume", "--max_iters=3", "--eval_interval=2")
    assert_ok(r)
    assert "random states" not in r.stdout  # each rank got its own saved generator back
    assert [rec["iter"] for rec in records(resumed, "train")] == [0, 1, 2]  # continued from iteration 2
    # and exactly as if never interrupted: step 3 drew each rank's next batches and used Adam's saved moments
    assert_same_as_one_process(resumed, steps=3)



# ============================================================================= expert parallel, forked ranks

# 8 experts, top-1, 5 tokens per rank: most experts get no token from a rank, some from no rank at all (and no
# expert's mean load over 2 or 4 ranks is exactly 1/8, where the aux-free bias's sign would hang on rounding)
EP_SHAPE = dict(block_size=5, vocab_size=32, n_layer=2, n_head=2, n_embd=16, n_experts=8, moe_top_k=1, moe_every=1,
             dropout=0.0, balance_mode="aux")
# (expert implementation, routing settings): both implementations, the step-wide balance loss (f counted over
# every rank's batch), and the aux-free bias (moved by the load of all ranks)
EP_VARIANTS = [("loop", {}), ("grouped", {}), ("loop", {"balance_scope": "global", "balance_loss_weight": 1.0}),
            ("grouped", {"balance_mode": "aux_free", "bias_update_rate": 0.1})]


def _ep_batches(world_size):
    g = torch.Generator().manual_seed(7)
    return [(torch.randint(0, 32, (1, 5), generator=g), torch.randint(0, 32, (1, 5), generator=g))
            for _ in range(world_size)]


def _ep_rank(rank, world_size, init_file, results, ep_size):
    join_gloo(rank, world_size, init_file)
    proc = SimpleNamespace(ddp=True, world_size=world_size, rank=rank, local_rank=rank, device_type="cpu",
                           sharding=("ep",))
    cfg = SimpleNamespace(fsdp=False, ep_size=ep_size)
    batches = _ep_batches(world_size)
    out = {}
    for impl, routing in EP_VARIANTS:
        torch.manual_seed(0)
        ref = MoEGPT(MoEConfig(**{**EP_SHAPE, **routing}, moe_impl=impl))
        model = MoEGPT(MoEConfig(**{**EP_SHAPE, **routing}, moe_impl=impl))
        model.load_state_dict(ref.state_dict())
        # the reference: one process, every rank's batch, the gradient DDP would average
        ref.start_step(batches, nullcontext(), one_process)
        ref_extra = None
        for r, (x, y) in enumerate(batches):
            logits, loss, extra = ref(x, y)
            ((loss + extra["aux_loss"]) / world_size).backward()
            if r == rank:
                ref_logits, ref_loss, ref_extra = logits.detach(), loss.detach(), extra
        ddp = parallel.shard(model, cfg, proc)
        model.start_step(batches[rank:rank + 1], nullcontext(), parallel.reduce_mean(proc))
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
        ref.end_step(torch.stack([ref(x)[2]["expert_load"] for x, _ in batches]).mean(0), False, one_process)
        model.end_step(extra["expert_load"].detach(), False, parallel.reduce_mean(proc))
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


@pytest.mark.parametrize("world_size, ep_size", [(2, 2), (4, 2)], ids=["ep2", "ep2xdp2"])
def test_expert_parallel_equals_unsharded(world_size, ep_size):
    results = fork_ranks(_ep_rank, world_size, ep_size)
    assert sorted(results) == list(range(world_size))
    # the case of experts without tokens really happened: on each rank, in each layer, some expert got none
    for rank_loads in results.values():
        assert all((load == 0).any(dim=-1).all() for load in rank_loads.values())


# ============================================================================= host syncs, forked ranks

# one optimizer step (train.train_step, 2 micro-steps, bf16 autocast) of a 2-layer MoE on 2 ranks
SYNC_SHAPE = dict(block_size=8, vocab_size=32, n_layer=2, n_head=2, n_embd=16, dropout=0.0, n_experts=8,
                  moe_top_k=2, moe_impl="grouped")
SYNC_CASES = {"ddp-aux_free": (dict(balance_mode="aux_free"), ()),
              "ddp-global-balance": (dict(balance_scope="global"), ()),
              "ep-capacity": (dict(capacity_factor=1.0), ("ep",))}


def _host_syncs_rank(rank, world_size, init_file, results):
    from torch.nn.parallel import DistributedDataParallel as DDP
    join_gloo(rank, world_size, init_file)
    out = {}
    for name, (routing, sharding) in SYNC_CASES.items():
        proc = SimpleNamespace(ddp=True, world_size=world_size, rank=rank, local_rank=rank, device_type="cpu",
                               sharding=sharding)
        torch.manual_seed(0)
        model = build_model({**SYNC_SHAPE, **routing})
        wrapped = parallel.shard(model, SimpleNamespace(fsdp=False, ep_size=2), proc) if sharding else DDP(model)
        optimizer = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        g = torch.Generator().manual_seed(rank)
        batches = [(torch.randint(0, 32, (2, 8), generator=g), torch.randint(0, 32, (2, 8), generator=g))
                   for _ in range(2)]
        sent, real = [], expert_parallel.all_to_all_single_autograd
        expert_parallel.all_to_all_single_autograd = lambda t, *a: sent.append(t.dtype) or real(t, *a)
        with HostSyncs() as syncs:
            for _ in range(2):  # the first step creates Adam's moments
                train_step(wrapped, model, optimizer, scaler, batches, torch.autocast("cpu", dtype=torch.bfloat16),
                           proc, 1.0)
        expert_parallel.all_to_all_single_autograd = real
        out[name] = (syncs.counts, sorted(set(map(str, sent))))
    results[rank] = out
    dist.destroy_process_group()


def test_a_training_step_waits_for_the_device_only_for_the_expert_parallel_splits():
    """Under DDP the step hooks' all-reduces (aux-free bias, global balance) stay on the device; expert
    parallel reads its all_to_all splits once per MoE layer per micro-step (torch's all_to_all takes Python
    ints) and sends the tokens in bf16 under bf16 autocast."""
    results = fork_ranks(_host_syncs_rank, 2)
    for rank in (0, 1):
        assert results[rank]["ddp-aux_free"] == ({}, [])
        assert results[rank]["ddp-global-balance"] == ({}, [])
        # 2 steps x 2 micro-steps x 2 MoE layers; rows there and back
        assert results[rank]["ep-capacity"] == ({"expert_parallel.py:__call__ tolist": 8}, ["torch.bfloat16"])


# ============================================================================= FSDP, forked ranks

SHAPES = {"dense": dict(block_size=8, vocab_size=32, n_layer=2, n_head=2, n_embd=16, dropout=0.0),
          "moe": dict(block_size=8, vocab_size=32, n_layer=2, n_head=2, n_embd=16, dropout=0.0, n_experts=8,
                      moe_top_k=1, balance_mode="aux_free", bias_update_rate=0.01, qk_norm=True),
          # f of the balance loss counted over the whole step, every micro-batch of both ranks
          "moe_global": dict(block_size=8, vocab_size=32, n_layer=2, n_head=2, n_embd=16, dropout=0.0, n_experts=4,
                             moe_top_k=2, balance_scope="global", balance_loss_weight=1.0)}
STEPS, ACCUM = 2, 2  # optimizer steps, micro-steps per rank


def _fsdp_batches(world_size):
    g = torch.Generator().manual_seed(3)
    return [[[(torch.randint(0, 32, (1, 8), generator=g), torch.randint(0, 32, (1, 8), generator=g))
              for _ in range(ACCUM)] for _ in range(world_size)] for _ in range(STEPS)]


def _train(model, optimizer, steps, proc, micro_batches, wrapped):
    """train.py's step (train_step) on this process's micro-batches of each step: -> the mean loss of each step."""
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    steps = [train_step(wrapped, model, optimizer, scaler, micro_batches(step), nullcontext(), proc, 1.0)
             for step in range(steps)]
    return [stats["loss"].item() for stats, _, _ in steps]


def _fsdp_rank(rank, world_size, init_file, results, ep_size):
    join_gloo(rank, world_size, init_file)
    sharding = ("fsdp", "ep") if ep_size > 1 else ("fsdp",)
    proc = SimpleNamespace(ddp=True, world_size=world_size, rank=rank, local_rank=rank, device_type="cpu",
                           dtype="float32", sharding=sharding)
    one = SimpleNamespace(ddp=False, world_size=1, sharding=(), device_type="cpu")
    batches = _fsdp_batches(world_size)
    out = {}
    for name, shape in SHAPES.items():
        if ep_size > 1 and name == "dense":
            continue  # expert parallel needs experts
        torch.manual_seed(0)
        ref = build_model(shape)
        model = build_model(shape)
        model.load_state_dict(ref.state_dict())
        ref_opt = configure_optimizers(ref, 0.1, 1e-3, (0.9, 0.95), "cpu")
        # one process: every rank's micro-batches as its micro-steps; its mean loss is the ranks' mean
        ref_losses = _train(ref, ref_opt, STEPS, one, lambda s: sum(batches[s], []), ref)
        parallel.shard(model, SimpleNamespace(fsdp=True, ep_size=ep_size), proc)
        opt = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
        # FSDP shards all but the expert-parallel experts, which stay this rank's plain share
        sharded = {k: hasattr(p, "to_local") for k, p in model.named_parameters()}
        assert sharded == {k: ep_size == 1 or ".mlp.experts." not in k for k in sharded}
        assert len(opt.param_groups) == (4 if ep_size > 1 else 2)  # a fused AdamW step per kind of tensor
        losses = _train(model, opt, STEPS, proc, lambda s: batches[s][rank], model)
        mean = torch.tensor(losses)
        dist.all_reduce(mean)
        torch.testing.assert_close(mean / world_size, torch.tensor(ref_losses), rtol=0, atol=1e-6)
        # Adam divides by sqrt(v) + 1e-8: for gradient entries near 1e-8 a rounding difference of the reduction
        # moves the update by ~1e-6; a missing or doubled micro-batch would move parameters by ~lr = 1e-3
        ref_state = ref.state_dict()
        for k, v in model.state_dict().items():
            full = v.full_tensor() if hasattr(v, "full_tensor") else v
            if ".mlp.experts." in k and ep_size > 1:  # this rank's share of the experts
                ep = model.moe_layers()[0].expert_parallel
                ref_state[k] = ref_state[k][ep.first:ep.first + ep.n_local]
            torch.testing.assert_close(full, ref_state[k], rtol=0, atol=1e-5, msg=lambda m: f"{name} {k}: {m}")
        # a step train.py skips (non-finite) changes nothing, with the fused AdamW deciding on DTensors
        local = parallel.local_tensor
        before = {k: local(v).clone() for k, v in model.state_dict().items()}
        adam = [local(s["exp_avg"]).clone() for s in opt.state.values()]
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        step_unless(torch.tensor(True), opt, torch.amp.GradScaler("cpu", enabled=False))
        assert all(torch.equal(local(v), before[k]) for k, v in model.state_dict().items())
        assert all(torch.equal(local(s["exp_avg"]), a) for s, a in zip(opt.state.values(), adam))
        if name == "moe":  # the aux-free bias moved, the same on every rank
            bias = model.moe_layers()[0].expert_bias
            every = [torch.empty_like(bias) for _ in range(world_size)]
            dist.all_gather(every, bias)
            assert all(torch.equal(b, every[0]) for b in every) and bias.abs().sum() > 0
        out[name] = True
    results[rank] = out
    dist.destroy_process_group()


@pytest.mark.parametrize("world_size, ep_size", [(2, 1), (4, 2)], ids=["fsdp2", "fsdp4-ep2"])
def test_fsdp_equals_one_process_with_accumulation(world_size, ep_size):
    results = fork_ranks(_fsdp_rank, world_size, ep_size)
    names = [name for name in SHAPES if ep_size == 1 or name != "dense"]
    assert dict(results) == {rank: {name: True for name in names} for rank in range(world_size)}


# ============================================================================= train.py under torchrun: FSDP, EP

def consolidated(out, dest="ckpt.pt", cli=False):
    """The sharded checkpoint as out/ckpt.pt (what the one-process reference reads): by `python -m
    tools.consolidate` (in this process), or by the function it calls."""
    if cli:
        r = run_script(["tools.consolidate", out, f"--dest={out / dest}"], cwd=out)
        assert_ok(r)
        assert f"wrote {out / dest}" in r.stdout
    else:
        consolidate(out, out / dest)
    return load_checkpoint(out / dest)


@pytest.fixture(scope="module")
def fsdp_moe_run(tmp_path_factory, shakespeare_data):
    """2 steps of an MoE (16 experts, top-1: most get no token on a rank) on 2 FSDP ranks."""
    out = tmp_path_factory.mktemp("fsdp") / "moe"
    r = torchrun(out.parent, *TINY, *MOE_SPARSE, *data_args(shakespeare_data), f"--out_dir={out}", "--max_iters=2",
                 "--eval_interval=2", "--fsdp=True")
    assert_ok(r)
    return out, r


def test_fsdp_train_py_equals_one_process(fsdp_moe_run, tmp_path):
    out, r = fsdp_moe_run
    assert "saved sharded checkpoint" in r.stdout
    assert sorted(os.listdir(out)) == [".lock", "ckpt-2.dcp", SHARDED, "metrics.jsonl"]
    copy = tmp_path / "copy"  # the fixture's out_dir stays as the run left it, for the resume tests
    shutil.copytree(out, copy, symlinks=True)
    consolidated(copy, cli=True)
    assert_same_as_one_process(copy)


def test_expert_parallel_train_py_stopped_and_resumed_equals_one_process(shakespeare_data, tmp_path):
    """2 steps on 2 ranks with the experts split over them, saved, resumed for a 3rd: the same as one process
    taking the 3 steps on both ranks' batches. So every random state (each rank's batches), Adam's state and
    the aux-free bias came back from the sharded checkpoint."""
    out = tmp_path / "ep"
    args = [*TINY, *MOE_SPARSE, *data_args(shakespeare_data), f"--out_dir={out}", "--eval_interval=2", "--ep_size=2",
            "--balance_mode=aux_free", "--bias_update_rate=0.01"]
    assert_ok(torchrun(tmp_path, *args, "--max_iters=2"))
    r = torchrun(tmp_path, *args, "--max_iters=3", "--init_from=resume")
    assert_ok(r)
    assert "random states" not in r.stdout
    consolidated(out)
    # expert parallel runs each expert's matmul on other rows than one process, which rounds differently
    assert_same_as_one_process(out, steps=3, moment_atol=1e-7)


@pytest.mark.parametrize("layout", [[], ["--ep_size=2"]], ids=["ddp", "ep2"])
def test_muon_two_ranks_equal_one_process_on_both_batches(shakespeare_data, tmp_path, layout):
    """optimizer='muon' under DDP (every rank orthogonalises the same all-reduced gradients) and expert
    parallel (each rank's experts are whole matrices: orthogonalised where they live), stopped after 2 steps
    and resumed for a 3rd: the same as one process taking Muon's 3 steps on both ranks' batches."""
    out = tmp_path / "muon"
    args = [*TINY, "--n_experts=4", "--moe_top_k=2", "--block_size=8", "--batch_size=2",
            "--gradient_accumulation_steps=4", *data_args(shakespeare_data), f"--out_dir={out}", "--eval_interval=2",
            "--optimizer=muon", "--muon_lr=2e-3", *layout]
    r = torchrun(tmp_path, *args, "--max_iters=2")
    assert_ok(r)
    assert "optimizer: muon" in r.stdout
    assert_ok(torchrun(tmp_path, *args, "--max_iters=3", "--init_from=resume"))
    if layout:
        consolidated(out)
    # Muon orthogonalises in bfloat16, through 5 Newton-Schulz steps each rounded to bfloat16: a float32
    # rounding difference of the gradient (~1e-9: the all-reduce's order; expert parallel's matmuls on other
    # rows) can flip roundings there and move an update entry by ~10%. The momentum buffers (gradients) agree
    # to 1e-5, and the weights differ from one process's by 2-3% of what the 3 steps moved them, on average
    # (measured); a missing or doubled micro-batch changes a step's gradient by a quarter or more.
    assert_same_as_one_process(out, steps=3, moment_atol=1e-5, param_atol=1e-3)
    ckpt = load_checkpoint(out / "ckpt.pt")
    torch.manual_seed(ckpt["config"]["seed"])
    initial = build_model(ckpt["model_args"]).state_dict()
    reference = reference_steps(ckpt, world_size=2, steps=3)[0].state_dict()
    for name, p in reference.items():
        moved, off = (p - initial[name]).abs().mean(), (ckpt["model"][name] - p).abs().mean()
        assert off < 0.05 * moved, (name, off, moved)


@pytest.mark.parametrize("nproc, layout", [(1, []), (4, ["--ep_size=2"])], ids=["w1", "w4-fsdp-ep2xdp2"])
def test_sharded_checkpoint_resumes_at_another_world_size(fsdp_moe_run, shakespeare_data, tmp_path, nproc, layout):
    """Saved by 2 FSDP ranks; loaded by one process, and by 4 FSDP ranks with the experts split in 2 (each
    half on 2 ranks):
    max_iters is where it stopped, so the resumed run only evaluates and saves what it loaded."""
    src, _ = fsdp_moe_run
    saved = consolidated(src, "saved.pt")
    out = tmp_path / "resumed"
    shutil.copytree(src, out, symlinks=True)
    args = [*TINY, *data_args(shakespeare_data), f"--out_dir={out}", "--init_from=resume", "--max_iters=2", *layout]
    if nproc == 1:
        r = run_script(["train.py", *args], cwd=tmp_path)
        assert_ok(r)
        assert not os.path.exists(out / SHARDED) and not list(out.glob("ckpt-*.dcp"))  # the newer ckpt.pt replaced it
        loaded = load_checkpoint(out / "ckpt.pt")
    else:
        r = torchrun(tmp_path, *args, nproc=nproc)
        assert_ok(r)
        loaded = consolidated(out, "loaded.pt")
    assert "random states for 2 processes" in r.stdout  # the batches differ from an uninterrupted run; it says so
    for k, v in saved["model"].items():
        assert torch.equal(loaded["model"][k], v), k
    for i, state in saved["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(loaded["optimizer"]["state"][i][k], v), (i, k)


def test_sigkill_during_sharded_saves_leaves_a_loadable_checkpoint(shakespeare_data, tmp_path):
    """A save every step, killed (-9, every process) after the 3rd: a step's save takes about a third of its
    time, so the kill often lands inside one. Then the states a kill can leave at each point of a save, made
    by hand: a half-written temporary folder, and a renamed folder the link does not point at yet."""
    out = tmp_path / "killed"
    args = [*TINY, *MOE_SPARSE, *data_args(shakespeare_data), f"--out_dir={out}", "--max_iters=50",
            "--eval_interval=100", "--save_interval=1", "--fsdp=True"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(REPO / "train.py"), *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    saves = 0
    for line in p.stdout:
        saves += line.startswith("saved sharded checkpoint")
        if saves == 3:
            # the ranks first (torchrun starts each in a process group of its own), then torchrun
            with open(f"/proc/{p.pid}/task/{p.pid}/children") as f:
                for pid in f.read().split():
                    os.kill(int(pid), signal.SIGKILL)
            p.kill()
            break
    p.wait()
    assert saves == 3
    target = os.readlink(out / SHARDED)
    iter_num = int(target.split("-")[1][:-len(".dcp")])
    (out / ".tmp-ckpt.dcp").mkdir(exist_ok=True)
    # a save writes its manifest first (files: null, completed at the end): what marks the folder as ours
    (out / ".tmp-ckpt.dcp" / "manifest.json").write_text('{"format": "nanoMoE sharded checkpoint", "files": null}')
    (out / ".tmp-ckpt.dcp" / "__0_0.distcp").write_bytes(b"half")
    shutil.copytree(out / target, out / f"ckpt-{iter_num + 1}.dcp")  # renamed, not linked yet: not the latest
    os.symlink(f"ckpt-{iter_num + 1}.dcp", out / ".tmp-ckpt.dcp.12345")  # the new link, before its rename
    # loadable: every tensor read back into one process (what a resume at any world size does)
    ckpt = consolidated(out, "loaded.pt")
    assert ckpt["iter_num"] == iter_num >= 3 and len(ckpt["rng"]) == 2
    # and the next run on out_dir (its lock taken, then started) clears what the cut-short saves left, keeping
    # the linked one
    lock = OutDirLock(out)
    lock.start()
    lock.close()
    assert sorted(p.name for p in out.glob("*.dcp")) == [target, SHARDED]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]


# ============================================================================= sharded checkpoints, first-class

# a Mixtral-style MoE (it exports), small enough for 2 CPU ranks; every sharded layout a 2-process run has
MIXTRAL = ["--bias=False", "--pos_emb=rope", "--norm=rmsnorm", "--mlp=swiglu", "--n_experts=4", "--moe_top_k=2",
           "--block_size=8", "--batch_size=1", "--gradient_accumulation_steps=2"]
SHARDED_LAYOUTS = {"fsdp": ["--fsdp=True"], "ep": ["--ep_size=2"], "fsdp-ep": ["--fsdp=True", "--ep_size=2"]}


@pytest.mark.parametrize("layout", SHARDED_LAYOUTS)
def test_sample_export_and_experts_read_a_sharded_checkpoint_directly(shakespeare_data, tmp_path, layout):
    """sample.py, tools.export and tools.experts read ckpt.dcp in one process, no consolidation step first, and
    give exactly what they give from the consolidated file."""
    out = tmp_path / "run"
    assert_ok(torchrun(tmp_path, *TINY, *MIXTRAL, *data_args(shakespeare_data), f"--out_dir={out}",
                       "--max_iters=2", "--eval_interval=2", *SHARDED_LAYOUTS[layout]))
    assert os.path.islink(out / SHARDED) and not (out / "ckpt.pt").exists()
    sample = ["--device=cpu", "--num_samples=2", "--max_new_tokens=12", "--seed=3"]
    direct = run_script(["sample.py", f"--out_dir={out}", *sample], cwd=tmp_path)
    assert_ok(direct)
    assert_ok(run_script(["tools.export", f"--out_dir={out}", f"--hf_dir={tmp_path / 'hf-direct'}"], cwd=tmp_path))
    assert_ok(run_script(["tools.experts", out, "--device=cpu", "--max_tokens=512"], cwd=tmp_path))
    assert (out / "experts" / "report.md").is_file()

    consolidated(out, "file.pt", cli=True)
    from_file = run_script(["sample.py", f"--out_dir={out}", "--ckpt=file.pt", *sample], cwd=tmp_path)
    assert direct.stdout == from_file.stdout and len(direct.stdout) > 24
    assert_ok(run_script(["tools.export", f"--out_dir={out}", "--ckpt=file.pt", f"--hf_dir={tmp_path / 'hf-file'}"],
                         cwd=tmp_path))
    names = sorted(os.listdir(tmp_path / "hf-direct"))
    assert names == sorted(os.listdir(tmp_path / "hf-file")) and "model.safetensors" in names
    for name in names:
        assert (tmp_path / "hf-direct" / name).read_bytes() == (tmp_path / "hf-file" / name).read_bytes(), name


def _flip_two_bytes(path):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid] ^= 0xFF
    data[mid + 1] ^= 0x01
    path.write_bytes(bytes(data))


def _shard(folder):
    return sorted(p for p in folder.iterdir() if p.suffix == ".distcp")[-1]


# what can happen to a saved sharded checkpoint, and the words of its one line
SHARD_DAMAGE = {
    "two-bytes-flipped": (lambda d: _flip_two_bytes(_shard(d)), ["__", ".distcp fails its SHA-256 check"]),
    "shard-missing": (lambda d: _shard(d).unlink(), ["is missing its file __", ".distcp"]),
    "shard-truncated": (lambda d: _shard(d).write_bytes(_shard(d).read_bytes()[:100]), ["truncated", ".distcp"]),
    "metadata-missing": (lambda d: (d / ".metadata").unlink(), ["is missing its file .metadata"]),
    "metadata-garbage": (lambda d: (d / ".metadata").write_bytes(os.urandom((d / ".metadata").stat().st_size)),
                         [".metadata fails its SHA-256 check"]),
    "meta-missing": (lambda d: (d / "meta.pt").unlink(), ["is missing its file meta.pt"]),
    "manifest-missing": (lambda d: (d / "manifest.json").unlink(), ["has no manifest.json"]),
    "manifest-garbage": (lambda d: (d / "manifest.json").write_text("{\"files\": 3"), ["manifest.json is damaged"]),
    "folder-missing": (lambda d: shutil.rmtree(d), ["is missing"]),
}


@pytest.mark.parametrize("damage", SHARD_DAMAGE)
def test_a_damaged_sharded_checkpoint_is_one_line_naming_the_file(fsdp_moe_run, shakespeare_data, tmp_path, damage):
    """Bytes changed on disk, a shard missing or cut short, a missing or garbage .metadata or manifest: every
    reader (a resume, sample.py, tools.consolidate) refuses in one line naming the file, before any weight is
    used (two flipped bytes used to resume silently with an Adam state of 9.5e+29)."""
    from conftest import assert_user_error, snapshot
    src, _ = fsdp_moe_run
    out = tmp_path / "run"
    shutil.copytree(src, out, symlinks=True)
    damage_fn, words = SHARD_DAMAGE[damage]
    damage_fn(out / os.readlink(out / SHARDED))
    before = snapshot(out)
    resume = run_script(["train.py", *TINY, *data_args(shakespeare_data), f"--out_dir={out}", "--init_from=resume",
                         "--max_iters=3"], cwd=tmp_path)
    assert_user_error(resume, *words)
    assert_user_error(run_script(["sample.py", f"--out_dir={out}", "--device=cpu"], cwd=tmp_path), *words)
    assert_user_error(run_script(["tools.consolidate", out], cwd=tmp_path), *words)
    assert snapshot(out) == before


def test_a_sharded_save_on_a_full_disk_is_one_line_and_leaves_no_temporary_folder(fsdp_moe_run, shakespeare_data,
                                                                                  tmp_path):
    """The disk fills while the ranks write their shards (simulated in the writer DCP calls): one error line from
    rank 0, the previous sharded checkpoint kept whole, no .tmp-ckpt.dcp left behind."""
    src, _ = fsdp_moe_run
    out = tmp_path / "run"
    shutil.copytree(src, out, symlinks=True)
    target = os.readlink(out / SHARDED)
    (tmp_path / "sitecustomize.py").write_text(
        "import errno, torch.distributed.checkpoint.filesystem as fs\n"
        "real = fs._write_item\n"
        "def full(*args, **kwargs):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "fs._write_item = full\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(tmp_path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "train.py"),
           *TINY, *data_args(shakespeare_data), f"--out_dir={out}", "--init_from=resume", "--max_iters=3",
           "--eval_interval=100", "--save_interval=1"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "the disk is full" in errors[0] and SHARDED in errors[0], r.stderr
    assert "Traceback" not in r.stdout, r.stdout
    assert os.readlink(out / SHARDED) == target and not (out / ".tmp-ckpt.dcp").exists()
    assert load_sharded_check(out)


def load_sharded_check(out):
    from nanomoe.distributed.checkpoint import read_sharded
    return read_sharded(str(out / SHARDED), needs=("tokenizer",))["iter_num"] == 2


@pytest.mark.parametrize("bad", [["--n_head=3"], ["--learning_rate=inf"], ["--init_from=resume"]],
                         ids=["model-setting", "non-finite", "nothing-to-resume"])
def test_a_bad_input_under_torchrun_is_our_error_line_once_without_our_traceback(shakespeare_data, tmp_path, bad):
    """Every rank meets the bad input; rank 0 alone prints the line. torchrun's own failure summary may follow
    (the README says so), but no traceback from our code."""
    r = torchrun(tmp_path, *TINY, *DENSE, *data_args(shakespeare_data), f"--out_dir={tmp_path / 'out'}",
                 "--max_iters=2", *bad)
    assert r.returncode != 0
    errors = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    assert f'File "{REPO}' not in r.stdout + r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_consolidating_on_a_full_disk_keeps_the_old_file_and_leaves_no_temporary_one(fsdp_moe_run, tmp_path,
                                                                                     monkeypatch, capsys):
    from conftest import run_main
    from tools import consolidate as tool
    src, _ = fsdp_moe_run
    out = tmp_path / "run"
    shutil.copytree(src, out, symlinks=True)
    (out / "consolidated.pt").write_bytes(b"the file from before")
    real_save = torch.save

    def save_half(obj, f, *args, **kwargs):
        f.write(b"x" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half)
    code, out_text, err = run_main(tool.main, [out, "--force"], capsys)
    monkeypatch.setattr(torch, "save", real_save)
    assert code == 2 and err.startswith("error: the disk is full") and len(err.strip().splitlines()) == 1, err
    assert (out / "consolidated.pt").read_bytes() == b"the file from before"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]
