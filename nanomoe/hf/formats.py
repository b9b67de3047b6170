"""
Hugging Face formats in and out: the one place that picks the format. train.py (init_from='gpt2' or
'hf:/path') and tools/export.py use it; each family's file knows its layout: gpt2.py (GPT2LMHeadModel),
llama.py (LlamaForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM), qwen3.py (Qwen3ForCausalLM,
Qwen3MoeForCausalLM), deepseek.py (DeepseekV3ForCausalLM, DeepseekV2ForCausalLM).

    model = load_hf("hf:/path/to/folder")             # a GPT or an MoEGPT, whichever the folder holds
    export_checkpoint(ckpt, "out/hf")                 # the format the checkpoint's architecture has

Which format a checkpoint exports to (pick_format: the first in FORMATS that holds it exactly; tools.export
--format names one, and then it must hold it). HOLDS below says, feature by feature, what each format
needs and cannot have; each family's family_problems adds its finer limits (backbone, widths, eps, layers):
    learned positions, LayerNorm, GELU, dense              -> gpt2         GPT2LMHeadModel
    RoPE, RMSNorm, SwiGLU (+ GQA, + biases), dense         -> llama        LlamaForCausalLM
    that backbone, MoE in every layer, renormalised top-k  -> mixtral      MixtralForCausalLM
    ... with shared experts, dense layers or top-k weights not renormalised
                                                           -> qwen2_moe    Qwen2MoeForCausalLM
    that backbone with QK-norm, dense / MoE (no shared)    -> qwen3, qwen3_moe   Qwen3(Moe)ForCausalLM
    MLA, dense or MoE with sigmoid scores (+ aux-free bias, shared experts, first dense layers)
                                                           -> deepseek_v3  DeepseekV3ForCausalLM
    MLA, MoE with softmax scores not renormalised          -> deepseek_v2  DeepseekV2ForCausalLM
Anything without an exact equivalent is refused before anything is written, with one line naming it.
"""
import json
import os
import shutil
from dataclasses import asdict, fields

import torch

from moe_model import MoEConfig, MoEGPT
from nanomoe.checkpoint import model_from_checkpoint
from nanomoe.errors import UserError
from nanomoe.factory import build_model, check_same_model, model_keys
from nanomoe.files import check_writable_folder, disk_full_message, is_disk_full
from nanomoe.hf import deepseek, gpt2, llama, qwen3
from nanomoe.hf.common import HUB_NAMES, folder_model_type, load_config, load_pretrained, quiet_transformers, \
    transformers_module

FAMILIES = {"gpt2": gpt2, "llama": llama, "mixtral": llama, "qwen2_moe": llama, "qwen3": qwen3,
            "qwen3_moe": qwen3, "deepseek_v3": deepseek, "deepseek_v2": deepseek}
FORMATS = tuple(FAMILIES)  # pick_format's order: the first that holds a model exactly
ARCHITECTURES = {fmt: FAMILIES[fmt].ARCHITECTURES[fmt] for fmt in FORMATS}

# Features that decide the format: name -> (what it is, whether model_args have it). Read with .get(setting,
# default), so checkpoints older than a setting pass.
FEATURES = {
    "experts": ("experts (n_experts > 0)", lambda a: a.get("n_experts", 0) > 0),
    "qk_norm": ("QK-norm (qk_norm=True)", lambda a: a.get("qk_norm", False)),
    "mla": ("multi-head latent attention (attn='mla')", lambda a: a.get("attn", "mha") == "mla"),
    "bias": ("biases (bias=True)", lambda a: a["bias"]),
    "shared": ("shared experts (n_shared_experts > 0)", lambda a: a.get("n_shared_experts", 0) > 0),
    "softmax": ("softmax router scores (router_score='softmax')",
                lambda a: a.get("n_experts", 0) > 0 and a.get("router_score", "softmax") == "softmax"),
    "sigmoid": ("sigmoid router scores (router_score='sigmoid')",
                lambda a: a.get("n_experts", 0) > 0 and a.get("router_score", "softmax") == "sigmoid"),
    "aux_free": ("aux-free routing bias (balance_mode='aux_free')",
                 lambda a: a.get("n_experts", 0) > 0 and a.get("balance_mode") == "aux_free"),
}
# format -> {feature: True (needs it) or False (cannot hold it)}; a feature not named may be either way
HOLDS = {
    "gpt2": dict(experts=False, qk_norm=False, mla=False),
    "llama": dict(experts=False, qk_norm=False, mla=False),
    "mixtral": dict(experts=True, qk_norm=False, mla=False, bias=False, shared=False, sigmoid=False, aux_free=False),
    "qwen2_moe": dict(experts=True, qk_norm=False, mla=False, bias=False, sigmoid=False, aux_free=False),
    "qwen3": dict(experts=False, qk_norm=True, mla=False, bias=False),
    "qwen3_moe": dict(experts=True, qk_norm=True, mla=False, bias=False, shared=False, sigmoid=False, aux_free=False),
    "deepseek_v3": dict(mla=True, qk_norm=False, bias=False, softmax=False),
    "deepseek_v2": dict(mla=True, qk_norm=False, bias=False, sigmoid=False, aux_free=False),
}
# Settings no Hugging Face format here has an equivalent for, whichever family: (setting, its value in a model
# without it, whether a value exports, what the formats lack)
NO_EQUIVALENT = (
    ("mamba_layers", None, lambda v: not v, "Mamba layers (mamba_layers)"),  # first: the largest gap
    ("capacity_factor", 0.0, lambda v: v == 0, "capacity_factor > 0 (tokens dropped when an expert is full)"),
    ("fgram_max_n", 0, lambda v: not v, "F-gram embeddings (fgram_max_n > 0)"),
)
# what a forced export moves aside, so no stale shard or tokenizer of an earlier export stays beside the new one
WRITTEN = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
           "pytorch_model.bin", "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "vocab.json", "merges.txt", "README.md")


