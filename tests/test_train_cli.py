"""
train.py and sample.py end to end, the way a person runs them: prepare a tiny dataset, train a tiny dense
model on the CPU, sample from it, resume it; and the one-line errors for the usual mistakes.
"""
import json
import re
import shutil

import pytest
import torch

import conftest
from conftest import assert_user_error, run

SEPARATOR = "\n---------------\n"  # sample.py prints it after each sample


def train_args(data_root, out_dir, *extra):
    return conftest.train_args(data_root, out_dir, "--log_interval=5", "--eval_interval=20", *extra)


def logged_iters(stdout):
    return [int(m) for m in re.findall(r"^iter (\d+): loss", stdout, flags=re.M)]


def read_metrics(out_dir):
    with open(out_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, shakespeare_data):
    """A 40-iteration run of a tiny dense model (checkpoints at the evals of iterations 20 and 40)."""
    work = tmp_path_factory.mktemp("dense")
    out = work / "out"
    r = run(train_args(shakespeare_data, out, "--max_iters=40", "--lr_decay_iters=40"), cwd=work)
    return work, out, r


def sample(work, out_dir, *extra):
    return run(["sample.py", f"--out_dir={out_dir}", "--device=cpu", "--num_samples=1", *extra], cwd=work,
               check=False)


def test_training_lowers_loss_and_saves_checkpoint(dense_run):
    work, out, r = dense_run
    assert "model: GPT," in r.stdout
    assert logged_iters(r.stdout) == list(range(0, 40, 5))
    train = [m for m in read_metrics(out) if m["type"] == "train"]
    evals = [m for m in read_metrics(out) if m["type"] == "eval"]
    assert [m["iter"] for m in evals] == [0, 20, 40]
    # ln(61) = 4.1 at the start; a few dozen steps learn at least the character frequencies
    assert train[-1]["loss"] < train[0]["loss"] - 0.5, (train[0]["loss"], train[-1]["loss"])
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 40 and ckpt["model_class"] == "GPT"
    assert ckpt["model_args"]["n_embd"] == 32 and "n_experts" not in ckpt["model_args"]


def test_sample_prints_prompt_plus_requested_length(dense_run):
    work, out, _ = dense_run
    r = sample(work, out, "--max_new_tokens=50", "--start=ab")
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith(SEPARATOR)
    text = r.stdout[:-len(SEPARATOR)]
    assert len(text) == 2 + 50 and text.startswith("ab")


def test_resume_continues_from_saved_iteration(dense_run, shakespeare_data):
    work, out, _ = dense_run
    resumed = work / "resumed"
    shutil.copytree(out, resumed)
    r = run(train_args(shakespeare_data, resumed, "--max_iters=60", "--lr_decay_iters=40",
                       "--init_from=resume"), cwd=work)
    assert logged_iters(r.stdout) == [40, 45, 50, 55]  # not from 0
    assert torch.load(resumed / "ckpt.pt", weights_only=True)["iter_num"] == 60
    iters = [m["iter"] for m in read_metrics(resumed) if m["type"] == "train"]
    assert iters == list(range(0, 60, 5))  # the first run's records are kept, the new ones appended


def test_resume_needs_only_out_dir_the_rest_comes_from_the_checkpoint(dense_run):
    work, out, _ = dense_run
    resumed = work / "resumed-short"
    shutil.copytree(out, resumed)
    r = run(["train.py", "--init_from=resume", f"--out_dir={resumed}", "--max_iters=45"], cwd=work)
    assert logged_iters(r.stdout) == [40]  # same data, model, log_interval and device as the saved run
    assert "device cpu" in r.stdout
    assert torch.load(resumed / "ckpt.pt", weights_only=True)["iter_num"] == 45


def test_sample_prompt_outside_vocabulary(dense_run):
    work, out, _ = dense_run
    r = sample(work, out, "--max_new_tokens=5", "--start=ab\u20ac")
    assert_user_error(r, "'\u20ac'", "vocabulary")


def test_sample_prompt_file_missing(dense_run):
    work, out, _ = dense_run
    r = sample(work, out, "--max_new_tokens=5", "--start=FILE:no_such_prompt.txt")
    assert_user_error(r, "no_such_prompt.txt", "not found")


def test_missing_dataset_names_prepare_command(tmp_path):
    r = run(["train.py", "--dataset=my_notes", f"--data_root={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}",
             *conftest.TINY_RUN], cwd=tmp_path, check=False)
    assert_user_error(r, f"python prepare.py text --input PATH --name my_notes --data_root {tmp_path / 'data'}")



def test_wandb_log_without_wandb_is_a_clear_error(tmp_path, shakespeare_data):
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed: the missing-package message cannot be seen")
    except ImportError:
        pass
    r = run(train_args(shakespeare_data, tmp_path / "out", "--wandb_log=True"), cwd=tmp_path, check=False)
    assert_user_error(r, "pip install wandb")
    assert not (tmp_path / "out").exists()  # nothing written
