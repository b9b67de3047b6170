"""
What the experts learn (python -m tools.experts) and the checkpoints it reads over training (train.py
--save_every, --keep_checkpoints): the report's numbers against the model's own, router saturation against
checkpoints whose choices we know, the kinds of token, sharded checkpoints, kept copies through prune, resume
and kill -9, and each bad input as one line with nothing written.
"""
import os
import re
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch

import prepare
from conftest import (TINY_MODEL, TINY_RUN, assert_ok, assert_same_tensors, assert_user_error, kill_after_saves,
                      run_script, snapshot, train_args)
from nanomoe.checkpoint import SHARDED, load_checkpoint, model_from_checkpoint
from nanomoe.data import TokenData
from nanomoe.tokenizer import Tokenizer
from tools import experts

pytest.importorskip("matplotlib", reason="tools.experts draws with matplotlib (pip install matplotlib)")

MOE = ["--n_experts=4", "--moe_top_k=2"]
FIGURES = ["coactivation.png", "compare.png", "load.png", "saturation.png", "specialisation.png"]


@pytest.fixture(scope="module")
def runs(shakespeare_data, tmp_path_factory):
    """A tiny MoE run that kept ckpt-2.pt and ckpt-4.pt (and ckpt-6.pt = its final ckpt.pt), a dense one."""
    work = tmp_path_factory.mktemp("experts")
    for name, extra in (("moe", [*MOE, "--max_iters=6", "--save_every=2"]), ("dense", ["--max_iters=2"])):
        assert_ok(run_script(train_args(shakespeare_data, work / name, "--eval_interval=3", *extra), cwd=work))
    return SimpleNamespace(moe=work / "moe", dense=work / "dense", data=shakespeare_data)


def report(out_dir, *args, cwd=None):
    return run_script(["tools.experts", out_dir, *args], cwd=cwd or out_dir.parent)


def table_rows(text, first_cell):
    """The cells of the Markdown table rows whose first cell is first_cell."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_cell} |")]


@torch.no_grad()
def val_blocks_through(model, data_root, n_tokens, block=32):
    """The model's own numbers on the first val blocks, run as one batch: its mean cross-entropy and each MoE
    layer's expert load (MoE.stats), what train.py's evaluation reads."""
    val = torch.from_numpy(TokenData(data_root, "shakespeare_char", block).memmap("val")[:n_tokens + 1].astype("int64"))
    _, loss, extra = model.eval()(val[:-1].view(-1, block), val[1:].view(-1, block))
    return loss.item(), extra.get("expert_load")


def test_report_numbers_are_the_models_own(runs, tmp_path):
    """The load table equals the MoE layers' own stats and each run's loss in the comparison its cross-entropy,
    on the same val tokens; every figure is written. Saturation: the kept copies are read, the final model is
    100%, a copy of it too, and one whose first router is the final one negated chooses there exactly the two
    experts (of 4) the final model leaves out: 0%."""
    out = tmp_path / "moe"
    shutil.copytree(runs.moe, out)
    final = load_checkpoint(out / "ckpt.pt")
    negated = {**final, "model": dict(final["model"])}
    negated["model"]["transformer.h.0.mlp.router.weight"] = -final["model"]["transformer.h.0.mlp.router.weight"]
    torch.save(negated, out / "ckpt-3.pt")
    shutil.copyfile(out / "ckpt.pt", out / "ckpt-5.pt")
    r = report(out, runs.dense, "--max_tokens=2000")
    assert_ok(r)
    assert re.fullmatch(r"routed 1,984 val tokens through 2 MoE layer\(s\) and 4 kept checkpoint\(s\); wrote "
                        r".*experts/report\.md \(\d+s\)\n", r.stdout), r.stdout
    folder = out / "experts"
    assert sorted(os.listdir(folder)) == sorted(FIGURES + ["report.md"])
    for name in FIGURES:
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (folder / "report.md").read_text()
    loss, load = val_blocks_through(load_model(out / "ckpt.pt"), runs.data, 1984)
    for layer in range(2):
        row = table_rows(text, f"layer {layer}")[0]  # the val row comes first
        assert row[1] == "val" and [float(x) for x in row[2:6]] == pytest.approx(load[layer].tolist(), abs=6e-4)
    dense_loss, _ = val_blocks_through(load_model(runs.dense / "ckpt.pt"), runs.data, 1984)
    everything = table_rows(text, "all")[0]
    assert [float(everything[2]), float(everything[3])] == pytest.approx([loss, dense_loss], abs=1e-4)
    saturation = {int(row[0]): row[1:] for it in range(7) for row in table_rows(text, str(it))}
    assert sorted(saturation) == [2, 3, 4, 5, 6]  # the kept copies and the final model (iteration 6)
    assert saturation[3][0] == "0.0%" and saturation[5] == saturation[6] == ["100.0%", "100.0%"]


def load_model(path):
    return model_from_checkpoint(load_checkpoint(path))


def test_an_expert_s_top_tokens_are_those_it_takes_more_of_than_their_share():
    """Routing made up for 3 experts, top-1: token 0 always goes to expert 2, token 1 (ten times as frequent)
    9 times in 10, token 2 never, token 3 always but too rarely to rank. Token 1 makes up more of expert 2's
    tokens beyond its share of all tokens than token 0 does; only token 3's routing is not fixed by the token."""
    tokens = torch.tensor([0] * 40 + [1] * 400 + [2] * 100 + [3] * 5)
    choices = torch.tensor([2] * 40 + ([2] * 9 + [0]) * 40 + [1] * 100 + [2, 2, 2, 0, 1]).unsqueeze(1)
    count, share = experts.routed_share(tokens, choices, 4, 3)
    assert count.tolist() == [40, 400, 100, 5] and share[:, 2].tolist() == pytest.approx([1.0, 0.9, 0.0, 0.6])
    assert experts.top_tokens(share, count, expert=2, expert_share=403 / 545) == [1, 0]
    assert experts.top_tokens(share, count, expert=1, expert_share=101 / 545) == [2]
    assert experts.fixed_by_token(tokens, choices) == (40 + 360 + 100 + 3) / 545


