"""
Write a checkpoint as a Hugging Face model (config.json, model.safetensors or shards with an index, the
tokenizer or a note on it), for transformers, serving tools and the hub. The format follows the checkpoint's
architecture (nanomoe/hf/formats.py has the table); --format names one, and must fit:

    python -m tools.export --out_dir=out-shakespeare-char                   # -> out-shakespeare-char/hf
    python -m tools.export --out_dir=out-moe --ckpt=best.pt --hf_dir=exported/moe --format=qwen2_moe

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("out-shakespeare-char/hf")

gpt2 (learned positions, LayerNorm, GELU), llama (RoPE, RMSNorm, SwiGLU), mixtral and qwen2_moe (that backbone
with experts), qwen3 and qwen3_moe (with QK-norm), deepseek_v3 (MLA, sigmoid routing, the aux-free bias) and
deepseek_v2 (MLA, softmax routing) compute our logits (docs/hf.md has the table). A model with no exact
equivalent in the format (GELU experts with biases, capacity, ...) is refused with one line naming what is
missing, and nothing is written.
"""
import os
import signal
import sys

if __name__ == "__main__":  # Ctrl-C while the imports below load: exit quietly with 130, no traceback
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))

from nanomoe.checkpoint import check_finite_weights
from nanomoe.cli import run_cli
from nanomoe.configurator import parse_args
from nanomoe.hf.formats import ARCHITECTURES, FORMATS, export_checkpoint
from nanomoe.runs import read_checkpoint
from nanomoe.settings import Valid, script_keys

# -----------------------------------------------------------------------------
out_dir = "out"  # folder of the training run
ckpt = "ckpt.pt"  # in out_dir: ckpt.pt (latest; a sharded run's ckpt.dcp if it saved last), best.pt, ckpt.dcp
hf_dir: str | None = None  # where to write the Hugging Face folder (None = out_dir/hf)
format: Valid(str | None, choices=FORMATS) = None  # None = the format the checkpoint's architecture has
force = False  # replace the files of an earlier export in a non-empty hf_dir
# -----------------------------------------------------------------------------
KEYS = script_keys(sys.modules[__name__])


def main(argv=None):
    cfg = parse_args(KEYS, sys.argv[1:] if argv is None else argv)
    path = os.path.join(cfg["out_dir"], cfg["ckpt"])
    hf_dir = os.path.join(cfg["out_dir"], "hf") if cfg["hf_dir"] is None else cfg["hf_dir"]
    ckpt = read_checkpoint(cfg["out_dir"], cfg["ckpt"])  # a file, or a sharded run's ckpt.dcp read from its shards
    check_finite_weights(ckpt, path)
    fmt = export_checkpoint(ckpt, hf_dir, cfg["format"], cfg["force"])
    tokenizer = (ckpt.get("tokenizer") or {}).get("tokenizer", "unknown")
    print(f"wrote {hf_dir} as {ARCHITECTURES[fmt]} (token ids of the {tokenizer} tokenizer); load with "
          f"transformers.{ARCHITECTURES[fmt]}.from_pretrained('{hf_dir}')")


if __name__ == "__main__":
    run_cli(main)
