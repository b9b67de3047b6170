"""
Train a dense or Mixture-of-Experts GPT. One process on a CPU, an Apple GPU or a CUDA GPU:

    python train.py config/train_shakespeare_char.py --batch_size=32

Several GPUs or nodes with DistributedDataParallel (gloo on CPU, nccl on CUDA):

    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_moe.py

The model is an MoEGPT when the config asks for experts (n_experts > 0), a dense GPT otherwise. The loss
optimised is cross-entropy + balance_loss_weight * balance + z_loss_weight * z; the log shows each part.
"""
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import fields
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from batches import TokenData
from checkpoint import (RUNTIME_KEYS, link_checkpoint, load_checkpoint, model_classes, model_from_checkpoint, model_state,
                        save_checkpoint, unwrap)
from common import UserError, autocast_context, compile_supported, gpu_peak_flops, pick_device, pick_dtype, run_cli
from configurator import parse_args
from hf_gpt2 import is_hf_init, model_for_training
from moe_model import MoEConfig

# -----------------------------------------------------------------------------
# default config values: GPT-2 (124M) on a large corpus; config files and --key=value override them
# I/O
out_dir = "out"
eval_interval = 2000  # evaluate train/val loss (and save a checkpoint) every this many iterations
log_interval = 1
eval_iters = 200  # batches per split in each evaluation
eval_only = False  # evaluate once and exit
always_save_checkpoint = True  # save ckpt.pt at every eval, not only when val loss improves
save_interval = 0  # also save ckpt.pt every this many iterations (0 = only at evals)
init_from = "scratch"  # 'scratch', 'resume' (from out_dir/ckpt.pt), 'gpt2'...'gpt2-xl' or 'hf:/path' (GPT-2 weights)
# logging
wandb_log = False
wandb_project = "nanomoe"
wandb_run_name = "run"
# data
dataset = "openwebtext"
data_root = "data"  # datasets live in data_root/<dataset>/ as written by prepare.py
gradient_accumulation_steps = 5 * 8  # micro-steps per optimizer step, over all processes together
batch_size = 12  # sequences per micro-step per process
# model: every field of MoEConfig (and so of GPTConfig) is a config key; see model.py and moe_model.py
# adamw optimizer
learning_rate = 6e-4
max_iters = 600000
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip gradients at this norm (0 = off)
# learning rate schedule: linear warmup, then cosine decay to min_lr
decay_lr = True
warmup_iters = 2000
lr_decay_iters = 600000  # should be ~= max_iters per Chinchilla
min_lr = 6e-5  # should be ~= learning_rate/10 per Chinchilla
# system
backend = "auto"  # DDP backend: 'auto' = nccl on CUDA, gloo otherwise
device = "auto"  # 'auto' picks cuda > mps > cpu; or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"  # 'auto' = bfloat16 on GPUs that support it, float16 on older GPUs, float32 elsewhere
compile = True  # torch.compile the model (turned off where it does not work: CPU, MPS)
seed = 1337
peak_flops = None  # FLOP/s peak for MFU on a GPU we do not know (H100/H200/A100 are known)
max_nonfinite_steps = 5  # stop after this many optimizer steps in a row with a NaN/Inf loss or gradient
nan_inject_iters = ""  # testing aid: comma-separated iterations whose loss is made NaN
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))}
MODEL_KEYS = [f.name for f in fields(MoEConfig) if f.name != "vocab_size"]  # vocab comes from the dataset
DEFAULTS.update({k: getattr(MoEConfig, k) for k in MODEL_KEYS})
DEFAULTS["n_experts"] = 0  # dense unless a config asks for experts


def get_lr(it, cfg):
    """Linear warmup for warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def rng_state(batch_gen):
    """Every random state a resumed run needs to continue exactly (as tensors and plain values)."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(), "batch": batch_gen.get_state(),
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


def record_iter(line):
    """The iter of a metrics.jsonl line; a line torn by a crash mid-write counts as after any checkpoint."""
    try:
        return json.loads(line).get("iter", 0)
    except ValueError:
        return math.inf


