"""
The tools (tools/, run as `python -m tools.NAME`): bench times train.py's own step and prints its figures;
plot draws runs' metrics.jsonl; study trains the variants, tabulates seeds and resumes; consolidate refuses
a run without a sharded checkpoint. Each bad input is one line.
"""
import errno
import json
import os
import re
import shutil
from types import SimpleNamespace

import pytest
import torch

from conftest import TINY_MODEL, TINY_RUN, assert_ok, assert_user_error, run, run_main, run_script
from tools import bench, consolidate, plot, study

try:
    import matplotlib  # noqa: F401
    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False
needs_matplotlib = pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="tools.plot needs matplotlib (pip install "
                                                                  "matplotlib)")


def without_matplotlib(tmp_path):
    """An environment in which `import matplotlib` fails, as where it is not installed."""
    fake = tmp_path / "fake" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    return {"PYTHONPATH": str(fake.parent)}


# ----------------------------------------------------------------------------- bench

TINY = ["--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16",
        "--batch_size=2", "--gradient_accumulation_steps=1", "--vocab_size=64", "--n_experts=4",
        "--bench_warmup=1", "--bench_steps=2"]
LINE = re.compile(r"^(dense|moe-loop|moe-grouped)\s+([\d.]+) ms/step\s+([\d,]+) tok/s .*params ([\d.]+)M, "
                  r"active ([\d.]+)M  ckpt save \d+ ms \(([\d.]+) MiB\)$", re.M)


def test_bench_prints_every_variant_and_the_ratios(tmp_path):
    r = run_script(["tools.bench", *TINY, "--moe_top_k=1"], cwd=tmp_path)
    assert_ok(r)
    rows = {m[0]: m for m in LINE.findall(r.stdout)}
    assert set(rows) == {"dense", "moe-loop", "moe-grouped"}, r.stdout
    assert all(float(row[1]) > 0 and float(row[5]) > 0 for row in rows.values())
    # top-1 of 4 experts: the MoE has more parameters, the same active count as the dense model
    assert float(rows["moe-loop"][3]) > float(rows["dense"][3])
    assert rows["moe-loop"][4] == rows["dense"][4] == rows["moe-grouped"][4]
    for part in ("", " fwd+bwd", " optimizer"):  # the whole step, and its two parts timed apart
        assert re.search(rf"^ratio{re.escape(part)}: moe-loop/dense [\d.]+x, moe-grouped/dense [\d.]+x$", r.stdout, re.M), part
    # each part of each line is a positive time, and they add up to about the step (medians of each)
    for label, step, fwd_bwd, opt in re.findall(r"^(\S+)\s+([\d.]+) ms/step .* fwd\+bwd ([\d.]+) ms  optimizer "
                                                r"([\d.]+) ms", r.stdout, re.M):
        assert float(fwd_bwd) > 0 and float(opt) > 0 and float(fwd_bwd) + float(opt) < 1.5 * float(step), label
    # MFU on a CPU is against its own matmul speed, measured at the start and printed with the thread count
    assert re.search(r"^cpu peak: [\d.]+ GFLOP/s, a 2048x2048 float32 matmul on 1 thread\(s\)", r.stdout, re.M)
    assert ", 1 thread(s);" in r.stdout and re.search(r"^dense .* mfu +[\d.]+%", r.stdout, re.M)


def test_bench_equal_active_gives_each_token_the_dense_mlp_compute():
    """expert_hidden = F / (top_k + shared): the routed and shared experts a token goes through hold as many
    hidden units as the dense MLP (F = 4 * 32 here); rounded to a multiple of 8 where it does not divide."""
    from nanomoe.configurator import parse_args
    for k, shared, hidden in ((1, 0, 128), (2, 0, 64), (2, 2, 32), (4, 0, 32), (3, 0, 40)):
        cfg = SimpleNamespace(**parse_args(bench.KEYS, [*TINY, f"--moe_top_k={k}", f"--n_shared_experts={shared}",
                                                        "--bench_equal_active=True"]))
        sized = bench.equal_active(cfg)
        assert sized.expert_hidden == hidden, (k, shared)
        model = bench.build("grouped", sized)
        layer = model.moe_layers()[0]
        active_hidden = k * layer.experts.c_fc.size(1) + (layer.shared.c_fc.out_features if shared else 0)
        assert abs(active_hidden - 128) <= 8 * (k + shared), (k, shared)
    default = SimpleNamespace(**parse_args(bench.KEYS, [*TINY, "--moe_top_k=2"]))
    assert bench.equal_active(default).expert_hidden is None  # off by default: the experts keep the dense size


