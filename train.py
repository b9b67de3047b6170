"""
Train a dense or Mixture-of-Experts GPT. One process on a CPU, an Apple GPU or a CUDA GPU:

    python train.py config/train_shakespeare_char.py --batch_size=32

Several GPUs or nodes with DistributedDataParallel (gloo on CPU, nccl on CUDA):

    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_moe.py

or with the model spread over them instead of copied (nanomoe/distributed/): --fsdp=True shards parameters,
gradients and optimizer state (FSDP2); --ep_size=N splits each MoE layer's experts over groups of N processes.

The model is an MoEGPT when the config asks for experts (n_experts > 0), a dense GPT otherwise. The loss
optimised is cross-entropy + aux_loss, where aux_loss = balance_loss_weight * balance + z_loss_weight * z
(the balance term with balance_mode='aux' only); the log shows each part (`loss` is always the cross-entropy).
One optimizer step is written once, in train_step below; tools/bench.py and tools/bench_sharding.py call it too.
"""
import contextlib
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from types import SimpleNamespace

if __name__ == "__main__":  # Ctrl-C while the imports below load: exit quietly with 130, no traceback
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from moe_model import load_stats
from nanomoe.checkpoint import (SHARDED, TO_RESUME, OutDirLock, kept_path, latest_checkpoint, link_checkpoint,
                                load_checkpoint, model_from_checkpoint, model_state, prune_kept, remove_sharded,
                                restore_training_state, rng_state, save_checkpoint)
from nanomoe.cli import duration, run_cli
from nanomoe.configurator import parse_args
from nanomoe.data import TokenData
from nanomoe.device import DTYPES, autocast_context, cpu_matmul_flops, gpu_peak_flops
from nanomoe.distributed.parallel import (BACKENDS, accumulating, any_rank, check_sharding, clip_gradients, finish,
                                          gather_objects, install_stop_handlers, join, local_tensor, mean_over_ranks,
                                          reduce_mean, setup_processes, shard, sync_gradients)
from nanomoe.errors import UserError
from nanomoe.factory import build_model, check_same_model, model_keys
from nanomoe.hf.formats import is_hf_init, model_for_training
from nanomoe.metrics import MetricsLog
from nanomoe.optim import OPTIMIZERS, build_optimizer, describe, set_lr
from nanomoe.settings import MAX_SEED, Valid, script_keys

# -----------------------------------------------------------------------------
# default config values: GPT-2 (124M) on a large corpus; config files and --key=value override them
# I/O
out_dir = "out"
eval_interval: Valid(min=1) = 2000  # evaluate train/val loss (and save a checkpoint) every this many iterations
log_interval: Valid(min=1) = 1
eval_iters: Valid(min=1) = 200  # batches per split in each evaluation
eval_only = False  # evaluate once and exit
always_save_checkpoint = True  # save ckpt.pt at every eval, not only when val loss improves
save_interval: Valid(min=0) = 0  # also save ckpt.pt every this many iterations (0 = only at evals)
save_every: Valid(min=0) = 0  # also save every this many iterations, kept as ckpt-<iter>.pt (0 = off)
keep_checkpoints: Valid(int | None, min=1) = 10  # save_every: keep the newest this many copies (None = all)
init_from = "scratch"  # 'scratch', 'resume' (from out_dir/ckpt.pt), 'gpt2'...'gpt2-xl' or 'hf:/path' (Hugging Face weights)
# logging
wandb_log = False
wandb_project = "nanomoe"
wandb_run_name = "run"
# data
dataset = "openwebtext"
data_root = "data"  # datasets live in data_root/<dataset>/ as written by prepare.py
gradient_accumulation_steps: Valid(min=1) = 5 * 8  # micro-steps per optimizer step, over all processes together
batch_size: Valid(min=1) = 12  # sequences per micro-step per process
# model: every field of GPTConfig (model.py) and MoEConfig (moe_model.py) is a config key too (docs/config.md)
# optimizer: 'adamw', or 'muon' for the hidden weight matrices (each expert its own) with AdamW for the rest
optimizer: Valid(choices=OPTIMIZERS) = "adamw"
learning_rate: Valid(min=0) = 6e-4
max_iters: Valid(min=0) = 600000
weight_decay: Valid(min=0) = 1e-1
beta1: Valid(min=0, below=1) = 0.9
beta2: Valid(min=0, below=1) = 0.95
grad_clip: Valid(min=0) = 1.0  # clip gradients at this norm (0 = off)
muon_lr: Valid(float | None, min=0, below=math.inf) = None  # Muon's peak rate, on lr's schedule (None = learning_rate)
muon_momentum: Valid(min=0, below=1) = 0.95  # Muon's (Nesterov) momentum
# learning rate schedule: linear warmup, then cosine decay to min_lr
decay_lr = True
warmup_iters: Valid(min=0) = 2000
lr_decay_iters: Valid(min=0) = 600000  # should be ~= max_iters per Chinchilla
min_lr: Valid(min=0) = 6e-5  # should be ~= learning_rate/10 per Chinchilla
# system
backend: Valid(choices=BACKENDS) = "auto"  # DDP backend: 'auto' = nccl on CUDA, gloo otherwise
fsdp = False  # under torchrun: shard parameters, gradients and optimizer state over the processes (FSDP2)
ep_size: Valid(min=1) = 1  # under torchrun: split each MoE layer's experts over this many processes
device = "auto"  # 'auto' picks cuda > mps > cpu; or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype: Valid(choices=DTYPES) = "auto"  # 'auto' = bfloat16 on GPUs that support it, float16 on older GPUs, float32 elsewhere
compile = True  # torch.compile the model (turned off with a note on CPU and MPS, and with fsdp or ep_size)
seed: Valid(min=0, max=MAX_SEED) = 1337
peak_flops: Valid(float | None, above=0) = None  # FLOP/s peak for MFU on a GPU we do not know (docs/gpu.md lists the known ones)
max_nonfinite_steps: Valid(min=1) = 5  # stop after this many optimizer steps in a row with a NaN/Inf loss or gradient
# -----------------------------------------------------------------------------
RUN_KEYS = script_keys(sys.modules[__name__])  # the settings of the run; the model's come from its config classes
KEYS = {**RUN_KEYS, **model_keys(skip=("vocab_size",))}  # the dataset decides vocab_size


