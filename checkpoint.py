"""
Checkpoint I/O, shared by train.py, sample.py, bench.py and export.py.

A checkpoint holds only tensors and plain Python values (no pickled classes), so it loads with
torch.load(weights_only=True): opening one cannot run code. It is written with common.atomic_write (temp
file, fsync, rename), so a crash at any moment leaves either the old or the new checkpoint, complete.

What train.py saves:
    model_args   the model's settings, once (build_model(model_args) rebuilds it: MoEGPT when n_experts > 0)
    model        the weights, with clean names (no torch.compile / DDP prefixes)
    tokenizer    the dataset's tokenizer (meta.json's tokenizer fields), so sampling needs no data folder
    config       the run's other settings; optimizer, scaler, rng, iter_num, best_val_loss to resume

A sharded run (train.py --fsdp=True or --ep_size > 1 under torchrun) saves with torch.distributed.checkpoint
instead, each rank writing its own shards: out_dir/ckpt.dcp links to the folder of the latest one (see
save_sharded). `python checkpoint.py OUT_DIR` turns it into an ordinary single file for sample.py, export.py
and everything else.
"""
import os
import pickle
import random
import re
import shutil
import socket
import sys
import warnings
import zipfile
from dataclasses import asdict

import numpy as np
import torch

from common import UserError, atomic_write, replace_durably, temp_path
from model import build_model, model_keys


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
        os.link(src, tmp)
    except OSError:
        import shutil
        shutil.copyfile(src, tmp)
    replace_durably(tmp, dst)


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
            raise UserError(f"no checkpoint at {path}, but {folder} holds a sharded one ({SHARDED}); make a single "
                            f"file of it with: python checkpoint.py {folder} (then --ckpt={CONSOLIDATED})")
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


def restore_training_state(ckpt, optimizer, scaler, batch_gen, proc, model=None):
    """Optimizer, scaler and random states from a checkpoint; from a sharded one the model's weights too."""
    if "sharded" in ckpt:
        load_sharded(ckpt["sharded"], model, optimizer)
    else:
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
# the run's folder (out_dir): checked before anything is written, locked while a run uses it

