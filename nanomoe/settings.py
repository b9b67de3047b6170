"""
A setting is declared once, where it lives, and every check reads that declaration (the configurator, the
resume check, the error message):
- a model setting is a dataclass field made with setting() (model.py, moe_model.py): its annotation is its
  type, its metadata holds its range, its choices and whether it is `runtime` (how the model computes, not
  what it is: a run loading a checkpoint may set it anew) or part of the model (the checkpoint decides it);
- a script setting is a module-level variable (train.py, sample.py...): its default gives its type, and its
  annotation, where it has one, the rest: `batch_size: Valid(min=1) = 12`,
  `peak_flops: Valid(float | None, above=0) = None`, `dtype: Valid(choices=("auto", "float32")) = "auto"`.
A key may also be a list of plain values (`mamba_layers: list[int]`, written --mamba_layers=[0,1,2]): its
range and choices then apply to each element.
"""
import inspect
import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields

from nanomoe.errors import UserError

PLAIN_TYPES = (int, float, bool, str, type(None))
MAX_SEED = 2**32 - 1 - 1024  # numpy's seeds end at 2**32 - 1; each DDP rank adds its rank (and eval adds 999)


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


def script_keys(module):
    """{name: Key} for a script's module-level settings (script_keys(sys.modules[__name__])): plain values with
    lowercase names not starting with '_' (CONSTANTS and _private names are not settings). The annotations
    are read with inspect.get_annotations, which holds on Python 3.10 to 3.14 (where PEP 649 evaluates them
    lazily and a module's globals no longer hold __annotations__)."""
    annotations = inspect.get_annotations(module)
    return {k: Key.of_default(v, annotations.get(k)) for k, v in vars(module).items()
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
    # inf and nan pass every comparison test or fail it silently (nan < x is False, inf > 0 is True): a
    # learning rate of inf would train NaN steps, a temperature of inf sample noise. 1e999 parses as inf.
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{what} is not a finite number; set --{key} to a finite value"
                        + (f" ({spec.rule()})" if spec.rule() else ""))
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