def main():
    t_start = time.time()
    cfg, explicit = parse_config(sys.argv[1:])
    # the lock first (rank 0): whether a checkpoint exists, the one to resume and the metrics log are all read
    # under it, so a second run started a moment after this one cannot decide on what it saw before our save
    lock = OutDirLock(cfg.out_dir) if os.environ.get("RANK", "0") == "0" else None
    with lock if lock is not None else contextlib.nullcontext():  # a refused run leaves out_dir as it was
        cfg, ckpt, proc, data, raw_model = start_run(cfg, explicit)
        ctx = autocast_context(proc.device, proc.dtype)
        iter_num, best_val_loss = (ckpt["iter_num"], ckpt["best_val_loss"]) if ckpt else (0, float("inf"))

        torch.manual_seed(cfg.seed + proc.rank)  # dropout differs per rank
        batch_gen = torch.Generator().manual_seed(cfg.seed + proc.rank)  # each rank draws its own batches
        tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
        if proc.sharding:
            if proc.master:
                describe_run(raw_model, cfg, proc, tokens_per_iter)  # while every rank holds the whole model
            model = shard(raw_model, cfg, proc)  # before the optimizer sees the parameters
        optimizer = build_optimizer(raw_model, vars(cfg), proc.device_type)
        if proc.master and describe(optimizer):  # Muon: which parameters it takes, which stay on AdamW
            print(describe(optimizer))
        scaler = torch.amp.GradScaler(proc.device_type, enabled=(proc.dtype == "float16"))
        if ckpt:
            if "sharded" in ckpt:  # the weights and the optimizer are read into the sharded model
                from nanomoe.distributed.checkpoint import load_sharded
                load_sharded(ckpt["sharded"], raw_model, optimizer)
            restore_training_state(ckpt, optimizer, scaler, batch_gen, proc)
            ckpt = None  # free the memory
        if not proc.sharding:
            model = torch.compile(raw_model) if proc.compile else raw_model
            if proc.ddp:
                model = DDP(model, device_ids=[proc.local_rank] if proc.device_type == "cuda" else None)
            if proc.master:
                describe_run(raw_model, cfg, proc, tokens_per_iter)
        metrics = None
        if proc.master:
            mode = "append" if cfg.eval_only else "resume" if cfg.init_from == "resume" else "new"
            metrics = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), mode, iter_num)
            lock.start()  # the run writes from here on; removes what saves a kill cut short left
    wandb = start_wandb(cfg) if cfg.wandb_log and proc.master else None
    run = SimpleNamespace(cfg=cfg, proc=proc, model=model, raw_model=raw_model, data=data, ctx=ctx,
                          metrics=metrics, wandb=wandb, optimizer=optimizer, scaler=scaler, batch_gen=batch_gen,
                          ckpt_path=os.path.join(cfg.out_dir, "ckpt.pt"), tokenizer=data.tokenizer_meta(),
                          data_fingerprint=data.fingerprint(), stop_requested=None)

    if cfg.eval_only:
        evaluate_and_log(run, iter_num, best_val_loss, tokens_per_iter)
        finish(proc, lock)
        return
    # a signal stops the run after the step it arrives in, or at once during an evaluation (which can be long)
    stop_requested = run.stop_requested = install_stop_handlers(proc.master)
    # MFU counts the model's parameters, of which an expert-parallel rank holds only its share: not shown there
    peak = gpu_peak_flops(proc.device, cfg.peak_flops) if "ep" not in proc.sharding else None
    accum_steps = cfg.gradient_accumulation_steps // proc.world_size  # micro-steps on this process
    nonfinite = SimpleNamespace(pending=[], in_row=0, total=0)  # steps whose update was skipped
    model.train()
    t0, step_time, running_mfu, last_eval_iter = time.time(), None, -1.0, None
    while iter_num < cfg.max_iters:
        if iter_num % cfg.eval_interval == 0 and last_eval_iter != iter_num:
            evaluated = evaluate_and_log(run, iter_num, best_val_loss, tokens_per_iter)
            if evaluated is None:  # abandoned for a signal
                stop(run, nonfinite, iter_num, best_val_loss)
                break
            improved, best_val_loss = evaluated
            if iter_num > 0 and (improved or cfg.always_save_checkpoint):
                save(run, "eval", iter_num, best_val_loss, improved)
            last_eval_iter, t0 = iter_num, time.time()  # the eval's time is not the step's
        lr = get_lr(iter_num, cfg)
        set_lr(optimizer, lr, cfg.learning_rate, cfg.muon_lr)
        batches = [data.get_batch("train", cfg.batch_size, batch_gen, proc.device) for _ in range(accum_steps)]
        sums, grad_norm, skipped = train_step(model, raw_model, optimizer, scaler, batches, ctx, proc, cfg.grad_clip)
        nonfinite.pending.append((iter_num, skipped))

        t1 = time.time()
        dt, t0 = t1 - t0, t1
        step_time = dt if step_time is None else 0.9 * step_time + 0.1 * dt
        if iter_num % cfg.log_interval == 0:
            check_nonfinite(nonfinite, run)
            stats = mean_over_ranks(sums, proc)
            if proc.master:
                mfu = raw_model.estimate_mfu(tokens_per_iter // proc.world_size, dt, peak)  # per GPU
                if mfu is not None:
                    running_mfu = mfu if running_mfu < 0 else 0.9 * running_mfu + 0.1 * mfu
                eta = step_time * (cfg.max_iters - iter_num - 1)
                print(log_line(iter_num, cfg.max_iters, stats, lr, dt, tokens_per_iter, running_mfu, eta), flush=True)
                log_metrics(run, {"type": "train", "iter": iter_num, "time": t1,
                                  "tokens": (iter_num + 1) * tokens_per_iter, "lr": lr, "ms_per_iter": dt * 1000,
                                  "tokens_per_sec": tokens_per_iter / dt, "mfu": mfu, "grad_norm": grad_norm,
                                  **stats})
        iter_num += 1
        keep = cfg.save_every > 0 and iter_num % cfg.save_every == 0
        if keep or cfg.save_interval and iter_num % cfg.save_interval == 0:
            check_nonfinite(nonfinite, run)
            reason = f"save_every {cfg.save_every}" if keep else f"save_interval {cfg.save_interval}"
            save(run, reason, iter_num, best_val_loss, keep=keep)
        # a signal stops the run after this step; under DDP every rank must agree on which step, so the ranks
        # compare their flags (a collective) at log steps only
        if (not proc.ddp or iter_num % cfg.log_interval == 0) and any_rank(bool(stop_requested), proc):
            stop(run, nonfinite, iter_num, best_val_loss)
            break
    else:
        check_nonfinite(nonfinite, run)
        if last_eval_iter != iter_num:  # the final model is always evaluated (and saved by the usual rule)
            evaluated = evaluate_and_log(run, iter_num, best_val_loss, tokens_per_iter)
            if evaluated is None:
                stop(run, nonfinite, iter_num, best_val_loss)
            else:
                improved, best_val_loss = evaluated
                if iter_num > 0 and (improved or cfg.always_save_checkpoint):
                    save(run, "eval", iter_num, best_val_loss, improved)
    if proc.master:
        print(summary(run, best_val_loss, time.time() - t_start))
    finish(proc, lock)


def stop(run, nonfinite, iter_num, best_val_loss):
    """A signal asked the run to stop: save where it is (resumable), say how to continue."""
    check_nonfinite(nonfinite, run)
    save(run, "stopped by signal", iter_num, best_val_loss)
    if run.proc.master:
        print(f"stopped at iter {iter_num}; continue with --init_from=resume --out_dir={run.cfg.out_dir}")


def summary(run, best_val_loss, seconds):
    """The run's last line: what it reached, how long it took, where its checkpoint is and how to sample it."""
    best = f"best val loss {best_val_loss:.4f}" if math.isfinite(best_val_loss) else "no val loss yet"
    path = latest_checkpoint(run.cfg.out_dir)
    if not os.path.lexists(path):
        return f"done: {best}, {duration(seconds)}; no checkpoint saved (always_save_checkpoint=False and no eval " \
               f"improved on the start)"
    return f"done: {best}, {duration(seconds)}; checkpoint {path}; sample it: python sample.py " \
           f"--out_dir={run.cfg.out_dir}"


# -----------------------------------------------------------------------------
# one optimizer step

def train_step(model, raw_model, optimizer, scaler, batches, ctx, proc, grad_clip):
    """One optimizer step on this process's micro-batches `batches` [(x, y), ...]: the model's start-of-step
    hook, a forward and backward per micro-batch (the gradients accumulate, and are synced across processes
    on the last one only), the expert gradients' sync under expert parallel, unscaling and clipping, the update
    unless the loss or a gradient is non-finite, and the model's end-of-step hook. model is what runs the
    forward (compiled, DDP or FSDP), raw_model the plain GPT inside it. -> (stats, grad_norm, skipped): the
    means over the micro-steps of the cross-entropy ('loss') and of the model's extra numbers (balance, z,
    expert_load, ...), and whether the update was skipped, all device tensors: nothing here waits for the GPU."""
    reduce = reduce_mean(proc)
    # MoE hooks (moe_model.py): balance_scope='global' routes the step's batches before the first backward
    raw_model.start_step(batches, ctx, reduce)
    sums = {}
    for micro_step, (x, y) in enumerate(batches):
        # under DDP (FSDP) gradients are all-reduced (reduce-scattered) only on the last micro-step
        sync = not proc.ddp or micro_step == len(batches) - 1
        with accumulating(model, sync, proc), ctx:
            _, loss, extra = model(x, y)
            aux_loss = extra.get("aux_loss", 0.0)  # the MoE's weighted balance + z losses
        scaler.scale((loss + aux_loss) / len(batches)).backward()
        for k, v in {"loss": loss, **extra}.items():
            if k != "aux_loss":
                sums[k] = sums.get(k, 0) + v.detach().float() / len(batches)

    sync_gradients(raw_model, proc)  # expert parallel: the experts' gradients (DDP synced the rest)
    scaler.unscale_(optimizer)
    grad_norm = clip_gradients(raw_model, grad_clip if grad_clip > 0 else float("inf"), proc)
    # a non-finite loss or gradient skips the update; the flag stays on the device (no host sync per step)
    # and is read at the next log step or save. Under fp16 the GradScaler skips inf gradients itself.
    skipped = ~torch.isfinite(sums["loss"])
    if not scaler.is_enabled():
        skipped = skipped | ~torch.isfinite(grad_norm)
    skipped = any_rank(skipped, proc)  # under DDP every rank skips the same steps
    step_unless(skipped, optimizer, scaler)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    raw_model.end_step(sums.get("expert_load"), skipped, reduce)  # aux_free: the expert biases move
    return sums, grad_norm, skipped


def step_unless(bad, optimizer, scaler):
    """optimizer.step() unless `bad` (a bool tensor on the device) is True, and then exactly as if the step
    never happened: parameters, Adam's moments and its step count unchanged. A fused AdamW takes the flag as
    found_inf and decides on the device, so the host does not wait for the GPU. Under fp16 the GradScaler
    owns found_inf, and other optimizers have no such input: there the flag is read on the host."""
    if scaler.is_enabled() or not optimizer.defaults.get("fused"):
        if not bad.item():
            scaler.step(optimizer)
        return
    optimizer.found_inf = bad.float()
    optimizer.step()
    del optimizer.found_inf


# -----------------------------------------------------------------------------
# setup

def parse_config(argv):
    """The run's settings and the keys its config files and flags set."""
    explicit = set()
    return SimpleNamespace(**parse_args(KEYS, argv, explicit)), explicit


def start_run(cfg, explicit):
    """Everything before the first write, under out_dir's lock: the checkpoint to resume, the processes, the
    checks, the data and the model with its preflight. -> (cfg, ckpt, proc, data, raw_model)"""
    ckpt = read_resumed(cfg, explicit)
    proc = setup_processes(cfg)
    check_run(cfg, proc)
    join(proc, cfg.backend)
    data = TokenData(cfg.data_root, cfg.dataset, cfg.block_size)  # a missing dataset names its prepare command
    if ckpt and data.check_same_data(ckpt["tokenizer"], ckpt.get("data")) and proc.master:
        print(f"note: the files of {data.dir} changed since the checkpoint was saved (same tokenizer); "
              f"training goes on with the new ones")
    raw_model = make_model(cfg, explicit, ckpt, data).to(proc.device)
    preflight(raw_model, data, cfg, proc, autocast_context(proc.device, proc.dtype))
    return cfg, ckpt, proc, data, raw_model


def read_resumed(cfg, explicit):
    """(init_from='resume') the checkpoint, whose settings fill every key the command does not give: a resumed
    run is the saved run. None otherwise."""
    if cfg.init_from != "resume":
        return None
    path = latest_checkpoint(cfg.out_dir)  # ckpt.pt, or a sharded run's ckpt.dcp
    if path.endswith(SHARDED):
        from nanomoe.distributed.checkpoint import load_sharded_meta  # torch's DCP: imported only when needed
        ckpt = load_sharded_meta(path, TO_RESUME)
    else:
        ckpt = load_checkpoint(path, TO_RESUME)
    saved = ckpt.get("config", {}).get("optimizer", "adamw")  # checkpoints from before Muon: AdamW
    if "optimizer" in explicit and cfg.optimizer != saved:
        raise UserError(f"{path} was trained with optimizer='{saved}'; it cannot resume with "
                        f"optimizer='{cfg.optimizer}' (its optimizer state is {saved}'s); resume with "
                        f"--optimizer={saved}, or leave --optimizer out")
    for k, v in {**ckpt.get("config", {}), **ckpt["model_args"]}.items():
        if k in KEYS and k not in explicit and k not in ("init_from", "out_dir"):
            setattr(cfg, k, v)
    return ckpt


def check_run(cfg, proc):
    """Everything that can be checked before anything is written or any process group is joined."""
    if cfg.decay_lr and cfg.min_lr > cfg.learning_rate:
        raise UserError(f"min_lr={cfg.min_lr} is above learning_rate={cfg.learning_rate}: the schedule decays to "
                        f"min_lr, so set --min_lr to at most the learning rate (nanoGPT uses learning_rate / 10)")
    if cfg.gradient_accumulation_steps % proc.world_size:
        raise UserError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} is not divisible by the "
                        f"world size {proc.world_size} (use a multiple of {proc.world_size})")
    if cfg.init_from not in ("scratch", "resume") and not is_hf_init(cfg.init_from):
        raise UserError(f"init_from={cfg.init_from!r} is not 'scratch', 'resume', 'gpt2', 'gpt2-medium', "
                        f"'gpt2-large', 'gpt2-xl' or 'hf:/path/to/folder'")
    check_sharding(cfg, proc)
    if cfg.optimizer == "muon" and "fsdp" in proc.sharding:
        raise UserError("optimizer='muon' orthogonalises each whole weight matrix, but fsdp=True splits them over the "
                        "processes; use --fsdp=False (DDP and --ep_size work with Muon), or --optimizer=adamw")
    if cfg.optimizer == "muon" and cfg.muon_lr is not None and cfg.learning_rate == 0:
        raise UserError(f"muon_lr={cfg.muon_lr} follows the schedule as a fraction of learning_rate, which is 0; set "
                        f"--learning_rate above 0, or leave muon_lr unset (None: Muon takes learning_rate)")
    ckpt_path = latest_checkpoint(cfg.out_dir)  # read under out_dir's lock (main)
    if cfg.init_from != "resume" and os.path.exists(ckpt_path) and not cfg.eval_only:
        # a new run would overwrite the old one's checkpoint: that is hours of someone's GPU time
        raise UserError(f"{ckpt_path} already exists; continue it with --init_from=resume, or choose another "
                        f"--out_dir (or delete the old run) to start a new one")
    log = os.path.join(cfg.out_dir, "metrics.jsonl")
    if cfg.eval_only and cfg.init_from != "resume" and os.path.exists(log):
        # its eval record would land in another run's log as if that run had made it
        raise UserError(f"--eval_only=True with init_from={cfg.init_from!r} would add a new model's eval to "
                        f"{log}, the log of another run; evaluate that run with --init_from=resume, or give "
                        f"another --out_dir")
    if cfg.save_every and proc.sharding:
        raise UserError(f"save_every={cfg.save_every} keeps copies of ckpt.pt, but a --fsdp / --ep_size run saves a "
                        f"sharded ckpt.dcp and keeps no copies; use --save_interval instead, or train unsharded")
    if cfg.init_from == "resume" and proc.sharding and not ckpt_path.endswith(SHARDED):
        raise UserError(f"{ckpt_path} was saved unsharded; a --fsdp / --ep_size run resumes only its own sharded "
                        f"checkpoints: resume it with --fsdp=False --ep_size=1")
    if cfg.wandb_log and proc.master:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("wandb_log=True needs the wandb package: pip install wandb (or --wandb_log=False)") from None


