"""
Shared by the tests: the repository path, run() for the CLI scripts, one-line error checks, flags for a tiny
model, and a small shakespeare_char dataset prepared once per test session.

Test files use the plain helpers with `from conftest import REPO, run` and the dataset as a fixture:

    def test_train(tmp_path, shakespeare_data):
        run(["train.py", f"--data_root={shakespeare_data}", *TINY_MODEL, *TINY_RUN], cwd=tmp_path)
"""
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# the tests' models are tiny: one thread is fastest, and two threads on a busy 2-core machine mostly spin
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests import model.py, moe_model.py, ... directly

CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
TINY_CHARS = 100_000  # enough text for a few dozen iterations, quick to tokenize

# a model and a run small enough that CLI training takes seconds on 2 CPU cores
TINY_MODEL = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--dropout=0.0"]
TINY_RUN = ["--device=cpu", "--dtype=float32", "--compile=False", "--batch_size=8",
            "--gradient_accumulation_steps=1", "--eval_iters=2", "--warmup_iters=0", "--learning_rate=3e-3"]


def train_args(data_root, out_dir, *extra):
    """train.py arguments for a tiny model on the shakespeare_data fixture's dataset."""
    return ["train.py", "--dataset=shakespeare_char", f"--data_root={data_root}", f"--out_dir={out_dir}",
            *TINY_MODEL, *TINY_RUN, *extra]


def run(args, cwd, env=None, check=True, timeout=300):
    """Run `python REPO/<args[0]> args[1:]` in cwd and return the CompletedProcess (text stdout/stderr).
    env holds variables added to (or replacing) the current environment; the script runs on one CPU
    thread unless OMP_NUM_THREADS says otherwise. With check, a non-zero exit fails the test and shows
    both output streams."""
    cmd = [sys.executable, str(REPO / args[0]), *map(str, args[1:])]
    full_env = {"OMP_NUM_THREADS": "1", **os.environ, **(env or {})}
    r = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}")
    return r


def assert_user_error(r, *words):
    """The script failed the way a person should see it: exit code 2 and one 'error: ...' line on stderr
    that contains every one of words, no traceback. Returns that line."""
    assert r.returncode == 2, f"exit code {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    return lines[0]


def _corpus_text():
    if CORPUS.is_file():
        return CORPUS.read_text(encoding="utf-8")[:TINY_CHARS]
    # without the shared copy of tiny-shakespeare: a deterministic stand-in with the same kind of text
    rng = random.Random(0)
    words = ["the", "king", "and", "queen", "of", "my", "lord", "abate", "cabbage", "to", "be", "or", "not",
             "ROMEO:", "JULIET:", "what", "light", "through", "yonder", "window", "breaks"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))).capitalize() + "."
             for _ in range(TINY_CHARS // 40)]
    return "\n".join(lines)[:TINY_CHARS]


@pytest.fixture(scope="session")
def shakespeare_data(tmp_path_factory):
    """A data_root holding shakespeare_char/ (char tokenizer, first 100k characters of tiny-shakespeare),
    made by prepare.py once per session. Pass it to the scripts as --data_root."""
    root = tmp_path_factory.mktemp("data")
    text_file = root / "input.txt"
    text_file.write_text(_corpus_text(), encoding="utf-8")
    run(["prepare.py", "text", "--input", text_file, "--name", "shakespeare_char", "--tokenizer", "char",
         "--data_root", root], cwd=root)
    assert (root / "shakespeare_char" / "train.bin").is_file()
    return root
