"""
Shared by the tests, written once: the repository path, ways to run a script (a subprocess as a person runs
it, or in this process when a torch start per case would cost too much), one-line error checks, flags for a
tiny model, and a small char dataset made once per session from text generated here (the tests read nothing
outside the repository).

    def test_train(tmp_path, shakespeare_data):
        run(train_args(shakespeare_data, tmp_path / "out", "--max_iters=4"), cwd=tmp_path)

`python -m pytest -m "not slow" tests` leaves out the tests marked slow (kill -9 and resume, torchrun and
forked ranks, Hugging Face interop, the study): a quick loop while working. CI runs them all.

`python -m pytest tests --device=cuda` (or NANOMOE_TEST_DEVICE=cuda) runs the tests that take the `device`
fixture (the grouped experts, the MoE layer, the model, the generation cache, the compiled bf16 MoE) on the
GPU; they skip with a reason where CUDA is not available. The others run on the CPU either way.
"""
import contextlib
import hashlib
import io
import json
import os
import random
import runpy
import signal
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests import model.py, moe_model.py, train.py and nanomoe/ as the scripts do

# the tests' models are tiny: one thread is fastest, and two threads on a busy 2-core machine mostly spin
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--device", default=os.environ.get("NANOMOE_TEST_DEVICE", "cpu"),
                     help="where the tests that take the `device` fixture run: cpu (default) or cuda "
                          "(env NANOMOE_TEST_DEVICE)")


@pytest.fixture
def device(request):
    """The device of the tests that can run on a GPU: --device (or NANOMOE_TEST_DEVICE), cpu by default."""
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"--device={name} asked for, but CUDA is not available here")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise pytest.UsageError(f"--device={name}: use cpu or cuda")
    return name


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: kill-and-resume, torchrun and forked ranks, Hugging Face interop and "
                                       "whole-study tests; `pytest -m 'not slow'` skips them for a quick loop")


# GPT-2's BPE offline: tiktoken reads its files from TIKTOKEN_CACHE_DIR; without it these tests skip with a reason
needs_gpt2 = pytest.mark.skipif(not os.environ.get("TIKTOKEN_CACHE_DIR"),
                                reason="GPT-2 BPE needs tiktoken's files offline: set TIKTOKEN_CACHE_DIR to a "
                                       "folder that holds them")

def import_transformers():
    """transformers, imported when a Hugging Face test first runs (a collection that imported it would cost
    seconds even for the quick tier); the test is skipped without it."""
    return pytest.importorskip("transformers", reason="Hugging Face formats need transformers "
                                                      "(pip install transformers)")


# a model and a run small enough that CLI training takes seconds on 2 CPU cores
TINY_MODEL = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--dropout=0.0"]
TINY_RUN = ["--device=cpu", "--dtype=float32", "--compile=False", "--batch_size=8",
            "--gradient_accumulation_steps=1", "--eval_iters=2", "--warmup_iters=0", "--learning_rate=3e-3"]


def train_args(data_root, out_dir, *extra):
    """train.py and its arguments for a tiny model on the shakespeare_data fixture's dataset."""
    return ["train.py", "--dataset=shakespeare_char", f"--data_root={data_root}", f"--out_dir={out_dir}",
            *TINY_MODEL, *TINY_RUN, *extra]


# ----------------------------------------------------------------------------- running scripts

def _command(args, env):
    """The command line for args[0] (a top-level script, or tools.NAME run as a module from the repository)
    and its environment: one CPU thread unless OMP_NUM_THREADS says otherwise (matmul results then do not
    depend on how many cores are free), unbuffered output."""
    script, rest = str(args[0]), list(map(str, args[1:]))
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if script.startswith("tools."):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        return [sys.executable, "-m", script, *rest], env
    return [sys.executable, str(REPO / script), *rest], env


def run(args, cwd, env=None, check=True, timeout=300):
    """Run a script (run(["train.py", ...]) or run(["tools.bench", ...])) in cwd, as a person would, and
    return the CompletedProcess (text stdout/stderr). env holds variables added to the environment. With
    check, a non-zero exit fails the test and shows both output streams."""
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


