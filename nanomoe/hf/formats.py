"""
Hugging Face formats in and out: the one place that picks the format. train.py (init_from='gpt2' or
'hf:/path') and tools/export.py use it; the layouts are in gpt2.py (GPT2LMHeadModel) and llama.py
(LlamaForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM).

    model = load_hf("hf:/path/to/folder")             # a GPT (gpt2, llama) or an MoEGPT (mixtral, qwen2_moe)
    export_checkpoint(ckpt, "out/hf")                 # the format the checkpoint's architecture has

Which format a checkpoint exports to (pick_format; tools.export --format overrides, then it must fit):
    learned positions, LayerNorm, GELU, dense           -> gpt2       GPT2LMHeadModel
    RoPE, RMSNorm, SwiGLU (+ GQA, + biases), dense      -> llama      LlamaForCausalLM
    that backbone, MoE in every layer, renormalised top-k, no shared experts, no biases
                                                        -> mixtral    MixtralForCausalLM
    that backbone, MoE with shared experts, moe_every > 1 or top-k weights not renormalised
                                                        -> qwen2_moe  Qwen2MoeForCausalLM
Anything without an exact equivalent is refused before anything is written, with one message naming it.
"""
import errno
import json
import os
import shutil
from dataclasses import asdict, fields

import torch

from moe_model import MoEConfig, MoEGPT
from nanomoe.checkpoint import model_from_checkpoint
from nanomoe.errors import UserError
from nanomoe.factory import build_model, check_same_model, model_keys
from nanomoe.files import disk_full_message
from nanomoe.hf import llama
from nanomoe.hf.common import HUB_NAMES, first_line, folder_model_type, transformers_module
from nanomoe.hf.gpt2 import export_hf, gpt2_problems, load_gpt2

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", **llama.ARCHITECTURES}
FORMATS = tuple(ARCHITECTURES)

# Settings no Hugging Face format here has an equivalent for, whichever family: (setting, its value in a model
# without it, whether a value exports, what the formats lack). Read with model_args.get(setting, default), so
# settings of newer checkpoints are checked and older checkpoints (without them) pass.
NO_EQUIVALENT = (
    ("mamba_layers", None, lambda v: not v, "Mamba layers (mamba_layers)"),  # first: the largest gap
    ("capacity_factor", 0.0, lambda v: v == 0, "capacity_factor > 0 (tokens dropped when an expert is full)"),
    ("attn", None, lambda v: v != "mla", "multi-head latent attention (attn='mla')"),
    ("fgram_max_n", 0, lambda v: not v, "F-gram embeddings (fgram_max_n > 0)"),
    ("balance_mode", None, lambda v: v != "aux_free", "the aux-free routing bias (balance_mode='aux_free')"),
    ("router_score", "softmax", lambda v: v == "softmax", "sigmoid router scores (router_score='sigmoid')"),
)
# what a forced export removes first, so no stale shard or tokenizer of an earlier export stays beside the new one
WRITTEN = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
           "pytorch_model.bin", "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "vocab.json", "merges.txt", "README.md")


# ---- in

def is_hf_init(init_from):
    """True for the init_from values that load Hugging Face weights: a GPT-2 hub name or 'hf:/path/to/folder'."""
    return init_from in HUB_NAMES or init_from.startswith("hf:")


def load_hf(name_or_path, settings=None):
    """A GPT or MoEGPT with the weights of a GPT-2 hub name or a local folder ('hf:/path' or '/path') of model
    type gpt2, llama, mixtral or qwen2_moe. settings (a run's config) gives the runtime settings: dropout,
    and for an MoE the loss weights, capacity and implementation (moe_renorm stays the format's)."""
    source = name_or_path[3:] if name_or_path.startswith("hf:") else name_or_path
    settings = settings or {}
    model_type = "gpt2" if source in HUB_NAMES else folder_model_type(source)
    if model_type == "gpt2":
        return load_gpt2(source, dropout=settings.get("dropout", 0.0))
    if model_type not in FORMATS:
        raise UserError(f"'{source}' holds a {model_type!r} model; init_from reads {', '.join(FORMATS)}")
    transformers = transformers_module()
    try:
        # float32, as GPT-2's weights load: training keeps float32 weights and casts under autocast
        hf = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except Exception as e:  # OSError for missing files, ValueError for bad configs, ...
        raise UserError(f"cannot load '{source}': {type(e).__name__}: {first_line(e)}") from None
    args = llama.model_args_from_hf(hf.config, source)
    keys = model_keys()
    args.update({k: v for k, v in settings.items() if k in keys and keys[k].runtime and k != "moe_renorm"})
    sd = llama.from_hf_state(dict(hf.state_dict()), args, source)
    model = build_model(args)
    model.load_state_dict(sd)
    return model