def test_bench_profile_prints_where_the_moe_layers_time_goes(tmp_path):
    r = run_script(["tools.bench", *TINY, "--moe_top_k=2", "--bench_profile=True", "--bench_checkpoint=False",
                    "--peak_flops=1e9"], cwd=tmp_path)
    assert_ok(r)
    for variant in ("moe-loop", "moe-grouped"):
        table = r.stdout.split(f"profile {variant}:")[1].split("\nratio")[0].split("\nmoe-")[0]
        rows = {m[0].strip(): [float(v) for v in m[1:]] for m in
                re.findall(r"^  (.+?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+%$", table, re.M)}
        assert set(rows) == {"router + top-k", "counting (per-expert counts, capacity)", "permute (sort + gather)",
                             "expert GEMMs (+ activation, shared)", "combine (weight + scatter)",
                             "balance statistics"}, table
        # the expert GEMMs run forward and backward; every row's total is its forward plus its backward
        assert rows["expert GEMMs (+ activation, shared)"][0] > 0 and rows["expert GEMMs (+ activation, shared)"][1] > 0
        assert all(abs(f + b - t) < 0.02 for f, b, t in rows.values()), table
        assert re.search(r"^  MoE layers, all stages .* step with the profiler on: \d+%\)$", table, re.M)
    assert "profile dense" not in r.stdout


def test_bench_sweep_prints_one_line_per_point(tmp_path):
    r = run_script(["tools.bench", *TINY, "--bench_variants=dense,grouped", "--bench_equal_active=True",
                    "--bench_sweep=n_embd=32,64", "--peak_flops=1e9"], cwd=tmp_path)
    assert_ok(r)
    lines = re.findall(r"^sweep n_embd=(\d+) \(32 tok/step\): dense [\d.]+ ms \(fwd\+bwd [\d.]+, opt [\d.]+\), "
                       r"moe-grouped [\d.]+ ms \(fwd\+bwd [\d.]+, opt [\d.]+\); moe-grouped/dense step [\d.]+x "
                       r"fwd\+bwd [\d.]+x opt [\d.]+x$", r.stdout, re.M)
    assert lines == ["32", "64"], r.stdout
    assert "ms/step" not in r.stdout  # the sweep's lines replace the per-variant ones


@pytest.mark.parametrize("flags, words", [
    (["--bench_sweep=n_embd"], ["bench_sweep", "KEY=V1,V2"]),
    (["--bench_sweep=n_embed=32,64"], ["n_embed", "not a model or train.py key"]),
    (["--bench_sweep=bench_steps=1,2"], ["bench_steps", "not a model or train.py key"]),
    (["--bench_sweep=n_embd=32,many"], ["n_embd", "many"]),
    (["--bench_sweep=n_embd=32,64", "--bench_profile=True"], ["bench_profile", "bench_sweep"]),
    (["--bench_equal_active=True", "--expert_hidden=64"], ["bench_equal_active", "expert_hidden=64"]),
    (["--bench_profile=maybe"], ["bench_profile", "maybe"]),
])
def test_bench_rejects_bad_values_of_its_keys(tmp_path, flags, words):
    r = run_script(["tools.bench", *TINY, *flags, "--peak_flops=1e9"], cwd=tmp_path)
    assert_user_error(r, *words)


