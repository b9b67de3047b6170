"""
Reliability and security: what a run does when it is killed, stopped, fed bad input or handed a hostile file.

The scripts run the way a person runs them, on a tiny char dataset in a scratch folder: as subprocesses where
a signal or a kill is the point, in this process (conftest.run_script) where a torch start per case would
cost more than the case. The tests check exit codes, the one-line errors, the files left on disk and the
trained parameters bit for bit.
"""
import errno
import io
import json
import os
import shutil
import signal
import sys

import pytest
import torch

import conftest
import model as model_module
import train
from conftest import (assert_ok, assert_same_tensors, assert_user_error, kill_after_saves, read_lines_until,
                      read_metrics, run, run_script, snapshot, start)
from model import GPT, GPTConfig
from nanomoe import checkpoint, metrics
from nanomoe.cli import run_cli
from nanomoe.errors import UserError


def train_args(shakespeare_data, out_dir, *extra):
    return conftest.train_args(shakespeare_data, out_dir, "--batch_size=4", *extra)


def assert_finite(ckpt):
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.fixture(scope="module")
def trained(shakespeare_data, tmp_path_factory):
    """The out_dir of a finished 4-iteration run: ckpt.pt, best.pt, metrics.jsonl."""
    out = tmp_path_factory.mktemp("rel-trained") / "out"
    assert_ok(run_script(train_args(shakespeare_data, out, "--max_iters=4", "--eval_interval=2"), cwd=out.parent))
    return out


# ----------------------------------------------------------------------------- kill -9 and resume

# (settings, saves after which to kill each attempt, state that must have moved): runs whose every random
# state, optimizer and buffer a resume must restore. dropout > 0 makes a test fail if any random state is not
# restored; 2 micro-steps per step, router jitter, the aux-free bias (a buffer that moves every step) with
# QK-norm and a first dense layer, MLA and F-gram, a Mamba2 layer
MAMBA = ["--mamba_layers=[0]", "--mamba2_num_heads=4", "--mamba2_head_dim=16", "--mamba2_state_size=8",
         "--mamba2_chunk_size=8", "--mamba2_expand=2"]
RESUMED_RUNS = {
    "dense": (["--max_iters=12", "--eval_interval=4", "--dropout=0.1", "--learning_rate=1e-2", "--warmup_iters=2",
               "--lr_decay_iters=12", "--gradient_accumulation_steps=2"], [3, 4], "lm_head.weight"),
    "moe": (["--max_iters=8", "--eval_interval=4", "--n_experts=4", "--moe_top_k=2", "--dropout=0.1",
             "--router_jitter=0.1", "--learning_rate=1e-2", "--router_score=sigmoid", "--balance_mode=aux_free",
             "--bias_update_rate=0.01", "--qk_norm=True", "--first_dense_layers=1"], [3],
            "transformer.h.1.mlp.expert_bias"),
    "mla-fgram": (["--max_iters=6", "--eval_interval=3", "--attn=mla", "--kv_latent_dim=16", "--d_rope=8",
                   "--q_latent_dim=16", "--fgram_max_n=3", "--fgram_buckets=256", "--dropout=0.1"], [2],
                  "transformer.fgram.tables.1"),
    "hybrid-moe": (["--max_iters=6", "--eval_interval=3", "--n_experts=4", "--moe_top_k=2", "--attn=mla",
                    "--kv_latent_dim=16", "--d_rope=8", "--pos_emb=rope", "--dropout=0.1", "--block_size=20",
                    *MAMBA], [3], "transformer.h.0.mamba.A_log"),
    # Muon's momentum buffers (experts' stacked ones too) and the AdamW state beside them; 2 micro-steps, clipped
    "moe-muon": (["--max_iters=8", "--eval_interval=4", "--n_experts=4", "--moe_top_k=2", "--dropout=0.1",
                  "--optimizer=muon", "--muon_lr=0.02", "--gradient_accumulation_steps=2", "--grad_clip=0.5",
                  "--warmup_iters=2", "--lr_decay_iters=8"], [2, 3], "transformer.h.1.mlp.experts.c_proj"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", RESUMED_RUNS)
def test_killed_and_resumed_run_ends_bit_identical_to_one_left_alone(shakespeare_data, tmp_path, name):
    """A run saving every step, killed with SIGKILL after its n-th save (once or twice) and resumed each time,
    ends with exactly the parameters and optimizer state of the same run left alone, and a log that holds
    each iteration once, as if it had never stopped. The killed runs are processes of their own; the run left
    alone and the last resume run in this process (the same computation, a torch start less each)."""
    settings, kills, moved = RESUMED_RUNS[name]
    args = [*settings, "--save_interval=1"]
    assert_ok(run_script(train_args(shakespeare_data, tmp_path / "straight", *args), cwd=tmp_path))
    out = tmp_path / "killed"
    killed = train_args(shakespeare_data, out, *args)
    kill_points = []
    for i, n_saves in enumerate(kills):
        kill_after_saves(killed + (["--init_from=resume"] if i else []), tmp_path, n_saves)
        kill_points.append(torch.load(out / "ckpt.pt", weights_only=True)["iter_num"])
    max_iters = int(settings[0].split("=")[1])
    assert 0 < kill_points[0] and kill_points == sorted(set(kill_points)) and kill_points[-1] < max_iters
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "iter": 9, "lo')  # a record torn by the kill must not break the resume
    assert_ok(run_script([*killed, "--init_from=resume"], cwd=tmp_path))

    a = checkpoint.load_checkpoint(tmp_path / "straight" / "ckpt.pt")
    b = checkpoint.load_checkpoint(out / "ckpt.pt")
    assert a["iter_num"] == b["iter_num"] == max_iters
    assert_same_tensors(a["model"], b["model"], f"model after kills at {kill_points}")
    for i, state in a["optimizer"]["state"].items():
        assert_same_tensors(state, b["optimizer"]["state"][i], f"optimizer state {i}")
    assert a["model"][moved].abs().sum() > 0  # the case's own state is there, and moved (and matched above)
    assert [m["iter"] for m in read_metrics(out) if m["type"] == "train"] == list(range(max_iters))
    evals = [m for m in read_metrics(out) if m["type"] == "eval" and m["iter"] > 0]
    assert checkpoint.load_checkpoint(out / "best.pt")["best_val_loss"] == min(m["val_loss"] for m in evals)


# ----------------------------------------------------------------------------- crash while saving

def small_checkpoint(value):
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))
    torch.nn.init.constant_(model.lm_head.weight, value)
    return {**checkpoint.model_state(model), "iter_num": int(value)}


@pytest.mark.parametrize("crash", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "interrupt"])
def test_crash_in_the_middle_of_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, crash):
    path = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint(small_checkpoint(1.0), path)
    real_save = torch.save

    def half_save(obj, f, *args, **kwargs):
        """torch.save that dies halfway: half of the bytes reach the file, then the crash."""
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
        f.flush()
        raise crash

    monkeypatch.setattr(torch, "save", half_save)
    expected = UserError if isinstance(crash, OSError) else type(crash)  # a full disk is a message
    with pytest.raises(expected):
        checkpoint.save_checkpoint(small_checkpoint(2.0), path)
    (tmp_path / "first").mkdir()
    with pytest.raises(expected):
        checkpoint.save_checkpoint(small_checkpoint(2.0), tmp_path / "first" / "ckpt.pt")
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "first"]  # no temp file left behind
    assert os.listdir(tmp_path / "first") == []  # a first save that crashes leaves nothing
    ckpt = checkpoint.load_checkpoint(path)
    assert ckpt["iter_num"] == 1
    assert torch.equal(ckpt["model"]["lm_head.weight"], torch.full((16, 8), 1.0))