# ---- in

def is_hf_init(init_from):
    """True for the init_from values that load Hugging Face weights: a GPT-2 hub name or 'hf:/path/to/folder'."""
    return init_from in HUB_NAMES or init_from.startswith("hf:")


def load_hf(name_or_path, settings=None):
    """A GPT or MoEGPT with the weights of a GPT-2 hub name or a local folder ('hf:/path' or '/path') of a
    model type in FORMATS. settings (a run's config) gives the runtime settings: dropout, and for an MoE the
    loss weights, capacity and implementation (moe_renorm stays the format's)."""
    source = name_or_path[3:] if name_or_path.startswith("hf:") else name_or_path
    settings = settings or {}
    model_type = "gpt2" if source in HUB_NAMES else folder_model_type(source)
    if model_type == "gpt2":
        return gpt2.load_gpt2(source, dropout=settings.get("dropout", 0.0))
    if model_type not in FORMATS:
        what = f"a {model_type!r} model" if model_type else "a config.json that names no model_type"
        raise UserError(f"'{source}' holds {what}; init_from reads {', '.join(FORMATS)}")
    family = FAMILIES[model_type]
    config = load_config(source)
    args = family.model_args_from_hf(config, source)  # before the weights: a refused folder allocates nothing
    hf = load_pretrained(transformers_module().AutoModelForCausalLM, source, config=config)
    sd = family.from_hf_state(dict(hf.state_dict()), args, source, hf.config)
    keys = model_keys()
    args.update({k: v for k, v in settings.items() if k in keys and keys[k].runtime and k != "moe_renorm"})
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
    """The first format (in FORMATS' order) that holds the checkpoint exactly; None if none does."""
    return next((fmt for fmt in FORMATS if not format_problems(model_args, fmt)), None)


def format_problems(args, fmt):
    """Why model_args `args` have no exact equivalent in `fmt`: HOLDS's features, then the family's limits."""
    problems = []
    for feature, needed in HOLDS[fmt].items():
        what, has = FEATURES[feature]
        if bool(has(args)) == needed:
            continue
        # the formats that hold what this model has here (of those with or without experts, as it is)
        others = [f for f in FORMATS if HOLDS[f].get(feature) in (None, not needed)
                  and HOLDS[f].get("experts") in (None, FEATURES["experts"][1](args))]
        if needed:
            problems.append(f"{ARCHITECTURES[fmt]} needs {what}, this model has none (formats without: "
                            f"{', '.join(others)})")
        else:
            problems.append(f"{ARCHITECTURES[fmt]} has no {what} (formats with: {', '.join(others) or 'none'})")
    return problems + FAMILIES[fmt].family_problems(args, fmt)


def check_exportable(model_args, fmt=None):
    """-> the format to write (`fmt`, or pick_format's choice); a UserError naming what it cannot represent
    exactly, or, with no fmt, what the closest format lacks."""
    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}: tools.export writes {', '.join(FORMATS)}")
    for name, default, exports, what in NO_EQUIVALENT:
        if not exports(model_args.get(name, default)):
            raise UserError(f"cannot export to {fmt or 'any format'}: no Hugging Face format here has {what}")
    if fmt is not None:
        problems = format_problems(model_args, fmt)
        if problems:
            raise UserError(f"cannot export to {fmt}: {'; '.join(problems)}")
        return fmt
    fmt = pick_format(model_args)
    if fmt is None:  # the closest: the fewest problems, and of equals the later (the more specialised) format
        closest, problems = min(((f, format_problems(model_args, f)) for f in reversed(FORMATS)),
                                key=lambda fp: len(fp[1]))
        raise UserError(f"no Hugging Face format here holds this model exactly; the closest, {closest}: "
                        f"{'; '.join(problems)}")
    return fmt


