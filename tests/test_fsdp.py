"""
FSDP2 (train.py --fsdp=True), expert parallel through train.py (--ep_size) and sharded checkpoints.

The in-process tests fork 2 gloo ranks and train with the pieces train.py uses (parallel.shard, accumulating,
clip_gradients, train.step_unless) against one process doing the same steps on both ranks' batches. The
torchrun tests run train.py the way a person would, compare with test_ddp's one-process reference, and
move a sharded checkpoint between world sizes and layouts.
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

import checkpoint
import parallel
from checkpoint import SHARDED, load_checkpoint, open_out_dir
from conftest import REPO, assert_ok, run, run_in_process
from model import build_model
from test_ddp import MOE_SPARSE, TINY, assert_same_as_one_process, data_args, torchrun

SHAPES = {"dense": dict(block_size=8, vocab_size=32, n_layer=2, n_head=2, n_embd=16, dropout=0.0),
          "moe": dict(block_size=8, vocab_size=32, n_layer=2, n_head=2, n_embd=16, dropout=0.0, n_experts=8,
                      moe_top_k=1, balance_mode="aux_free", bias_update_rate=0.01),
          # f of the balance loss counted over the whole step, every micro-batch of both ranks
          "moe_global": dict(block_size=8, vocab_size=32, n_layer=2, n_head=2, n_embd=16, dropout=0.0, n_experts=4,
                             moe_top_k=2, balance_scope="global", balance_loss_weight=1.0)}
STEPS, ACCUM = 2, 2  # optimizer steps, micro-steps per rank


def _batches(world_size):
    g = torch.Generator().manual_seed(3)
    return [[[(torch.randint(0, 32, (1, 8), generator=g), torch.randint(0, 32, (1, 8), generator=g))
              for _ in range(ACCUM)] for _ in range(world_size)] for _ in range(STEPS)]


def _train(model, optimizer, steps, proc, micro_batches, wrapped):
    """train.py's step, on this process's micro-batches of each step: -> the mean loss of each step."""
    from train import step_unless
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = []
    for step in range(steps):
        batches = micro_batches(step)
        model.start_step(batches, nullcontext(), proc)
        loads, total = [], 0.0
        for i, (x, y) in enumerate(batches):
            with parallel.accumulating(wrapped, i == len(batches) - 1 or not proc.ddp, proc):
                _, loss, extra = wrapped(x, y)
            ((loss + extra.get("aux_loss", 0)) / len(batches)).backward()
            total += loss.item() / len(batches)
            if "expert_load" in extra:
                loads.append(extra["expert_load"])
        parallel.sync_gradients(model, proc)
        parallel.clip_gradients(model, 1.0, proc)
        step_unless(torch.tensor(False), optimizer, scaler)
        optimizer.zero_grad(set_to_none=True)
        model.end_step(torch.stack(loads).mean(0) if loads else None, torch.tensor(False), proc)
        losses.append(total)
    return losses


def _fsdp_rank(rank, world_size, ep_size, init_file, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    sharding = ("fsdp", "ep") if ep_size > 1 else ("fsdp",)
    proc = SimpleNamespace(ddp=True, world_size=world_size, rank=rank, local_rank=rank, device_type="cpu",
                           dtype="float32", sharding=sharding)
    one = SimpleNamespace(ddp=False, world_size=1, sharding=())
    batches = _batches(world_size)
    out = {}
    for name, shape in SHAPES.items():
        if ep_size > 1 and name == "dense":
            continue  # expert parallel needs experts
        torch.manual_seed(0)
        ref = build_model(shape)
        model = build_model(shape)
        model.load_state_dict(ref.state_dict())
        ref_opt = ref.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
        # one process: every rank's micro-batches as its micro-steps; its mean loss is the ranks' mean
        ref_losses = _train(ref, ref_opt, STEPS, one, lambda s: sum(batches[s], []), ref)
        parallel.shard(model, SimpleNamespace(fsdp=True, ep_size=ep_size), proc)
        opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
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
        from train import step_unless
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
def test_fsdp_equals_one_process_with_accumulation(tmp_path, world_size, ep_size):
    results = mp.Manager().dict()
    # fork: the children start with this process's imports (spawn would import torch again in each)
    mp.start_processes(_fsdp_rank, args=(world_size, ep_size, str(tmp_path / "init"), results), nprocs=world_size,
                       start_method="fork")
    names = [name for name in SHAPES if ep_size == 1 or name != "dense"]
    assert dict(results) == {rank: {name: True for name in names} for rank in range(world_size)}


# ----------------------------------------------------------------------------- train.py under torchrun

def consolidate(out, dest="ckpt.pt", cli=False):
    """The sharded checkpoint as out/ckpt.pt (what test_ddp's reference reads): by `python checkpoint.py`, or
    (quicker, no torch start) by the function it calls."""
    if cli:
        r = run(["checkpoint.py", out, f"--dest={out / dest}"], cwd=out)
        assert f"wrote {out / dest}" in r.stdout
    else:
        checkpoint.consolidate(out, out / dest)
    return load_checkpoint(out / dest)


@pytest.fixture(scope="module")
def fsdp_moe_run(tmp_path_factory, shakespeare_data):
    """2 steps of an MoE (16 experts, top-1: most get no token on a rank) on 2 FSDP ranks."""
    out = tmp_path_factory.mktemp("fsdp") / "moe"
    r = torchrun(out.parent, *TINY, *MOE_SPARSE, *data_args(shakespeare_data), f"--out_dir={out}", "--max_iters=2",
                 "--eval_interval=2", "--fsdp=True")
    assert_ok(r)
    return out, r


@pytest.mark.slow
def test_fsdp_train_py_equals_one_process(fsdp_moe_run, tmp_path):
    out, r = fsdp_moe_run
    assert "saved sharded checkpoint" in r.stdout
    assert sorted(os.listdir(out)) == [".lock", "ckpt-2.dcp", SHARDED, "metrics.jsonl"]
    copy = tmp_path / "copy"  # the fixture's out_dir stays as the run left it, for the resume tests
    shutil.copytree(out, copy, symlinks=True)
    consolidate(copy, cli=True)
    assert_same_as_one_process(copy)


@pytest.mark.slow
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
    consolidate(out)
    # expert parallel runs each expert's matmul on other rows than one process, which rounds differently
    assert_same_as_one_process(out, steps=3, moment_atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("nproc, layout", [(1, []), (4, ["--ep_size=2"])], ids=["w1", "w4-fsdp-ep2xdp2"])
def test_sharded_checkpoint_resumes_at_another_world_size(fsdp_moe_run, shakespeare_data, tmp_path, nproc, layout):
    """Saved by 2 FSDP ranks; loaded by one process, and by 4 FSDP ranks with the experts split in 2 (each
    half on 2 ranks):
    max_iters is where it stopped, so the resumed run only evaluates and saves what it loaded."""
    src, _ = fsdp_moe_run
    saved = consolidate(src, "saved.pt")
    out = tmp_path / "resumed"
    shutil.copytree(src, out, symlinks=True)
    args = [*TINY, *data_args(shakespeare_data), f"--out_dir={out}", "--init_from=resume", "--max_iters=2", *layout]
    if nproc == 1:
        r = run(["train.py", *args], cwd=tmp_path)
        assert not os.path.exists(out / SHARDED) and not list(out.glob("ckpt-*.dcp"))  # the newer ckpt.pt replaced it
        loaded = load_checkpoint(out / "ckpt.pt")
    else:
        r = torchrun(tmp_path, *args, nproc=nproc)
        assert_ok(r)
        loaded = consolidate(out, "loaded.pt")
    assert "random states for 2 processes" in r.stdout  # the batches differ from an uninterrupted run; it says so
    for k, v in saved["model"].items():
        assert torch.equal(loaded["model"][k], v), k
    for i, state in saved["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(loaded["optimizer"]["state"][i][k], v), (i, k)


@pytest.mark.slow
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
    (out / ".tmp-ckpt.dcp" / "__0_0.distcp").write_bytes(b"half")
    shutil.copytree(out / target, out / f"ckpt-{iter_num + 1}.dcp")  # renamed, not linked yet: not the latest
    os.symlink(f"ckpt-{iter_num + 1}.dcp", out / ".tmp-ckpt.dcp.12345")  # the new link, before its rename
    # loadable: every tensor read back into one process (what a resume at any world size does)
    ckpt = consolidate(out, "loaded.pt")
    assert ckpt["iter_num"] == iter_num >= 3 and len(ckpt["rng"]) == 2
    # and the next run on out_dir clears what the cut-short saves left, keeping the linked one
    open_out_dir(out).close()
    assert sorted(p.name for p in out.glob("*.dcp")) == [target, SHARDED]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_consolidate_without_a_sharded_checkpoint(tmp_path, capsys):
    code, _, err = run_in_process(checkpoint.main, [tmp_path], capsys)
    # the other bad inputs: tests/test_reliability.py
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "has no sharded checkpoint (ckpt.dcp)" in err