def make_model(cfg, explicit, ckpt, data):
    """The model to train: the checkpoint's (resume), GPT-2's weights (init_from='gpt2' or 'hf:/path',
    sparse-upcycled when n_experts > 0) or a new one from the config. The same seed on every rank gives
    every rank the same initial weights."""
    settings = vars(cfg)
    if ckpt is not None:
        # the model's shape comes from the checkpoint; a config that sets another one is a mistake
        check_same_model({"n_experts": 0, **ckpt["model_args"]}, settings, explicit, "checkpoint")
        model = model_from_checkpoint(ckpt, {k: settings[k] for k in explicit if k in KEYS})
    elif is_hf_init(cfg.init_from):
        torch.manual_seed(cfg.seed)
        model = model_for_training(settings, explicit)
    else:
        vocab_size = data.meta["vocab_size"]
        if data.meta["tokenizer"] == "gpt2":
            vocab_size = 64 * math.ceil(vocab_size / 64)  # 50257 -> 50304: a multiple of 64 runs faster
        torch.manual_seed(cfg.seed)
        model = build_model({**settings, "vocab_size": vocab_size})
    if model.config.vocab_size < data.meta["vocab_size"]:
        raise UserError(f"the model's vocab_size {model.config.vocab_size} is smaller than the dataset's "
                        f"{data.meta['vocab_size']} (the checkpoint was trained on another dataset)")
    return model