@pytest.mark.slow  # two subprocesses, each training a 36M-parameter MoE for five steps (about 10 s)
def test_a_cpu_training_step_reuses_freed_memory_instead_of_faulting_it_in_again(tmp_path):
    """setup_processes on a CPU calls keep_freed_memory: once warm, a training step of an MoE (whose gradients
    cover all 8 experts) finds its memory where the last step freed it, instead of having the kernel fault in
    and zero-fill tens of thousands of fresh pages every step."""
    import conftest
    code = ("import resource, sys, torch\n"
            "from moe_model import MoEConfig, MoEGPT\n"
            "from nanomoe.device import keep_freed_memory\n"
            "if sys.argv[1] == 'keep':\n    keep_freed_memory()\n"
            "torch.manual_seed(0)\n"
            "model = MoEGPT(MoEConfig(n_embd=512, n_head=8, n_layer=2, n_experts=8, moe_top_k=1, block_size=128,\n"
            "                         vocab_size=512, moe_impl='grouped'))\n"
            "opt = torch.optim.AdamW(model.parameters(), fused=True)\n"
            "x = torch.randint(0, 512, (8, 128))\n"
            "faults = []\n"
            "for _ in range(5):\n"
            "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "    _, loss, extra = model(x, x)\n"
            "    (loss + extra['aux_loss']).backward()\n"
            "    opt.step()\n"
            "    opt.zero_grad(set_to_none=True)\n"
            "    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
            "print(sum(faults[2:]))\n")  # the steps after two warm-up steps
    script = tmp_path / "faults.py"
    script.write_text(code)
    faults = {mode: int(run([str(script), mode], cwd=tmp_path, env={"PYTHONPATH": str(conftest.REPO)}).stdout)
              for mode in ("default", "keep")}
    assert faults["keep"] * 10 < faults["default"], faults


@pytest.mark.slow  # a subprocess: torch's import and the CPU's matmul peak take a few seconds
def test_bench_on_a_cpu_says_at_once_when_the_config_is_sized_for_a_gpu(tmp_path):
    """The GPU bench command run on a CPU says so before it starts timing (it is stopped once it has)."""
    import conftest
    p = conftest.start(["tools.bench", str(conftest.REPO / "config" / "train_gpt2_moe.py"), "--device=cpu",
                        "--compile=False", "--dtype=float32"], cwd=tmp_path)
    try:
        note = conftest.read_lines_until(p, "note: this config is sized for a GPU")[-1]
    finally:
        p.kill()
        p.communicate()
    assert "hours" in note and "config/bench_cpu.py" in note


def test_bench_rejects_an_unknown_variant(tmp_path):
    r = run_script(["tools.bench", *TINY, "--bench_variants=dense,fast"], cwd=tmp_path)
    assert_user_error(r, "bench_variants", "fast")


def test_bench_times_a_hybrid(tmp_path):
    r = run_script(["tools.bench", *TINY, "--n_layer=1", "--bench_variants=dense", "--bench_checkpoint=False",
                    "--mamba_layers=[0]", "--mamba2_num_heads=4", "--mamba2_head_dim=16", "--mamba2_state_size=8",
                    "--mamba2_chunk_size=8"], cwd=tmp_path)
    assert_ok(r)
    assert "Mamba2 layers [0]" in r.stdout and re.search(r"^dense\s+[\d.]+ ms/step", r.stdout, re.M)


@pytest.mark.parametrize("weight", ["z_loss_weight", "balance_loss_weight"])
def test_a_benchmarked_step_trains_the_router_with_the_auxiliary_losses(tmp_path, weight):
    """The step bench times is train.py's: the balance loss and the z-loss reach the router's gradient. (An
    older copy of the step read a renamed key and left them out: a weight of 0 and of 10 gave bit-identical
    router weights.)"""
    from nanomoe.configurator import parse_args
    from nanomoe.distributed.parallel import setup_processes
    routers = []
    for value in (0.0, 10.0):
        flags = [*TINY, "--moe_top_k=2", "--grad_clip=0", f"--{weight}={value}"]
        cfg = SimpleNamespace(**parse_args(bench.KEYS, flags))
        model, _, step = bench.make_step("grouped", cfg, setup_processes(cfg))
        step()
        routers.append(model.moe_layers()[0].router.weight.detach().clone())
    assert not torch.equal(routers[0], routers[1])