def check_out_dir(out_dir):
    """Fail early, before any training, if out_dir cannot be used; it is created only when first written."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"out_dir '{out_dir}' is a file, not a folder (choose another --out_dir)")
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):  # the nearest folder that exists must let us create the rest
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"cannot create out_dir '{out_dir}': '{existing}' is a file (choose another --out_dir)")
    if not os.access(existing, os.W_OK):
        raise UserError(f"out_dir '{out_dir}' is not writable (choose another --out_dir or fix its permissions)")


def open_out_dir(out_dir):
    """Create out_dir, take its lock, remove the temporary files of saves a kill cut short. -> the lock: the
    open .lock file, to be closed when the run is over."""
    os.makedirs(out_dir, exist_ok=True)
    lock = lock_out_dir(out_dir)
    current = os.readlink(os.path.join(out_dir, SHARDED)) if os.path.islink(os.path.join(out_dir, SHARDED)) else None
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if name.startswith(".tmp-") and (os.path.islink(path) or not os.path.isdir(path)):
            os.remove(path)  # a file, or the new link of a sharded save
        elif name.startswith(".tmp-") or (name.startswith("ckpt-") and name.endswith(".dcp") and name != current):
            shutil.rmtree(path)  # a sharded save a kill cut short, before or after its rename
    return lock


def lock_out_dir(out_dir):
    """One run per out_dir at a time: an exclusive lock on out_dir/.lock for as long as this process lives.
    The OS releases it when the process ends in any way, so a kill -9 leaves no stale lock behind."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; runs there are not guarded
        return None
    f = open(os.path.join(out_dir, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"out_dir '{out_dir}' is in use by another train.py ({holder}); wait for it to end, or "
                        f"choose another --out_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f  # locked while it is open (and so at most until the process ends)


# -----------------------------------------------------------------------------
# sharded checkpoints: torch.distributed.checkpoint (DCP), for train.py --fsdp / --ep_size

SHARDED = "ckpt.dcp"  # in out_dir: a link to the folder of the latest sharded checkpoint
CONSOLIDATED = "consolidated.pt"  # where `python checkpoint.py OUT_DIR` writes its single file


def latest_checkpoint(out_dir):
    """The checkpoint a resumed run continues: ckpt.pt or the sharded ckpt.dcp, whichever was saved last (each
    save removes the other, but a kill between the two leaves both)."""
    plain, sharded = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, SHARDED)
    if not os.path.exists(sharded):
        return plain
    if os.path.exists(plain) and os.path.getmtime(plain) > os.lstat(sharded).st_mtime:  # the link moves last
        return plain
    return sharded


def remove_sharded(out_dir):
    """Remove out_dir's sharded checkpoint (after an unsharded run saved a newer ckpt.pt there)."""
    link = os.path.join(out_dir, SHARDED)
    if os.path.islink(link):
        target = os.readlink(link)
        os.remove(link)
        shutil.rmtree(os.path.join(out_dir, target), ignore_errors=True)


def load_sharded_meta(path, needs=()):
    """A sharded checkpoint's entries other than weights and optimizer (its meta.pt), checked like
    load_checkpoint's, plus 'sharded': the folder, to read the weights from once the model is sharded."""
    meta_path = os.path.join(path, "meta.pt")
    if not os.path.isfile(meta_path):
        raise UserError(f"sharded checkpoint {path} has no meta.pt: it is incomplete or damaged")
    try:
        meta = torch.load(meta_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot load {meta_path}: it is truncated or corrupt ({type(e).__name__})") from None
    check_entries(meta, path, [k for k in needs if k != "optimizer"])  # the optimizer is in the shards
    return {**meta, "sharded": os.path.realpath(path)}


def sharded_state(model, optimizer):
    """{"model": ..., "optimizer": ...} keyed by parameter name, each tensor as the DTensor (FSDP) or plain
    tensor this rank holds; expert-parallel slices described as such (expert_parallel.global_view)."""
    import expert_parallel
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    state = {"model": get_model_state_dict(model),
             "optimizer": get_optimizer_state_dict(model, optimizer, options=flat_optimizer_state())}
    return expert_parallel.global_view(model, state)


def flat_optimizer_state():
    """The optimizer's state keyed by parameter name, not by parameter group: runs that group the parameters
    differently (FSDP with expert parallel splits each group in two, see GPT.configure_optimizers) read each
    other's checkpoints."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(flatten_optimizer_state_dict=True)


def save_sharded(model, optimizer, meta, out_dir, proc):
    """Every rank writes its shards to out_dir/.tmp-ckpt.dcp/, rank 0 adds meta.pt (the other entries of a
    ckpt.pt), renames the folder to ckpt-<iter>.dcp and points the link ckpt.dcp at it by an atomic rename.
    A kill at any moment leaves ckpt.dcp on a complete checkpoint: the previous one until the link moves.
    Then the previous folder, and a ckpt.pt an unsharded run of this out_dir left, are removed."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    tmp = os.path.join(out_dir, ".tmp-ckpt.dcp")
    if proc.master:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()  # nobody writes into the folder before it is fresh
    dcp.save(sharded_state(model, optimizer), checkpoint_id=tmp)  # returns once every rank's files are written
    if proc.master:
        save_checkpoint(meta, os.path.join(tmp, "meta.pt"))
        name, n = f"ckpt-{meta['iter_num']}.dcp", 1
        while os.path.exists(os.path.join(out_dir, name)):
            name, n = f"ckpt-{meta['iter_num']}-{n}.dcp", n + 1
        os.rename(tmp, os.path.join(out_dir, name))
        link = os.path.join(out_dir, SHARDED)
        previous = os.readlink(link) if os.path.islink(link) else None
        os.symlink(name, temp_path(link))
        replace_durably(temp_path(link), link)
        if previous and previous != name:
            shutil.rmtree(os.path.join(out_dir, previous), ignore_errors=True)
        if os.path.exists(os.path.join(out_dir, "ckpt.pt")):
            os.remove(os.path.join(out_dir, "ckpt.pt"))
    dist.barrier()


def load_sharded(path, model, optimizer):
    """Read a sharded checkpoint into model and optimizer, whatever their layout now (another world size or ep
    size, FSDP or not, one process): DCP reads each rank's part of every tensor from the saved shards."""
    import expert_parallel
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    state = sharded_state(model, optimizer)
    with warnings.catch_warnings():
        # one process without a process group (consolidating, resuming unsharded): DCP warns that it reads
        # every shard itself, which is what we ask for
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=not torch.distributed.is_initialized())
    state = expert_parallel.local_view(model, state)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=flat_optimizer_state())


def consolidate(out_dir, dest=None):
    """The sharded checkpoint of out_dir as one ordinary checkpoint file (weights, optimizer and every other
    entry; resumable by an unsharded run, readable by sample.py and export.py). -> the file's path."""
    meta = load_sharded_meta(os.path.join(out_dir, SHARDED), needs=TO_RESUME)
    model = model_from_checkpoint(meta)
    c = meta["config"]
    optimizer = model.configure_optimizers(c["weight_decay"], c["learning_rate"], (c["beta1"], c["beta2"]), "cpu")
    load_sharded(meta["sharded"], model, optimizer)
    ckpt = {**model_state(model), **{k: v for k, v in meta.items() if k not in ("model_args", "sharded")},
            "optimizer": optimizer.state_dict()}
    dest = dest or os.path.join(out_dir, CONSOLIDATED)
    save_checkpoint(ckpt, dest)
    return dest


def main(argv):
    from common import ArgumentParser
    parser = ArgumentParser(prog="checkpoint.py", description="Write a sharded checkpoint (OUT_DIR/ckpt.dcp, "
                            "saved by train.py --fsdp or --ep_size) as one ordinary checkpoint file.")
    parser.add_argument("out_dir", help="the training run's folder")
    parser.add_argument("--dest", help=f"the file to write (default OUT_DIR/{CONSOLIDATED})")
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(args.out_dir, SHARDED)):
        raise UserError(f"{args.out_dir} has no sharded checkpoint ({SHARDED}); a run without --fsdp / --ep_size "
                        f"saves ckpt.pt, which needs no conversion")
    dest = consolidate(args.out_dir, args.dest)
    beside = os.path.dirname(os.path.abspath(dest)) == os.path.abspath(args.out_dir)
    print(f"wrote {dest}" + (f": python sample.py --out_dir={args.out_dir} --ckpt={os.path.basename(dest)}"
                             if beside else ""))


if __name__ == "__main__":
    from common import run_cli
    run_cli(lambda: main(sys.argv[1:]))
