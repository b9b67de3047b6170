"""
Shared by the tests: the repository path, run() for the CLI scripts, one-line error checks, flags for a tiny
model, and a small shakespeare_char dataset prepared once per test session.

Test files use the plain helpers with `from conftest import REPO, run` and the dataset as a fixture:

    def test_train(tmp_path, shakespeare_data):
        run(["train.py", f"--data_root={shakespeare_data}", *TINY_MODEL, *TINY_RUN], cwd=tmp_path)
"""
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: kill-and-resume, torchrun, Hugging Face interop and whole-study "
                                       "tests; `pytest -m 'not slow'` skips them for a quick loop (.ci/run and "
                                       "the README command run all)")

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


def _command(args, env):
    """`python REPO/<args[0]> args[1:]` and its environment: one CPU thread unless OMP_NUM_THREADS says
    otherwise (matmul results then do not depend on how many cores are free), unbuffered output."""
    cmd = [sys.executable, str(REPO / args[0]), *map(str, args[1:])]
    return cmd, {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}


def run(args, cwd, env=None, check=True, timeout=300):
    """Run `python REPO/<args[0]> args[1:]` in cwd and return the CompletedProcess (text stdout/stderr).
    env holds variables added to (or replacing) the current environment. With check, a non-zero exit fails
    the test and shows both output streams."""
    cmd, full_env = _command(args, env)
    r = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}")
    return r


def start(args, cwd, env=None):
    """A running script (as run() would run it) whose stdout, with stderr, we read line by line."""
    cmd, full_env = _command(args, env)
    return subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, stdin=subprocess.DEVNULL)


def read_lines_until(p, prefix):
    """Lines of a started script up to and including the first that starts with prefix."""
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"the script ended without printing {prefix!r}:\n" + "".join(lines))


def read_metrics(out_dir):
    """The records of out_dir/metrics.jsonl, in order."""
    with open(Path(out_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def snapshot(*folders):
    """Every file (by content hash) and folder under the folders, to prove a failed run changed nothing."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for folder in map(Path, folders) for p in sorted(folder.rglob("*"))}


def run_in_process(main, argv, capsys):
    """A script's main(argv) in this process, as its command line runs it (run_cli): (exit code, stdout,
    stderr). For scripts whose imports (matplotlib, transformers) would make a subprocess slow."""
    from common import run_cli
    code = 0
    try:
        run_cli(lambda: main([str(a) for a in argv]))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_ok(r):
    """The script exited 0 (else both output streams are shown)."""
    assert r.returncode == 0, f"exit code {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"


def assert_user_error(r, *words):
    """The script failed the way a person should see it: exit code 2 and one 'error: ...' line on stderr
    that contains every one of words, no traceback. Returns that line."""
    assert r.returncode == 2, f"exit code {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
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