def run_script(args, cwd):
    """Run a script (args as for run()) inside this process, its `if __name__ == "__main__"` block included,
    the way `python script args` runs it in cwd: a CompletedProcess with its exit code and output. For the
    many cases where a torch start per subprocess would cost more than the case itself. An exception other
    than SystemExit propagates: it is the traceback a person would see. The working folder, sys.argv and the
    signal handlers are put back afterwards."""
    script, rest = str(args[0]), [str(a) for a in args[1:]]
    path = REPO / (script.replace(".", "/") + ".py" if script.startswith("tools.") else script)
    saved = os.getcwd(), sys.argv, {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        os.chdir(cwd)
        sys.argv = [str(path), *rest]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if script.startswith("tools."):
                with warnings.catch_warnings():  # a test may have imported the tool's module already: no matter
                    warnings.simplefilter("ignore", RuntimeWarning)
                    runpy.run_module(script, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:
        code = e.code or 0
    finally:
        os.chdir(saved[0])
        sys.argv = saved[1]
        for s, h in saved[2].items():
            signal.signal(s, h)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def run_main(main, argv, capsys):
    """A tool's main(argv) in this process, as its command line runs it (run_cli): (exit code, stdout,
    stderr). For tools whose imports (matplotlib, transformers) would make a subprocess slow."""
    from nanomoe.cli import run_cli
    code = 0
    try:
        run_cli(lambda: main([str(a) for a in argv]))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def torchrun(cwd, *args, nproc=2, script="train.py"):
    """A script under torchrun (--standalone picks a free port for the rendezvous), one thread per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # torchrun's default, without its banner
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=150,
                          stdin=subprocess.DEVNULL)


def kill_after_saves(args, cwd, n_saves):
    """Start a script and SIGKILL it as soon as it reports its n-th saved checkpoint (it may be a step or a
    save further on by then, possibly in the middle of writing the next one: that is part of the test)."""
    p = start(args, cwd=cwd)
    saves, output = 0, []
    for line in p.stdout:
        output.append(line)
        saves += line.startswith("saved checkpoint")
        if saves == n_saves:
            p.kill()
            break
    p.communicate()
    assert p.returncode == -signal.SIGKILL, "the run ended before it was killed:\n" + "".join(output)


# ----------------------------------------------------------------------------- host syncs

# ops after which the host waits for a GPU to finish: a Python number out of a tensor (.item(), float(),
# bool(), what .tolist() does per element), and outputs whose shape depends on the data (the host must read
# it to allocate them): torch.where(mask) and x[mask] (nonzero), repeat_interleave without output_size,
# bincount (it reads the min and max), unique, masked_select
SYNCING_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::repeat_interleave", "aten::bincount",
               "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::masked_select"}


class HostSyncs(TorchDispatchMode):
    """Counts, on any device, the places where code would make the host wait for a GPU: the ops above, index
    reads and writes with a boolean mask (nonzero inside), and .tolist() / .cpu() / .numpy(), which on a CPU
    tensor dispatch nothing. Each count is keyed by what synced and where: 'file.py:function op'. CUDA runs
    backward on threads of its own, where a mode does not reach: count on the CPU (torch.cuda's own
    set_sync_debug_mode is the check on a GPU).

    F.one_hot checks its indices' range on the host on CPUs only (ATen's Onehot.cpp skips the check on CUDA,
    to avoid a sync): those two reads are not counted.

        with HostSyncs() as syncs:
            train_step(...)
        assert syncs.total() == 0, syncs
    """

    def __init__(self):
        super().__init__()
        self.counts = {}
        self.paused = 0
        self.patches = []

    def record(self, what):
        if self.paused:
            return
        frames = [f for f in traceback.extract_stack()[:-2]
                  if f.filename.startswith(str(REPO)) and "/tests/" not in f.filename]
        where = f"{Path(frames[-1].filename).name}:{frames[-1].name}" if frames else "tests"
        key = f"{where} {what}"
        self.counts[key] = self.counts.get(key, 0) + 1

    def total(self):
        return sum(self.counts.values())

    def __repr__(self):
        return f"HostSyncs({self.counts})"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        masked = name in ("aten::index", "aten::index_put_", "aten::_index_put_impl_") and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ())
        # repeat_interleave reads its repeats (a tensor) on the host unless told the output's size
        known_size = name == "aten::repeat_interleave" and (func._overloadname == "self_int" or
                                                            (kwargs or {}).get("output_size") is not None)
        if name in SYNCING_OPS and not known_size or masked:
            self.record(name.split("::")[1] + (" with a boolean mask" if masked else ""))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        import torch.nn.functional as F
        for name in ("tolist", "cpu", "numpy"):
            self._patch(torch.Tensor, name, lambda real, name=name: lambda t, *a, **kw: (self.record(name),
                                                                                         real(t, *a, **kw))[1])

        def one_hot(real):
            def unchecked(*a, **kw):
                self.paused += 1
                try:
                    return real(*a, **kw)
                finally:
                    self.paused -= 1
            return unchecked
        self._patch(F, "one_hot", one_hot)
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, name, real in self.patches:
            setattr(owner, name, real)
        return super().__exit__(*exc)

    def _patch(self, owner, name, wrap):
        real = getattr(owner, name)
        self.patches.append((owner, name, real))
        setattr(owner, name, wrap(real))


# ----------------------------------------------------------------------------- checking what a run left

def read_metrics(out_dir):
    """The records of out_dir/metrics.jsonl, in order."""
    with open(Path(out_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def snapshot(*folders):
    """Every file (by content hash) and folder under the folders, to prove a failed run changed nothing."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for folder in map(Path, folders) for p in sorted(folder.rglob("*"))}


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


def assert_same_tensors(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


# ----------------------------------------------------------------------------- data

def generated_text(n_chars, seed=0):
    """Deterministic play-like text (speaker lines of common words): something a tiny model learns quickly."""
    rng = random.Random(seed)
    words = ["the", "king", "and", "queen", "of", "my", "lord", "abate", "cabbage", "to", "be", "or", "not",
             "what", "light", "through", "yonder", "window", "breaks", "thou", "art", "sweet", "sorrow"]
    speakers = ["ROMEO:", "JULIET:", "KING HENRY:", "First Citizen:"]
    lines = []
    while sum(map(len, lines)) < n_chars:
        lines.append(rng.choice(speakers))
        lines += [" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))).capitalize() + rng.choice(".,;!?")
                  for _ in range(rng.randint(1, 3))]
        lines.append("")
    return "\n".join(lines)[:n_chars]


@pytest.fixture(scope="session")
def shakespeare_data(tmp_path_factory):
    """A data_root holding shakespeare_char/ (a char tokenizer over 100k characters of generated_text()), made
    by prepare.py once per session. Pass it to the scripts as --data_root."""
    import prepare
    root = tmp_path_factory.mktemp("data")
    text_file = root / "input.txt"
    text_file.write_text(generated_text(100_000), encoding="utf-8")
    prepare.main(["text", "--input", str(text_file), "--name", "shakespeare_char", "--tokenizer", "char",
                  "--data_root", str(root)])
    assert (root / "shakespeare_char" / "train.bin").is_file()
    return root
