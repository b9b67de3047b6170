"""
Sharded checkpoints: torch.distributed.checkpoint (DCP), for train.py --fsdp / --ep_size. Every rank writes
its own shards; out_dir/ckpt.dcp links to the folder of the latest checkpoint and moves by atomic rename
(save_sharded). They resume at any world size and layout (load_sharded), and consolidate() makes an ordinary
checkpoint file of one (python -m tools.consolidate OUT_DIR).
"""
import hashlib
import json
import os
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from nanomoe.checkpoint import (CONSOLIDATED, MANIFEST, MANIFEST_FORMAT, SHARDED, SHARDED_TEMP, TO_RESUME,
                                check_entries, made_by_sharded_save, model_from_checkpoint, model_state,
                                save_checkpoint)
from nanomoe.distributed import expert_parallel
from nanomoe.errors import UserError
from nanomoe.files import atomic_write, disk_full_message, is_disk_full, replace_durably, temp_path
from nanomoe.optim import build_optimizer


def load_sharded_meta(path, needs=()):
    """A sharded checkpoint's entries other than weights and optimizer (its meta.pt), checked like
    load_checkpoint's, plus 'sharded': the folder, to read the weights from once the model is sharded. Every
    file is first checked against the SHA-256 its save recorded (check_manifest)."""
    if not os.path.isdir(path):
        raise UserError(f"sharded checkpoint {path} is missing (the link names no folder): use another checkpoint "
                        f"of the run, or train it again")
    check_manifest(path)
    meta_path = os.path.join(path, "meta.pt")
    try:
        meta = torch.load(meta_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot load {meta_path}: it is truncated or corrupt ({type(e).__name__})") from None
    if not isinstance(meta, dict) or "model_args" not in meta:
        raise UserError(f"{meta_path} is not a nanoMoE checkpoint's entries (no model_args)")
    check_entries(meta, path, [k for k in needs if k != "optimizer"])  # the optimizer is in the shards
    return {**meta, "sharded": os.path.realpath(path)}


def check_manifest(path):
    """Every file the save listed in the folder's manifest is there, whole and unchanged (size and SHA-256):
    bytes damaged on disk or in a copy would otherwise resume as weights (DCP checks nothing). -> None, or a
    UserError naming the file."""
    manifest_path = os.path.join(path, MANIFEST)
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest["files"]
        assert manifest.get("format") == MANIFEST_FORMAT and isinstance(files, dict) and files
        assert all(isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
                   for v in files.values())
    except FileNotFoundError:
        raise UserError(f"sharded checkpoint {path} has no {MANIFEST}: its save did not finish, or it was not "
                        f"written by this nanoMoE; use another checkpoint of the run, or train it again") from None
    except Exception:  # not JSON, not UTF-8, a field missing or of another type: all mean the same
        raise UserError(f"sharded checkpoint {path}: {manifest_path} is damaged (not the manifest a save "
                        f"writes); use another checkpoint of the run, or train it again") from None
    for name, expected in sorted(files.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise UserError(f"sharded checkpoint {path} is missing its file {name}: use another checkpoint of "
                            f"the run, or train it again")
        size = os.path.getsize(file)
        if size != expected["bytes"]:
            raise UserError(f"sharded checkpoint {path}: {name} has {size} bytes, its save wrote "
                            f"{expected['bytes']} (truncated or damaged); use another checkpoint of the run")
        if sha256_of(file) != expected["sha256"]:
            raise UserError(f"sharded checkpoint {path}: {name} fails its SHA-256 check (the bytes changed "
                            f"since the save: a damaged disk or copy); use another checkpoint of the run")


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder, files):
    """The manifest: written first with no files (it marks the folder as ours, so a kill's leftover can be
    removed), then with every file's size and SHA-256 once the save is complete."""
    entries = None if files is None else {name: {"bytes": os.path.getsize(os.path.join(folder, name)),
                                                 "sha256": sha256_of(os.path.join(folder, name))}
                                          for name in files}
    with atomic_write(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
        json.dump({"format": MANIFEST_FORMAT, "files": entries}, f, indent=1)


def sharded_state(model, optimizer):
    """{"model": ..., "optimizer": ...} keyed by parameter name, each tensor as the DTensor (FSDP) or plain
    tensor this rank holds; expert-parallel slices described as such (expert_parallel.global_view). Without an
    optimizer its entry is empty (the weights alone are read)."""
    state = {"model": get_model_state_dict(model),
             "optimizer": {} if optimizer is None else
             get_optimizer_state_dict(model, optimizer, options=flat_optimizer_state())}
    return expert_parallel.global_view(model, state)


def flat_optimizer_state():
    """The optimizer's state keyed by parameter name, not by parameter group: runs that group the parameters
    differently (FSDP with expert parallel splits each group in two, see optim.configure_optimizers) read each
    other's checkpoints."""
    return StateDictOptions(flatten_optimizer_state_dict=True)


def save_sharded(model, optimizer, meta, out_dir, proc):
    """Every rank writes its shards to out_dir/.tmp-ckpt.dcp/, rank 0 adds meta.pt (the other entries of a
    ckpt.pt) and the manifest (each file's SHA-256, checked at load), renames the folder to ckpt-<iter>.dcp
    and points the link ckpt.dcp at it by an atomic rename. A kill at any moment leaves ckpt.dcp on a complete
    checkpoint: the previous one until the link moves. Then the previous folder, and a ckpt.pt an unsharded
    run of this out_dir left, are removed. A full disk is one line, and the temporary folder goes."""
    tmp = os.path.join(out_dir, SHARDED_TEMP)
    if proc.master:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)  # a killed save's (OutDirLock.start removed any that was not ours)
        try:
            os.makedirs(tmp)
            write_manifest(tmp, None)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(disk_full_message(tmp)) if is_disk_full(e) else e from None
    dist.barrier()  # nobody writes into the folder before it is fresh
    try:
        dcp.save(sharded_state(model, optimizer), checkpoint_id=tmp)  # returns once every rank's files are written
        if proc.master:
            save_checkpoint(meta, os.path.join(tmp, "meta.pt"))
            write_manifest(tmp, sorted(n for n in os.listdir(tmp) if n != MANIFEST))
    except BaseException as e:
        if proc.master:
            shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e) or isinstance(e, UserError) and "disk is full" in str(e):
            raise UserError(disk_full_message(os.path.join(out_dir, SHARDED))) from None
        raise
    if proc.master:
        name, n = f"ckpt-{meta['iter_num']}.dcp", 1
        while os.path.exists(os.path.join(out_dir, name)):
            name, n = f"ckpt-{meta['iter_num']}-{n}.dcp", n + 1
        os.rename(tmp, os.path.join(out_dir, name))
        link = os.path.join(out_dir, SHARDED)
        previous = os.readlink(link) if os.path.islink(link) else None
        os.symlink(name, temp_path(link))
        replace_durably(temp_path(link), link)
        if previous and previous != name and made_by_sharded_save(os.path.join(out_dir, previous)):
            shutil.rmtree(os.path.join(out_dir, previous), ignore_errors=True)
        if os.path.exists(os.path.join(out_dir, "ckpt.pt")):
            os.remove(os.path.join(out_dir, "ckpt.pt"))
    dist.barrier()


