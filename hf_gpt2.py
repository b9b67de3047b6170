"""
GPT-2 weights in and out of Hugging Face format. The one place that knows the Hugging Face layout; train.py
(init_from='gpt2' or 'hf:/path') and export.py use it.

    dense = load_gpt2("gpt2")                       # hub download (needs transformers), like nanoGPT
    dense = load_gpt2("hf:/path/to/folder")         # a folder written by save_pretrained or export.py
    export_hf(dense, "out/hf")                      # config.json + model.safetensors, GPT2LMHeadModel layout

Hugging Face's GPT-2 keeps its linear layers in a Conv1D module whose weight is (in, out), the transpose of
nn.Linear's (out, in); the four such matrices per layer are transposed on the way in and out. GPT-2's MLP
uses the tanh approximation of GELU ('gelu_new'): loaded models get mlp='gelu_tanh' and so compute exactly
what transformers computes; export_hf writes the activation the model uses ('gelu' or 'gelu_new').
"""
import json
import os
from dataclasses import asdict, fields

import torch

from common import UserError
from model import GPT, GPTConfig, check_same_model

HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# Hugging Face's Conv1D weights are (in, out): these are transposed to and from nn.Linear's (out, in)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def is_hf_init(init_from):
    """True for the init_from values that load GPT-2 weights: a hub name or 'hf:/path/to/folder'."""
    return init_from in HUB_NAMES or init_from.startswith("hf:")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("GPT-2 weights need the transformers package: pip install transformers") from None
    return transformers


def _first_line(e):
    return (str(e).strip().splitlines() or [""])[0][:300]


def _load_hf_model(source):
    """transformers.GPT2LMHeadModel from a hub name or a local folder, with readable errors."""
    transformers = _transformers()
    if source not in HUB_NAMES:
        config_path = os.path.join(source, "config.json")
        if not os.path.isdir(source):
            raise UserError(f"no folder '{source}': init_from takes {', '.join(HUB_NAMES)} or hf:/path/to/folder "
                            f"(a folder written by save_pretrained or export.py)")
        if not os.path.isfile(config_path):
            raise UserError(f"'{source}' is not a Hugging Face model folder (no config.json)")
        try:
            with open(config_path) as f:
                model_type = json.load(f).get("model_type")
        except (OSError, ValueError, AttributeError) as e:
            raise UserError(f"cannot read {config_path}: {_first_line(e)}") from None
        if model_type != "gpt2":
            raise UserError(f"'{source}' is not a GPT-2 model (config.json model_type is {model_type!r}, "
                            f"expected 'gpt2')")
    try:
        return transformers.GPT2LMHeadModel.from_pretrained(source)
    except Exception as e:  # OSError offline or for missing files, ValueError for bad configs, ...
        hint = (" (no network? save it with save_pretrained where there is one, then use "
                "init_from='hf:/path/to/folder')") if source in HUB_NAMES else ""
        raise UserError(f"cannot load GPT-2 weights from '{source}': {type(e).__name__}: {_first_line(e)}{hint}") \
            from None


