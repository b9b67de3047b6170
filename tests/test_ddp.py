"""
train.py under torchrun: two CPU processes (gloo) on a tiny char dataset, run the way a person would run them.

The equivalence tests are the heart of it: two ranks, each drawing its own batches, must take exactly the
optimizer steps that one process takes when it is fed both ranks' batches as its micro-steps. The reference
below is that one process, written out plainly (same initial weights, same batches, loss / accumulation steps,
clip, AdamW); its parameters must match the 2-rank run's checkpoint.
"""
import os
import shutil
import subprocess
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from batches import TokenData
from checkpoint import load_checkpoint
from conftest import REPO, assert_ok, read_metrics
from model import build_model

pytestmark = pytest.mark.slow  # torchrun processes: `pytest -m 'not slow'` skips it for a quick loop

TINY = ["--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32", "--eval_iters=2",
        "--decay_lr=False", "--dropout=0.0"]
DENSE = ["--block_size=32", "--batch_size=4", "--gradient_accumulation_steps=4"]
# 8 tokens per micro-step cannot reach 16 experts with top-1 routing: on every rank, in every backward, at
# least half the experts get no token, and DDP must still find a gradient for all their weights
MOE_SPARSE = ["--n_experts=16", "--moe_top_k=1", "--block_size=8", "--batch_size=1",
              "--gradient_accumulation_steps=4"]


def torchrun(cwd, *args, nproc=2):
    """train.py under torchrun; --standalone picks a free port for the rendezvous."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # torchrun's default, without its banner
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "train.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=150,
                          stdin=subprocess.DEVNULL)


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


@pytest.fixture(scope="module")
def moe_global_run(runs_dir, shakespeare_data):
    # top-2 of 4: the global-batch balance loss with a weight that makes its gradient visible
    return train_2ranks(runs_dir, shakespeare_data, "moe_global",
                        ["--n_experts=4", "--moe_top_k=2", "--block_size=8", "--batch_size=2",
                         "--gradient_accumulation_steps=4", "--balance_scope=global", "--balance_loss_weight=1.0"])


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
    optimizer = model.configure_optimizers(c["weight_decay"], c["learning_rate"], (c["beta1"], c["beta2"]), "cpu")
    data = TokenData(c["data_root"], c["dataset"], ckpt["model_args"]["block_size"])
    gens = [torch.Generator().manual_seed(c["seed"] + rank) for rank in range(world_size)]
    accum = c["gradient_accumulation_steps"]
    one_process = SimpleNamespace(ddp=False)
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


def assert_same_as_one_process(out_dir, steps=2, moment_atol=1e-9):
    """moment_atol: expert parallel runs each expert's matmul on other rows than one process does, which rounds
    differently (float32 matmul results depend on the batch's size): Adam's moments then agree to ~1e-8."""
    ckpt = load_checkpoint(out_dir / "ckpt.pt")
    assert ckpt["iter_num"] == steps
    model, optimizer, losses, loads = reference_steps(ckpt, world_size=2, steps=steps)
    # Adam's first moment is a running mean of the synced (all-reduced, clipped) gradients: they agree up to
    # float32 rounding (the all-reduce adds the micro-batches' gradients in another order)
    ref_state = optimizer.state_dict()["state"]
    for i, state in ckpt["optimizer"]["state"].items():
        torch.testing.assert_close(state["exp_avg"], ref_state[i]["exp_avg"], rtol=1e-4, atol=moment_atol)
    # the parameters too, a little less tightly: Adam divides by sqrt(v) + 1e-8, so for a gradient entry near
    # 1e-8 (idle experts have some) a 1e-10 rounding difference moves the update by ~1e-6. A missing or doubled
    # micro-batch would move parameters by ~lr = 6e-4.
    ref = model.state_dict()
    assert ref.keys() == ckpt["model"].keys()
    for name, p in ref.items():
        torch.testing.assert_close(ckpt["model"][name], p, rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")
    logged = [rec["loss"] for rec in records(out_dir, "train")]
    assert logged == pytest.approx(losses, abs=1e-5)  # the log shows the mean over both ranks
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


def test_global_balance_loss_two_ranks_equal_one_process_on_both_batches(moe_global_run):
    # f counted over all 4 micro-batches of both ranks (all-reduced), P per micro-batch: the same gradient as one
    # process computing the balance loss over the union of the batches
    out, r = moe_global_run
    assert_ok(r)
    assert load_checkpoint(out / "ckpt.pt")["config"]["gradient_accumulation_steps"] == 4
    assert_same_as_one_process(out)


def test_hybrid_two_ranks_equal_one_process_on_both_batches(runs_dir, shakespeare_data):
    """A Mamba2 layer (layer 0; block 10 = chunks of 4, the last padded) before an attention layer, MoE FFNs:
    DDP all-reduces the Mamba2 parameters' gradients like any other's."""
    out, r = train_2ranks(runs_dir, shakespeare_data, "hybrid",
                          ["--n_experts=4", "--moe_top_k=2", "--block_size=10", "--batch_size=2",
                           "--gradient_accumulation_steps=4", "--mamba_layers=[0]", "--mamba2_num_heads=4",
                           "--mamba2_head_dim=16", "--mamba2_state_size=8", "--mamba2_chunk_size=4"])
    assert_ok(r)
    assert "transformer.h.0.mamba.A_log" in load_checkpoint(out / "ckpt.pt")["model"]
    assert_same_as_one_process(out)


def _aux_free_rank(rank, init_file, results):
    import torch.distributed as dist
    from moe_model import MoEConfig, MoEGPT
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = MoEGPT(MoEConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8, n_experts=4,
                             balance_mode="aux_free", bias_update_rate=0.1))
    # each rank saw different tokens: rank 0's load leans to expert 0, rank 1's to expert 3
    load = torch.tensor([[0.4, 0.3, 0.2, 0.1]]) if rank == 0 else torch.tensor([[0.1, 0.15, 0.25, 0.5]])
    model.end_step(load, torch.tensor(False), SimpleNamespace(ddp=True, device_type="cpu", world_size=2))
    results[rank] = model.moe_layers()[0].expert_bias.tolist()
    dist.destroy_process_group()


def test_aux_free_bias_is_the_same_on_every_rank(tmp_path):
    # the bias moves by the load of both ranks together (all-reduced): mean load [0.25, 0.225, 0.225, 0.3]
    import torch.multiprocessing as mp
    results = mp.Manager().dict()
    mp.spawn(_aux_free_rank, args=(str(tmp_path / "init"), results), nprocs=2)
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


def test_accumulation_not_divisible_by_world_size(shakespeare_data, tmp_path):
    r = torchrun(tmp_path, *TINY, *DENSE, *data_args(shakespeare_data), f"--out_dir={tmp_path / 'out'}",
                 "--gradient_accumulation_steps=3")
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: gradient_accumulation_steps=3 is not divisible by the world size 2 "
                      "(use a multiple of 2)"] * 2, r.stderr  # one line from each rank
    # torchrun prints its own summary (with its own traceback); none comes from train.py
    assert "train.py\", line" not in r.stderr and "[rank" not in r.stderr, r.stderr