# ----------------------------------------------------------------------------- signals

def test_resume_removes_the_temporary_file_of_a_save_that_was_killed(trained, shakespeare_data, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    stale = out / ".tmp-ckpt.pt1a2b3c"
    stale.write_bytes(b"half a checkpoint")
    assert_ok(run_script(train_args(shakespeare_data, out, "--init_from=resume", "--max_iters=5", "--eval_interval=2"),
                         cwd=tmp_path))
    assert not stale.exists()
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 5


@pytest.mark.slow  # two runs stopped by signals
def test_sigint_saves_says_where_and_exits_0_and_a_second_signal_quits_at_once(shakespeare_data, tmp_path):
    # two runs side by side: one gets SIGINT, the other SIGINT and at once SIGTERM
    forever = ["--max_iters=100000", "--eval_interval=100000"]
    out = tmp_path / "out"
    graceful = start(train_args(shakespeare_data, out, *forever), cwd=tmp_path)
    hurried = start(train_args(shakespeare_data, tmp_path / "hurried", *forever), cwd=tmp_path)
    read_lines_until(graceful, "iter 2/")
    graceful.send_signal(signal.SIGINT)
    read_lines_until(hurried, "iter 2/")
    hurried.send_signal(signal.SIGINT)
    hurried.send_signal(signal.SIGTERM)
    rest, _ = graceful.communicate(timeout=60)
    hurried_rest, _ = hurried.communicate(timeout=60)

    assert graceful.returncode == 0, rest
    assert "Traceback" not in rest
    assert f"saved checkpoint to {out / 'ckpt.pt'}" in rest
    assert f"--init_from=resume --out_dir={out}" in rest
    stopped_at = int(rest.split("stopped at iter ")[1].split(";")[0])
    ckpt = checkpoint.load_checkpoint(out / "ckpt.pt")
    assert ckpt["iter_num"] == stopped_at >= 3

    assert hurried.returncode == 130, hurried_rest
    assert "stopped at iter" not in hurried_rest


# ----------------------------------------------------------------------------- non-finite losses

def train_in_process(args, monkeypatch, capsys):
    """train.main() in this process (so a test can patch what it calls), as `python train.py args` would
    run it: -> (exit code, stdout + stderr). The signal handlers it installs are put back afterwards."""
    monkeypatch.setattr(sys, "argv", [str(a) for a in args])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    code = 0
    try:
        run_cli(train.main)
    except SystemExit as e:
        code = e.code
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    out = capsys.readouterr()
    return code, out.out + out.err


# ----------------------------------------------------------------------------- the run's folder and its lock

def test_a_run_started_while_another_ends_does_not_overwrite_its_checkpoint(trained, shakespeare_data, tmp_path,
                                                                          monkeypatch, capsys):
    """Run A holds out_dir's lock and has no checkpoint yet; run B, a new run on the same out_dir, starts. While
    B loads its data, A saves its checkpoint and ends. B must stop at the lock, having read nothing of the folder
    before it (it used to pass the "a checkpoint exists" check first, then take the freed lock and overwrite
    A's checkpoint)."""
    out = tmp_path / "out"
    out.mkdir()
    a = checkpoint.OutDirLock(str(out))  # run A, training
    real_data = train.TokenData

    def a_saves_and_ends(*args, **kwargs):
        shutil.copy(trained / "ckpt.pt", out / "ckpt.pt")
        a.close()
        return real_data(*args, **kwargs)

    monkeypatch.setattr(train, "TokenData", a_saves_and_ends)
    code, output = train_in_process(train_args(shakespeare_data, out, "--max_iters=2"), monkeypatch, capsys)
    a.close()
    assert code == 2 and output.strip().splitlines() == [output.strip()], output
    assert output.startswith("error: out_dir") and "is in use by another train.py" in output, output
    assert sorted(os.listdir(out)) == [".lock"]  # B wrote nothing (A, still running, has not saved yet)


def test_a_resume_while_another_run_holds_the_lock_is_one_line(trained, shakespeare_data, tmp_path):
    """A single-process resume while a (torchrun) run trains in the folder: the lock refuses it before it reads
    the checkpoint the other run is rewriting; the folder is untouched."""
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    other = checkpoint.OutDirLock(str(out))  # the torchrun run's rank 0
    before = snapshot(out)
    r = run_script(train_args(shakespeare_data, out, "--init_from=resume", "--max_iters=6"), cwd=tmp_path)
    assert_user_error(r, "is in use by another train.py", f"pid {os.getpid()}")
    assert snapshot(out) == before
    other.close()


def test_a_refused_new_run_leaves_no_folder_behind(shakespeare_data, tmp_path):
    """The lock is taken before the checks; a run refused after it removes the folders it created."""
    out = tmp_path / "new" / "deeper" / "out"
    r = run_script(train_args(shakespeare_data, out, "--n_head=3"), cwd=tmp_path)
    assert_user_error(r, "n_head=3")
    assert os.listdir(tmp_path) == []


def _sharded_folder(path, ours):
    """A folder named like a sharded checkpoint: ours carries save_sharded's manifest, a user's does not."""
    path.mkdir()
    (path / "notes.txt").write_text("a user's file")
    if ours:
        (path / checkpoint.MANIFEST).write_text(json.dumps({"format": checkpoint.MANIFEST_FORMAT, "files": None}))


def test_resume_removes_only_the_sharded_folders_its_saves_made(trained, shakespeare_data, tmp_path):
    """An unsharded resume clears what killed sharded saves left (their folders carry our manifest), and keeps
    a user's own folders that merely look like them."""
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    for name, ours in [("ckpt-5.dcp", False), (".tmp-ckpt.dcp", False), ("ckpt-7.dcp", True), ("ckpt-8-1.dcp", True)]:
        _sharded_folder(out / name, ours)
    assert_ok(run_script(train_args(shakespeare_data, out, "--init_from=resume", "--max_iters=5",
                                    "--eval_interval=2"), cwd=tmp_path))
    assert (out / "ckpt-5.dcp" / "notes.txt").exists() and (out / ".tmp-ckpt.dcp" / "notes.txt").exists()
    assert not (out / "ckpt-7.dcp").exists() and not (out / "ckpt-8-1.dcp").exists()


def test_ctrl_c_during_a_long_evaluation_abandons_it_within_a_batch(trained, shakespeare_data, tmp_path, monkeypatch,
                                                                    capsys):
    """A signal during an evaluation of 100,000 batches per split (a resumed run's first, at iter 4): the eval
    stops after the batch it arrives in and records nothing, the run saves where it is, says how to continue
    and ends 0."""
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    records = read_metrics(out)
    real_forward, real_evaluate, eval_batches = model_module.GPT.forward, train.evaluate, []

    def evaluate(run):
        eval_batches.append(0)  # counts from here
        return real_evaluate(run)

    def forward(self, idx, targets=None):
        if eval_batches:
            eval_batches.append(1)
            if len(eval_batches) == 4:  # the 3rd batch
                os.kill(os.getpid(), signal.SIGINT)
        return real_forward(self, idx, targets)

    monkeypatch.setattr(train, "evaluate", evaluate)
    monkeypatch.setattr(model_module.GPT, "forward", forward)
    code, output = train_in_process(train_args(shakespeare_data, out, "--init_from=resume", "--max_iters=8",
                                               "--eval_iters=100000"), monkeypatch, capsys)
    assert code == 0, output
    assert len(eval_batches) == 4  # the batch the signal arrived in was the last
    assert "evaluation abandoned after 3 of 100000 train batches" in output
    assert "saved checkpoint" in output and "stopped at iter 4; continue with --init_from=resume" in output
    assert checkpoint.load_checkpoint(out / "ckpt.pt")["iter_num"] == 4
    assert read_metrics(out) == [r for r in records if r["iter"] < 4]  # none of the abandoned eval (the resume
    # dropped the old run's records from iter 4 on: it redoes them)


def test_a_run_ends_with_a_summary_line_whose_sample_command_works(trained, tmp_path, shakespeare_data):
    out = tmp_path / "out"
    r = run_script(train_args(shakespeare_data, out, "--max_iters=2", "--eval_interval=2"), cwd=tmp_path)
    assert_ok(r)
    last = r.stdout.strip().splitlines()[-1]
    best = min(rec["val_loss"] for rec in read_metrics(out) if rec["type"] == "eval")
    assert last.startswith(f"done: best val loss {best:.4f}, ") and f"checkpoint {out / 'ckpt.pt'};" in last, last
    command = last.split("sample it: ")[1].split()
    assert command[:2] == ["python", "sample.py"]
    assert_ok(run_script([*command[1:], "--device=cpu", "--num_samples=1", "--max_new_tokens=4"], cwd=tmp_path))


def train_with_nan_losses(args, nan_iters, monkeypatch, capsys):
    """train_in_process with the training loss made NaN at the iterations in nan_iters (the forward pass
    reads the iteration from get_lr, which the loop calls once per iteration first)."""
    it = [None]
    real_get_lr, real_forward = train.get_lr, model_module.GPT.forward

    def get_lr(i, cfg):
        it[0] = i
        return real_get_lr(i, cfg)

    def forward(self, idx, targets=None):
        logits, loss, extra = real_forward(self, idx, targets)
        if self.training and it[0] in nan_iters:
            loss = loss * float("nan")
        return logits, loss, extra

    monkeypatch.setattr(train, "get_lr", get_lr)
    monkeypatch.setattr(model_module.GPT, "forward", forward)
    return train_in_process(args, monkeypatch, capsys)


def test_nan_steps_are_skipped_counted_and_too_many_stop_the_run(shakespeare_data, tmp_path, monkeypatch, capsys):
    # one NaN step is skipped and the run finishes
    code, out = train_with_nan_losses(train_args(shakespeare_data, tmp_path / "once", "--max_iters=6",
                                                 "--eval_interval=100"), {3}, monkeypatch, capsys)
    assert code == 0, out
    assert "iter 3: non-finite loss or gradient, update skipped (1 in a row, 1 in total)" in out
    skips = [m for m in read_metrics(tmp_path / "once") if m["type"] == "skip"]
    assert [(m["iter"], m["nonfinite_total"]) for m in skips] == [(3, 1)]
    ckpt = checkpoint.load_checkpoint(tmp_path / "once" / "ckpt.pt")
    assert ckpt["iter_num"] == 6
    assert_finite(ckpt)
    # the skipped step changed nothing: Adam counted 5 steps for the 6 iterations
    assert all(state["step"] == 5 for state in ckpt["optimizer"]["state"].values())

    # two in a row with max_nonfinite_steps=2 stop the run
    code, out = train_with_nan_losses(train_args(shakespeare_data, tmp_path / "twice", "--max_iters=8",
                                                 "--eval_interval=100", "--save_interval=1", "--max_nonfinite_steps=2"),
                                      {3, 4}, monkeypatch, capsys)
    assert code not in (0, 2), out
    assert "error: 2 non-finite steps in a row; stopping" in out
    ckpt = checkpoint.load_checkpoint(tmp_path / "twice" / "ckpt.pt")  # the last good checkpoint
    assert ckpt["iter_num"] == 4  # saved after the skipped iteration 3, not after 4
    assert_finite(ckpt)


def test_a_skipped_muon_step_changes_nothing(shakespeare_data, tmp_path, monkeypatch, capsys):
    """optimizer='muon' has no fused found_inf input: the flag is read on the host and the step not taken. A
    run of 4 iterations whose last one is NaN ends with exactly the weights, Muon momentum buffers and AdamW
    moments of a run of the same 3 good iterations."""
    muon = ["--optimizer=muon", "--muon_lr=0.02", "--n_experts=4", "--moe_top_k=2", "--eval_interval=100"]
    code, out = train_in_process(train_args(shakespeare_data, tmp_path / "three", *muon, "--max_iters=3"),
                                 monkeypatch, capsys)
    assert code == 0, out
    code, out = train_with_nan_losses(train_args(shakespeare_data, tmp_path / "four", *muon, "--max_iters=4"), {3},
                                      monkeypatch, capsys)
    assert code == 0, out
    assert "iter 3: non-finite loss or gradient, update skipped" in out
    a = checkpoint.load_checkpoint(tmp_path / "three" / "ckpt.pt")
    b = checkpoint.load_checkpoint(tmp_path / "four" / "ckpt.pt")
    assert_same_tensors(a["model"], b["model"], "model")
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, state in a["optimizer"]["state"].items():
        assert_same_tensors(state, b["optimizer"]["state"][i], f"optimizer state {i}")
    assert any("momentum_buffer" in s for s in a["optimizer"]["state"].values())


def test_accumulation_not_divisible_by_the_world_size(shakespeare_data, tmp_path, monkeypatch):
    """What each rank of a 2-process torchrun says (torchrun sets these variables): one line, before anything
    is written or any process group is joined."""
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    r = run_script(train_args(shakespeare_data, tmp_path / "out", "--gradient_accumulation_steps=3"), cwd=tmp_path)
    assert_user_error(r, "gradient_accumulation_steps=3 is not divisible by the world size 2 (use a multiple of 2)")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- one run per out_dir, faults

@pytest.mark.slow  # a run stopped by a signal
def test_a_second_run_on_a_busy_out_dir_is_refused_and_sighup_saves(shakespeare_data, tmp_path):
    """Two train.py on one out_dir: the second is refused with one line naming the first, and writes
    nothing; SIGHUP (a closed terminal) stops the first like SIGTERM, saving; then the out_dir is free."""
    out = tmp_path / "out"
    first = start(train_args(shakespeare_data, out, "--max_iters=100000", "--eval_interval=100000"), cwd=tmp_path)
    read_lines_until(first, "iter 1/")
    second = run_script(train_args(shakespeare_data, out, "--eval_only=True"), cwd=tmp_path)
    assert_user_error(second, "in use by another train.py", f"pid {first.pid}")
    assert sorted(os.listdir(out)) == [".lock", "metrics.jsonl"]  # the second run wrote nothing
    assert [r["type"] for r in read_metrics(out)].count("eval") == 1  # the first run's own iter-0 eval
    first.send_signal(signal.SIGHUP)
    rest, _ = first.communicate(timeout=60)
    assert first.returncode == 0 and "SIGHUP received" in rest and "saved checkpoint" in rest, rest
    stopped_at = checkpoint.load_checkpoint(out / "ckpt.pt")["iter_num"]
    assert_ok(run_script(train_args(shakespeare_data, out, "--init_from=resume", f"--max_iters={stopped_at + 1}"),
                         cwd=tmp_path))


@pytest.mark.slow  # a subprocess whose reader goes away
def test_a_closed_stdout_pipe_does_not_stop_the_run(shakespeare_data, tmp_path):
    """`train.py | head -1`: the reader goes away after one line; the run goes on and saves."""
    out = tmp_path / "out"
    p = start(train_args(shakespeare_data, out, "--max_iters=30", "--eval_interval=30"), cwd=tmp_path)
    p.stdout.readline()
    p.stdout.close()
    assert p.wait(timeout=120) == 0
    assert checkpoint.load_checkpoint(out / "ckpt.pt")["iter_num"] == 30


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc to see when torch is being loaded")
def test_ctrl_c_while_starting_exits_quietly(tmp_path):
    p = start(["train.py", "--device=cpu"], cwd=tmp_path)
    maps = f"/proc/{p.pid}/maps"
    while p.poll() is None and "torch" not in open(maps).read():  # wait until `import torch` is under way
        pass
    p.send_signal(signal.SIGINT)
    output, _ = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in output, output


def test_disk_full_during_a_save_is_one_line_and_keeps_the_last_checkpoint(shakespeare_data, tmp_path, monkeypatch,
                                                                           capsys):
    out = tmp_path / "out"
    real_save, saves = torch.save, []

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            f.write(b"x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    code, output = train_in_process(train_args(shakespeare_data, out, "--max_iters=6", "--save_interval=2",
                                               "--eval_interval=100"), monkeypatch, capsys)
    assert code == 2, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "disk is full" in errors[0] and str(out / "ckpt.pt") in errors[0], output
    assert "Traceback" not in output
    assert checkpoint.load_checkpoint(out / "ckpt.pt")["iter_num"] == 2  # the save before the full disk
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]