# ----------------------------------------------------------------------------- plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shakespeare_data):
    """out_dirs of a dense and an MoE run (4 iterations, evals at 0, 2 and 4)."""
    work = tmp_path_factory.mktemp("plot_runs")
    for name, extra in (("dense", []), ("moe", ["--n_experts=4", "--moe_top_k=2", "--moe_every=2"])):
        assert_ok(run_script(["train.py", "--dataset=shakespeare_char", f"--data_root={shakespeare_data}",
                              f"--out_dir={work / name}", *TINY_MODEL, *TINY_RUN, "--max_iters=4", "--eval_interval=2",
                              *extra], cwd=work))
    return work / "dense", work / "moe"


def plot_cli(argv, capsys):
    """tools.plot's command line in this process (matplotlib is slow to import): (exit code, stdout, stderr)."""
    return run_main(plot.main, argv, capsys)


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC


@needs_matplotlib
@pytest.mark.parametrize("x", ["iter", pytest.param("tokens", marks=pytest.mark.slow)])
def test_plot_writes_curves_and_expert_load(runs, tmp_path, capsys, x):
    code, out, err = plot_cli([*runs, "-o", tmp_path / "runs.png", "--x", x], capsys)
    assert code == 0, err
    assert_png(tmp_path / "runs.png")
    assert_png(tmp_path / "runs_experts.png")
    assert "runs_experts.png" in out


@needs_matplotlib
@pytest.mark.slow  # drawing takes seconds
def test_dense_runs_give_no_expert_image(runs, tmp_path, capsys):
    code, _, err = plot_cli([runs[0], "-o", tmp_path / "dense.png"], capsys)
    assert code == 0, err
    assert_png(tmp_path / "dense.png")
    assert not (tmp_path / "dense_experts.png").exists()


@needs_matplotlib
def test_expert_load_is_read_per_layer(runs):
    loads, source = plot.expert_loads(plot.read_metrics(runs[1]))
    assert source == "val at eval" and [r["iter"] for r, _ in loads] == [0, 2, 4]
    last = loads[-1][1]
    assert len(last) == 1 and len(last[0]) == 4  # moe_every=2 on 2 layers: one MoE layer of 4 experts
    assert sum(last[0]) == pytest.approx(1.0)


def plot_with_appended(run_dir, text, tmp_path, capsys):
    """tools.plot on a copy of run_dir whose metrics.jsonl ends with text; -> (exit code, stdout, stderr)."""
    live = tmp_path / "live"
    shutil.copytree(run_dir, live)
    with open(live / "metrics.jsonl", "a") as f:
        f.write(text)
    return plot_cli([live, "-o", tmp_path / "live.png"], capsys)


@needs_matplotlib
@pytest.mark.slow  # drawing takes seconds
def test_a_run_being_written_is_plotted(runs, tmp_path, capsys):
    # train.py is in the middle of the last line
    code, _, err = plot_with_appended(runs[1], '{"type": "train", "iter": 4, "time": 17', tmp_path, capsys)
    assert code == 0 and err == "", err
    assert_png(tmp_path / "live_experts.png")


