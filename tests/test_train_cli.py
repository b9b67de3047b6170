"""
train.py and sample.py end to end, the way a person runs them: train a tiny dense model on the CPU, sample from
it (from another folder, without the dataset, as a process of its own), resume it.
The bad inputs of both scripts are in test_reliability.py.
"""
import re
import shutil

import pytest
import torch

import conftest
from conftest import assert_ok, assert_user_error, read_lines_until, read_metrics, run, run_script, start

SEPARATOR = "\n---------------\n"  # sample.py prints it after each sample


def train_args(data_root, out_dir, *extra):
    return conftest.train_args(data_root, out_dir, "--log_interval=5", "--eval_interval=20", *extra)


def logged_iters(out_dir):
    return [m["iter"] for m in read_metrics(out_dir) if m["type"] == "train"]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, shakespeare_data):
    """A 40-iteration run of a tiny dense model (checkpoints at the evals of iterations 20 and 40)."""
    work = tmp_path_factory.mktemp("dense")
    out = work / "out"
    r = run_script(train_args(shakespeare_data, out, "--max_iters=40", "--lr_decay_iters=40"), cwd=work)
    assert_ok(r)
    return work, out, r


def sample(work, out_dir, *extra):
    return run(["sample.py", f"--out_dir={out_dir}", "--device=cpu", "--num_samples=1", *extra], cwd=work,
               check=False)  # a real process, as the README's command


def test_training_lowers_loss_and_saves_checkpoint(dense_run):
    work, out, r = dense_run
    assert "model: GPT," in r.stdout
    # a person sees where the run is and how long is left
    assert "iter 35/40: loss " in r.stdout and ", eta " in r.stdout
    assert logged_iters(out) == list(range(0, 40, 5))
    train = [m for m in read_metrics(out) if m["type"] == "train"]
    evals = [m for m in read_metrics(out) if m["type"] == "eval"]
    assert [m["iter"] for m in evals] == [0, 20, 40]
    # ln(61) = 4.1 at the start; a few dozen steps learn at least the character frequencies
    assert train[-1]["loss"] < train[0]["loss"] - 0.5, (train[0]["loss"], train[-1]["loss"])
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 40 and ckpt["model_args"]["n_embd"] == 32 and "n_experts" not in ckpt["model_args"]
    # the checkpoint carries its tokenizer, and the run's settings apart from the model's (stored once)
    assert ckpt["tokenizer"]["tokenizer"] == "char" and len(ckpt["tokenizer"]["chars"]) == ckpt["tokenizer"]["vocab_size"]
    assert ckpt["config"]["max_iters"] == 40 and "n_embd" not in ckpt["config"]


def test_sample_from_another_folder_without_the_data(dense_run, tmp_path):
    _, out, _ = dense_run
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(out, moved)
    r = sample(tmp_path, moved, "--max_new_tokens=50", "--start=ab")
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith(SEPARATOR)
    text = r.stdout[:-len(SEPARATOR)]
    assert len(text) == 2 + 50 and text.startswith("ab")


def test_resume_continues_from_saved_iteration(dense_run, shakespeare_data):
    work, out, _ = dense_run
    resumed = work / "resumed"
    shutil.copytree(out, resumed)
    assert_ok(run_script(train_args(shakespeare_data, resumed, "--max_iters=60", "--lr_decay_iters=40",
                                    "--init_from=resume"), cwd=work))
    assert torch.load(resumed / "ckpt.pt", weights_only=True)["iter_num"] == 60
    assert logged_iters(resumed) == list(range(0, 60, 5))  # the first run's records kept, the new ones appended


def test_resume_needs_only_out_dir_the_rest_comes_from_the_checkpoint(dense_run):
    work, out, _ = dense_run
    resumed = work / "resumed-short"
    shutil.copytree(out, resumed)
    r = run_script(["train.py", "--init_from=resume", f"--out_dir={resumed}", "--max_iters=45"], cwd=work)
    assert_ok(r)
    assert logged_iters(resumed)[-2:] == [35, 40]  # same data, model, log_interval and device as the saved run
    assert "device cpu" in r.stdout
    assert torch.load(resumed / "ckpt.pt", weights_only=True)["iter_num"] == 45


def test_wandb_log_without_wandb_is_a_clear_error(tmp_path, shakespeare_data):
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed: the missing-package message cannot be seen")
    except ImportError:
        pass
    r = run_script(train_args(shakespeare_data, tmp_path / "out", "--wandb_log=True"), cwd=tmp_path)
    assert_user_error(r, "pip install wandb")
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.slow  # a GPU-sized run, stopped once it has said so
def test_gpu_recipe_on_a_cpu_says_how_long_and_points_to_the_cpu_recipe(tmp_path, shakespeare_data):
    """The README's GPU command run on a CPU says at once that it would take hours, instead of looking hung
    (the run is stopped once it has said so)."""
    p = start(["train.py", str(conftest.REPO / "config" / "train_shakespeare_moe.py"),
               f"--data_root={shakespeare_data}", f"--out_dir={tmp_path / 'out'}", "--device=cpu"], cwd=tmp_path)
    try:
        note = read_lines_until(p, "note: this config is sized for a GPU")[-1]
    finally:
        p.kill()
        p.communicate()
    assert re.search(r"would take about \d+(d\d\dh|h\d\dm) ", note) and "config/train_shakespeare_moe_cpu.py" in note, note


@pytest.mark.parametrize("seconds, text", [(12.9, "12s"), (250, "4m10s"), (3 * 3600 + 300, "3h05m"),
                                           (1159183.1 * 3600, "48299d07h")])
def test_long_durations_read_in_days(seconds, text):
    from nanomoe.cli import duration
    assert duration(seconds) == text