@torch.no_grad()
def preflight(model, data, cfg, proc, ctx):
    """One forward pass of one sequence before anything is written: settings that are each legal can still
    make a model that computes NaN/Inf (rope_theta=1e-300, a float16 overflow); better one line now than a
    run of skipped steps. Eval mode and a generator of its own: no random state of the run moves."""
    x, y = data.get_batch("val", 1, torch.Generator().manual_seed(cfg.seed), proc.device)
    model.eval()
    with ctx:
        _, loss, _ = model(x, y)
    model.train()
    if not torch.isfinite(loss):
        raise UserError(f"the model computes a non-finite loss ({loss.item()}) on its first batch, before any "
                        f"training: some setting is extreme (rope_theta, dtype, the model's size); change it and "
                        f"run again (nothing was written)")


def describe_run(model, cfg, proc, tokens_per_iter):
    """What is about to run, and, on a CPU, how long a GPU-sized config would take there."""
    n_all, n_active = model.get_num_params(), model.num_active_params()
    print(f"model: {type(model).__name__}, {n_all / 1e6:.2f}M parameters, {n_active / 1e6:.2f}M active per "
          f"token; device {proc.device}, dtype {proc.dtype}, {proc.world_size} process(es)")
    split = f", {cfg.gradient_accumulation_steps // proc.world_size} on each of {proc.world_size} processes" \
        if proc.ddp else ""
    print(f"tokens per iteration: {tokens_per_iter:,} ({cfg.gradient_accumulation_steps} micro-steps x "
          f"{cfg.batch_size} sequences x {cfg.block_size} tokens{split})")
    if proc.device_type == "cpu":
        # training costs 3x a forward pass; each eval runs eval_iters forward passes per split
        evals = cfg.max_iters // cfg.eval_interval + 1
        tokens = cfg.max_iters * tokens_per_iter + evals * 2 * cfg.eval_iters * cfg.batch_size * cfg.block_size / 3
        # a small GPT's training step runs at about the FLOP/s of a plain 1024x1024 matmul on the same CPU
        # (measured on the CPU recipe), so that speed gives the estimate
        seconds = model.flops_per_token() * tokens / cpu_matmul_flops()
        if seconds > 30 * 60:
            recipe = ("train_shakespeare_hybrid_cpu.py" if model.config.mamba_layers else
                      "train_shakespeare_moe_cpu.py" if hasattr(model, "moe_layers") else "train_shakespeare_char_cpu.py")
            print(f"note: this config is sized for a GPU: on this CPU it would take about {duration(seconds)} "
                  f"(estimated from its matmul speed). For a run of minutes try config/{recipe}")


