"""
Write a dense checkpoint as a Hugging Face GPT-2 model (config.json + model.safetensors), for
transformers, other tools and the hub:

    python export.py --out_dir=out-shakespeare-char                   # -> out-shakespeare-char/hf
    python export.py --out_dir=out-x --ckpt=best.pt --hf_dir=exported/x

    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained("out-shakespeare-char/hf")

Only the GPT-2 architecture fits the format (learned positions, LayerNorm, GELU, full attention heads); an
MoE checkpoint does not (GPT-2 has no experts). No tokenizer is written: token ids are those of the
tokenizer the checkpoint names (for GPT-2 BPE, transformers' GPT2TokenizerFast.from_pretrained('gpt2')).
"""
import os
import signal
import sys

if __name__ == "__main__":  # Ctrl-C while the imports below load: exit quietly with 130, no traceback
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))

from checkpoint import load_checkpoint, model_from_checkpoint
from common import UserError, run_cli
from configurator import parse_args, script_keys
from hf_gpt2 import export_hf

# -----------------------------------------------------------------------------
out_dir = "out"  # folder of the training run
ckpt = "ckpt.pt"  # checkpoint file in out_dir: ckpt.pt (latest) or best.pt (best val loss)
hf_dir: str | None = None  # where to write the Hugging Face folder (None = out_dir/hf)
# -----------------------------------------------------------------------------
KEYS = script_keys(globals())


def main():
    cfg = parse_args(KEYS, sys.argv[1:])
    path = os.path.join(cfg["out_dir"], cfg["ckpt"])
    hf_dir = cfg["hf_dir"] or os.path.join(cfg["out_dir"], "hf")
    ckpt = load_checkpoint(path)
    n = ckpt["model_args"].get("n_experts", 0)
    if n > 0:
        raise UserError(f"{path} holds an MoE model ({n} experts): the GPT-2 (Hugging Face) format has no "
                        f"experts, so only dense checkpoints can be exported")
    model = model_from_checkpoint(ckpt)
    export_hf(model, hf_dir)
    tokenizer = ckpt.get("tokenizer", {}).get("tokenizer", "unknown")
    print(f"wrote {hf_dir}/config.json and model.safetensors ({model.get_num_params() / 1e6:.2f}M parameters, "
          f"token ids of the {tokenizer} tokenizer); load with transformers.GPT2LMHeadModel.from_pretrained('{hf_dir}')")


if __name__ == "__main__":
    run_cli(main)
