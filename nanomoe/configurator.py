"""
Config files and --key=value, with nanoGPT's semantics, for train.py, sample.py and tools/:

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

Positional arguments are Python files exec'd in order (they assign module-level names such as
`batch_size = 32`); then every `--key=value` is parsed with ast.literal_eval (falling back to a plain
string). Unlike nanoGPT, mistakes are reported as one readable line instead of a bare assert: unknown keys
come with a suggestion, a value must have the key's type, and a value outside the key's range is refused
(each key's declaration: settings.py).
"""
import ast
import difflib
import os
import sys

from nanomoe.errors import UserError
from nanomoe.files import read_utf8
from nanomoe.settings import PLAIN_TYPES, Key, check_value, takes_list


def _suggest(key, known):
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


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


def _run_config_source(path, scope, keys, set_keys):
    """Exec one config file into scope. Inside it, include("other.py") first runs another config file
    (relative to this one) into the same scope, so a variant states only what it changes."""
    if not os.path.isfile(path):
        raise UserError(f"config file '{path}' not found (positional arguments are config files, "
                        f"overrides are written --key=value)")
    source = read_utf8(path, "config file", "a config file is Python source: save it as UTF-8")
    set_keys.update(k for k in _assigned_names(source, path) if k in keys)
    outer_include = scope.get("include")
    folder = os.path.dirname(path)
    scope["include"] = lambda name: _run_config_source(os.path.join(folder, name), scope, keys, set_keys)
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


def _exec_config_file(path, config, keys, set_keys):
    scope = dict(config)
    _run_config_source(path, scope, keys, set_keys)
    for key, value in scope.items():
        # modules, functions and _private helpers a config file defines are not settings; lists are, when a
        # key takes one (mamba_layers = [0, 1, 2])
        if key.startswith("_") or not (isinstance(value, PLAIN_TYPES) or takes_list(keys.get(key))):
            continue
        if key not in keys:
            raise UserError(f"unknown config key '{key}' in config file '{path}'{_suggest(key, list(keys))}")
        config[key] = check_value(key, value, keys[key], f"config file '{path}'")


def print_help(keys):
    """-h/--help: the script's docstring and every config key with its default, then exit 0."""
    doc = (sys.modules["__main__"].__doc__ or "").strip()
    spec = getattr(sys.modules["__main__"], "__spec__", None)  # set when run as python -m tools.NAME
    command = f"python -m {spec.name}" if spec else f"python {os.path.basename(sys.argv[0]) or 'SCRIPT'}"
    print(f"{doc}\n\nusage: {command} [config.py ...] [--key=value ...]\nconfig keys and defaults "
          "(docs/config.md says what each means):")
    for key, spec in keys.items():
        valid = spec.rule() or (" | ".join(map(repr, spec.choices)) if spec.choices else "")
        if valid and takes_list(spec):
            valid = "each " + valid
        print(f"  --{key}={spec.default!r}" + (f"  [{valid}]" if valid else "") + (f"  # {spec.help}" if spec.help else ""))
    sys.exit(0)


def parse_args(keys, argv, set_keys=None):
    """Return a new dict of values: the defaults, updated by each config file and --key=value in argv, in
    order. keys maps each key to a Key (or to a plain default value, whose type is then the key's type). If a
    set is given as set_keys, the keys that the files and flags set are added to it."""
    keys = {k: v if isinstance(v, Key) else Key.of_default(v) for k, v in keys.items()}
    config = {k: spec.default for k, spec in keys.items()}
    set_keys = set() if set_keys is None else set_keys
    if "-h" in argv or "--help" in argv:
        print_help(keys)
    for arg in argv:
        if not arg.startswith("--"):
            _exec_config_file(arg, config, keys, set_keys)
            continue
        if "=" not in arg:
            raise UserError(f"'{arg}' has no value: write overrides as --key=value (e.g. --batch_size=32)")
        key, raw = arg[2:].split("=", 1)
        if key not in keys:
            raise UserError(f"unknown config key '{key}' in '{arg}'{_suggest(key, list(keys))}")
        try:
            value = ast.literal_eval(raw)
        except (SyntaxError, ValueError):
            value = raw  # a bare word such as --device=cpu is a string
            if float in keys[key].types and raw.strip().lower().lstrip("+-") in ("inf", "infinity", "nan"):
                value = float(raw)  # refused as not finite (settings.check_in_range), not as a word
        if str in keys[key].types and type(value) not in keys[key].types:
            value = raw  # a string setting takes numbers and comma lists as written: --bench_variants=dense,loop
        if not isinstance(value, PLAIN_TYPES) and not takes_list(keys[key]):
            raise UserError(f"config key '{key}': value {raw!r} is not a plain int, float, bool, string or None")
        config[key] = check_value(key, value, keys[key], f"'{arg}'")
        set_keys.add(key)
    return config