def start_wandb(cfg):
    import wandb
    wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=vars(cfg))
    return wandb


# -----------------------------------------------------------------------------
# the training step's helpers

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


def check_nonfinite(nonfinite, run):
    """Read the skip flags of the steps since the last check (one host sync), report each skipped step, and
    stop the run after max_nonfinite_steps skips in a row. A skipped step changed nothing, so finding out a
    few steps late loses nothing; saves call this first, so a checkpoint never follows an unreported skip."""
    flags = torch.stack([bad for _, bad in nonfinite.pending]).tolist() if nonfinite.pending else []
    for (it, _), bad in zip(nonfinite.pending, flags):
        if not bad:
            nonfinite.in_row = 0
            continue
        nonfinite.in_row += 1
        nonfinite.total += 1
        if run.proc.master:
            print(f"iter {it}: non-finite loss or gradient, update skipped "
                  f"({nonfinite.in_row} in a row, {nonfinite.total} in total)")
            log_metrics(run, {"type": "skip", "iter": it, "time": time.time(), "nonfinite_total": nonfinite.total})
        if nonfinite.in_row >= run.cfg.max_nonfinite_steps:
            if run.proc.master:
                print(f"error: {nonfinite.in_row} non-finite steps in a row; stopping. Lower learning_rate or "
                      f"raise grad_clip, then resume from the last good checkpoint", file=sys.stderr)
            if run.proc.ddp:
                dist.destroy_process_group()
            sys.exit(1)
    nonfinite.pending.clear()


