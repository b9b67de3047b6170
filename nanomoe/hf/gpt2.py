"""
GPT-2 weights in and out of Hugging Face format: the GPT2LMHeadModel layout. formats.py, which train.py
(init_from='gpt2' or 'hf:/path') and tools/export.py use, picks this file for GPT-2 folders and checkpoints.

    dense = load_gpt2("gpt2")                       # hub download (needs transformers), like nanoGPT
    dense = load_gpt2("hf:/path/to/folder")         # a folder written by save_pretrained or tools.export
    export_hf(dense, "out/hf")                      # config.json + model.safetensors, GPT2LMHeadModel layout

Hugging Face's GPT-2 keeps its linear layers in a Conv1D module whose weight is (in, out), the transpose of
nn.Linear's (out, in); the four such matrices per layer are transposed on the way in and out. GPT-2's MLP
uses the tanh approximation of GELU ('gelu_new'): loaded models get mlp='gelu_tanh' and so compute exactly
what transformers computes; export_hf writes the activation the model uses ('gelu' or 'gelu_new').
"""
import json
import os
from dataclasses import asdict

import torch

from model import GPT, GPTConfig
from nanomoe.errors import UserError
from nanomoe.hf.common import HUB_NAMES, first_line, folder_model_type, load_pretrained, transformers_module

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel"}
# Hugging Face's Conv1D weights are (in, out): these are transposed to and from nn.Linear's (out, in)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _load_hf_model(source):
    """transformers.GPT2LMHeadModel from a hub name or a local folder, with readable errors."""
    transformers = transformers_module()
    if source not in HUB_NAMES:
        model_type = folder_model_type(source)
        if model_type != "gpt2":
            raise UserError(f"'{source}' is not a GPT-2 model (config.json model_type is {model_type!r}, "
                            f"expected 'gpt2')")
    hint = (" (no network? save it with save_pretrained where there is one, then use "
            "init_from='hf:/path/to/folder')") if source in HUB_NAMES else ""
    return load_pretrained(transformers.GPT2LMHeadModel, source, hint)


def _check_hf_config(hf, source):
    """Settings of a GPT2Config our GPT cannot reproduce are an error, not a silent difference."""
    c = hf.config
    problems = []
    if getattr(c, "activation_function", "gelu_new") not in ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh"):
        problems.append(f"activation_function={c.activation_function!r} (only GELU)")
    if getattr(c, "n_inner", None) not in (None, 4 * c.n_embd):
        problems.append(f"n_inner={c.n_inner} (only 4 * n_embd)")
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
                       vocab_size=c.vocab_size, bias=True, dropout=dropout, mlp=mlp,
                       norm_eps=float(c.layer_norm_epsilon))
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
        raise UserError(f"'{source}' does not have GPT-2's weights: {first_line(e)}") from None
    return model


def family_problems(args, family="gpt2"):
    """Why a dense model with settings `args` has no exact GPT-2 equivalent; [] if it has one."""
    problems = [f"the GPT-2 format needs {name}={gpt2[0]!r}, this model has {name}={args[name]!r}"
                for name, gpt2 in (("pos_emb", ("learned",)), ("norm", ("layernorm",)), ("mlp", ("gelu", "gelu_tanh")))
                if args[name] not in gpt2]
    if args.get("n_kv_head") not in (None, args["n_head"]):
        problems.append(f"the GPT-2 format needs n_kv_head=None (one key/value head per head), this model has "
                        f"n_kv_head={args['n_kv_head']}")
    return problems


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
    if c.qk_norm or c.attn != "mha":  # formats.HOLDS says so for export_checkpoint; this function is public too
        raise UserError("the GPT-2 format has plain multi-head attention (no qk_norm, no attn='mla')")
    problems = family_problems(asdict(c))
    if problems:
        raise UserError(problems[0])

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
        "layer_norm_epsilon": c.norm_eps, "initializer_range": 0.02, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "tie_word_embeddings": True,
        # GPT-2's <|endoftext|> where the vocabulary has it (a char vocabulary does not)
        "bos_token_id": 50256 if c.vocab_size > 50256 else None,
        "eos_token_id": 50256 if c.vocab_size > 50256 else None,
    }
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create '{folder}': {e.strerror}") from None
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