def model_for_training(cfg, explicit=()):
    """train.py's init_from='gpt2'|...|'hf:/path': the weights with the run's runtime settings (dropout, ...),
    cropped to its block_size, upcycled to an MoEGPT with the run's MoE settings when the weights are dense
    and n_experts > 0. The shape comes from the weights; a shape setting the run sets explicitly (in
    `explicit`) must agree with it."""
    model = load_hf(cfg["init_from"], cfg)
    arch = asdict(model.config)
    # block_size is compared even when the config file only inherits it: GPT-2's 1024 crops to a smaller one
    check_same_model(arch, cfg, set(explicit) | {"block_size"}, "checkpoint", crop=True)
    if cfg["block_size"] < model.config.block_size:
        model.crop_block_size(cfg["block_size"])
    if isinstance(model, MoEGPT):
        if "moe_renorm" in explicit:  # a runtime setting, but the format's value is what the weights learned
            model.config.moe_renorm = cfg["moe_renorm"]
        return model
    if cfg.get("n_experts", 0) <= 0:
        return model
    moe_keys = [f.name for f in fields(MoEConfig) if f.name not in arch]
    return MoEGPT.from_dense(model, MoEConfig(**asdict(model.config), **{k: cfg[k] for k in moe_keys}))


# ---- out

def pick_format(model_args):
    """The Hugging Face format whose architecture the checkpoint has (see the module docstring)."""
    if model_args.get("n_experts", 0) > 0:
        return "mixtral" if llama.fits_mixtral(model_args) else "qwen2_moe"
    return "gpt2" if model_args["pos_emb"] == "learned" else "llama"