def log_line(it, max_iters, stats, lr, dt, tokens_per_iter, running_mfu, eta):
    parts = [f"loss {stats['loss']:.4f}"]
    parts += [f"{k} {stats[k]:.4f}" for k in ("balance", "z") if k in stats]
    parts += [f"lr {lr:.2e}", f"time {dt * 1000:.2f}ms", f"tok/s {tokens_per_iter / dt:,.0f}"]
    if running_mfu >= 0:
        parts.append(f"mfu {running_mfu * 100:.2f}%")
    parts.append(f"eta {duration(eta)}")
    return f"iter {it}/{max_iters}: " + ", ".join(parts)


# -----------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate(run):
    """Mean CE (and balance loss, expert load) per split. Each rank takes an equal share of eval_iters (at
    least one batch, so the mean of the ranks' means is the mean); its own generator keeps the training
    batches independent of whether an eval happened. A long eval says so once it has timed a batch. A signal
    (Ctrl-C) abandons it after the batch it arrives in: -> None."""
    cfg, proc = run.cfg, run.proc
    n = math.ceil(cfg.eval_iters / proc.world_size)
    out, t0 = {}, time.time()
    run.model.eval()
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(cfg.seed + 999 + proc.rank)  # the same eval batches every time
        sums = {}
        for i in range(n):
            x, y = run.data.get_batch(split, cfg.batch_size, gen, proc.device)
            with run.ctx:
                _, loss, extra = run.model(x, y)
            for k, v in {"loss": loss, **extra}.items():
                if k != "aux_loss":
                    sums[k] = sums.get(k, 0) + v.detach().float()
            if run.stop_requested is not None and any_rank(bool(run.stop_requested), proc):
                run.model.train()
                if proc.master:
                    print(f"evaluation abandoned after {i + 1} of {n} {split} batches", flush=True)
                return None
            if split == "train" and i == 0 and proc.master:
                estimate = (time.time() - t0) * 2 * n
                if estimate > 5:
                    print(f"evaluating: {n} batches per split, about {duration(estimate)}", flush=True)
        for k, v in mean_over_ranks({k: v / n for k, v in sums.items()}, proc).items():
            out[f"{split}_{k}"] = v
    run.model.train()
    return out


