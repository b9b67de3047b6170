"""
Sharded checkpoints: torch.distributed.checkpoint (DCP), for train.py --fsdp / --ep_size. Every rank writes
its own shards; out_dir/ckpt.dcp links to the folder of the latest checkpoint and moves by atomic rename
(save_sharded). They resume at any world size and layout (load_sharded), and consolidate() makes an ordinary
checkpoint file of one (python -m tools.consolidate OUT_DIR).
"""
import os
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from nanomoe.checkpoint import (CONSOLIDATED, SHARDED, TO_RESUME, check_entries, model_from_checkpoint, model_state,
                                save_checkpoint)
from nanomoe.distributed import expert_parallel
from nanomoe.errors import UserError
from nanomoe.files import replace_durably, temp_path
from nanomoe.optim import build_optimizer


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
    ckpt.pt), renames the folder to ckpt-<iter>.dcp and points the link ckpt.dcp at it by an atomic rename.
    A kill at any moment leaves ckpt.dcp on a complete checkpoint: the previous one until the link moves.
    Then the previous folder, and a ckpt.pt an unsharded run of this out_dir left, are removed."""
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


def consolidate(out_dir, dest=None):
    """The sharded checkpoint of out_dir as one ordinary checkpoint file (weights, optimizer and every other
    entry; resumable by an unsharded run, readable by sample.py and tools.export). -> the file's path."""
    meta = load_sharded_meta(os.path.join(out_dir, SHARDED), needs=TO_RESUME)
    model = model_from_checkpoint(meta)
    c = meta["config"]
    optimizer = build_optimizer(model, c, "cpu")
    load_sharded(meta["sharded"], model, optimizer)
    ckpt = {**model_state(model), **{k: v for k, v in meta.items() if k not in ("model_args", "sharded")},
            "optimizer": optimizer.state_dict()}
    dest = dest or os.path.join(out_dir, CONSOLIDATED)
    save_checkpoint(ckpt, dest)
    return dest