def check_exportable(model_args, fmt, picked=False):
    """A UserError naming what `fmt` cannot represent exactly; nothing when it can. picked: fmt is
    pick_format's choice, not the user's."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}: tools.export writes {', '.join(FORMATS)}")
    for name, default, exports, what in NO_EQUIVALENT:
        if not exports(model_args.get(name, default)):
            raise UserError(f"cannot export to {fmt}: no Hugging Face format here has {what}")
    if fmt == "gpt2":
        n = model_args.get("n_experts", 0)
        if n > 0:
            raise UserError(f"an MoE model ({n} experts) cannot be written in GPT-2 format: GPT-2 has no experts "
                            f"(its MoE formats are mixtral and qwen2_moe, for RoPE + RMSNorm + SwiGLU models)")
        problems = gpt2_problems(model_args)
    else:
        problems = llama.family_problems(model_args, fmt)
    if problems and picked and fmt != "gpt2" and model_args.get("n_experts", 0) > 0:
        # an MoE that fits no format: say why neither GPT-2 nor the MoE format it came closest to holds it
        raise UserError(f"cannot export this MoE model: GPT-2 has no experts, and {'; '.join(problems)}")
    if problems:
        raise UserError(f"cannot export to {fmt}: {'; '.join(problems)}")


def export_checkpoint(ckpt, folder, fmt=None, force=False, max_shard_size="5GB"):
    """Write checkpoint `ckpt` to `folder` in Hugging Face format (config.json, model.safetensors or shards
    with an index, tokenizer files or a note): -> the format written. Everything is checked before anything
    is written; the files are written to a temporary folder beside it and moved in at the end."""
    args = ckpt["model_args"]
    check_exportable(args, fmt or pick_format(args), picked=fmt is None)
    fmt = fmt or pick_format(args)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"'{folder}' is a file, not a folder (choose another --hf_dir)")
    if os.path.isdir(folder) and os.listdir(folder) and not force:
        raise UserError(f"'{folder}' is not empty; use --force=True to replace the export in it, or another --hf_dir")
    if fmt != "gpt2":
        transformers_module()
    # in the dtype the checkpoint holds (float32 from train.py; a bfloat16 checkpoint stays bfloat16)
    dtype = next(v.dtype for v in ckpt["model"].values() if v.is_floating_point())
    model = model_from_checkpoint(ckpt).to(dtype).eval()
    parent = os.path.dirname(os.path.abspath(folder))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create '{parent}': {e.strerror}") from None
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(folder))}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        if fmt == "gpt2":
            export_hf(model, tmp)
        else:
            _save_llama_family(model, args, fmt, tmp, max_shard_size)
        write_tokenizer(ckpt.get("tokenizer") or {}, fmt, tmp)
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):  # a forced export: no earlier weights, shards or tokenizer stay
            if name in WRITTEN or (name.startswith("model-") and name.endswith(".safetensors")) \
                    or (name.startswith("pytorch_model-") and name.endswith(".bin")):
                os.remove(os.path.join(folder, name))
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(disk_full_message(folder)) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return fmt


def _save_llama_family(model, args, fmt, folder, max_shard_size):
    """Build the transformers model from our weights and let save_pretrained write it (it writes the experts
    in the per-expert layout Mixtral and Qwen2-MoE checkpoints use, and shards above max_shard_size)."""
    transformers = transformers_module()
    kwargs = llama.hf_config(args, fmt)
    config_class = {"llama": transformers.LlamaConfig, "mixtral": transformers.MixtralConfig,
                    "qwen2_moe": transformers.Qwen2MoeConfig}[fmt]
    config = config_class(**kwargs, architectures=[ARCHITECTURES[fmt]])
    config.dtype = model.lm_head.weight.dtype  # save_pretrained writes the weights in it
    with torch.device("meta"):  # no memory, no random init: every tensor comes from our weights
        hf = getattr(transformers, ARCHITECTURES[fmt])(config)
    hf.load_state_dict(llama.to_hf_state(model.state_dict(), args, fmt), strict=True, assign=True)
    hf.tie_weights()
    hf.save_pretrained(folder, max_shard_size=max_shard_size)
    # readers older than transformers 5 take rope_theta from the top level (Mixtral's default is 1e6, not ours)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        written = json.load(f)
    written["rope_theta"] = kwargs["rope_parameters"]["rope_theta"]
    with open(path, "w") as f:
        json.dump(written, f, indent=2, sort_keys=True)
        f.write("\n")


def write_tokenizer(meta, fmt, folder):
    """The checkpoint's tokenizer beside the weights: a char vocabulary as tokenizer.json (one token per
    character, AutoTokenizer loads it); GPT-2 BPE as transformers' own files when they are in the local
    cache (never downloaded); and a README.md saying which it is."""
    kind = meta.get("tokenizer")
    note = {"char": "a character vocabulary: `tokenizer.json` maps each character to its id (characters "
                    "outside the vocabulary are dropped), `AutoTokenizer.from_pretrained` loads it.",
            "gpt2": "GPT-2 BPE (tiktoken's 'gpt2'): ids 0..50256 are GPT-2's; rows above 50256 are padding."}
    text = note.get(kind, "unknown: the checkpoint names no tokenizer.")
    try:
        transformers_module()
    except UserError:  # a GPT-2 export needs only safetensors: the note then says what to install
        kind, text = None, text + " (Install transformers and export again to get the tokenizer files.)"
    if kind == "char":
        from tokenizers import Tokenizer, decoders, models

        # BPE with no merges splits text into characters; Fuse joins them back without spaces
        tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(meta["chars"])}, merges=[]))
        tok.decoder = decoders.Fuse()
        transformers_module().PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
    elif kind == "gpt2":
        try:
            tok = transformers_module().GPT2TokenizerFast.from_pretrained("gpt2", local_files_only=True)
            tok.save_pretrained(folder)
            text += " Its tokenizer files are included."
        except Exception:  # not in the local Hugging Face cache (tiktoken's cache holds other files)
            text += (" Its tokenizer files were not in the local Hugging Face cache, so none are included: "
                     "use `AutoTokenizer.from_pretrained('gpt2')`.")
    arch = ARCHITECTURES[fmt]
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(f"# Exported from nanoMoE\n\n`transformers.{arch}.from_pretrained(this_folder)` computes the same "
                f"logits as the nanoMoE checkpoint.\n\nTokenizer: {text}\n")
