"""
What the Hugging Face families share (formats.py and each family's file import it): the transformers package
(imported on use, with a message when missing, and quiet: our errors are one line), loading a folder so that
a missing, misshapen or foreign tensor is an error instead of a silently re-initialised weight, GPT-2's hub
names, and a folder's model_type.
"""
import json
import os
from contextlib import contextmanager

import torch

from nanomoe.errors import UserError

HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise UserError("Hugging Face formats need the transformers package: pip install transformers") from None
    return transformers


def first_line(e):
    return (str(e).strip().splitlines() or [""])[0][:300]


@contextmanager
def quiet_transformers():
    """No load reports, warnings or progress bars from transformers while we load or save: what goes wrong is
    our one error line, and what goes right needs no bars."""
    logging = transformers_module().utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def load_config(source):
    """The transformers config of a local folder: read first, so a damaged or foreign one is refused before
    any weight is allocated (a config.json with only a model_type would otherwise build the family's default,
    a model of billions of parameters)."""
    try:
        with quiet_transformers():
            return transformers_module().AutoConfig.from_pretrained(source)
    except Exception as e:  # ValueError, TypeError or transformers' own for bad or unknown fields, ...
        raise UserError(f"cannot read the config of '{source}': {type(e).__name__}: {first_line(e)}") from None


def load_pretrained(model_class, source, hint="", **kwargs):
    """model_class.from_pretrained(source, **kwargs) in float32 (training keeps float32 weights), refusing
    what transformers would only warn about: a tensor the folder lacks (it would start from random values),
    one of another shape, or one the model has no place for. hint ends the message of a failed load."""
    try:
        with quiet_transformers():
            hf, info = model_class.from_pretrained(source, dtype=torch.float32, output_loading_info=True,
                                                   ignore_mismatched_sizes=True, **kwargs)
    except Exception as e:  # OSError for missing files, ValueError for bad configs, ...
        raise UserError(f"cannot load '{source}': {type(e).__name__}: {first_line(e)}{hint}") from None
    problems = []
    if info["missing_keys"]:
        problems.append(f"lacks {names(info['missing_keys'])} (transformers would start them from random values)")
    if info["mismatched_keys"]:
        problems.append("has tensors of other shapes than its config.json says: " + ", ".join(
            f"{k} {tuple(theirs)} instead of {tuple(want)}" for k, theirs, want in sorted(info["mismatched_keys"])[:3]))
    if info["unexpected_keys"]:
        problems.append(f"has tensors its model has no place for: {names(info['unexpected_keys'])}")
    if problems:
        raise UserError(f"'{source}' is damaged or not what its config.json says: it {'; it '.join(problems)}")
    return hf.eval()


def names(keys, n=3):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def folder_model_type(source):
    """config.json's model_type of a local Hugging Face folder, with readable errors."""
    config_path = os.path.join(source, "config.json")
    if not os.path.isdir(source):
        raise UserError(f"no folder '{source}': init_from takes {', '.join(HUB_NAMES)} or hf:/path/to/folder "
                        f"(a folder written by save_pretrained or tools.export)")
    if not os.path.isfile(config_path):
        raise UserError(f"'{source}' is not a Hugging Face model folder (no config.json)")
    try:
        with open(config_path) as f:
            return json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"cannot read {config_path}: {first_line(e)}") from None
