"""
Generate text from a trained checkpoint (dense or MoE; the checkpoint says which):

    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3
    python sample.py --out_dir=out-shakespeare-moe --start=FILE:prompt.txt --stream=True
"""
import os
import signal
import sys
from types import SimpleNamespace

if __name__ == "__main__":  # Ctrl-C while the imports below load: exit quietly with 130, no traceback
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))

import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from common import DTYPES, MAX_SEED, Progress, UserError, autocast_context, pick_device, pick_dtype, run_cli
from configurator import Valid, parse_args, script_keys
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
out_dir = "out"  # folder of the training run
ckpt = "ckpt.pt"  # checkpoint file in out_dir: ckpt.pt (latest) or best.pt (best val loss)
start = "\n"  # prompt, or FILE:path to read it from a file
num_samples: Valid(min=1) = 3
max_new_tokens: Valid(min=1) = 500
temperature: Valid(above=0) = 0.8  # < 1 is more conservative, > 1 more random
top_k: Valid(int | None, min=1) = 200  # sample only from the top_k most likely tokens (None = all)
seed: Valid(min=0, max=MAX_SEED) = 1337
device = "auto"
dtype: Valid(choices=DTYPES) = "auto"
stream = False  # print tokens as they are generated (one sample at a time)
# -----------------------------------------------------------------------------
KEYS = script_keys(globals())


def main():
    cfg = SimpleNamespace(**parse_args(KEYS, sys.argv[1:]))
    dev = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, dev)

    ckpt = load_checkpoint(os.path.join(cfg.out_dir, cfg.ckpt), needs=("tokenizer",))
    model = model_from_checkpoint(ckpt)
    tok = Tokenizer.from_meta(ckpt["tokenizer"])  # the tokenizer the run was trained with, kept in the checkpoint
    del ckpt

    start = cfg.start
    if start.startswith("FILE:"):
        path = start[5:]
        if not os.path.isfile(path):
            raise UserError(f"prompt file '{path}' not found (--start=FILE:path reads the prompt from a file)")
        with open(path, encoding="utf-8") as f:
            start = f.read()
    ids = tok.encode(start)
    if not ids:
        raise UserError("the prompt encodes to no tokens; give a non-empty --start")

    torch.manual_seed(cfg.seed)
    model.eval().to(dev)
    x = torch.tensor(ids, dtype=torch.long, device=dev)[None, ...]
    with torch.no_grad(), autocast_context(dev, dtype):
        for _ in range(cfg.num_samples):
            if cfg.stream:
                # decode everything generated so far and print what is new: a BPE character can span tokens
                print(start, end="", flush=True)
                pending = []  # tokens not printed yet: a BPE character can span several
                for t in model.generate_stream(x, cfg.max_new_tokens, cfg.temperature, cfg.top_k, tok.vocab_size):
                    pending.append(t[0].item())
                    text = tok.decode(pending)
                    if not text.endswith("\ufffd"):  # else wait for the rest of a split character
                        print(text, end="", flush=True)
                        pending = []
                print(tok.decode(pending))
            else:
                progress = Progress()  # a status line on a terminal, for long generations
                new = []
                for t in model.generate_stream(x, cfg.max_new_tokens, cfg.temperature, cfg.top_k, tok.vocab_size):
                    new.append(t)
                    progress.update(f"generating: {len(new)}/{cfg.max_new_tokens} tokens")
                progress.done()
                print(tok.decode(torch.cat([x] + new, dim=1)[0].tolist()))
            print("---------------")


if __name__ == "__main__":
    run_cli(main)