def test_metrics_write_on_a_full_disk_says_so(tmp_path):
    log = metrics.MetricsLog(str(tmp_path / "metrics.jsonl"), "new")

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    log.file = FullDisk()
    with pytest.raises(UserError, match="disk is full"):
        log.write({"iter": 1})


def test_metrics_logs_of_earlier_runs_are_kept_and_eval_only_changes_none(trained, shakespeare_data, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    records = read_metrics(out)
    assert_ok(run_script(train_args(shakespeare_data, out, "--init_from=resume", "--eval_only=True"), cwd=tmp_path))
    after = read_metrics(out)
    assert after[:len(records)] == records and [r["type"] for r in after[len(records):]] == ["eval"]
    assert not (out / "metrics.jsonl.1").exists()

    fresh = tmp_path / "fresh"  # an out_dir with logs of runs that never saved a checkpoint
    fresh.mkdir()
    for n in range(2):
        (fresh / "metrics.jsonl").write_text(f'{{"type": "train", "iter": {n}}}\n')
        assert_ok(run_script(train_args(shakespeare_data, fresh, "--max_iters=1", "--eval_interval=100",
                                        "--always_save_checkpoint=False"), cwd=tmp_path))
        (fresh / "ckpt.pt").unlink(missing_ok=True)
        (fresh / "best.pt").unlink(missing_ok=True)
    assert (fresh / "metrics.jsonl.1").read_text() == '{"type": "train", "iter": 0}\n'
    assert (fresh / "metrics.jsonl.2").read_text() == '{"type": "train", "iter": 1}\n'


# ----------------------------------------------------------------------------- hostile checkpoints

class Payload:
    """Unpickling this would create a folder: a stand-in for code a hostile checkpoint runs on load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("extra", ["object", "class", "function"])
def test_checkpoint_with_pickled_objects_is_refused(tmp_path, extra):
    marker = tmp_path / "pwned"
    payload = {"object": Payload(marker), "class": Payload, "function": os.system}[extra]
    path = tmp_path / "ckpt.pt"
    torch.save({**small_checkpoint(1.0), "x": payload}, path)
    with pytest.raises(UserError, match="pickled"):
        checkpoint.load_checkpoint(path)
    assert not marker.exists()


def test_sample_refuses_checkpoint_with_code(trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    marker = tmp_path / "pwned"
    torch.save({**ckpt, "x": Payload(marker)}, out / "ckpt.pt")
    r = run_script(["sample.py", f"--out_dir={out}", "--device=cpu", "--num_samples=1", "--max_new_tokens=5"],
                   cwd=tmp_path)
    assert_user_error(r, "refusing checkpoint", "pickled")
    assert not marker.exists()


# ----------------------------------------------------------------------------- compiled and wrapped models

@pytest.mark.slow  # torch.compile's import takes seconds
def test_checkpoint_of_a_compiled_or_wrapped_model_has_clean_names(tmp_path):
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))

    class Wrapper(torch.nn.Module):  # state_dict names like DDP's: 'module.' + the model's names
        def __init__(self, module):
            super().__init__()
            self.module = module

    plain = checkpoint.model_state(model)["model"]
    for wrapped in (torch.compile(model), Wrapper(model), Wrapper(torch.compile(model))):
        assert any(k.startswith(("_orig_mod.", "module.")) for k in wrapped.state_dict())
        state = checkpoint.model_state(wrapped)
        assert not any("_orig_mod." in k or k.startswith("module.") for k in state["model"])
        assert_same_tensors(state["model"], plain, type(wrapped).__name__)
    checkpoint.save_checkpoint(checkpoint.model_state(torch.compile(model)), tmp_path / "ckpt.pt")
    restored = checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(tmp_path / "ckpt.pt"))
    assert_same_tensors(restored.state_dict(), model.state_dict(), "round trip")


# ----------------------------------------------------------------------------- bad input: one line, exit 2

def _write(name, text):
    return lambda case: (case / name).write_text(text)


def _edit_meta(case):
    """meta.json that claims 10 characters while the token files hold ids up to ~58."""
    path = case / "data" / "shakespeare_char" / "meta.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta.update(chars=meta["chars"][:10], vocab_size=10)
    path.write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")


def _truncate(path):
    def setup(case):
        data = (case / path).read_bytes()
        (case / path).write_bytes(data[:len(data) // 2])
    return setup


def _damage(path):
    """Zero 1000 bytes in the middle of the file: the tensors' bytes, which torch.load alone does not check."""
    def setup(case):
        data = (case / path).read_bytes()
        mid = len(data) // 2
        (case / path).write_bytes(data[:mid] + bytes(1000) + data[mid + 1000:])
    return setup


def _append_byte(path):
    return lambda case: (case / path).write_bytes((case / path).read_bytes() + b"\0")


def _edit_checkpoint(edit):
    def setup(case):
        ckpt = torch.load(case / "out" / "ckpt.pt", weights_only=True)
        edit(ckpt)
        torch.save(ckpt, case / "out" / "ckpt.pt")
    return setup


def _drop_entry(name):
    """A checkpoint as an older nanoMoE saved it, or a damaged one: without one of its entries."""
    return _edit_checkpoint(lambda ckpt: ckpt.pop(name))


_drop_tokenizer = _drop_entry("tokenizer")
_add_model_setting = _edit_checkpoint(lambda ckpt: ckpt["model_args"].update(warp_factor=9))


def _other_dataset(case):
    """data/other: a char dataset with another character set than the checkpoint's."""
    import prepare
    (case / "other.txt").write_text("abc abc cab\n" * 2000, encoding="utf-8")
    prepare.main(["text", "--input", str(case / "other.txt"), "--name", "other", "--tokenizer", "char",
                  "--data_root", str(case / "data")])


def _remove(*paths):
    return lambda case: [(case / p).unlink() for p in paths]


def _lock_folder(case):
    (case / "out" / ".lock").unlink()
    (case / "out" / ".lock").mkdir()


# a line of metrics.jsonl that is not a record, followed by good ones (a torn last line is normal: dropped)
DAMAGED_LOG_LINES = {"not-json": b"{iter: 1", "string-iter": b'{"type": "eval", "iter": "two"}',
                     "null-iter": b'{"type": "eval", "iter": null}', "no-iter": b'{"type": "eval"}',
                     "list": b"[1, 2]", "latin-1": '{"type": "caf\xe9", "iter": 1}'.encode("latin-1")}


def _damage_log(line):
    def setup(case):
        lines = (case / "out" / "metrics.jsonl").read_bytes().splitlines()
        (case / "out" / "metrics.jsonl").write_bytes(b"\n".join([lines[0], line, *lines[1:]]) + b"\n")
    return setup


def _write_bytes(name, data):
    return lambda case: (case / name).write_bytes(data)


def _nan_weight(case):
    """A checkpoint of a run that diverged (or was damaged): one weight NaN, every file otherwise sound."""
    ckpt = torch.load(case / "out" / "ckpt.pt", weights_only=True)
    ckpt["model"]["transformer.ln_f.weight"][0] = float("nan")
    torch.save(ckpt, case / "out" / "ckpt.pt")


# text that is not UTF-8: Latin-1, UTF-16 (with its byte-order mark), binary
NOT_UTF8 = {"latin-1": "batch_size = 4  # café\n".encode("latin-1"),
            "utf-16": "batch_size = 4\n".encode("utf-16"), "binary": bytes(range(128, 256))}


# (id, script, arguments after the usual ones ({case} is the case's folder), setup of the folder, words in the error)
BAD_INPUTS = [
    ("unknown-key", "train.py", ["--n_embed=32"], None, ["unknown config key 'n_embed'", "did you mean 'n_embd'?"]),
    ("unknown-key-in-file", "train.py", ["{case}/typo.py"], _write("typo.py", "n_embed = 32\n"),
     ["'n_embed'", "did you mean 'n_embd'?", "typo.py"]),
    ("wrong-type", "train.py", ["--batch_size=4.5"], None, ["'batch_size'", "expects int", "got float"]),
    ("bool-for-int", "train.py", ["--batch_size=True"], None, ["'batch_size'", "expects int", "got bool"]),
    ("int-for-bool", "train.py", ["--compile=1"], None, ["'compile'", "expects bool", "got int"]),
    ("word-for-float", "train.py", ["--learning_rate=fast"], None, ["'learning_rate'", "expects float", "got str"]),
    ("wrong-type-in-file", "train.py", ["{case}/bad.py"], _write("bad.py", "batch_size = 'big'\n"),
     ["'batch_size'", "expects int", "got str", "bad.py"]),
    ("list-for-plain-key", "train.py", ["--n_head=[1, 2]"], None, ["'n_head'", "not a plain"]),
    ("expert_hidden-zero", "train.py", ["--n_experts=4", "--expert_hidden=0"], None, ["expert_hidden=0", ">= 1"]),
    ("moe_impl-unknown", "train.py", ["--moe_impl=fast"], None, ["moe_impl='fast'", "'loop'"]),
    ("n_experts-over-the-grouped-kernel", "train.py", ["--n_experts=1024"], None, ["n_experts=1024", "1023"]),
    ("pos_emb-unknown", "train.py", ["--pos_emb=alibi"], None, ["pos_emb='alibi'", "'rope'"]),
    ("rope-odd-head-size", "train.py", ["--pos_emb=rope", "--n_embd=30", "--n_head=2"], None,
     ["even head size", "15"]),
    ("malformed-value", "train.py", ["--batch_size=[1"], None, ["'batch_size'", "expects int", "'[1'"]),
    ("flag-without-value", "train.py", ["--max_iters"], None, ["'--max_iters' has no value"]),
    ("missing-config-file", "train.py", ["{case}/nope.py"], None, ["config file", "nope.py", "not found"]),
    ("config-file-raises", "train.py", ["{case}/boom.py"], _write("boom.py", "batch_size = 4\nx = 1 / 0\n"),
     ["boom.py", "ZeroDivisionError"]),
    ("bad-device", "train.py", ["--device=tpu"], None, ["unknown device 'tpu'"]),
    ("init_from-typo", "train.py", ["--init_from=resum"], None, ["init_from='resum'"]),
    ("grad-accum-zero", "train.py", ["--gradient_accumulation_steps=0"], None,
     ["gradient_accumulation_steps=0", "must be >= 1"]),
    ("grad-accum-negative", "train.py", ["--gradient_accumulation_steps=-2"], None,
     ["gradient_accumulation_steps=-2", "must be >= 1"]),
    # values torch would take silently but that cannot work: each refused by its declared range
    ("min_lr-negative", "train.py", ["--min_lr=-1"], None, ["min_lr=-1.0", "must be >= 0", "--min_lr"]),
    ("min_lr-above-learning_rate", "train.py", ["--min_lr=0.1", "--learning_rate=0.01"], None,
     ["min_lr=0.1 is above learning_rate=0.01"]),
    ("learning_rate-negative", "train.py", ["--learning_rate=-3e-4"], None, ["learning_rate=-0.0003", ">= 0"]),
    ("beta2-one", "train.py", ["--beta2=1.0"], None, ["beta2=1.0", "< 1"]),
    ("dropout-one", "train.py", ["--dropout=1.0"], None, ["dropout=1.0", "< 1"]),
    ("weight_decay-negative", "train.py", ["--weight_decay=-0.1"], None, ["weight_decay=-0.1", ">= 0"]),
    ("grad_clip-negative", "train.py", ["--grad_clip=-1"], None, ["grad_clip=-1.0", ">= 0"]),
    ("n_head-zero", "train.py", ["--n_head=0"], None, ["n_head=0", ">= 1"]),
    ("n_kv_head-word", "train.py", ["--n_kv_head=abc"], None, ["'n_kv_head'", "expects int or None"]),
    ("peak_flops-word", "train.py", ["--peak_flops=fast"], None, ["'peak_flops'", "expects float or None"]),
    ("seed-negative", "train.py", ["--seed=-1"], None, ["seed=-1", ">= 0"]),
    ("backend-unknown", "train.py", ["--backend=mpi"], None, ["backend='mpi'", "'gloo'"]),
    ("device-index-on-cpu", "train.py", ["--device=cpu:1"], None, ["unknown device 'cpu:1'"]),
    ("max_nonfinite_steps-zero", "train.py", ["--max_nonfinite_steps=0"], None, ["max_nonfinite_steps=0"]),
    ("legal-values-non-finite-model", "train.py", ["--pos_emb=rope", "--rope_theta=1e-300"], None,
     ["non-finite loss", "rope_theta", "nothing was written"]),
    ("resume-dense-with-experts", "train.py", ["--init_from=resume", "--n_experts=4"], None,
     ["another model shape", "n_experts: config 4 vs checkpoint 0"]),
    ("resume-checkpoint-without-optimizer", "train.py", ["--init_from=resume"], _drop_entry("optimizer"),
     ["ckpt.pt lacks optimizer"]),
    ("resume-on-another-tokenizer", "train.py", ["--init_from=resume", "--dataset=other"], _other_dataset,
     ["trained with the", "-character tokenizer", "other"]),
    ("sample-unknown-model-setting", "sample.py", [], _add_model_setting, ["does not know (warp_factor)"]),
    ("sample-num_samples-zero", "sample.py", ["--num_samples=0"], None, ["num_samples=0", ">= 1"]),
    ("sample-top_k-zero", "sample.py", ["--top_k=0"], None, ["top_k=0", ">= 1"]),
    # training never downloads: a missing dataset names the prepare.py command, even for shakespeare_char
    ("dataset-missing", "train.py", ["--data_root={case}/nodata"], None,
     ["not found", "python prepare.py shakespeare_char --data_root"]),
    ("other-dataset-missing", "train.py", ["--dataset=nope"], None,
     ["not found", "python prepare.py text --input PATH --name nope --data_root"]),
    ("split-missing", "train.py", [], _remove("data/shakespeare_char/val.bin"), ["val.bin not found", "prepare.py"]),
    ("token-file-odd-size", "train.py", [], _append_byte("data/shakespeare_char/train.bin"),
     ["train.bin has", "bytes, not a whole number of uint16 tokens"]),
    ("vocab-smaller-than-data", "train.py", [], _edit_meta, ["holds token id", "vocab_size=10"]),
    ("block-larger-than-data", "train.py", ["--block_size=12000"], None, ["val.bin", "too few", "block_size=12000"]),
    ("n_embd-not-divisible-by-n_head", "train.py", ["--n_head=3"], None, ["n_embd=32", "n_head=3"]),
    ("n_head-not-divisible-by-n_kv_head", "train.py", ["--n_head=4", "--n_kv_head=3"], None,
     ["n_head=4", "n_kv_head=3"]),
    ("top_k-over-n_experts", "train.py", ["--n_experts=2", "--moe_top_k=3"], None, ["moe_top_k=3", "n_experts=2"]),
    ("out_dir-is-a-file", "train.py", ["--out_dir={case}/afile"], _write("afile", "x"), ["afile", "is a file"]),
    ("out_dir-under-a-file", "train.py", ["--out_dir={case}/afile/run"], _write("afile", "x"),
     ["cannot create out_dir", "afile/run"]),
    ("out_dir-empty", "train.py", ["--out_dir="], None, ["out_dir is empty"]),
    ("out_dir-under-proc", "train.py", ["--out_dir=/proc/nanomoe-run"], None, ["out_dir", "/proc/nanomoe-run"]),
    ("out_dir-under-sys", "train.py", ["--out_dir=/sys/nanomoe-run"], None, ["out_dir", "/sys/nanomoe-run"]),
    ("scratch-over-a-checkpoint", "train.py", [], None, ["ckpt.pt already exists", "--init_from=resume"]),
    ("resume-no-checkpoint", "train.py", ["--init_from=resume"], _remove("out/ckpt.pt", "out/best.pt"),
     ["no checkpoint at", "ckpt.pt"]),
    ("resume-truncated-checkpoint", "train.py", ["--init_from=resume"], _truncate("out/ckpt.pt"),
     ["ckpt.pt", "truncated or corrupt"]),
    ("resume-corrupt-checkpoint", "train.py", ["--init_from=resume"], _damage("out/ckpt.pt"),
     ["ckpt.pt", "corrupt", "CRC"]),
    ("resume-other-shape", "train.py", ["--init_from=resume", "--n_layer=3"], None,
     ["another model shape", "n_layer: config 3 vs checkpoint 2"]),
    ("resume-larger-block_size", "train.py", ["--init_from=resume", "--block_size=64"], None,
     ["block_size=64 is larger than the checkpoint's 32"]),
    # 12 is the default n_layer: a setting equal to the default still counts when the user wrote it
    ("resume-other-shape-default-value", "train.py", ["--init_from=resume", "--n_layer=12"], None,
     ["another model shape", "n_layer: config 12 vs checkpoint 2"]),
    ("sample-unknown-key", "sample.py", ["--temprature=0.5"], None, ["did you mean 'temperature'?"]),
    ("sample-prompt-outside-vocab", "sample.py", ["--start=ROMEO€"], None, ["not in the char vocabulary", "'€'"]),
    ("sample-prompt-file-missing", "sample.py", ["--start=FILE:{case}/prompt.txt"], None,
     ["prompt file", "prompt.txt", "not found"]),
    ("sample-no-checkpoint", "sample.py", ["--out_dir={case}/empty"], None, ["no checkpoint at", "empty"]),
    ("sample-corrupt-checkpoint", "sample.py", [], _damage("out/ckpt.pt"), ["corrupt", "CRC"]),
    ("n_experts-negative", "train.py", ["--n_experts=-1"], None, ["n_experts=-1", "must be >= 0"]),
    *[(f"config-file-{name}", "train.py", ["{case}/conf.py"], _write_bytes("conf.py", data),
       ["config file", "conf.py", "is not UTF-8 text"]) for name, data in NOT_UTF8.items()],
    *[(f"sample-prompt-file-{name}", "sample.py", ["--start=FILE:{case}/prompt.txt"], _write_bytes("prompt.txt", data),
       ["prompt file", "prompt.txt", "is not UTF-8 text"]) for name, data in NOT_UTF8.items()],
    ("sample-nan-weights", "sample.py", [], _nan_weight, ["non-finite weights", "transformer.ln_f.weight", "best.pt"]),
    ("export-nan-weights", "tools.export", ["--hf_dir={case}/hf"], _nan_weight,
     ["non-finite weights", "transformer.ln_f.weight"]),
    ("export-hf_dir-empty", "tools.export", ["--hf_dir="], None, ["hf_dir is empty"]),
    ("export-hf_dir-is-a-file", "tools.export", ["--hf_dir={case}/afile"], _write("afile", "x"), ["afile", "is a file"]),
    ("export-hf_dir-under-a-file", "tools.export", ["--hf_dir={case}/afile/hf"], _write("afile", "x"),
     ["cannot create hf_dir", "afile"]),
    ("export-hf_dir-under-proc", "tools.export", ["--hf_dir=/proc/nanomoe-hf"], None, ["hf_dir", "not writable"]),
    ("export-hf_dir-not-empty", "tools.export", ["--hf_dir={case}/out"], None, ["is not empty", "--force=True"]),
    ("sample-checkpoint-without-tokenizer", "sample.py", [], _drop_tokenizer, ["lacks tokenizer", "train it again"]),
    ("sample-zero-temperature", "sample.py", ["--temperature=0"], None, ["temperature=0.0", "must be > 0"]),
    # MLA and F-gram settings (the tiny model: n_embd=32, 2 heads of 16)
    ("mla-kv-latent-wider-than-n_embd", "train.py", ["--attn=mla", "--kv_latent_dim=64", "--d_rope=8"], None,
     ["kv_latent_dim=64 does not fit", "n_embd=32"]),
    ("mla-q-latent-wider-than-n_embd", "train.py", ["--attn=mla", "--kv_latent_dim=16", "--q_latent_dim=48",
                                                    "--d_rope=8"], None, ["q_latent_dim=48 does not fit"]),
    ("mla-kv-latent-zero", "train.py", ["--attn=mla", "--kv_latent_dim=0"], None, ["kv_latent_dim=0", ">= 1"]),
    ("mla-d_rope-odd", "train.py", ["--attn=mla", "--kv_latent_dim=16", "--d_rope=3"], None, ["d_rope=3", "even"]),
    ("mla-d_rope-larger-than-head", "train.py", ["--attn=mla", "--kv_latent_dim=16", "--d_rope=32"], None,
     ["d_rope=32 is larger than the head size", "=16"]),
    ("fgram_max_n-one", "train.py", ["--fgram_max_n=1"], None, ["fgram_max_n=1", "start at n=2"]),
    ("fgram_max_n-negative", "train.py", ["--fgram_max_n=-1"], None, ["fgram_max_n=-1", "must be >= 0"]),
    ("fgram_buckets-zero", "train.py", ["--fgram_max_n=2", "--fgram_buckets=0"], None,
     ["fgram_buckets=0", "must be >= 1"]),
    ("resume-other-attention", "train.py", ["--init_from=resume", "--attn=mla", "--kv_latent_dim=16", "--d_rope=8"],
     None, ["another model shape", "attn: config 'mla' vs checkpoint 'mha'"]),
    # Mamba2 settings (n_embd=32 and 2 layers; expand 2 -> 64 = mamba2_num_heads * mamba2_head_dim)
    ("mamba-width-mismatch", "train.py", ["--mamba_layers=[0]", "--mamba2_num_heads=4", "--mamba2_head_dim=8"],
     None, ["n_embd * mamba2_expand == mamba2_num_heads * mamba2_head_dim", "32 * 2 = 64 vs 4 * 8 = 32"]),
    ("mamba-layer-out-of-range", "train.py", ["--mamba_layers=[0,2]", "--mamba2_num_heads=4",
                                              "--mamba2_head_dim=16"], None, ["has layer 2", "n_layer=2", "0..1"]),
    ("mamba-layer-twice", "train.py", ["--mamba_layers=[1,1]", "--mamba2_num_heads=4", "--mamba2_head_dim=16"],
     None, ["mamba_layers=[1, 1] names a layer twice"]),
    ("mamba-layer-negative", "train.py", ["--mamba_layers=[-1]"], None, ["has -1", "must be >= 0"]),
    ("mamba-layers-not-a-list", "train.py", ["--mamba_layers=0"], None, ["'mamba_layers'", "expects list[int]",
                                                                          "got int 0"]),
    ("mamba-heads-not-divisible-by-groups", "train.py", ["--mamba_layers=[0]", "--mamba2_num_heads=4",
                                                         "--mamba2_head_dim=16", "--mamba2_n_groups=3"], None,
     ["mamba2_num_heads=4", "mamba2_n_groups=3"]),
    ("mamba-chunk-zero", "train.py", ["--mamba_layers=[0]", "--mamba2_chunk_size=0"], None,
     ["mamba2_chunk_size=0", ">= 1"]),
    ("resume-with-mamba-layers", "train.py", ["--init_from=resume", "--mamba_layers=[0]", "--mamba2_num_heads=4",
                                              "--mamba2_head_dim=16"], None,
     ["another model shape", "mamba_layers: config [0] vs checkpoint []"]),
    # FSDP and expert parallel (parallel.check_sharding): the checks that a single process reaches
    ("ep_size-dense-model", "train.py", ["--ep_size=2"], None, ["ep_size=2", "dense (n_experts=0)", "--ep_size=1"]),
    ("ep_size-not-dividing-n_experts", "train.py", ["--ep_size=3", "--n_experts=4"], None,
     ["ep_size=3 does not divide n_experts=4"]),
    ("ep_size-not-dividing-world-size", "train.py", ["--ep_size=2", "--n_experts=4"], None,
     ["ep_size=2 does not divide the world size 1"]),
    ("ep_size-zero", "train.py", ["--ep_size=0"], None, ["ep_size=0", ">= 1"]),
    ("ep_size-no-moe-layer", "train.py", ["--ep_size=2", "--n_experts=4", "--moe_every=3"], None,
     ["n_layer=2 and moe_every=3", "has none"]),
    # QK-norm, norm eps, dense first layers
    ("qk_norm-with-mla", "train.py", ["--attn=mla", "--kv_latent_dim=16", "--d_rope=8", "--qk_norm=True"], None,
     ["qk_norm=True", "attn='mha' or qk_norm=False"]),
    ("norm_eps-zero", "train.py", ["--norm_eps=0"], None, ["norm_eps=0", "> 0"]),
    ("first_dense_layers-all", "train.py", ["--n_experts=4", "--first_dense_layers=2"], None,
     ["first_dense_layers=2 leaves no MoE layer", "n_layer=2"]),
    # the optimizer (docs/muon.md)
    ("optimizer-unknown", "train.py", ["--optimizer=sgd"], None, ["optimizer='sgd'", "'adamw', 'muon'"]),
    ("muon_lr-negative", "train.py", ["--optimizer=muon", "--muon_lr=-0.01"], None, ["muon_lr=-0.01", ">= 0"]),
    ("muon_lr-infinite", "train.py", ["--optimizer=muon", "--muon_lr=1e999"], None, ["muon_lr=inf", "< inf"]),
    ("muon_lr-nan-in-file", "train.py", ["{case}/muon.py"], _write("muon.py", "muon_lr = float('nan')\n"),
     ["muon_lr=nan", "muon.py", ">= 0"]),
    ("muon_momentum-one", "train.py", ["--optimizer=muon", "--muon_momentum=1.0"], None, ["muon_momentum=1.0", "< 1"]),
    ("muon_momentum-negative", "train.py", ["--muon_momentum=-0.5"], None, ["muon_momentum=-0.5", ">= 0"]),
    ("muon_lr-with-zero-learning_rate", "train.py", ["--optimizer=muon", "--learning_rate=0", "--min_lr=0",
                                                     "--muon_lr=0.01"], None, ["muon_lr=0.01", "learning_rate"]),
    ("resume-adamw-with-muon", "train.py", ["--init_from=resume", "--optimizer=muon"], None,
     ["trained with optimizer='adamw'", "cannot resume with optimizer='muon'"]),
    ("resume-muon-with-adamw", "train.py", ["--init_from=resume", "--optimizer=adamw"],
     _edit_checkpoint(lambda ckpt: ckpt["config"].update(optimizer="muon")),
     ["trained with optimizer='muon'", "cannot resume with optimizer='adamw'"]),
    # a checkpoint from before Muon (no 'optimizer' setting) was trained with AdamW
    ("resume-pre-muon-checkpoint-with-muon", "train.py", ["--init_from=resume", "--optimizer=muon"],
     _edit_checkpoint(lambda ckpt: ckpt["config"].pop("optimizer")), ["trained with optimizer='adamw'"]),
    # the run's folder: what it holds is read under its lock
    ("eval_only-new-model-into-another-runs-log", "train.py", ["--eval_only=True", "--out_dir={case}/out"], None,
     ["--eval_only=True with init_from='scratch'", "metrics.jsonl", "--init_from=resume"]),
    ("lock-is-a-folder", "train.py", ["--init_from=resume"], _lock_folder, [".lock is a folder", "remove it"]),
    *[(f"resume-metrics-log-{name}", "train.py", ["--init_from=resume"], _damage_log(line),
       ["metrics.jsonl line 2 is damaged", "fix or delete that line"]) for name, line in DAMAGED_LOG_LINES.items()],
]


# these also run as real subprocesses, as a person runs them (in the slow tier: a torch start each); every case
# runs in this process (conftest.run_script), which runs the same `if __name__ == "__main__"` block
CLI_CASES = {"dataset-missing", "resume-corrupt-checkpoint"}
CASES = [pytest.param(*case, False, id=case[0]) for case in BAD_INPUTS] + \
    [pytest.param(*case, True, id=f"{case[0]}-subprocess", marks=pytest.mark.slow) for case in BAD_INPUTS
     if case[0] in CLI_CASES]


@pytest.mark.parametrize("case_id, script, extra, setup, words, as_subprocess", CASES)
def test_bad_input_is_one_line_exit_2_and_touches_nothing(shakespeare_data, trained, tmp_path, case_id, script, extra,
                                                          setup, words, as_subprocess):
    """Each bad input in a folder of its own: a copy of the dataset and of a trained out_dir."""
    case = tmp_path / case_id
    shutil.copytree(shakespeare_data / "shakespeare_char", case / "data" / "shakespeare_char")
    shutil.copytree(trained, case / "out")
    if setup:
        setup(case)
    if script == "tools.export":
        args = [script, f"--out_dir={case / 'out'}"]
    elif script == "train.py":
        # a new run goes to a new out_dir (one over a finished run's checkpoint is its own bad input)
        resume = any(a.startswith("--init_from=resume") for a in extra) or case_id == "scratch-over-a-checkpoint"
        args = train_args(case / "data", case / ("out" if resume else "new"), "--max_iters=6", "--eval_interval=2")
    else:
        args = [script, f"--out_dir={case / 'out'}", "--device=cpu", "--num_samples=1", "--max_new_tokens=5"]
    args += [a.replace("{case}", str(case)) for a in extra]
    before = snapshot(case, shakespeare_data)
    r = run(args, cwd=case, check=False) if as_subprocess else run_script(args, cwd=case)
    assert_user_error(r, *words)
    assert snapshot(case, shakespeare_data) == before


# every float setting of the scripts, given a value that is not a finite number: refused while the arguments are
# read, before any file, process group or model. The values take turns: inf, nan, 1e999 (Python reads it as
# inf), -inf; one of them in a config file instead of a flag
NON_FINITE = ["inf", "nan", "1e999", "-inf"]


def _float_keys():
    import sample
    for script, keys in (("train.py", train.KEYS), ("sample.py", sample.KEYS)):
        for key, spec in keys.items():
            if float in spec.types:
                yield script, key


FLOAT_KEYS = list(_float_keys())


@pytest.mark.parametrize("script, key, value, in_file",
                         [(script, key, NON_FINITE[i % 4], i % 5 == 4) for i, (script, key) in enumerate(FLOAT_KEYS)],
                         ids=[f"{script[:-3]}-{key}" for script, key in FLOAT_KEYS])
def test_non_finite_float_settings_are_refused_before_anything_runs(shakespeare_data, trained, tmp_path, script, key,
                                                                    value, in_file):
    assert len(FLOAT_KEYS) >= 16  # learning_rate, min_lr, dropout, rope_theta, z_loss_weight, temperature, ...
    if in_file:
        (tmp_path / "conf.py").write_text(f"{key} = float({value!r})\n")
    setting = [str(tmp_path / "conf.py")] if in_file else [f"--{key}={value}"]
    if script == "train.py":
        args = train_args(shakespeare_data, tmp_path / "new", "--max_iters=2", *setting)
    else:
        args = ["sample.py", f"--out_dir={trained}", "--device=cpu", "--num_samples=1", "--max_new_tokens=2", *setting]
    before = snapshot(tmp_path, trained)
    r = run_script(args, cwd=tmp_path)
    assert_user_error(r, f"{key}=", "is not a finite number", f"--{key}")
    assert snapshot(tmp_path, trained) == before


# ----------------------------------------------------------------------------- a sharded checkpoint, in one process

@pytest.fixture(scope="module")
def sharded(trained, tmp_path_factory):
    """The trained run's final state saved as a sharded ckpt.dcp by train.py's save_sharded (a one-process
    gloo group): the quick tier's stand-in for a torchrun run's (tests/test_distributed.py has those)."""
    import torch.distributed as dist
    from types import SimpleNamespace
    from nanomoe.distributed.checkpoint import save_sharded
    from nanomoe.optim import configure_optimizers
    out = tmp_path_factory.mktemp("sharded") / "out"
    out.mkdir()
    ckpt = checkpoint.load_checkpoint(trained / "ckpt.pt")
    model = checkpoint.model_from_checkpoint(ckpt)
    optimizer = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.99), "cpu")
    optimizer.load_state_dict(ckpt["optimizer"])
    dist.init_process_group("gloo", init_method=f"file://{out.parent / 'init'}", rank=0, world_size=1)
    try:
        save_sharded(model, optimizer, {k: v for k, v in ckpt.items() if k not in ("model", "optimizer")}, out,
                     SimpleNamespace(master=True))
    finally:
        dist.destroy_process_group()
    return out


