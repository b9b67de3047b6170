"""
Checkpoint I/O, shared by train.py, sample.py and tools/, and the run's folder (out_dir) with its lock.

A checkpoint holds only tensors and plain Python values (no pickled classes), so it loads with
torch.load(weights_only=True): opening one cannot run code. It is written with common.atomic_write (temp
file, fsync, rename), so a crash at any moment leaves either the old or the new checkpoint, complete.

What train.py saves:
    model_args   the model's settings, once (build_model(model_args) rebuilds it: MoEGPT when n_experts > 0)
    model        the weights, with clean names (no torch.compile / DDP prefixes)
    tokenizer    the dataset's tokenizer (meta.json's tokenizer fields), so sampling needs no data folder
    config       the run's other settings; optimizer, scaler, rng, iter_num, best_val_loss to resume

With save_every, train.py also keeps ckpt-<iter>.pt beside ckpt.pt: full checkpoints of earlier steps, the
newest keep_checkpoints of them (kept_checkpoints, prune_kept; tools.experts reads them for router saturation).

A sharded run (train.py --fsdp=True or --ep_size > 1 under torchrun) saves with torch.distributed.checkpoint
instead, each rank writing its own shards: out_dir/ckpt.dcp links to the folder of the latest one
(nanomoe/distributed/checkpoint.py, each file's SHA-256 in its manifest). sample.py and the tools read either
kind through nanomoe/runs.read_checkpoint; `python -m tools.consolidate OUT_DIR` makes an ordinary file of one.
"""
import json
import os
import pickle
import random
import re
import shutil
import socket
import zipfile
from dataclasses import asdict

import numpy as np
import torch

from nanomoe.errors import UserError
from nanomoe.factory import build_model, model_keys
from nanomoe.files import (atomic_write, check_writable_folder, disk_full_message, is_disk_full, missing_folder,
                           remove_if_empty, replace_durably, temp_path)


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
    """What a checkpoint needs to rebuild the model: its settings and its clean weights."""
    raw = unwrap(model)
    return {"model_args": asdict(raw.config), "model": clean_state_dict(raw.state_dict())}


def save_checkpoint(ckpt, path):
    """Atomically write ckpt (a dict of tensors and plain values) to path."""
    with atomic_write(path) as f:
        torch.save(ckpt, f)


def link_checkpoint(src, dst):
    """Make dst the same checkpoint as src without writing it twice (hard link, copy where links fail).
    src is later replaced by rename, which leaves dst's data in place."""
    tmp = temp_path(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        replace_durably(tmp, dst)
    except BaseException as e:  # a full disk while copying: no half copy stays, dst is as it was
        if os.path.lexists(tmp):
            os.remove(tmp)
        if is_disk_full(e):
            raise UserError(disk_full_message(dst)) from None
        raise


# what each entry of a checkpoint is; every loader needs model + model_args, and names what else it needs
ENTRY_TYPES = {"model": dict, "model_args": dict, "tokenizer": dict, "config": dict, "optimizer": dict,
               "scaler": dict, "iter_num": int, "best_val_loss": float, "rng": list}
TO_RESUME = ("tokenizer", "config", "optimizer", "iter_num", "best_val_loss", "rng")


def load_checkpoint(path, needs=(), map_location="cpu"):
    """Load a checkpoint safely; missing, truncated, corrupt or code-carrying files, and checkpoints that lack
    an entry the caller needs (`needs`, beyond model and model_args) or hold an entry of the wrong type or an
    unknown model setting, are a UserError."""
    if not os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        if os.path.exists(os.path.join(folder, SHARDED)):
            raise UserError(f"no checkpoint at {path}, but {folder} holds a sharded one ({SHARDED}, a sharded run "
                            f"keeps no best.pt): read that one with --ckpt={SHARDED}")
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
    check_entries(ckpt, path, needs)
    return ckpt


def check_finite_weights(ckpt, path):
    """A checkpoint whose weights hold NaN or Inf (a run that diverged, a damaged copy) cannot sample or export
    anything meaningful: one line naming the tensors."""
    bad = [k for k, v in ckpt["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{path} has non-finite weights (NaN or Inf) in {len(bad)} tensor(s), e.g. {bad[0]}: the "
                        f"run diverged before it was saved, or the file is damaged; use best.pt or an earlier "
                        f"checkpoint of the run")


def check_entries(ckpt, path, needs):
    missing = [k for k in needs if k not in ckpt]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)} (it was saved by an older nanoMoE, or it is damaged); "
                        f"train it again, or use a checkpoint that has them")
    wrong = [f"{k} is a {type(ckpt[k]).__name__}, not a {t.__name__}" for k, t in ENTRY_TYPES.items()
             if k in ckpt and not (isinstance(ckpt[k], t) or t is float and isinstance(ckpt[k], int))]
    if wrong:
        raise UserError(f"{path} is damaged: {'; '.join(wrong)}")
    unknown = sorted(set(ckpt["model_args"]) - set(model_keys()))
    if unknown:
        raise UserError(f"{path} has model settings this nanoMoE does not know ({', '.join(unknown)}): it was "
                        f"saved by another version; use that version, or one that has these settings")