def _check_hf_config(hf, source):
    """Settings of a GPT2Config our GPT cannot reproduce are an error, not a silent difference."""
    c = hf.config
    problems = []
    if getattr(c, "activation_function", "gelu_new") not in ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh"):
        problems.append(f"activation_function={c.activation_function!r} (only GELU)")
    if getattr(c, "n_inner", None) not in (None, 4 * c.n_embd):
        problems.append(f"n_inner={c.n_inner} (only 4 * n_embd)")
    if abs(getattr(c, "layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        problems.append(f"layer_norm_epsilon={c.layer_norm_epsilon} (only 1e-5)")
    if not getattr(c, "scale_attn_weights", True) or getattr(c, "scale_attn_by_inverse_layer_idx", False):
        problems.append("non-standard attention scaling")
    if problems:
        raise UserError(f"'{source}' has GPT-2 settings this repository's GPT does not support: {'; '.join(problems)}")


def load_gpt2(name_or_path, dropout=0.0):
    """A GPT with the weights of 'gpt2' | 'gpt2-medium' | 'gpt2-large' | 'gpt2-xl' (downloaded from the hub)
    or of a local GPT-2 folder ('hf:/path' or '/path')."""
    source = name_or_path[3:] if name_or_path.startswith("hf:") else name_or_path
    hf = _load_hf_model(source)
    _check_hf_config(hf, source)
    c = hf.config
    # GPT-2: learned positions, LayerNorm, GELU, biases everywhere, tied head; the shape comes from the config
    mlp = "gelu" if getattr(c, "activation_function", "gelu_new") == "gelu" else "gelu_tanh"
    config = GPTConfig(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.n_positions,
                       vocab_size=c.vocab_size, bias=True, dropout=dropout, mlp=mlp)
    sd = {}
    for k, v in hf.state_dict().items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of older transformers versions, not weights
        sd[k] = v.t() if k.endswith(CONV1D) else v
    wte = sd["transformer.wte.weight"]
    head = sd.setdefault("lm_head.weight", wte)
    if head.shape != wte.shape or not torch.equal(head, wte):
        raise UserError(f"'{source}' has an output head that is not tied to the token embedding; "
                        f"this repository's GPT ties them")
    model = GPT(config)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise UserError(f"'{source}' does not have GPT-2's weights: {_first_line(e)}") from None
    return model


def model_for_training(cfg, explicit=()):
    """train.py's init_from='gpt2'|...|'hf:/path': the GPT-2 weights with the run's dropout, cropped to its
    block_size, upcycled to an MoEGPT with the run's MoE settings when n_experts > 0. The shape comes from
    the checkpoint; a shape setting the run sets explicitly (in `explicit`) must agree with it."""
    from moe_model import MoEConfig, MoEGPT

    dense = load_gpt2(cfg["init_from"], dropout=cfg["dropout"])
    arch = asdict(dense.config)
    # block_size is compared even when the config file only inherits it: GPT-2's 1024 crops to a smaller one
    check_same_model(arch, cfg, set(explicit) | {"block_size"}, "checkpoint", crop=True)
    if cfg["block_size"] < dense.config.block_size:
        dense.crop_block_size(cfg["block_size"])
    if cfg.get("n_experts", 0) <= 0:
        return dense
    moe_keys = [f.name for f in fields(MoEConfig) if f.name not in arch]
    return MoEGPT.from_dense(dense, MoEConfig(**asdict(dense.config), **{k: cfg[k] for k in moe_keys}))


def export_hf(model, folder):
    """Write model (a dense GPT-2-shaped GPT) to folder as config.json + model.safetensors, loadable with
    transformers.GPT2LMHeadModel.from_pretrained(folder). A model without biases gets zero biases."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UserError("writing Hugging Face weights needs the safetensors package: pip install safetensors") \
            from None
    if hasattr(model, "moe_layers"):
        raise UserError("an MoE model cannot be written in GPT-2 (Hugging Face) format: GPT-2 has no experts")
    c = model.config
    for name, value, gpt2 in (("pos_emb", c.pos_emb, ("learned",)), ("norm", c.norm, ("layernorm",)),
                              ("mlp", c.mlp, ("gelu", "gelu_tanh"))):
        if value not in gpt2:
            raise UserError(f"the GPT-2 format needs {name}={gpt2[0]!r}, this model has {name}={value!r}")
    if c.n_kv_head not in (None, c.n_head):
        raise UserError(f"the GPT-2 format needs n_kv_head=None (one key/value head per head), this model has "
                        f"n_kv_head={c.n_kv_head}")

    sd = model.state_dict()
    tensors = {}
    for name, v in sd.items():
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight; Hugging Face ties it back on load
        tensors[name] = (v.t() if name.endswith(CONV1D) else v).detach().cpu().contiguous().clone()
        bias = name[:-len("weight")] + "bias"
        if name.endswith(".weight") and "wte" not in name and "wpe" not in name and bias not in sd:
            tensors[bias] = torch.zeros(v.shape[0], dtype=v.dtype)  # bias=False: GPT-2 layout has biases
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_ctx": c.block_size,
        "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None,
        "activation_function": "gelu_new" if c.mlp == "gelu_tanh" else "gelu",  # what our MLP computes
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "tie_word_embeddings": True,
        # GPT-2's <|endoftext|> where the vocabulary has it (a char vocabulary does not)
        "bos_token_id": 50256 if c.vocab_size > 50256 else None,
        "eos_token_id": 50256 if c.vocab_size > 50256 else None,
    }
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create '{folder}': {e.strerror}") from None
    weights = os.path.join(folder, "model.safetensors")
    save_file(tensors, weights, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(weights, 0o666 & ~umask)  # safetensors writes 0600; an export is meant to be shared
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
