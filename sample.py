"""
Generate text from a trained checkpoint (dense or MoE; the checkpoint says which):

    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3
    python sample.py --out_dir=out-shakespeare-moe --start=FILE:prompt.txt --stream=True
    python sample.py --out_dir=out-shakespeare-char --bench_context=256     # tokens/s with and without kv cache
"""
import os
import signal
import statistics
import sys
import time
from types import SimpleNamespace

if __name__ == "__main__":  # Ctrl-C while the imports below load: exit quietly with 130, no traceback
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))

import torch

from nanomoe.checkpoint import check_finite_weights, model_from_checkpoint
from nanomoe.cli import Progress, run_cli
from nanomoe.configurator import parse_args
from nanomoe.device import DTYPES, autocast_context, pick_device, pick_dtype, synchronize
from nanomoe.errors import UserError
from nanomoe.files import read_utf8
from nanomoe.runs import read_checkpoint
from nanomoe.settings import MAX_SEED, Valid, script_keys
from nanomoe.tokenizer import Tokenizer

# -----------------------------------------------------------------------------
out_dir = "out"  # folder of the training run
ckpt = "ckpt.pt"  # in out_dir: ckpt.pt (latest; a sharded run's ckpt.dcp if it saved last), best.pt, ckpt.dcp
start = "\n"  # prompt, or FILE:path to read it from a file
num_samples: Valid(min=1) = 3
max_new_tokens: Valid(min=1) = 500
temperature: Valid(above=0) = 0.8  # < 1 is more conservative, > 1 more random
top_k: Valid(int | None, min=1) = 200  # sample only from the top_k most likely tokens (None = all)
seed: Valid(min=0, max=MAX_SEED) = 1337
device = "auto"
dtype: Valid(choices=DTYPES) = "auto"
stream = False  # print tokens as they are generated (one sample at a time)
kv_cache = True  # keep past keys/values (MLA: latents; Mamba2: a fixed state) instead of re-running the context
bench_context: Valid(min=0) = 0  # > 0: time generation instead: random prompt + max_new_tokens = this many tokens, num_samples runs
# -----------------------------------------------------------------------------
KEYS = script_keys(sys.modules[__name__])


def main():
    cfg = SimpleNamespace(**parse_args(KEYS, sys.argv[1:]))
    dev = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, dev)

    ckpt = read_checkpoint(cfg.out_dir, cfg.ckpt, needs=("tokenizer",))  # a file, or a sharded run's ckpt.dcp
    check_finite_weights(ckpt, os.path.join(cfg.out_dir, cfg.ckpt))
    model = model_from_checkpoint(ckpt)
    tok = Tokenizer.from_meta(ckpt["tokenizer"])  # the tokenizer the run was trained with, kept in the checkpoint
    del ckpt

    start = cfg.start
    if start.startswith("FILE:"):
        path = start[5:]
        if not os.path.isfile(path):
            raise UserError(f"prompt file '{path}' not found (--start=FILE:path reads the prompt from a file)")
        start = read_utf8(path, "prompt file", "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
    ids = tok.encode(start)
    if not ids:
        raise UserError("the prompt encodes to no tokens; give a non-empty --start")

    torch.manual_seed(cfg.seed)
    model.eval().to(dev)
    if cfg.bench_context:
        return bench_generation(model, cfg, dev, dtype, tok.vocab_size)
    x = torch.tensor(ids, dtype=torch.long, device=dev)[None, ...]
    gen_args = (cfg.max_new_tokens, cfg.temperature, cfg.top_k, tok.vocab_size, cfg.kv_cache)
    with torch.no_grad(), autocast_context(dev, dtype):
        for _ in range(cfg.num_samples):
            if cfg.stream:
                # decode everything generated so far and print what is new: a BPE character can span tokens
                print(start, end="", flush=True)
                pending = []  # tokens not printed yet: a BPE character can span several
                for t in model.generate_stream(x, *gen_args):
                    pending.append(t[0].item())
                    text = tok.decode(pending)
                    if not text.endswith("\ufffd"):  # else wait for the rest of a split character
                        print(text, end="", flush=True)
                        pending = []
                print(tok.decode(pending))
            else:
                progress = Progress()  # a status line on a terminal, for long generations
                new = []
                for t in model.generate_stream(x, *gen_args):
                    new.append(t)
                    progress.update(f"generating: {len(new)}/{cfg.max_new_tokens} tokens")
                progress.done()
                print(tok.decode(torch.cat([x] + new, dim=1)[0].tolist()))
            print("---------------")


def bench_generation(model, cfg, dev, dtype, vocab_size):
    """Tokens/s of generating max_new_tokens after a random prompt that brings the context to bench_context,
    with and without the KV cache (prefill included), median of num_samples runs each."""
    block_size = model.config.block_size
    if not cfg.max_new_tokens < cfg.bench_context <= block_size:
        raise UserError(f"bench_context={cfg.bench_context} must be larger than max_new_tokens="
                        f"{cfg.max_new_tokens} and at most the model's block_size={block_size}")
    prompt = torch.randint(vocab_size, (1, cfg.bench_context - cfg.max_new_tokens), device=dev)
    mamba = f" and Mamba2 in layers {model.config.mamba_layers}" if model.config.mamba_layers else ""
    print(f"{cfg.out_dir}/{cfg.ckpt}: {model.config.attn} attention{mamba}, context {cfg.bench_context} "
          f"({prompt.size(1)} prompt + {cfg.max_new_tokens} new tokens), median of {cfg.num_samples} runs")
    speed = {}
    for kv_cache in (True, False):
        times = []
        for _ in range(cfg.num_samples):
            synchronize(dev)
            t0 = time.perf_counter()
            with torch.no_grad(), autocast_context(dev, dtype):
                for _ in model.generate_stream(prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, vocab_size,
                                               kv_cache):
                    pass
            synchronize(dev)  # generation queues its tokens on a GPU without waiting for them
            times.append(time.perf_counter() - t0)
        speed[kv_cache] = cfg.max_new_tokens / statistics.median(times)
        print(f"kv_cache={kv_cache!s:5}  {speed[kv_cache]:10,.1f} tokens/s", flush=True)
    print(f"speed-up with the cache: {speed[True] / speed[False]:.2f}x")


if __name__ == "__main__":
    run_cli(main)