def model_from_checkpoint(ckpt, overrides=None):
    """Rebuild the checkpoint's model with its weights. overrides may set runtime model settings (moe_impl,
    dropout, ...: declared `runtime` on the config fields); others would not fit the saved weights. A sharded
    checkpoint's weights are read later, into the model once it is sharded (restore_training_state)."""
    keys = model_keys()
    args = dict(ckpt["model_args"])
    args.update({k: v for k, v in (overrides or {}).items() if k in keys and keys[k].runtime})
    model = build_model(args)
    if "sharded" in ckpt:
        return model
    try:
        model.load_state_dict(clean_state_dict(ckpt["model"]))
    except RuntimeError as e:
        raise UserError(f"checkpoint weights do not fit its own model config: {str(e).splitlines()[0]}") from None
    return model


def rng_state(batch_state):
    """Every random state a resumed run needs to continue exactly (as tensors and plain values)."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(), "batch": batch_state,
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state, batch_gen):
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    batch_gen.set_state(state["batch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def restore_training_state(ckpt, optimizer, scaler, batch_gen, proc):
    """Optimizer, scaler and random states from a checkpoint (a sharded one's optimizer and weights are read
    by distributed/checkpoint.load_sharded instead)."""
    if "sharded" not in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    states = ckpt.get("rng", [])
    if len(states) == proc.world_size:
        set_rng_state(states[proc.rank], batch_gen)
    elif proc.master:
        print(f"note: checkpoint has random states for {len(states)} processes, this run has {proc.world_size}; "
              f"batches will differ from an uninterrupted run")


# -----------------------------------------------------------------------------
# the run's folder (out_dir): locked first, before anything that depends on what it holds is decided

class OutDirLock:
    """One run per out_dir at a time: an exclusive lock on out_dir/.lock for as long as this process lives.
    The OS releases it when the process ends in any way, so a kill -9 leaves no stale lock behind.

    train.py takes it before it reads anything in out_dir (the checkpoint to resume, whether one exists, the
    metrics log): a second run started a moment later stops here, instead of deciding on what it saw before
    the first run saved. A run refused after the lock (bad input) abandons it: the folder and the .lock file
    are as they were (a folder it created is removed again). start() is the point of no return."""

    def __init__(self, out_dir):
        check_writable_folder(out_dir, "out_dir")  # before any training: one line if it cannot be used
        self.out_dir, self.path = out_dir, os.path.join(out_dir, ".lock")
        self.created = missing_folder(out_dir)  # what this lock creates (removed again if the run never starts)
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:  # a special filesystem (/proc, /sys) or a read-only one that os.access misjudged
            self.abandon()
            raise UserError(f"cannot create out_dir '{out_dir}': {e.strerror or e} (choose another --out_dir)") \
                from None
        if os.path.isdir(self.path) or os.path.islink(self.path) and not os.path.exists(self.path):
            self.abandon()
            raise UserError(f"{self.path} is {'a folder' if os.path.isdir(self.path) else 'a broken link'}, not "
                            f"the lock file train.py keeps there; remove it (no run is using it then), or choose "
                            f"another --out_dir")
        self.previous = open(self.path, "rb").read() if os.path.isfile(self.path) else None
        self.file = None
        try:
            import fcntl
        except ImportError:  # Windows: no flock; runs there are not guarded
            return
        try:
            self.file = open(self.path, "a+")
        except OSError as e:
            self.abandon()
            raise UserError(f"cannot write {self.path}: {e.strerror or e} (choose another --out_dir)") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            self.file = None
            raise UserError(f"out_dir '{out_dir}' is in use by another train.py ({holder}); wait for it to end, "
                            f"or choose another --out_dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()

    def abandon(self):
        """The run stopped before it started: put the .lock file back as it was, remove the folders we made."""
        if getattr(self, "file", None) is not None:
            if self.previous is None:
                os.remove(self.path)
            else:
                with open(self.path, "wb") as f:
                    f.write(self.previous)
            self.file.close()  # releases the lock
            self.file = None
        remove_if_empty(self.created)  # only while empty: nothing of anybody's goes

    def start(self):
        """The run starts writing: remove what saves a kill cut short left (remove_leftovers)."""
        self.started = True
        remove_leftovers(self.out_dir)

    def __enter__(self):  # `with lock:` the run's setup; an error in it abandons the lock
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and not getattr(self, "started", False):
            self.abandon()

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


TEMP_FILE = re.compile(r"\.tmp-.+")  # files_.temp_path's names, and the new link of a sharded save
KEPT_SHARDED = re.compile(r"ckpt-\d+(-\d+)?\.dcp")  # save_sharded's folders (the link ckpt.dcp names one)
SHARDED_TEMP = ".tmp-ckpt.dcp"  # the folder a sharded save writes before its rename


def remove_leftovers(out_dir):
    """Remove the temporary files of saves a kill cut short, and sharded-checkpoint folders the link does not
    name (a save killed before or after its rename). A folder goes only when its manifest says our save made
    it (made_by_sharded_save): a user's own `ckpt-5.dcp` or `.tmp-ckpt.dcp` stays."""
    link = os.path.join(out_dir, SHARDED)
    current = os.readlink(link) if os.path.islink(link) else None
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            if (name == SHARDED_TEMP or KEPT_SHARDED.fullmatch(name) and name != current) \
                    and made_by_sharded_save(path):
                shutil.rmtree(path)
        elif TEMP_FILE.fullmatch(name):
            os.remove(path)  # a file, or the new link of a sharded save


