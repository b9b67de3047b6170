"""
configurator.parse_args: config files exec'd in order, then --key=value overrides; every mistake is a
UserError with a message a person can act on. One case goes through train.py to see what the user sees.
"""
import pytest

from common import UserError
from conftest import assert_user_error, run
from configurator import parse_args

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


def test_unknown_flag_suggests_closest_key():
    msg = error(["--n_embed=32"])
    assert "unknown config key 'n_embed'" in msg and "did you mean 'n_embd'?" in msg


def test_unknown_key_in_file_names_file_and_suggests(tmp_path):
    path = write(tmp_path, "typo.py", "n_embed = 32\n")
    msg = error([path])
    assert "'n_embed'" in msg and "did you mean 'n_embd'?" in msg and path in msg


def test_unknown_key_far_from_all_has_no_suggestion():
    msg = error(["--zzzzzz=1"])
    assert "unknown config key 'zzzzzz'" in msg and "did you mean" not in msg


@pytest.mark.parametrize("flag, expected, given", [
    ("--batch_size=1.5", "int", "float"),
    ("--batch_size=True", "int", "bool"),  # bool is an int subclass in Python, but not a batch size
    ("--compile=1", "bool", "int"),
    ("--learning_rate=fast", "float", "str"),
])
def test_type_mismatch_names_key_expected_and_given(flag, expected, given):
    key = flag[2:].split("=")[0]
    msg = error([flag])
    assert f"'{key}'" in msg and f"expects {expected}" in msg and f"got {given}" in msg


def test_type_mismatch_in_file(tmp_path):
    path = write(tmp_path, "bad.py", "batch_size = 'big'\n")
    msg = error([path])
    assert "'batch_size'" in msg and "expects int" in msg and "got str" in msg and path in msg


def test_int_accepted_for_float():
    cfg = parse_args(DEFAULTS, ["--learning_rate=1"])
    assert cfg["learning_rate"] == 1.0 and type(cfg["learning_rate"]) is float


def test_flag_without_equals_is_explained():
    msg = error(["--batch_size", "32"])
    assert "'--batch_size' has no value" in msg and "--key=value" in msg


def test_missing_config_file(tmp_path):
    missing = str(tmp_path / "nope.py")
    msg = error([missing])
    assert f"config file '{missing}' not found" in msg


def test_config_file_that_raises(tmp_path):
    path = write(tmp_path, "boom.py", "batch_size = 4\nx = 1 / 0\n")
    msg = error([path])
    assert path in msg and "ZeroDivisionError" in msg


@pytest.mark.parametrize("flag, words", [
    ("--n_kv_head=abc", ["'n_kv_head'", "expects int or None", "got str 'abc'"]),
    ("--peak_flops=fast", ["'peak_flops'", "expects float or None", "got str 'fast'"]),
    ("--n_experts=-1", ["n_experts=-1", "must be >= 0"]),
    ("--expert_hidden=0", ["expert_hidden=0", "must be >= 1"]),
    ("--dropout=1.0", ["dropout=1.0", "must be >= 0 and < 1"]),
    ("--moe_impl=fast", ["moe_impl='fast'", "'loop'"]),
])
def test_train_keys_are_checked_against_their_declared_type_and_range(flag, words):
    """Model keys take their type and range from the config fields; script keys typed `float | None` too."""
    import train
    with pytest.raises(UserError) as e:
        parse_args(train.KEYS, [flag])
    for w in words:
        assert w in str(e.value), str(e.value)


def test_declared_keys_take_none_and_ints_for_floats():
    import train
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


def test_non_plain_value_is_rejected():
    msg = error(["--n_head=[1, 2]"])
    assert "'n_head'" in msg and "not a plain" in msg
    # a string key takes any value as written
    assert parse_args(DEFAULTS, ["--out_dir=[1, 2]"])["out_dir"] == "[1, 2]"


def test_train_cli_reports_unknown_key_in_one_line(tmp_path):
    r = run(["train.py", "--n_embed=32", "--device=cpu"], cwd=tmp_path, check=False)
    assert_user_error(r, "unknown config key 'n_embed'", "did you mean 'n_embd'?")
    assert list(tmp_path.iterdir()) == []  # nothing was created before the config was checked


def test_set_keys_lists_what_files_and_flags_set_even_at_the_default_value(tmp_path):
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("n_layer = 12\nimport math\n_helper = 3\n")
    set_keys = set()
    parse_args({"n_layer": 12, "batch_size": 8, "lr": 0.1}, [str(cfg_file), "--lr=0.1"], set_keys)
    assert set_keys == {"n_layer", "lr"}


def test_help_lists_every_key_with_its_default_and_exits_0(tmp_path):
    r = run(["sample.py", "--help"], cwd=tmp_path)
    assert "usage: python sample.py" in r.stdout
    assert "--temperature=0.8" in r.stdout and "--out_dir='out'" in r.stdout


def test_readme_documents_every_train_config_key():
    import train
    from conftest import REPO
    readme = (REPO / "README.md").read_text()
    missing = [k for k in train.KEYS if f"| `{k}` |" not in readme]
    assert not missing, f"README's config table lacks {missing}"


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
    import bench
    import train
    from conftest import REPO
    for path in sorted((REPO / "config").glob("*.py")):
        keys = bench.KEYS if path.name.startswith("bench") else train.KEYS
        cfg = parse_args(keys, [str(path)])
        assert cfg["out_dir"] != "out" or path.name.startswith("bench"), path.name
    moe = parse_args(train.KEYS, [str(REPO / "config" / "train_gpt2_moe_16_experts.py")])
    assert (moe["n_experts"], moe["moe_top_k"], moe["moe_every"], moe["n_layer"]) == (16, 1, 2, 12)


def test_a_list_key_takes_a_list_from_flags_and_files_and_checks_each_element(tmp_path):
    import train
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
