"""bench.py on a CPU: one line per variant with its figures, the MoE/dense ratios, clear errors."""
import re

from conftest import assert_user_error, run

TINY = ["--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16",
        "--batch_size=2", "--gradient_accumulation_steps=1", "--vocab_size=64", "--n_experts=4",
        "--bench_warmup=1", "--bench_steps=2"]
LINE = re.compile(r"^(dense|moe-loop|moe-grouped)\s+([\d.]+) ms/step\s+([\d,]+) tok/s .*params ([\d.]+)M, "
                  r"active ([\d.]+)M  ckpt save \d+ ms \(([\d.]+) MiB\)$", re.M)


def test_bench_prints_every_variant_and_the_ratios(tmp_path):
    r = run(["bench.py", *TINY, "--moe_top_k=1"], cwd=tmp_path)
    rows = {m[0]: m for m in LINE.findall(r.stdout)}
    assert set(rows) == {"dense", "moe-loop", "moe-grouped"}, r.stdout
    assert all(float(row[1]) > 0 and float(row[5]) > 0 for row in rows.values())
    # top-1 of 4 experts: the MoE has more parameters, the same active count as the dense model
    assert float(rows["moe-loop"][3]) > float(rows["dense"][3])
    assert rows["moe-loop"][4] == rows["dense"][4] == rows["moe-grouped"][4]
    assert re.search(r"^ratio: moe-loop/dense [\d.]+x, moe-grouped/dense [\d.]+x$", r.stdout, re.M)


def test_bench_rejects_an_unknown_variant(tmp_path):
    r = run(["bench.py", *TINY, "--bench_variants=dense,fast"], cwd=tmp_path, check=False)
    assert_user_error(r, "bench_variants", "fast")
