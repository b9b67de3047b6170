"""
nanomoe/configurator.parse_args: config files exec'd in order, then --key=value overrides, with nanoGPT's
semantics; what each key takes comes from its one declaration (nanomoe/settings.py). The mistakes a person
makes on the command line (unknown keys, wrong types, values out of range, missing or failing config files)
are in test_reliability.py's table, run through the scripts.
"""
import pytest

import train
from conftest import REPO, run_script
from nanomoe.configurator import parse_args
from nanomoe.errors import UserError
from tools import bench

DEFAULTS = {"batch_size": 12, "learning_rate": 6e-4, "n_embd": 768, "n_head": 12, "compile": True,
            "device": "auto", "out_dir": "out", "peak_flops": None}


def write(tmp_path, name, source):
    path = tmp_path / name
    path.write_text(source)
    return str(path)


def error(argv):
    with pytest.raises(UserError) as e:
        parse_args(DEFAULTS, argv)
    return str(e.value)


def test_defaults_untouched_without_arguments():
    cfg = parse_args(DEFAULTS, [])
    assert cfg == DEFAULTS and cfg is not DEFAULTS


def test_files_in_order_then_flags_in_order(tmp_path):
    base = write(tmp_path, "base.py", "batch_size = 4\nn_embd = 64\n")
    # a later file sees what earlier files set, like nanoGPT's exec'd configs
    small = write(tmp_path, "small.py", "batch_size = 8\nn_head = n_embd // 16\n")
    cfg = parse_args(DEFAULTS, [base, small, "--batch_size=16", "--device=cpu", "--batch_size=32"])
    assert cfg["batch_size"] == 32  # the last override wins
    assert cfg["n_embd"] == 64 and cfg["n_head"] == 4
    assert cfg["device"] == "cpu"
    assert cfg["learning_rate"] == 6e-4  # untouched keys keep their defaults
    assert DEFAULTS["batch_size"] == 12  # the defaults dict itself is not modified


def test_second_file_overrides_first(tmp_path):
    a = write(tmp_path, "a.py", "batch_size = 4\n")
    b = write(tmp_path, "b.py", "batch_size = 8\n")
    assert parse_args(DEFAULTS, [a, b])["batch_size"] == 8
    assert parse_args(DEFAULTS, [b, a])["batch_size"] == 4


def test_config_file_may_import_and_use_private_helpers(tmp_path):
    path = write(tmp_path, "calc.py", "import math\n_width = 4096\nn_embd = int(math.sqrt(_width))\n"
                                      "def helper():\n    return 1\n")
    cfg = parse_args(DEFAULTS, [path])
    assert cfg["n_embd"] == 64
    assert set(cfg) == set(DEFAULTS)  # math, _width and helper are not settings


def test_unknown_key_far_from_all_has_no_suggestion():
    msg = error(["--zzzzzz=1"])
    assert "unknown config key 'zzzzzz'" in msg and "did you mean" not in msg


def test_int_accepted_for_float():
    cfg = parse_args(DEFAULTS, ["--learning_rate=1"])
    assert cfg["learning_rate"] == 1.0 and type(cfg["learning_rate"]) is float


def test_declared_keys_take_none_and_ints_for_floats():
    cfg = parse_args(train.KEYS, ["--n_kv_head=None", "--peak_flops=4e14", "--rope_theta=500000"])
    assert cfg["n_kv_head"] is None and cfg["peak_flops"] == 4e14
    assert cfg["rope_theta"] == 500000.0 and type(cfg["rope_theta"]) is float


def test_none_allowed_where_default_is_none():
    assert parse_args(DEFAULTS, ["--peak_flops=1e15"])["peak_flops"] == 1e15
    assert parse_args(DEFAULTS, ["--peak_flops=None"])["peak_flops"] is None


def test_bare_words_become_strings():
    cfg = parse_args(DEFAULTS, ["--device=cpu", "--out_dir=out-moe/run 1"])
    assert cfg["device"] == "cpu" and cfg["out_dir"] == "out-moe/run 1"
    # a quoted value is a Python string literal
    assert parse_args(DEFAULTS, ["--device='cuda:1'"])["device"] == "cuda:1"