class MetricsLog:
    """out_dir/metrics.jsonl: one JSON object per log line and per eval, appended and flushed, so it can be
    read (plotted) while the run goes on."""

    def __init__(self, path, resume_iter):
        self.path = path
        if resume_iter is not None and os.path.exists(path):
            # a resumed run redoes the iterations after its checkpoint: drop their old records
            with open(path) as f:
                kept = [line.rstrip("\n") + "\n" for line in f if line.strip() and record_iter(line) < resume_iter]
            with open(path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)
        elif resume_iter is None and os.path.exists(path):
            os.replace(path, path + ".prev")  # a new run from scratch keeps the old record aside, not mixed in
        self.file = open(path, "a")

    def write(self, record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()


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


def mean_over_ranks(values, ddp):
    """Average a dict of floats/tensors over DDP ranks so the log shows the global picture."""
    if not ddp:
        return values
    keys = list(values)
    flat = torch.cat([torch.as_tensor(values[k], dtype=torch.float32).flatten().cpu() for k in keys])
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flat = flat.to(device)
    dist.all_reduce(flat)
    flat = (flat / dist.get_world_size()).cpu()
    out, i = {}, 0
    for k in keys:
        n = torch.as_tensor(values[k]).numel()
        out[k] = flat[i:i + n].view_as(torch.as_tensor(values[k], dtype=torch.float32))
        i += n
    return out


def main():
    explicit = set()  # the keys this run's config files and flags set
    cfg = SimpleNamespace(**parse_args(DEFAULTS, sys.argv[1:], explicit))
    ckpt = None
    if cfg.init_from == "resume":
        # a resumed run is the saved run: every setting this command does not give comes from the checkpoint
        ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
        for k, v in ckpt.get("config", {}).items():
            if k in DEFAULTS and k not in explicit and k not in ("init_from", "out_dir"):
                setattr(cfg, k, v)

    # ---- processes and devices
    ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun?
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
    dev = pick_device(cfg.device)
    if ddp and dev.startswith("cuda"):
        dev = f"cuda:{local_rank}"  # one GPU per process, whatever cuda:N the config names
        torch.cuda.set_device(dev)
    if ddp and dev == "mps":
        raise UserError("torchrun with device 'mps' is not supported (gloo cannot reduce MPS tensors); "
                        "train on one process, or use --device=cpu")
    master = rank == 0
    if cfg.gradient_accumulation_steps % world_size:
        raise UserError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} is not divisible by the "
                        f"world size {world_size} (use a multiple of {world_size})")
    accum_steps = cfg.gradient_accumulation_steps // world_size  # micro-steps on this process
    dtype = pick_dtype(cfg.dtype, dev)
    device_type = dev.split(":")[0]
    use_compile = cfg.compile and compile_supported(dev)
    if cfg.compile and not use_compile and master:
        print(f"note: torch.compile is off on device '{dev}' (it is used on CUDA)")
    for name in ("batch_size", "gradient_accumulation_steps", "max_iters", "eval_iters", "log_interval",
                 "eval_interval"):
        if getattr(cfg, name) < (0 if name == "max_iters" else 1):
            raise UserError(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.init_from not in ("scratch", "resume") and not is_hf_init(cfg.init_from):
        raise UserError(f"init_from={cfg.init_from!r} is not 'scratch', 'resume', 'gpt2', 'gpt2-medium', "
                        f"'gpt2-large', 'gpt2-xl' or 'hf:/path/to/folder'")
    check_out_dir(cfg.out_dir)
    wandb = None
    if cfg.wandb_log and master:
        try:
            import wandb
        except ImportError:
            raise UserError("wandb_log=True needs the wandb package: pip install wandb (or --wandb_log=False)") from None
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.init_from != "resume" and os.path.exists(ckpt_path) and not cfg.eval_only:
        # a new run would overwrite the old one's checkpoint: that is hours of someone's GPU time
        raise UserError(f"{ckpt_path} already exists; continue it with --init_from=resume, or choose another "
                        f"--out_dir (or delete the old run) to start a new one")

    # ---- distributed (before the data, so the other ranks can wait while rank 0 prepares it)
    if ddp:
        be = cfg.backend if cfg.backend != "auto" else ("nccl" if device_type == "cuda" else "gloo")
        dist.init_process_group(backend=be)

    # ---- data
    if cfg.dataset == "shakespeare_char" and not os.path.isdir(os.path.join(cfg.data_root, cfg.dataset)) and master:
        import prepare
        print(f"{cfg.data_root}/shakespeare_char is missing: preparing it now")
        prepare.main(["shakespeare_char", "--data_root", cfg.data_root])
    if ddp:
        dist.barrier()  # every rank reads the data only once rank 0 has finished writing it
    data = TokenData(cfg.data_root, cfg.dataset, cfg.block_size)
    vocab_size = data.meta["vocab_size"]
    if data.meta["tokenizer"] == "gpt2":
        vocab_size = 64 * math.ceil(vocab_size / 64)  # 50257 -> 50304: a multiple of 64 runs faster

    # ---- model
    iter_num, best_val_loss = 0, float("inf")
    if cfg.init_from == "resume":
        if "block_size" in explicit and cfg.block_size > ckpt["model_args"]["block_size"]:
            raise UserError(f"block_size={cfg.block_size} is larger than the checkpoint's "
                            f"{ckpt['model_args']['block_size']} (resume with --block_size="
                            f"{ckpt['model_args']['block_size']})")
        # the model's shape comes from the checkpoint; a config that sets another one is a mistake
        differ = [f"{k}: config {getattr(cfg, k)!r} vs checkpoint {ckpt['model_args'][k]!r}"
                  for k in MODEL_KEYS if k in explicit and k in ckpt["model_args"]
                  and getattr(cfg, k) != ckpt["model_args"][k] and k not in RUNTIME_KEYS]
        if differ:
            raise UserError(f"checkpoint {ckpt_path} has another model shape ({'; '.join(differ)})")
        model = model_from_checkpoint(ckpt, {k: getattr(cfg, k) for k in RUNTIME_KEYS if k in explicit})
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
    elif is_hf_init(cfg.init_from):
        # GPT-2 weights (shape from the checkpoint, dropout and block_size from the config); with n_experts > 0
        # sparse-upcycled: every expert starts as a copy of the MLP it replaces
        torch.manual_seed(cfg.seed)  # the same router init on every rank
        model = model_for_training(vars(cfg), explicit)
    else:
        model_args = {k: getattr(cfg, k) for k in MODEL_KEYS}
        model_args["vocab_size"] = vocab_size
        class_name = "MoEGPT" if cfg.n_experts > 0 else "GPT"
        model_cls, config_cls = model_classes(class_name)
        if class_name == "GPT":
            model_args = {k: v for k, v in model_args.items() if k in {f.name for f in fields(config_cls)}}
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = model_cls(config_cls(**model_args))
    if model.config.vocab_size < data.meta["vocab_size"]:
        raise UserError(f"the model's vocab_size {model.config.vocab_size} is smaller than the dataset's "
                        f"{data.meta['vocab_size']} (the checkpoint was trained on another dataset)")
    model.to(dev)

    torch.manual_seed(cfg.seed + rank)  # dropout differs per rank
    batch_gen = torch.Generator().manual_seed(cfg.seed + rank)  # each rank draws its own batches

    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt and ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        states = ckpt.get("rng", [])
        if len(states) == world_size:
            set_rng_state(states[rank], batch_gen)
        elif master:
            print(f"note: checkpoint has random states for {len(states)} processes, this run has {world_size}; "
                  f"batches will differ from an uninterrupted run")
        ckpt = None  # free the memory

    raw_model = model
    if use_compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
    ctx = autocast_context(dev, dtype)

    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    peak = gpu_peak_flops(dev, cfg.peak_flops)
    if master:
        n_all, n_active = raw_model.get_num_params(), raw_model.num_active_params()
        print(f"model: {type(raw_model).__name__}, {n_all / 1e6:.2f}M parameters, {n_active / 1e6:.2f}M active "
              f"per token; device {dev}, dtype {dtype}, {world_size} process(es)")
        split = f", {accum_steps} on each of {world_size} processes" if ddp else ""
        print(f"tokens per iteration: {tokens_per_iter:,} ({cfg.gradient_accumulation_steps} micro-steps x "
              f"{cfg.batch_size} sequences x {cfg.block_size} tokens{split})")
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        for name in os.listdir(cfg.out_dir):  # a save killed half-way leaves its temporary file behind
            if name.startswith(".tmp-"):
                os.remove(os.path.join(cfg.out_dir, name))
    metrics = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), iter_num if cfg.init_from == "resume" else None) \
        if master else None
    if wandb:
        wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=vars(cfg))
    config_dict = vars(cfg)
    nan_iters = {int(s) for s in str(cfg.nan_inject_iters).split(",") if s.strip()}

    @torch.no_grad()
    def evaluate():
        """Mean CE (and balance loss, expert load) per split. Each rank takes an equal share of eval_iters (at
        least one batch, so the mean of the ranks' means is the mean); its own generator keeps the training
        batches independent of whether an eval happened."""
        out = {}
        model.eval()
        for split in ("train", "val"):
            gen = torch.Generator().manual_seed(cfg.seed + 999 + rank)  # the same eval batches every time
            sums = {}
            n = 0
            for _ in range(math.ceil(cfg.eval_iters / world_size)):
                x, y = data.get_batch(split, cfg.batch_size, gen, dev)
                with ctx:
                    _, loss, extra = model(x, y)
                stats = {"loss": loss.float(), **{k: v.float() for k, v in extra.items() if k != "loss"}}
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0) + v.detach()
                n += 1
            means = {k: v / max(n, 1) for k, v in sums.items()}
            for k, v in mean_over_ranks(means, ddp).items():
                out[f"{split}_{k}"] = v.tolist() if torch.as_tensor(v).dim() else float(v)
        model.train()
        return out

    def save(reason):
        """Save the resumable state to ckpt.pt (all ranks gather their random states; rank 0 writes)."""
        state = rng_state(batch_gen)
        state["batch"] = next_iter_batch_state  # the generator before it drew the prefetched batch
        states = [None] * world_size
        if ddp:
            dist.all_gather_object(states, state)
        else:
            states = [state]
        if not master:
            return
        if not all(torch.isfinite(p).all() for p in raw_model.parameters()):
            print(f"not saving ({reason}): the model has non-finite parameters; the last good checkpoint stays")
            return
        ckpt_out = {**model_state(raw_model), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "iter_num": iter_num, "best_val_loss": best_val_loss, "config": config_dict, "rng": states}
        t0 = time.time()
        save_checkpoint(ckpt_out, ckpt_path)
        print(f"saved checkpoint to {ckpt_path} ({reason}, {time.time() - t0:.2f}s)")

    # ---- graceful stop: finish the current step, save, exit 0; a second signal exits at once
    stop_requested = []

    def on_signal(signum, frame):
        if stop_requested:
            os._exit(130)
        stop_requested.append(signum)
        if master:
            print(f"\n{signal.Signals(signum).name} received: stopping after this step (again to quit now)",
                  flush=True)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def do_eval(allow_save=True):
        nonlocal best_val_loss
        ev = evaluate()
        improved = ev["val_loss"] < best_val_loss
        best_val_loss = min(best_val_loss, ev["val_loss"])
        if master:
            extra = "".join(f", {s} balance {ev[f'{s}_balance']:.4f}" for s in ("train", "val") if f"{s}_balance" in ev)
            print(f"step {iter_num}: train loss {ev['train_loss']:.4f}, val loss {ev['val_loss']:.4f}{extra}")
            record = {"type": "eval", "iter": iter_num, "time": time.time(), "tokens": iter_num * tokens_per_iter,
                      **ev, "best_val_loss": best_val_loss}
            metrics.write(record)
            if wandb:
                wandb.log({k: v for k, v in record.items() if not isinstance(v, list)}, step=iter_num)
        if allow_save and iter_num > 0 and (improved or cfg.always_save_checkpoint):
            save("eval")
            if master and improved:
                link_checkpoint(ckpt_path, os.path.join(cfg.out_dir, "best.pt"))
        return ev

    # ---- training loop
    if cfg.eval_only:
        do_eval(allow_save=False)
        if ddp:
            dist.destroy_process_group()
        return
    model.train()
    next_iter_batch_state = batch_gen.get_state()
    x, y = data.get_batch("train", cfg.batch_size, batch_gen, dev)  # the first batch of iteration iter_num
    t0 = time.time()
    running_mfu, nonfinite_in_row, nonfinite_total, last_eval_iter = -1.0, 0, 0, None
    while iter_num < cfg.max_iters:
        if iter_num % cfg.eval_interval == 0 and last_eval_iter != iter_num:
            do_eval()
            last_eval_iter = iter_num
            t0 = time.time()  # the eval's time is not the step's
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        sums = {}
        for micro_step in range(accum_steps):
            # gradients are all-reduced only on the last micro-step
            sync = not ddp or micro_step == accum_steps - 1
            with (nullcontext() if sync else model.no_sync()), ctx:
                _, loss, extra = model(x, y)
                if iter_num in nan_iters:
                    loss = loss * float("nan")
                total = loss + extra["loss"] if "loss" in extra else loss
            # the next batch is drawn while the GPU works on this one
            if micro_step == accum_steps - 1:
                next_iter_batch_state = batch_gen.get_state()
            x, y = data.get_batch("train", cfg.batch_size, batch_gen, dev)
            scaler.scale(total / accum_steps).backward()
            for k, v in {"loss": loss, **{k: v for k, v in extra.items() if k != "loss"}}.items():
                sums[k] = sums.get(k, 0) + v.detach().float() / accum_steps

        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        # skip updates from a non-finite loss or gradient; under DDP all ranks see the same reduced gradient
        bad = not torch.isfinite(sums["loss"]).item() or (dtype != "float16" and not torch.isfinite(grad_norm).item())
        if ddp:
            flag = torch.tensor(float(bad), device=dev if device_type == "cuda" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = flag.item() > 0
        if bad:
            nonfinite_in_row += 1
            nonfinite_total += 1
            optimizer.zero_grad(set_to_none=True)
            if master:
                print(f"iter {iter_num}: non-finite loss or gradient, update skipped "
                      f"({nonfinite_in_row} in a row, {nonfinite_total} in total)")
                metrics.write({"type": "skip", "iter": iter_num, "time": time.time(), "nonfinite_total": nonfinite_total})
            if nonfinite_in_row >= cfg.max_nonfinite_steps:
                if master:
                    print(f"error: {nonfinite_in_row} non-finite steps in a row; stopping. Lower learning_rate or "
                          f"raise grad_clip, then resume from the last good checkpoint", file=sys.stderr)
                if ddp:
                    dist.destroy_process_group()
                sys.exit(1)
        else:
            nonfinite_in_row = 0
            scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        t1 = time.time()
        dt, t0 = t1 - t0, t1
        if iter_num % cfg.log_interval == 0:
            stats = {k: float(v) if torch.as_tensor(v).dim() == 0 else v for k, v in mean_over_ranks(sums, ddp).items()}
            if master:
                mfu = raw_model.estimate_mfu(tokens_per_iter // world_size, dt, peak)  # per GPU
                if mfu is not None:
                    running_mfu = mfu if running_mfu < 0 else 0.9 * running_mfu + 0.1 * mfu
                parts = [f"loss {stats['loss']:.4f}"]
                parts += [f"{k} {stats[k]:.4f}" for k in ("balance", "z") if k in stats]
                parts += [f"lr {lr:.2e}", f"time {dt * 1000:.2f}ms", f"tok/s {tokens_per_iter / dt:,.0f}"]
                if running_mfu >= 0:
                    parts.append(f"mfu {running_mfu * 100:.2f}%")
                print(f"iter {iter_num}: " + ", ".join(parts), flush=True)
                record = {"type": "train", "iter": iter_num, "time": t1, "tokens": (iter_num + 1) * tokens_per_iter,
                          "lr": lr, "ms_per_iter": dt * 1000, "tokens_per_sec": tokens_per_iter / dt,
                          "mfu": mfu, "grad_norm": float(grad_norm),
                          **{k: (v.tolist() if torch.as_tensor(v).dim() else v) for k, v in stats.items()}}
                metrics.write(record)
                if wandb:
                    wandb.log({k: v for k, v in record.items() if not isinstance(v, list)}, step=iter_num)
        iter_num += 1
        if cfg.save_interval and iter_num % cfg.save_interval == 0:
            save(f"save_interval {cfg.save_interval}")
        stop = bool(stop_requested)
        if ddp:
            flag = torch.tensor(float(stop), device=dev if device_type == "cuda" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops after the same step
            stop = flag.item() > 0
        if stop:
            save("stopped by signal")
            if master:
                print(f"stopped at iter {iter_num}; continue with --init_from=resume --out_dir={cfg.out_dir}")
            break
    else:
        if last_eval_iter != iter_num:
            do_eval()  # the final model is always evaluated (and saved by the usual rule)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
