"""study.py: the dense-vs-MoE study runs its variants, tabulates seeds, and picks up where it stopped."""
import json

import pytest

import study
from conftest import assert_user_error, run, run_in_process


@pytest.mark.slow  # three train.py runs
def test_study_tables_seeds_and_resumes(tmp_path, shakespeare_data):
    args = ["study.py", "--corpora=shakespeare_char", "--variants=top2x8-aux,top1x8-switch", "--seeds=2",
            "--max_iters=2", "--eval_iters=2", f"--data_root={shakespeare_data}", f"--work={tmp_path / 'work'}",
            f"--docs={tmp_path / 'docs'}"]
    first = run(args, cwd=tmp_path)
    # one seed of every variant, then the extra seed of the best MoE only (and of dense, when it is studied)
    runs = json.loads((tmp_path / "work" / "shakespeare_char" / "summary.json").read_text())
    best = min(runs, key=lambda r: r["best_val"])["variant"]
    assert sorted((r["variant"], r["seed"]) for r in runs) == sorted(
        [("top2x8-aux", 1337), ("top1x8-switch", 1337), (best, 1338)])
    assert first.stdout.count("== shakespeare_char ") == 3

    rows = (tmp_path / "docs" / "study_cpu_shakespeare_char.md").read_text().splitlines()
    by_variant = {row.split("|")[1].strip(): [c.strip() for c in row.split("|")[2:-1]] for row in rows[2:]}
    other = ({"top1x8-switch", "top2x8-aux"} - {best}).pop()
    assert set(by_variant) == {other, f"**{best}**"}
    moe = by_variant[f"**{best}**"]
    best_vals = [r["best_val"] for r in runs if r["variant"] == best]
    assert moe[0] == "2" and moe[1].startswith(f"{sum(best_vals) / 2:.4f} ± ")  # mean ± spread of 2 seeds
    assert moe[2] == "4,096"  # 2 steps x 2,048 tokens
    assert 0 <= float(moe[4]) and 0 <= float(moe[5]) <= 1  # load CV, dead share
    assert by_variant[other][0] == "1" and " ± " not in by_variant[other][1]
    assert (tmp_path / "docs" / "study_cpu_shakespeare_char.png").stat().st_size > 10_000

    # a second invocation trains nothing new: finished runs are read back, the table is the same
    again = run(args, cwd=tmp_path)
    assert "== " not in again.stdout
    assert (tmp_path / "docs" / "study_cpu_shakespeare_char.md").read_text().splitlines() == rows


@pytest.mark.parametrize("arg, message", [("--variants=dense,top9x8", "unknown variants top9x8"),
                                          ("--seeds=0", "--seeds must be at least 1"),
                                          ("--max_iters=0", "--max_iters must be at least 1")])
def test_study_bad_input(tmp_path, monkeypatch, capsys, arg, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_in_process(study.main, [arg], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "out-study").exists()


def test_study_says_matplotlib_is_missing_before_training(tmp_path):
    fake = tmp_path / "fake" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    r = run(["study.py"], cwd=tmp_path, env={"PYTHONPATH": str(fake.parent)}, check=False)
    assert_user_error(r, "study.py needs matplotlib for its plots: pip install matplotlib")
    assert not (tmp_path / "out-study").exists() and not (tmp_path / "data").exists()
