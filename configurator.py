"""
Config parsing shared by train.py, sample.py and bench.py, with nanoGPT's semantics:

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

Positional arguments are Python files exec'd in order (they assign module-level names such as
`batch_size = 32`); then every `--key=value` is parsed with ast.literal_eval (falling back to a plain
string). Unlike nanoGPT, mistakes are reported as one readable line instead of a bare assert:
unknown keys come with a suggestion, and a value must have the type of the key's default.
"""
import ast
import difflib
import os
import sys

from common import UserError

PLAIN_TYPES = (int, float, bool, str, type(None))


def _suggest(key, known):
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check(key, value, defaults, where):
    """Reject unknown keys and values whose type differs from the default's (int for float is fine)."""
    if key not in defaults:
        raise UserError(f"unknown config key '{key}' in {where}{_suggest(key, list(defaults))}")
    default = defaults[key]
    if default is None:
        return value  # optional settings take any plain value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    if type(value) is not type(default):
        raise UserError(f"config key '{key}' in {where} expects {type(default).__name__} "
                        f"(default {default!r}) but got {type(value).__name__} {value!r}")
    return value


def _assigned_names(source, path):
    """Names a config file assigns at its top level (`x = ...`, `x += ...`), whatever the value."""
    try:
        tree = ast.parse(source, path)
    except SyntaxError as e:
        raise UserError(f"config file '{path}' has a syntax error on line {e.lineno}: {e.msg}") from None
    names = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def _run_config_source(path, scope, defaults, set_keys):
    """Exec one config file into scope. Inside it, include("other.py") first runs another config file
    (relative to this one) into the same scope, so a variant states only what it changes."""
    if not os.path.isfile(path):
        raise UserError(f"config file '{path}' not found (positional arguments are config files, "
                        f"overrides are written --key=value)")
    with open(path) as f:
        source = f.read()
    set_keys.update(k for k in _assigned_names(source, path) if k in defaults)
    outer_include = scope.get("include")
    folder = os.path.dirname(path)
    scope["include"] = lambda name: _run_config_source(os.path.join(folder, name), scope, defaults, set_keys)
    try:
        exec(compile(source, path, "exec"), scope)
    except UserError:
        raise
    except Exception as e:  # a config file is user code: report what it raised, where, in one line
        raise UserError(f"config file '{path}' raised {type(e).__name__}: {e}") from None
    finally:  # an included file's include() resolved from its own folder; the outer file's is restored
        if outer_include is None:
            del scope["include"]
        else:
            scope["include"] = outer_include


def _exec_config_file(path, config, defaults, set_keys):
    scope = dict(config)
    _run_config_source(path, scope, defaults, set_keys)
    for key, value in scope.items():
        # modules, functions and _private helpers a config file defines are not settings
        if key.startswith("_") or not isinstance(value, PLAIN_TYPES):
            continue
        config[key] = _check(key, value, defaults, f"config file '{path}'")


def print_help(defaults):
    """-h/--help: the script's docstring and every config key with its default, then exit 0."""
    doc = (sys.modules["__main__"].__doc__ or "").strip()
    script = os.path.basename(sys.argv[0]) or "SCRIPT"
    print(f"{doc}\n\nusage: python {script} [config.py ...] [--key=value ...]\nconfig keys and defaults "
          "(the README's table says what each means):")
    for key, value in defaults.items():
        print(f"  --{key}={value!r}")
    sys.exit(0)


def parse_args(defaults, argv, set_keys=None):
    """Return a new dict: defaults, updated by each config file and --key=value in argv, in order.
    If a set is given as set_keys, the keys that the files and flags set are added to it."""
    config = dict(defaults)
    set_keys = set() if set_keys is None else set_keys
    if "-h" in argv or "--help" in argv:
        print_help(defaults)
    for arg in argv:
        if not arg.startswith("--"):
            _exec_config_file(arg, config, defaults, set_keys)
            continue
        if "=" not in arg:
            raise UserError(f"'{arg}' has no value: write overrides as --key=value (e.g. --batch_size=32)")
        key, raw = arg[2:].split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (SyntaxError, ValueError):
            value = raw  # a bare word such as --device=cpu is a string
        if isinstance(defaults.get(key), str) and isinstance(value, (int, float, type(None), tuple)):
            value = raw  # a string setting takes numbers and comma lists as written: --nan_inject_iters=3,4
        if not isinstance(value, PLAIN_TYPES):
            raise UserError(f"config key '{key}': value {raw!r} is not a plain int, float, bool, string or None")
        config[key] = _check(key, value, defaults, f"'{arg}'")
        set_keys.add(key)
    return config
