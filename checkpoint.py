"""
Checkpoint I/O, shared by train.py, sample.py, bench.py and export.py.

A checkpoint holds only tensors and plain Python values (no pickled classes), so it loads with
torch.load(weights_only=True): opening one cannot run code. It is written to a temporary file in the same
folder, fsync'ed, then renamed over the old one, so a crash at any moment leaves either the old or the new
checkpoint, complete.
"""
import os
import pickle
import re
import tempfile
import zipfile
from dataclasses import asdict

import torch

from common import UserError
from model import GPT, GPTConfig


def model_classes(name):
    """Checkpoints record the model class by name; this maps the name back to (model class, config class)."""
    if name == "GPT":
        return GPT, GPTConfig
    if name == "MoEGPT":
        from moe_model import MoEConfig, MoEGPT  # imported here: moe_model imports this module's neighbours
        return MoEGPT, MoEConfig
    raise UserError(f"checkpoint holds an unknown model class {name!r} (expected GPT or MoEGPT)")


def clean_state_dict(state_dict):
    """Parameter names without the '_orig_mod.' (torch.compile) and 'module.' (DDP) wrappers' prefixes."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def unwrap(model):
    """The plain GPT inside DDP and/or torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        # not `getattr(...) or ...`: the truth value of a compiled module calls len(), which GPT lacks
        model = model.module if hasattr(model, "module") else model._orig_mod
    return model


def model_state(model):
    """What a checkpoint needs to rebuild the model: class name, config fields, clean weights."""
    raw = unwrap(model)
    return {"model_class": type(raw).__name__, "model_args": asdict(raw.config),
            "model": clean_state_dict(raw.state_dict())}


def save_checkpoint(ckpt, path):
    """Atomically write ckpt (a dict of tensors and plain values) to path."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the checkpoint
        os.replace(tmp, path)
        dir_fd = os.open(folder, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def link_checkpoint(src, dst):
    """Make dst the same checkpoint as src without writing it twice (hard link, copy where links fail).
    src is later replaced by rename, which leaves dst's data in place."""
    tmp = dst + ".tmp-link"
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint safely; missing, truncated, corrupt or code-carrying files are a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path} (train one first, or check --out_dir / --init_from)")
    # torch.save writes a zip whose entries carry CRC32s that torch.load never checks: test them here (about
    # as fast as reading the file) so bytes damaged on disk or in a copy are refused instead of loaded as weights
    try:
        with zipfile.ZipFile(path) as zf:
            damaged = zf.testzip()
    except Exception as e:  # BadZipFile for a truncated file, others for odder damage: all mean the same
        raise UserError(f"cannot load checkpoint {path}: it is truncated or corrupt "
                        f"({type(e).__name__}: {e})") from None
    if damaged is not None:
        raise UserError(f"cannot load checkpoint {path}: it is corrupt (entry {damaged} fails its CRC check)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = found.group(1) if found else "a Python object"
        raise UserError(f"refusing checkpoint {path}: it holds a pickled {what}, and loading pickled objects can "
                        f"run code (a checkpoint holds only tensors and plain values)") from None
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"cannot load checkpoint {path}: it is truncated, corrupt or holds pickled objects "
                        f"({type(e).__name__}: {first_line})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise UserError(f"{path} is not a nanoMoE checkpoint (no 'model'/'model_args' entries)")
    return ckpt


# model settings that change how the model runs, not the shape of its weights: a run that loads a
# checkpoint may set them anew (e.g. train with moe_impl='loop', sample with 'grouped')
RUNTIME_KEYS = ("dropout", "moe_impl", "router_jitter", "balance_loss_weight", "z_loss_weight", "capacity_factor",
                "moe_renorm")


def model_from_checkpoint(ckpt, overrides=None):
    """Rebuild the model class the checkpoint was saved from, with its weights. overrides may set
    RUNTIME_KEYS (other keys would not fit the saved weights)."""
    model_cls, config_cls = model_classes(ckpt.get("model_class", "GPT"))
    args = dict(ckpt["model_args"])
    args.update({k: v for k, v in (overrides or {}).items() if k in RUNTIME_KEYS and k in args})
    model = model_cls(config_cls(**args))
    try:
        model.load_state_dict(clean_state_dict(ckpt["model"]))
    except RuntimeError as e:
        raise UserError(f"checkpoint weights do not fit its own model config: {str(e).splitlines()[0]}") from None
    return model