def test_set_keys_lists_what_files_and_flags_set_even_at_the_default_value(tmp_path):
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("n_layer = 12\nimport math\n_helper = 3\n")
    set_keys = set()
    parse_args({"n_layer": 12, "batch_size": 8, "lr": 0.1}, [str(cfg_file), "--lr=0.1"], set_keys)
    assert set_keys == {"n_layer", "lr"}


@pytest.mark.parametrize("script, usage", [("sample.py", "usage: python sample.py"),
                                           ("tools.bench", "usage: python -m tools.bench")])
def test_help_lists_every_key_with_its_default_and_range_and_exits_0(tmp_path, script, usage):
    r = run_script([script, "--help"], cwd=tmp_path)
    assert r.returncode == 0 and usage in r.stdout
    assert "--temperature=0.8  [> 0]" in r.stdout if script == "sample.py" else "--bench_steps=10  [>= 1]" in r.stdout


def test_config_reference_documents_every_train_config_key():
    reference = (REPO / "docs" / "config.md").read_text()
    missing = [k for k in train.KEYS if f"| `{k}` |" not in reference]
    assert not missing, f"docs/config.md's table lacks {missing}"


def test_include_runs_another_config_from_the_including_files_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path, "sub/base.py", "batch_size = 4\nn_embd = 64\n")
    write(tmp_path, "sub/variant.py", 'include("base.py")\nn_embd = n_embd * 2\n')
    set_keys = set()
    cfg = parse_args(DEFAULTS, [str(tmp_path / "sub" / "variant.py")], set_keys)
    assert cfg["batch_size"] == 4 and cfg["n_embd"] == 128  # the variant sees and changes the base's values
    assert {"batch_size", "n_embd"} <= set_keys
    write(tmp_path, "sub/broken.py", 'include("nope.py")\n')
    assert "nope.py" in error([str(tmp_path / "sub" / "broken.py")])


def test_every_shipped_config_parses():
    for path in sorted((REPO / "config").glob("*.py")):
        keys = bench.KEYS if path.name.startswith("bench") else train.KEYS
        cfg = parse_args(keys, [str(path)])
        assert cfg["out_dir"] != "out" or path.name.startswith("bench"), path.name
    moe = parse_args(train.KEYS, [str(REPO / "config" / "train_gpt2_moe_16_experts.py")])
    assert (moe["n_experts"], moe["moe_top_k"], moe["moe_every"], moe["n_layer"]) == (16, 1, 2, 12)


def test_a_list_key_takes_a_list_from_flags_and_files_and_checks_each_element(tmp_path):
    assert parse_args(train.KEYS, ["--mamba_layers=[0, 2, 3]"])["mamba_layers"] == [0, 2, 3]
    assert parse_args(train.KEYS, [])["mamba_layers"] == []
    path = write(tmp_path, "hybrid.py", "mamba_layers = [i for i in range(4) if i != 1]\n")
    assert parse_args(train.KEYS, [path])["mamba_layers"] == [0, 2, 3]
    for flag, words in [("--mamba_layers=[0, 'a']", ["expects list[int]", "[0, 'a']"]),
                        ("--mamba_layers=(0, 1)", ["expects list[int]", "got tuple"]),
                        ("--mamba_layers=[True]", ["expects list[int]"]),
                        ("--mamba_layers=[1, -2]", ["has -2, which is out of range", ">= 0"])]:
        with pytest.raises(UserError) as e:
            parse_args(train.KEYS, [flag])
        assert all(w in str(e.value) for w in words), str(e.value)
    with pytest.raises(UserError) as e:  # in a file too
        parse_args(train.KEYS, [write(tmp_path, "bad.py", "mamba_layers = [0.5]\n")])
    assert "bad.py" in str(e.value) and "expects list[int]" in str(e.value)
    assert "not a plain" in error(["--n_head=[1, 2]"])  # other keys still take no list