def load_sharded(path, model, optimizer=None):
    """Read a sharded checkpoint into model and optimizer, whatever their layout now (another world size or ep
    size, FSDP or not, one process): DCP reads each rank's part of every tensor from the saved shards.
    optimizer None reads the weights alone (tools that only run the model)."""
    state = sharded_state(model, optimizer)
    with warnings.catch_warnings():
        # one process without a process group (consolidating, resuming unsharded): DCP warns that it reads
        # every shard itself, which is what we ask for
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=not torch.distributed.is_initialized())
    state = expert_parallel.local_view(model, state)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=flat_optimizer_state())


def read_sharded(path, needs=()):
    """A sharded checkpoint read in this process, without a process group: every entry and the weights (all
    shards), as the dict load_checkpoint gives for a ckpt.pt (the optimizer only when needs asks for it)."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    meta = load_sharded_meta(path, needs)
    model = model_from_checkpoint(meta)
    optimizer = None
    if "optimizer" in needs:
        optimizer = build_optimizer(model, meta["config"], "cpu")
    try:
        load_sharded(meta["sharded"], model, optimizer)
    except (Exception, CheckpointException) as e:  # the manifest matched, so this is not damage on disk
        raise UserError(f"cannot read sharded checkpoint {path}: {type(e).__name__}: "
                        f"{(str(e).strip().splitlines() or [''])[-1][:200]}") from None
    ckpt = {**{k: v for k, v in meta.items() if k not in ("model_args", "sharded")}, **model_state(model)}
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    return ckpt


def consolidate(out_dir, dest=None):
    """The sharded checkpoint of out_dir as one ordinary checkpoint file (weights, optimizer and every other
    entry; resumable by an unsharded run, readable by sample.py and tools.export). -> the file's path."""
    ckpt = read_sharded(os.path.join(out_dir, SHARDED), needs=TO_RESUME)
    dest = dest or os.path.join(out_dir, CONSOLIDATED)
    save_checkpoint(ckpt, dest)
    return dest