MANIFEST = "manifest.json"  # in each sharded checkpoint's folder: written by save_sharded, checked at load
MANIFEST_FORMAT = "nanoMoE sharded checkpoint"


def made_by_sharded_save(folder):
    """Whether folder holds the manifest save_sharded writes first (incomplete) and last (with checksums)."""
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            return json.load(f).get("format") == MANIFEST_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


# -----------------------------------------------------------------------------
# which checkpoint of a run is the latest: ckpt.pt, or a sharded run's (nanomoe/distributed/checkpoint.py)

SHARDED = "ckpt.dcp"  # in out_dir: a link to the folder of the latest sharded checkpoint
CONSOLIDATED = "consolidated.pt"  # where `python -m tools.consolidate OUT_DIR` writes its single file


def latest_checkpoint(out_dir):
    """The checkpoint a resumed run continues: ckpt.pt or the sharded ckpt.dcp, whichever was saved last (each
    save removes the other, but a kill between the two leaves both)."""
    plain, sharded = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, SHARDED)
    if not os.path.lexists(sharded):  # a link to a folder that has gone is still the latest (and says so)
        return plain
    if os.path.exists(plain) and os.path.getmtime(plain) > os.lstat(sharded).st_mtime:  # the link moves last
        return plain
    return sharded


def remove_sharded(out_dir):
    """Remove out_dir's sharded checkpoint (after an unsharded run saved a newer ckpt.pt there): the link, and
    the folder it names when our save made it."""
    link = os.path.join(out_dir, SHARDED)
    if os.path.islink(link):
        target = os.path.join(out_dir, os.readlink(link))
        os.remove(link)
        if made_by_sharded_save(target):
            shutil.rmtree(target, ignore_errors=True)


# -----------------------------------------------------------------------------
# kept copies (train.py save_every): ckpt-<iter>.pt beside ckpt.pt, a full resumable checkpoint each

def kept_path(out_dir, iter_num):
    return os.path.join(out_dir, f"ckpt-{iter_num}.pt")


def kept_checkpoints(out_dir):
    """[(iter, path)] of the copies train.py --save_every kept in out_dir, oldest first. Counted from the folder
    itself, so a resumed or killed run counts what is really there."""
    found = []
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        m = re.fullmatch(r"ckpt-(\d+)\.pt", name)
        if m:
            found.append((int(m.group(1)), os.path.join(out_dir, name)))
    return sorted(found)


def prune_kept(out_dir, keep):
    """Remove all but the newest `keep` kept copies (None keeps them all)."""
    kept = kept_checkpoints(out_dir)
    for _, path in kept[:-keep] if keep is not None and len(kept) > keep else []:
        os.remove(path)  # a hard link: ckpt.pt or best.pt, if they are this file, stay