def test_kinds_of_token_in_code():
    text = "def f(x):\n    return 'A1'\n"
    tok = Tokenizer("char", "".join(sorted(set(text))))
    kinds = experts.token_classes(torch.tensor(tok.encode(text)), tok)
    got = {(c, experts.CLASSES[k]) for c, k in zip(text, kinds.tolist())}
    assert got == {("d", "lowercase"), ("e", "lowercase"), ("f", "lowercase"), (" ", "space"), ("(", "punctuation"),
                   ("x", "lowercase"), (")", "punctuation"), (":", "punctuation"), ("\n", "newline"),
                   (" ", "indentation"), ("r", "lowercase"), ("t", "lowercase"), ("u", "lowercase"),
                   ("n", "lowercase"), ("'", "punctuation"), ("A", "uppercase"), ("1", "digit")}
    assert [experts.CLASSES[k] for k in kinds[10:16].tolist()] == ["indentation"] * 4 + ["lowercase"] * 2


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    """A dataset with another char vocabulary than shakespeare_data's."""
    root = tmp_path_factory.mktemp("other-data")
    (root / "digits.txt").write_text("0123456789 \n" * 2000)
    prepare.main(["text", "--input", str(root / "digits.txt"), "--name", "digits", "--tokenizer", "char",
                  "--data_root", str(root)])
    return root