def evaluate_and_log(run, iter_num, best_val_loss, tokens_per_iter):
    """Evaluate, print, record; -> (whether val loss improved, the new best val loss), or None when a signal
    abandoned the evaluation (nothing recorded)."""
    ev = evaluate(run)
    if ev is None:
        return None
    if "val_expert_load" in ev:  # max/min load, load CV, dead experts (moe_model.load_stats)
        ev.update({f"val_{k}": v for k, v in load_stats(ev["val_expert_load"]).items()})
    val_loss = float(ev["val_loss"])
    improved = val_loss < best_val_loss
    best_val_loss = min(best_val_loss, val_loss)
    if run.proc.master:
        extra = "".join(f", {s} balance {float(ev[f'{s}_balance']):.4f}" for s in ("train", "val")
                        if f"{s}_balance" in ev)
        print(f"step {iter_num}: train loss {float(ev['train_loss']):.4f}, val loss {val_loss:.4f}{extra}")
        log_metrics(run, {"type": "eval", "iter": iter_num, "time": time.time(), "tokens": iter_num * tokens_per_iter,
                          **ev, "best_val_loss": best_val_loss})
    return improved, best_val_loss


# -----------------------------------------------------------------------------
# checkpoints and metrics

def save(run, reason, iter_num, best_val_loss, improved=False, keep=False):
    """Save the resumable state to ckpt.pt (every rank gives its random states; rank 0 writes), and make
    best.pt the same file when the eval that asked for the save improved val loss. keep (save_every): the
    state is written as ckpt-<iter>.pt first and ckpt.pt becomes the same file, so a kill between the two
    leaves ckpt.pt on the previous save and the resumed run keeps this step again; then the oldest copies
    beyond keep_checkpoints go (counted on disk: a resumed run counts the copies already there). A sharded
    run (--fsdp, --ep_size) writes ckpt.dcp instead, every rank its shards (distributed/checkpoint.save_sharded),
    and keeps no best.pt: a sharded checkpoint is a folder, and a second one would double the disk it takes.
    Saves happen between steps, so the batch generator's state is the one before the next step's first batch."""
    states = gather_objects(rng_state(run.batch_gen.get_state()), run.proc)  # each rank draws its own batches
    # one check on the device and one read of its answer (a check per parameter waited for the GPU each time)
    finite = torch.stack([torch.isfinite(local_tensor(p)).all() for p in run.raw_model.parameters()]).all()
    if any_rank(~finite, run.proc):  # a sharded rank sees only its share of the weights
        if run.proc.master:
            print(f"not saving ({reason}): the model has non-finite parameters; the last good checkpoint stays")
        return
    model_keys_ = set(model_keys())
    entries = {"model_args": asdict(run.raw_model.config), "tokenizer": run.tokenizer,
               "data": run.data_fingerprint, "scaler": run.scaler.state_dict(), "iter_num": iter_num,
               "best_val_loss": best_val_loss, "rng": states,
               "config": {k: v for k, v in vars(run.cfg).items() if k not in model_keys_}}
    t0 = time.time()
    if run.proc.sharding:
        from nanomoe.distributed.checkpoint import save_sharded
        save_sharded(run.raw_model, run.optimizer, entries, run.cfg.out_dir, run.proc)
        path = os.path.join(run.cfg.out_dir, SHARDED)
    elif run.proc.master:
        path = kept_path(run.cfg.out_dir, iter_num) if keep else run.ckpt_path
        save_checkpoint({**entries, **model_state(run.raw_model), "optimizer": run.optimizer.state_dict()}, path)
        if keep:
            link_checkpoint(path, run.ckpt_path)
            prune_kept(run.cfg.out_dir, run.cfg.keep_checkpoints)
        remove_sharded(run.cfg.out_dir)  # a sharded run's checkpoint this one resumed from is older now
    if not run.proc.master:
        return
    print(f"saved {'sharded ' if run.proc.sharding else ''}checkpoint to {path} ({reason}, {time.time() - t0:.2f}s)"
          + (f", also {run.ckpt_path}" if keep else ""))
    if improved and not run.proc.sharding:
        link_checkpoint(run.ckpt_path, os.path.join(run.cfg.out_dir, "best.pt"))


def log_metrics(run, record):
    """One record to metrics.jsonl (and wandb): tensors become numbers or (per-layer, per-expert) lists."""
    record = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in record.items()}
    run.metrics.write(record)
    if run.wandb:
        run.wandb.log({k: v for k, v in record.items() if not isinstance(v, list)}, step=record["iter"])


if __name__ == "__main__":
    run_cli(main)