@needs_matplotlib
def test_folder_without_metrics_is_one_line_error(runs, tmp_path, capsys):
    code, out, err = plot_cli([runs[0], tmp_path, "-o", tmp_path / "x.png"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: no metrics.jsonl in") and str(tmp_path) in err
    assert not (tmp_path / "x.png").exists()


def test_missing_matplotlib_names_the_install(runs, tmp_path):
    r = run(["tools.plot", runs[0], "-o", tmp_path / "x.png"], cwd=tmp_path, env=without_matplotlib(tmp_path),
            check=False)
    assert_user_error(r, "tools.plot needs matplotlib: pip install matplotlib")


@needs_matplotlib
@pytest.mark.slow  # drawing takes seconds
def test_an_existing_image_is_replaced_only_with_force(runs, tmp_path, capsys):
    (tmp_path / "mine.png").write_bytes(b"someone's picture")
    code, _, err = plot_cli([runs[1], "-o", tmp_path / "mine.png"], capsys)
    assert code == 2 and err.startswith("error: ") and "--force" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "mine.png").read_bytes() == b"someone's picture"
    assert not (tmp_path / "mine_experts.png").exists()
    code, _, _ = plot_cli([runs[1], "-o", tmp_path / "mine.png", "--force"], capsys)
    assert code == 0
    assert_png(tmp_path / "mine.png")


# metrics records of the wrong types (a damaged or hand-edited log): skipped, each with a warning naming its line
DAMAGED_RECORDS = {"string-iter": '{"type": "eval", "iter": "4", "val_loss": 1.0}',
                   "null-iter": '{"type": "eval", "iter": null, "val_loss": 1.0}',
                   "float-iter": '{"type": "eval", "iter": 2.5, "val_loss": 1.0}',
                   "string-val_loss": '{"type": "eval", "iter": 4, "val_loss": "low"}',
                   "empty-expert_load": '{"type": "eval", "iter": 4, "val_expert_load": []}',
                   "ragged-expert_load": '{"type": "eval", "iter": 4, "val_expert_load": [[0.5, 0.5], [1.0]]}',
                   "no-type": '{"iter": 4, "val_loss": 1.0}', "list": "[4, 1.0]", "number": "4"}


@pytest.mark.parametrize("name", DAMAGED_RECORDS)
def test_damaged_metrics_records_are_skipped_with_a_warning_naming_the_line(runs, tmp_path, capsys, name):
    live = tmp_path / "run"
    shutil.copytree(runs[1], live)
    lines = (live / "metrics.jsonl").read_text().splitlines()
    (live / "metrics.jsonl").write_text("\n".join([lines[0], DAMAGED_RECORDS[name], *lines[1:]]) + "\n")
    records = plot.read_metrics(live)
    assert records == plot.read_metrics(runs[1])  # the good records, all of them
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {live / 'metrics.jsonl'} line 2 ") and "skipped" in err[0]


@needs_matplotlib
@pytest.mark.slow  # drawing takes seconds
def test_a_damaged_record_still_plots_the_rest(runs, tmp_path, capsys):
    damaged = DAMAGED_RECORDS["string-iter"] + "\n" + DAMAGED_RECORDS["empty-expert_load"] + "\n"
    code, out, err = plot_with_appended(runs[1], damaged, tmp_path, capsys)
    assert code == 0 and err.count("warning: ") == 2, err
    assert_png(tmp_path / "live_experts.png")


@needs_matplotlib
@pytest.mark.parametrize("name, words", [("", ["is not a file name"]), ("{tmp}", ["is not a file name"]),
                                         ("{tmp}/x.xyz", ["cannot write '.xyz' images", ".png"]),
                                         ("{tmp}/nofolder/x.png", ["does not exist"]),
                                         ("{tmp}/afile/x.png", ["afile", "is a file"])])
def test_plot_output_names_that_cannot_be_used_are_one_line(runs, tmp_path, capsys, name, words):
    (tmp_path / "afile").write_text("x")
    before = sorted(os.listdir(tmp_path))
    code, out, err = plot_cli([runs[1], "-o", name.replace("{tmp}", str(tmp_path))], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert all(w in err for w in words), err
    assert sorted(os.listdir(tmp_path)) == before


@needs_matplotlib
@pytest.mark.slow  # drawing takes seconds
def test_plot_output_without_an_extension_is_written_as_the_png_it_names(runs, tmp_path, capsys):
    code, out, err = plot_cli([runs[1], "-o", tmp_path / "curves"], capsys)
    assert code == 0, err
    assert out.splitlines() == [f"wrote {tmp_path / 'curves.png'}", f"wrote {tmp_path / 'curves_experts.png'}"]
    assert_png(tmp_path / "curves.png")
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "curves_experts.png"]


@needs_matplotlib
@pytest.mark.slow  # drawing takes seconds
def test_plot_on_a_full_disk_keeps_the_old_image_and_leaves_no_partial_file(runs, tmp_path, capsys, monkeypatch):
    import matplotlib.figure
    (tmp_path / "mine.png").write_bytes(b"the old picture")
    real = matplotlib.figure.Figure.savefig

    def savefig_until_full(self, f, *args, **kwargs):
        real(self, f, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig_until_full)
    code, out, err = plot_cli([runs[1], "-o", tmp_path / "mine.png", "--force"], capsys)
    assert code == 2 and err.startswith("error: the disk is full") and len(err.strip().splitlines()) == 1, err
    assert sorted(os.listdir(tmp_path)) == ["mine.png"]
    assert (tmp_path / "mine.png").read_bytes() == b"the old picture"


# ----------------------------------------------------------------------------- study

def study_args(tmp_path, data_root, work):
    return ["tools.study", "--corpora=shakespeare_char", "--variants=dense,top2x8-aux,top1x8-switch", "--seeds=2",
            "--max_iters=4", "--eval_iters=2", "--optimizers=adamw", f"--data_root={data_root}", f"--work={work}",
            f"--docs={tmp_path / 'docs'}"]


@pytest.mark.slow  # nine train.py runs
def test_study_selects_on_one_seed_compares_on_fresh_ones_and_continues(tmp_path, shakespeare_data):
    args = study_args(tmp_path, shakespeare_data, tmp_path / "work")
    first = run(args, cwd=tmp_path)
    summary = json.loads((tmp_path / "work" / "shakespeare_char" / "summary.json").read_text())
    best = summary["best"]
    assert best == min(summary["selection"][1:], key=lambda r: r["final_val"])["variant"]  # picked by the tool
    assert [(r["variant"], r["seed"]) for r in summary["selection"]] == [
        ("dense", 1337), ("top2x8-aux", 1337), ("top1x8-switch", 1337)]
    # the table's figures come from fresh seeds only: the seed the winner was picked on is not among them
    assert [(r["variant"], r["seed"]) for r in summary["comparison"]] == [
        ("dense", 1338), (best, 1338), ("dense", 1339), (best, 1339)]
    assert first.stdout.count("== shakespeare_char ") == 7
    dense_final = [r["final_val"] for r in summary["comparison"] if r["variant"] == "dense"]
    assert summary["target"] == pytest.approx(sum(dense_final) / 2)

    page = (tmp_path / "docs" / "study.md").read_text()
    assert f"| **{best}** |" in page and f"Target: {summary['target']:.4f}." in page
    dense_row = next(line for line in page.splitlines() if line.startswith("| dense | ") and " of 2 |" in line)
    assert dense_row.split("|")[2].strip().startswith(f"{sum(dense_final) / 2:.4f} (")  # mean (min – max)
    assert (tmp_path / "docs" / "study_cpu_shakespeare_char.png").stat().st_size > 10_000

    # the committed page is not replaced without --force; with it, finished runs are read back, not trained
    refused = run(args, cwd=tmp_path, check=False)
    assert_user_error(refused, "study.md already exists: add --force")
    again = run(args + ["--force"], cwd=tmp_path)
    assert "== " not in again.stdout and (tmp_path / "docs" / "study.md").read_text() == page

    # an interrupted study continues: a run stopped after its first checkpoint is resumed, not restarted, and
    # ends where the uninterrupted run ended; Muon arms asked for later are the only runs added
    work = tmp_path / "work2"
    shutil.copytree(tmp_path / "work", work)
    args2 = [a for a in args[:-2] if a != "--optimizers=adamw"] + [f"--work={work}", f"--docs={tmp_path / 'docs2'}"]
    flags = study.train_flags("shakespeare_char", "dense", "adamw", 1338, study.parse_args(args2[1:]))
    shutil.rmtree(flags["out_dir"])
    partial = {**flags, "max_iters": 2, "eval_interval": 2}  # the same run, stopped after its step-2 checkpoint
    run(["train.py"] + [f"--{k}={v}" for k, v in partial.items()], cwd=tmp_path)
    continued = run(args2, cwd=tmp_path)
    assert continued.stdout.count("== ") == 5 and "== shakespeare_char dense seed 1338 (continued)" in continued.stdout
    resumed = json.loads((work / "shakespeare_char" / "summary.json").read_text())
    assert [(r["variant"], r["seed"]) for r in resumed["comparison"]] == [
        (arm, seed) for seed in (1338, 1339) for arm in ("dense", best, "dense+muon", f"{best}+muon")]
    adamw = [r["final_val"] for r in resumed["comparison"] if "+muon" not in r["variant"]]
    assert adamw == [r["final_val"] for r in summary["comparison"]]
    assert f"| {best}+muon | " in (tmp_path / "docs2" / "study.md").read_text()


@pytest.mark.parametrize("arg, message", [("--variants=dense,top9x8", "unknown variants top9x8"),
                                          ("--seeds=0", "--seeds must be at least 1"),
                                          ("--max_iters=0", "--max_iters must be at least 1"),
                                          ("--jobs=0", "--jobs must be at least 1"),
                                          ("--optimizers=muon", "--optimizers must include adamw"),
                                          ("--optimizers=adamw,sgd", "unknown optimizers sgd"),
                                          ("--muon_lr=inf", "--muon_lr must be a positive finite number")])
def test_study_bad_input(tmp_path, monkeypatch, capsys, arg, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(study.main, [arg], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "out-study").exists()


def test_study_says_matplotlib_is_missing_before_training(tmp_path):
    r = run(["tools.study"], cwd=tmp_path, env=without_matplotlib(tmp_path), check=False)
    assert_user_error(r, "tools.study needs matplotlib for its plots: pip install matplotlib")
    assert not (tmp_path / "out-study").exists() and not (tmp_path / "data").exists()


# ----------------------------------------------------------------------------- consolidate

def test_consolidate_without_a_sharded_checkpoint(tmp_path, capsys):
    code, _, err = run_main(consolidate.main, [tmp_path], capsys)
    # its other bad inputs are those of loading a checkpoint: test_reliability.py
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "has no sharded checkpoint (ckpt.dcp)" in err


def _fake_sharded_run(folder):
    """An out_dir whose ckpt.dcp link exists (its checks on --dest come before any shard is read)."""
    (folder / "ckpt-2.dcp").mkdir(parents=True)
    os.symlink("ckpt-2.dcp", folder / "ckpt.dcp")
    return folder


@pytest.mark.parametrize("dest, words", [
    ("{run}/consolidated.pt", ["consolidated.pt already exists", "--force"]),
    ("", ["--dest '' is not a file name"]),
    ("{tmp}", ["is not a file name"]),
    ("{tmp}/afile/moe.pt", ["afile", "is a file"]),
    ("{tmp}/nofolder/moe.pt", ["the folder", "nofolder", "does not exist"]),
    ("/proc/moe.pt", ["--dest", "/proc"]),
    ("{tmp}/mine", ["mine.pt already exists", "--force"]),  # no extension: completed with .pt, then checked
], ids=["exists", "empty", "a-folder", "under-a-file", "folder-missing", "under-proc", "completed-exists"])
def test_consolidate_dest_that_cannot_be_used_is_one_line_and_writes_nothing(tmp_path, capsys, dest, words):
    run_dir = _fake_sharded_run(tmp_path / "run")
    (run_dir / "consolidated.pt").write_bytes(b"a consolidated file from before")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "mine.pt").write_bytes(b"mine")
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    code, out, err = run_main(consolidate.main, [run_dir, "--dest", dest.replace("{run}", str(run_dir)).replace(
        "{tmp}", str(tmp_path))], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert all(w in err for w in words), err
    assert {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")} == before


# ----------------------------------------------------------------------------- every argument parser

# an option written short: argparse would take it as the longer option it starts (`--seed 3` as `--seeds 3`)
ABBREVIATED = [("prepare", ["text", "--input", "x.txt", "--val", "0.2"], "--val"),
               ("plot", ["run", "--forc"], "--forc"),
               ("consolidate", ["run", "--des", "x.pt"], "--des"),
               ("experts", ["run", "--max", "5"], "--max"),
               ("study", ["--seed", "3"], "--seed")]


@pytest.mark.parametrize("tool, argv, option", ABBREVIATED, ids=[t for t, _, _ in ABBREVIATED])
def test_no_parser_takes_an_abbreviated_option(tmp_path, capsys, monkeypatch, tool, argv, option):
    import prepare
    from tools import experts
    main = {"prepare": prepare.main, "plot": plot.main, "consolidate": consolidate.main, "experts": experts.main,
            "study": study.main}[tool]
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(main, argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: unrecognized arguments") and option in err, err
    assert os.listdir(tmp_path) == []