def test_sample_reads_a_sharded_checkpoint_as_the_file_it_was_saved_from(trained, sharded, tmp_path):
    args = ["--device=cpu", "--num_samples=2", "--max_new_tokens=16", "--seed=5"]
    from_file = run_script(["sample.py", f"--out_dir={trained}", *args], cwd=tmp_path)
    from_shards = run_script(["sample.py", f"--out_dir={sharded}", *args], cwd=tmp_path)
    assert_ok(from_shards)
    assert from_shards.stdout == from_file.stdout
    assert from_shards.stderr == ""  # no warning of DCP's about reading without a process group


def test_two_flipped_bytes_in_a_shard_are_one_line_naming_it(sharded, shakespeare_data, tmp_path):
    """The audit's case: two bytes changed inside a ckpt.dcp shard used to resume silently (an Adam state went
    from 2.8e-09 to 9.5e+29). Now every reader refuses it, naming the shard, and nothing is written."""
    out = tmp_path / "out"
    shutil.copytree(sharded, out, symlinks=True)
    folder = out / os.readlink(out / checkpoint.SHARDED)
    shard = sorted(folder.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    data[len(data) // 2 + 7] ^= 0x01
    shard.write_bytes(bytes(data))
    before = snapshot(out)
    for args in (["sample.py", f"--out_dir={out}", "--device=cpu"], ["tools.export", f"--out_dir={out}"],
                 ["tools.consolidate", out],
                 train_args(shakespeare_data, out, "--init_from=resume", "--max_iters=6")):
        assert_user_error(run_script(args, cwd=tmp_path), shard.name, "fails its SHA-256 check")
    assert snapshot(out) == before


def test_a_sharded_run_has_no_best_pt_and_the_line_names_what_to_read(sharded, tmp_path):
    base = ["sample.py", f"--out_dir={sharded}", "--device=cpu", "--num_samples=1", "--max_new_tokens=4"]
    assert_user_error(run_script([*base, "--ckpt=best.pt"], cwd=tmp_path), "keeps no best.pt", "--ckpt=ckpt.dcp")
    assert_ok(run_script([*base, "--ckpt=ckpt.dcp"], cwd=tmp_path))


def test_best_pt_copied_on_a_full_disk_is_one_line_and_leaves_no_half_copy(trained, tmp_path, monkeypatch):
    """Where hard links fail (another filesystem's rules), best.pt is a copy; a full disk during it leaves the
    old best.pt and no temporary file."""
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    old_best = (out / "best.pt").read_bytes()

    def no_links(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def copy_until_full(src, dst):
        with open(dst, "wb") as f:
            f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(shutil, "copyfile", copy_until_full)
    with pytest.raises(UserError, match="the disk is full.*best.pt"):
        checkpoint.link_checkpoint(str(out / "ckpt.pt"), str(out / "best.pt"))
    assert (out / "best.pt").read_bytes() == old_best
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]
