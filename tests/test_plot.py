"""
plot.py on the metrics.jsonl of real tiny train.py runs (dense and MoE): the images it writes, a last line
still being written, and the one-line errors.
"""
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import TINY_MODEL, TINY_RUN, assert_user_error, run, run_in_process

import plot  # noqa: E402  (matplotlib is imported inside plot.main)

try:
    import matplotlib  # noqa: F401
    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False
# all but the test of the missing-matplotlib message need it
needs_matplotlib = pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="plot.py needs matplotlib (pip install matplotlib)")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shakespeare_data):
    """out_dirs of a dense and an MoE run (4 iterations, evals at 0, 2 and 4)."""
    work = tmp_path_factory.mktemp("plot_runs")
    args = [["train.py", "--dataset=shakespeare_char", f"--data_root={shakespeare_data}", f"--out_dir={work / name}",
             *TINY_MODEL, *TINY_RUN, "--max_iters=4", "--eval_interval=2", *extra]
            for name, extra in (("dense", []), ("moe", ["--n_experts=4", "--moe_top_k=2", "--moe_every=2"]))]
    with ThreadPoolExecutor(2) as pool:  # side by side: most of a tiny run is importing torch
        list(pool.map(lambda a: run(a, cwd=work), args))
    return work / "dense", work / "moe"


def plot_cli(argv, capsys):
    """plot.py's command line in this process (matplotlib is slow to import): (exit code, stdout, stderr)."""
    return run_in_process(plot.main, argv, capsys)


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC


@needs_matplotlib
@pytest.mark.parametrize("x", ["iter", "tokens"])
def test_plot_writes_curves_and_expert_load(runs, tmp_path, capsys, x):
    code, out, err = plot_cli([*runs, "-o", tmp_path / "runs.png", "--x", x], capsys)
    assert code == 0, err
    assert_png(tmp_path / "runs.png")
    assert_png(tmp_path / "runs_experts.png")
    assert "runs_experts.png" in out


@needs_matplotlib
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


@needs_matplotlib
def test_a_run_being_written_is_plotted(runs, tmp_path, capsys):
    live = tmp_path / "live"
    shutil.copytree(runs[1], live)
    with open(live / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "iter": 4, "time": 17')  # train.py is in the middle of this line
    code, _, err = plot_cli([live, "-o", tmp_path / "live.png"], capsys)
    assert code == 0 and err == "", err
    assert_png(tmp_path / "live_experts.png")


@needs_matplotlib
def test_folder_without_metrics_is_one_line_error(runs, tmp_path, capsys):
    code, out, err = plot_cli([runs[0], tmp_path, "-o", tmp_path / "x.png"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: no metrics.jsonl in") and str(tmp_path) in err
    assert not (tmp_path / "x.png").exists()


def test_missing_matplotlib_names_the_install(runs, tmp_path):
    fake = tmp_path / "fake" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    r = run(["plot.py", runs[0], "-o", tmp_path / "x.png"], cwd=tmp_path, env={"PYTHONPATH": str(fake.parent)},
            check=False)
    assert_user_error(r, "plot.py needs matplotlib: pip install matplotlib")


@needs_matplotlib
def test_an_existing_image_is_replaced_only_with_force(runs, tmp_path, capsys):
    (tmp_path / "mine.png").write_bytes(b"someone's picture")
    code, _, err = plot_cli([runs[1], "-o", tmp_path / "mine.png"], capsys)
    assert code == 2 and err.startswith("error: ") and "--force" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "mine.png").read_bytes() == b"someone's picture"
    assert not (tmp_path / "mine_experts.png").exists()
    code, _, _ = plot_cli([runs[1], "-o", tmp_path / "mine.png", "--force"], capsys)
    assert code == 0
    assert_png(tmp_path / "mine.png")