BAD = {  # (arguments after the tool's name, words the error line must hold); {moe} {dense} {empty} ... filled in
    "dense run": (["{dense}"], ["holds a dense model (n_experts=0)"]),
    "no folder": (["{missing}"], ["run folder", "not found"]),
    "no checkpoint": (["{empty}"], ["no checkpoint at"]),
    "damaged checkpoint": (["{damaged}"], ["cannot load checkpoint", "truncated or corrupt"]),
    "data of another tokenizer": (["{moe}", "--dataset=digits", "--data_root={other_data}"],
                                  ["was trained with the", "tokenizer but dataset", "12-character one"]),
    "second run of another tokenizer": (["{moe}", "{digits_run}"], ["do not compare"]),
    "unknown layer": (["{moe}", "--layers=0,5"], ["unknown layer index 5", "MoE layers are 0, 1"]),
    "report exists": (["{done}"], ["already exists; add --force"]),
    "no matplotlib": (["{moe}"], ["tools.experts draws its figures with matplotlib: pip install matplotlib"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_writes_nothing(runs, other_data, tmp_path, monkeypatch, case):
    paths = {"moe": runs.moe, "dense": runs.dense, "missing": tmp_path / "nope", "empty": tmp_path / "empty",
             "damaged": tmp_path / "damaged", "other_data": other_data, "done": tmp_path / "done",
             "digits_run": tmp_path / "digits"}
    (tmp_path / "empty").mkdir()
    (tmp_path / "damaged").mkdir()
    data = (runs.moe / "ckpt.pt").read_bytes()
    (tmp_path / "damaged" / "ckpt.pt").write_bytes(data[:len(data) // 2])
    (tmp_path / "done" / "experts").mkdir(parents=True)
    shutil.copyfile(runs.moe / "ckpt.pt", tmp_path / "done" / "ckpt.pt")
    if case == "second run of another tokenizer":
        digits = ["train.py", "--dataset=digits", f"--data_root={other_data}", f"--out_dir={tmp_path / 'digits'}"]
        assert_ok(run_script([*digits, *TINY_MODEL, *TINY_RUN, "--max_iters=1"], cwd=tmp_path))
    if case == "no matplotlib":
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails, as where it is missing
    args, words = BAD[case]
    before = snapshot(tmp_path, runs.moe, runs.dense)
    r = run_script(["tools.experts", *(a.format(**paths) for a in args)], cwd=tmp_path)
    assert_user_error(r, *words)
    assert snapshot(tmp_path, runs.moe, runs.dense) == before


@pytest.mark.slow  # drawing takes seconds
def test_force_replaces_the_report(runs, tmp_path):
    out = tmp_path / "moe"
    shutil.copytree(runs.moe, out, ignore=shutil.ignore_patterns("experts", "ckpt-*"))
    (out / "experts").mkdir()
    (out / "experts" / "old.txt").write_text("an older report")
    assert_ok(report(out, "--max_tokens=1000", "--layers=1", "--force"))
    assert sorted(os.listdir(out / "experts")) == ["coactivation.png", "load.png", "report.md", "specialisation.png"]
    text = (out / "experts" / "report.md").read_text()
    assert "holds no earlier checkpoints: train with `--save_every=N`" in text
    assert table_rows(text, "layer 1") and not table_rows(text, "layer 0")  # --layers=1: that layer alone


@pytest.mark.slow  # two reports
def test_a_sharded_checkpoint_gives_the_same_report(runs, tmp_path):
    """The final model saved as a sharded ckpt.dcp (by train.py's save_sharded, in a one-process group) reads
    back as the same weights: the same report, figure for figure; a missing shard is one line."""
    import torch.distributed as dist
    from nanomoe.distributed.checkpoint import save_sharded
    from nanomoe.optim import configure_optimizers
    out = tmp_path / "sharded" / "moe"  # the run's name is the folder's
    out.mkdir(parents=True)
    ckpt = load_checkpoint(runs.moe / "ckpt.pt")
    model = model_from_checkpoint(ckpt)
    optimizer = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.99), "cpu")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        meta = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer")}
        save_sharded(model, optimizer, meta, out, SimpleNamespace(master=True))
    finally:
        dist.destroy_process_group()
    assert (out / SHARDED).is_symlink() and not (out / "ckpt.pt").exists()
    plain = tmp_path / "plain" / "moe"
    shutil.copytree(runs.moe, plain, ignore=shutil.ignore_patterns("experts", "ckpt-*"))
    for folder in (out, plain):
        assert_ok(report(folder, "--max_tokens=2000"))
    text = {p: re.sub(r"in \d+s", "", (p / "experts" / "report.md").read_text()).replace(str(p), "RUN")
            for p in (out, plain)}  # but for the folder and the time
    assert text[out] == text[plain].replace("RUN/ckpt.pt", f"RUN/{SHARDED}")
    for shard in (out / SHARDED).glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])
    r = report(out, "--force")
    assert_user_error(r, "sharded checkpoint", ".distcp has 100 bytes", "truncated or damaged")


# ----------------------------------------------------------------------------- train.py --save_every

def kept(out_dir):
    return sorted((int(p.stem[5:]) for p in out_dir.glob("ckpt-*.pt")))


def test_save_every_keeps_copies_counts_them_on_resume_and_prunes_the_oldest(shakespeare_data, tmp_path):
    out = tmp_path / "out"
    args = train_args(shakespeare_data, out, "--eval_interval=100", "--save_every=2")
    assert_ok(run_script([*args, "--max_iters=7", "--keep_checkpoints=2"], cwd=tmp_path))
    assert kept(out) == [4, 6]
    six = load_checkpoint(out / "ckpt-6.pt", needs=("optimizer", "rng"))
    assert six["iter_num"] == 6 and load_checkpoint(out / "ckpt.pt")["iter_num"] == 7
    r = run_script([*args, "--init_from=resume", "--max_iters=10", "--keep_checkpoints=3"], cwd=tmp_path)
    assert_ok(r)
    assert f"saved checkpoint to {out / 'ckpt-10.pt'} (save_every 2" in r.stdout
    assert kept(out) == [6, 8, 10]  # the copies of the first run counted, the oldest removed
    assert_same_tensors(load_checkpoint(out / "ckpt-6.pt")["model"], six["model"], "a kept copy after the resume")
    assert_same_tensors(load_checkpoint(out / "ckpt-10.pt")["model"], load_checkpoint(out / "ckpt.pt")["model"],
                        "the last copy and ckpt.pt")


def test_save_every_is_refused_for_a_sharded_run(shakespeare_data, tmp_path, monkeypatch):
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")):  # what torchrun sets
        monkeypatch.setenv(name, value)
    r = run_script(train_args(shakespeare_data, tmp_path / "out", *MOE, "--fsdp=True", "--save_every=2",
                              "--gradient_accumulation_steps=2"), cwd=tmp_path)
    assert_user_error(r, "save_every=2 keeps copies of ckpt.pt", "--save_interval")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a run killed with SIGKILL
def test_kept_copies_of_a_killed_and_resumed_run_equal_those_of_a_run_left_alone(shakespeare_data, tmp_path):
    """Killed after its 3rd save (maybe in the middle of the next one) and resumed: the run keeps the same
    copies, bit for bit, as the run left alone, and leaves no temporary file."""
    args = [*MOE, "--max_iters=10", "--eval_interval=5", "--save_every=2", "--keep_checkpoints=3", "--dropout=0.1"]
    assert_ok(run_script(train_args(shakespeare_data, tmp_path / "straight", *args), cwd=tmp_path))
    killed = train_args(shakespeare_data, tmp_path / "killed", *args)
    kill_after_saves(killed, tmp_path, 3)
    assert load_checkpoint(tmp_path / "killed" / "ckpt.pt")["iter_num"] < 10
    assert_ok(run_script([*killed, "--init_from=resume"], cwd=tmp_path))
    assert kept(tmp_path / "straight") == kept(tmp_path / "killed") == [6, 8, 10]
    for it in kept(tmp_path / "straight"):
        a, b = (load_checkpoint(tmp_path / run / f"ckpt-{it}.pt") for run in ("straight", "killed"))
        assert_same_tensors(a["model"], b["model"], f"ckpt-{it}.pt")
    assert not [p for p in os.listdir(tmp_path / "killed") if p.startswith(".tmp-")]


@pytest.mark.slow  # routing and a first figure
def test_a_full_disk_while_writing_the_report_is_one_line_and_leaves_nothing(runs, tmp_path, monkeypatch):
    from PIL import Image
    out = tmp_path / "moe"
    shutil.copytree(runs.moe, out, ignore=shutil.ignore_patterns("experts", "ckpt-*"))
    before = snapshot(out)

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    r = report(out, "--max_tokens=1000")
    assert_user_error(r, "the disk is full", str(out / "experts"))
    assert snapshot(out) == before  # no report, no temporary folder
