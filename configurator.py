"""
Config parsing shared by train.py, sample.py, bench.py and export.py, with nanoGPT's semantics:

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

Positional arguments are Python files exec'd in order (they assign module-level names such as
`batch_size = 32`); then every `--key=value` is parsed with ast.literal_eval (falling back to a plain
string). Unlike nanoGPT, mistakes are reported as one readable line instead of a bare assert: unknown keys
come with a suggestion, a value must have the key's type, and a value outside the key's range is refused.

Each key is declared once, where it lives:
- a model setting is a dataclass field made with setting() (model.py, moe_model.py): its annotation is its
  type, its metadata holds its range, its choices and whether it is `runtime` (how the model computes, not
  what it is: a run loading a checkpoint may set it anew) or part of the model (the checkpoint decides it);
- a script setting is a module-level variable (train.py, sample.py...): its default gives its type, and its
  annotation, where it has one, the rest: `batch_size: Valid(min=1) = 12`,
  `peak_flops: Valid(float | None, above=0) = None`, `dtype: Valid(choices=("auto", "float32")) = "auto"`.
A key may also be a list of plain values (`mamba_layers: list[int]`, written --mamba_layers=[0,1,2]): its
range and choices then apply to each element.
"""
import ast
import difflib
import os
import sys
import types
import typing
from dataclasses import MISSING, dataclass, field, fields

from common import UserError

PLAIN_TYPES = (int, float, bool, str, type(None))


@dataclass
class Key:
    """One config key: its default, the types it takes and the values that can work."""
    default: object
    types: tuple
    help: str = ""
    runtime: bool = False  # model settings only: True = may differ from the checkpoint's value
    min: float = None  # inclusive bounds
    max: float = None
    above: float = None  # exclusive bounds
    below: float = None
    choices: tuple = None

    def rule(self):
        """The declared range, as people write it: '>= 0 and < 1'."""
        bounds = ((self.min, ">="), (self.max, "<="), (self.above, ">"), (self.below, "<"))
        return " and ".join(f"{op} {b}" for b, op in bounds if b is not None)

    @classmethod
    def of_default(cls, default, annotation=None):
        """A key typed by its annotation (a type or a Valid), else by its default (a None default without one
        takes any value)."""
        declaration = {}
        if isinstance(annotation, Valid):
            annotation, declaration = annotation.type, annotation.declaration
        if annotation is not None:
            return cls(default, types_of(annotation), **declaration)
        return cls(default, PLAIN_TYPES if default is None else (type(default),), **declaration)


class Valid:
    """The annotation of a script setting that declares what values can work: `lr: Valid(min=0) = 6e-4`.
    type is needed only where the default does not say it (a None default)."""

    def __init__(self, type=None, **declaration):
        self.type, self.declaration = type, declaration


def setting(default, help="", **declaration):
    """A config dataclass field: setting(0.0, "dropout rate", runtime=True, min=0, below=1). A list default
    becomes a factory, so instances never share (and mutate) one list."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **declaration})
    return field(default=default, metadata={"help": help, **declaration})


def types_of(annotation):
    """int -> (int,); `int | None` -> (int, NoneType); `list[int]` -> (list[int],)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def field_default(f):
    return f.default_factory() if f.default is MISSING else f.default


def dataclass_keys(config_cls, skip=()):
    """{name: Key} for the fields of a config dataclass (GPTConfig, MoEConfig)."""
    return {f.name: Key(field_default(f), types_of(f.type), **f.metadata) for f in fields(config_cls)
            if f.name not in skip}


def script_keys(namespace):
    """{name: Key} for a script's module-level settings: plain values with lowercase names not starting with
    '_' (CONSTANTS and _private names are not settings)."""
    annotations = namespace.get("__annotations__", {})
    return {k: Key.of_default(v, annotations.get(k)) for k, v in namespace.items()
            if not k.startswith("_") and k.islower() and isinstance(v, PLAIN_TYPES)}


def type_name(t):
    return "None" if t is type(None) else str(t) if typing.get_origin(t) else t.__name__


def has_type(value, t):
    """isinstance for a key's types, list[int] included (bool is not an int here)."""
    if typing.get_origin(t) is list:
        item, = typing.get_args(t)
        return type(value) is list and all(type(v) is item for v in value)
    return type(value) is t


def check_value(key, value, spec, where=None):
    """value converted to the key's type (an int is fine for a float), or a UserError naming the problem."""
    at = f" in {where}" if where else ""
    if isinstance(value, int) and not isinstance(value, bool) and float in spec.types and int not in spec.types:
        value = float(value)
    if not any(has_type(value, t) for t in spec.types):
        expected = " or ".join(map(type_name, spec.types))
        raise UserError(f"config key '{key}'{at} expects {expected} (default {spec.default!r}) but got "
                        f"{type(value).__name__} {value!r}")
    if isinstance(value, list):  # the declared range and choices hold for each element
        for v in value:
            check_in_range(key, v, spec, at, f"{key}={value!r}{at} has {v!r}, which")
        return value
    if value is None or isinstance(value, bool):
        return value
    check_in_range(key, value, spec, at, f"{key}={value!r}{at}")
    return value


def check_in_range(key, value, spec, at, what):
    if spec.choices is not None and value not in spec.choices:
        raise UserError(f"{what} is not one of {', '.join(map(repr, spec.choices))}")
    ok = [spec.min is None or value >= spec.min, spec.max is None or value <= spec.max,
          spec.above is None or value > spec.above, spec.below is None or value < spec.below]
    if not all(ok):
        raise UserError(f"{what} is out of range: it must be {spec.rule()}"
                        + (f" ({spec.help})" if spec.help else "") + f"; set --{key} to such a value")


def check_fields(config):
    """Check (and convert int -> float) every field of a config dataclass instance against its declaration."""
    for f in fields(config):
        spec = Key(field_default(f), types_of(f.type), **f.metadata)
        setattr(config, f.name, check_value(f.name, getattr(config, f.name), spec))


def takes_list(spec):
    return spec is not None and any(typing.get_origin(t) is list for t in spec.types)


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
    with open(path) as f:
        source = f.read()
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
    script = os.path.basename(sys.argv[0]) or "SCRIPT"
    print(f"{doc}\n\nusage: python {script} [config.py ...] [--key=value ...]\nconfig keys and defaults "
          "(the README's table says what each means):")
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
        if str in keys[key].types and type(value) not in keys[key].types:
            value = raw  # a string setting takes numbers and comma lists as written: --bench_variants=dense,loop
        if not isinstance(value, PLAIN_TYPES) and not takes_list(keys[key]):
            raise UserError(f"config key '{key}': value {raw!r} is not a plain int, float, bool, string or None")
        config[key] = check_value(key, value, keys[key], f"'{arg}'")
        set_keys.add(key)
    return config
