"""
What the Hugging Face families share (formats.py, gpt2.py, llama.py import it): the transformers package
(imported on use, with a message when missing), GPT-2's hub names, and a folder's model_type.
"""
import json
import os

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