def export_checkpoint(ckpt, folder, fmt=None, force=False, max_shard_size="5GB"):
    """Write checkpoint `ckpt` to `folder` in Hugging Face format (config.json, model.safetensors or shards
    with an index, tokenizer files or a note): -> the format written. Everything is checked before anything
    is written; the files are written to a temporary folder beside it and moved in at the end, so a failure
    (a full disk) leaves the folder as it was and nothing else behind."""
    args = ckpt["model_args"]
    fmt = check_exportable(args, fmt)
    check_writable_folder(folder, "hf_dir")
    if os.path.isdir(folder) and os.listdir(folder) and not force:
        raise UserError(f"'{folder}' is not empty; use --force=True to replace the export in it, or another --hf_dir")
    if fmt != "gpt2":
        transformers_module()
    # in the dtype the checkpoint holds (float32 from train.py; a bfloat16 checkpoint stays bfloat16)
    dtype = next(v.dtype for v in ckpt["model"].values() if v.is_floating_point())
    model = model_from_checkpoint(ckpt).to(dtype).eval()
    folder = os.path.abspath(folder)
    created = missing_parent(folder)  # the first folder we create on the way, removed again on a failure
    tmp = os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.tmp-{os.getpid()}")
    try:
        os.makedirs(tmp)
        if fmt == "gpt2":
            gpt2.export_hf(model, tmp)
        else:
            save_with_transformers(model, args, fmt, tmp, max_shard_size)
        write_tokenizer(ckpt.get("tokenizer") or {}, fmt, tmp)
        umask = os.umask(0)
        os.umask(umask)
        for name in os.listdir(tmp):  # safetensors writes 0600; an export is meant to be shared
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        move_in(tmp, folder)
    except BaseException as e:  # an OSError, a native writer's error (safetensors), Ctrl-C: nothing stays
        if created:
            shutil.rmtree(created, ignore_errors=True)
        if is_disk_full(e):
            raise UserError(disk_full_message(folder)) from None
        if isinstance(e, OSError):
            raise UserError(f"cannot write the export to '{folder}': {e.strerror or e} (choose another --hf_dir)") \
                from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return fmt


def missing_parent(folder):
    """The outermost folder above `folder` that does not exist yet (None if its parent exists)."""
    parent, created = os.path.dirname(folder), None
    while not os.path.exists(parent):
        parent, created = os.path.dirname(parent), parent
    return created


def move_in(tmp, folder):
    """Make the files of `tmp` the export in `folder`: renames only (no space needed, nothing half-written);
    an earlier export's files are moved aside first and back if a rename fails."""
    os.makedirs(folder, exist_ok=True)
    old = [n for n in os.listdir(folder) if n in WRITTEN or (n.startswith("model-") and n.endswith(".safetensors"))
           or (n.startswith("pytorch_model-") and n.endswith(".bin"))]
    aside = tmp + "-old"
    os.makedirs(aside)
    moved = []
    try:
        for name in old:
            os.replace(os.path.join(folder, name), os.path.join(aside, name))
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
            moved.append(name)
    except OSError:
        for name in moved:
            os.replace(os.path.join(folder, name), os.path.join(tmp, name))
        for name in os.listdir(aside):
            os.replace(os.path.join(aside, name), os.path.join(folder, name))
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def save_with_transformers(model, args, fmt, folder, max_shard_size):
    """Build the transformers model from our weights and let save_pretrained write it (it writes the experts
    in the per-expert layout the MoE checkpoints use, and shards above max_shard_size)."""
    transformers = transformers_module()
    family = FAMILIES[fmt]
    kwargs = family.hf_config(args, fmt)
    config = transformers.AutoConfig.for_model(fmt, **kwargs, architectures=[ARCHITECTURES[fmt]])
    config.dtype = model.lm_head.weight.dtype  # save_pretrained writes the weights in it
    with torch.device("meta"):  # no memory, no random init: every tensor comes from our weights
        hf = getattr(transformers, ARCHITECTURES[fmt])(config)
    hf.load_state_dict(family.to_hf_state(model.state_dict(), args, fmt), strict=True, assign=True)
    hf.tie_weights()
    with quiet_transformers():
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
        except Exception as e:
            if is_disk_full(e):
                raise
            # not in the local Hugging Face cache (tiktoken's cache holds other files)
            text += (" Its tokenizer files were not in the local Hugging Face cache, so none are included: "
                     "use `AutoTokenizer.from_pretrained('gpt2')`.")
    arch = ARCHITECTURES[fmt]
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(f"# Exported from nanoMoE\n\n`transformers.{arch}.from_pretrained(this_folder)` computes the same "
                f"logits as the nanoMoE checkpoint.\n\nTokenizer: {text}\n")
