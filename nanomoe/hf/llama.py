"""
Llama-layout weights in and out of Hugging Face format: LlamaForCausalLM (dense), MixtralForCausalLM and
Qwen2MoeForCausalLM (MoE), and the pieces Qwen3 (qwen3.py) and DeepSeek-V3 (deepseek.py) reuse: the backbone's
config, its weight names, the dense MLP, the stacked experts and the MoE layer pattern. formats.py picks the
format and writes the folder; this file knows the layouts.

Our RoPE + RMSNorm + SwiGLU GPT is a Llama, weight for weight:
- RoPE: model.apply_rope rotates the pairs (x[i], x[i + hs/2]) (the two halves of a head), which is exactly
  transformers' rotate_half layout, with the same inverse frequencies: q/k weights copy without permuting.
- attention: our c_attn is [q | k | v] (n_head, n_kv_head, n_kv_head heads) -> q_proj, k_proj, v_proj;
  grouped-query attention repeats each kv head for n_head / n_kv_head consecutive query heads, like repeat_kv.
  With qk_norm, each head's q/k RMSNorm gains are self_attn.q_norm / k_norm (Qwen3's names).
- RMSNorm eps is our norm_eps (rms_norm_eps); the output head is tied to the embedding (tie_word_embeddings).
- SwiGLU: our c_fc is [gate | up] -> gate_proj, up_proj; c_proj -> down_proj. An MoE layer's stacked expert
  weights are transformers' own in-memory layout (experts.gate_up_proj (E, 2F, D), experts.down_proj
  (E, D, F)); save_pretrained writes them per expert, as Mixtral and Qwen2-MoE checkpoints have them.
- routing: softmax over experts in float32, top-k, renormalised when moe_renorm (Mixtral always renormalises;
  Qwen2-MoE's norm_topk_prob says whether).
- shared experts (Qwen2-MoE only): Qwen2-MoE scales its shared expert by sigmoid(shared_expert_gate(x)); ours
  has no gate. A zero gate gives sigmoid(0) = 0.5 for every token, so we write the gate as zeros and the shared
  down_proj times 2: 0.5 * (2 W) h is exactly W h in floating point (scaling by a power of two is exact).
  Reading back, a zero gate halves down_proj again; a Qwen2-MoE whose gate is not zero has no exact
  equivalent here and is refused.
- which layers are MoE: Qwen's rule, layer i is MoE when i is not in mlp_only_layers and (i + 1) %
  decoder_sparse_step == 0, is ours with moe_every = decoder_sparse_step and mlp_only_layers = the first
  first_dense_layers layers; Mixtral has no dense layers. Without shared experts, Qwen2-MoE gets
  shared_expert_intermediate_size=0: its shared branch then adds exactly 0.
"""
from types import SimpleNamespace

import torch

from model import GPTConfig, mlp_hidden_size
from moe_model import MoEConfig
from nanomoe.errors import UserError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


def hf_config(args, family):
    """The transformers config (as keyword arguments) for model_args `args` in `family` (llama | mixtral |
    qwen2_moe; formats.check_exportable found nothing missing)."""
    c = backbone_config(args)
    if family == "llama":
        return {**c, "intermediate_size": dense_hidden(args), "attention_bias": args["bias"],
                "mlp_bias": args["bias"]}
    expert_hidden = args.get("expert_hidden") or dense_hidden(args)
    moe = dict(num_experts_per_tok=args["moe_top_k"], router_aux_loss_coef=args["balance_loss_weight"])
    if family == "mixtral":
        return {**c, **moe, "num_local_experts": args["n_experts"], "intermediate_size": expert_hidden,
                "router_jitter_noise": 0.0, "sliding_window": None}
    return {**c, **moe, **qwen_moe_layers(args), "num_experts": args["n_experts"],
            "moe_intermediate_size": expert_hidden, "intermediate_size": dense_hidden(args),
            "shared_expert_intermediate_size": args["n_shared_experts"] * expert_hidden,
            "norm_topk_prob": renormalises(args), "qkv_bias": False, "use_sliding_window": False}


def backbone_config(args):
    """The config every family here shares: sizes, RoPE, RMSNorm eps, the tied head, GPT-2's special ids."""
    D, H = args["n_embd"], args["n_head"]
    return dict(vocab_size=args["vocab_size"], hidden_size=D, num_hidden_layers=args["n_layer"],
                num_attention_heads=H, num_key_value_heads=args.get("n_kv_head") or H, head_dim=D // H,
                hidden_act="silu", max_position_embeddings=args["block_size"], rms_norm_eps=norm_eps(args),
                rope_parameters={"rope_type": "default", "rope_theta": float(args["rope_theta"])},
                tie_word_embeddings=True, attention_dropout=0.0,
                # GPT-2's <|endoftext|> where the vocabulary has it (a char vocabulary has no special tokens)
                bos_token_id=50256 if args["vocab_size"] > 50256 else None,
                eos_token_id=50256 if args["vocab_size"] > 50256 else None)


def qwen_moe_layers(args):
    """Qwen2-MoE's and Qwen3-MoE's MoE layer rule for our moe_every and first_dense_layers."""
    return {"decoder_sparse_step": args["moe_every"],
            "mlp_only_layers": list(range(args.get("first_dense_layers", 0)))}


def norm_eps(args):
    return args.get("norm_eps", 1e-5)  # checkpoints older than the setting had 1e-5


def dense_hidden(args):
    return mlp_hidden_size(SimpleNamespace(mlp=args["mlp"], n_embd=args["n_embd"]))


def renormalises(args):
    """Whether the MoE of model_args `args` renormalises its top-k weights (moe_renorm=None: when k > 1)."""
    return MoEConfig.from_dict(args).renormalises()


def family_problems(args, family):
    """Why model_args `args` has no exact equivalent in `family` beyond the features formats.py compares
    (experts, QK-norm, MLA, shared experts, ...); [] if it has one."""
    problems = backbone_problems(args, ARCHITECTURES[family])
    if family == "mixtral" and args.get("n_experts", 0) > 0:
        if args["moe_every"] != 1 or args.get("first_dense_layers", 0):
            problems.append("MixtralForCausalLM has no dense layers (moe_every > 1 or first_dense_layers > 0; use "
                            "--format=qwen2_moe)")
        if not renormalises(args):
            problems.append(f"MixtralForCausalLM has no top-k weights that are not renormalised (moe_renorm="
                            f"{args['moe_renorm']!r} with moe_top_k={args['moe_top_k']}; use --format=qwen2_moe)")
    return problems


def backbone_problems(args, name):
    """What the RoPE + RMSNorm + SwiGLU backbone every family here has needs of model_args `args`."""
    return [f"{name} needs {key}={want!r} ({what}), this model has {key}={args[key]!r}"
            for key, want, what in (("pos_emb", "rope", "RoPE"), ("norm", "rmsnorm", "RMSNorm"),
                                    ("mlp", "swiglu", "a SwiGLU MLP")) if args[key] != want]


# ---- ours -> transformers (in-memory parameter names of the transformers model)

def to_hf_state(sd, args, family):
    """Our state dict (model_args `args`) -> the transformers model's in `family`. Attention other than
    c_attn (MLA) and MoE parts other than the router and experts are the caller's (deepseek.py)."""
    H, D = args["n_head"], args["n_embd"]
    hs, kv = D // H, args.get("n_kv_head") or H
    out = {"model.embed_tokens.weight": sd["transformer.wte.weight"], "lm_head.weight": sd["lm_head.weight"],
           "model.norm.weight": sd["transformer.ln_f.weight"]}
    for i in range(args["n_layer"]):
        ours, hf = f"transformer.h.{i}.", f"model.layers.{i}."
        out[hf + "input_layernorm.weight"] = sd[ours + "ln_1.weight"]
        out[hf + "post_attention_layernorm.weight"] = sd[ours + "ln_2.weight"]
        for leaf in ("weight", "bias"):
            if ours + "attn.c_attn." + leaf in sd:
                q, k, v = sd[ours + "attn.c_attn." + leaf].split([H * hs, kv * hs, kv * hs])
                out.update({hf + f"self_attn.{n}_proj.{leaf}": t for n, t in zip("qkv", (q, k, v))})
                out[hf + "self_attn.o_proj." + leaf] = sd[ours + "attn.c_proj." + leaf]
        for n in ("q_norm", "k_norm"):
            if ours + f"attn.{n}.weight" in sd:
                out[hf + f"self_attn.{n}.weight"] = sd[ours + f"attn.{n}.weight"]
        m = ours + "mlp."
        if m + "router.weight" not in sd:  # a dense layer
            out.update(mlp_to_hf(sd, m, hf + "mlp."))
            continue
        out[hf + "mlp.gate.weight"] = sd[m + "router.weight"]
        out[hf + "mlp.experts.gate_up_proj"] = sd[m + "experts.c_fc"]
        out[hf + "mlp.experts.down_proj"] = sd[m + "experts.c_proj"]
        if family == "qwen2_moe":
            if m + "shared.c_fc.weight" in sd:
                shared = mlp_to_hf(sd, m + "shared.", hf + "mlp.shared_expert.")
                down = hf + "mlp.shared_expert.down_proj.weight"
                shared[down] = shared[down] * 2  # times the gate's constant 0.5: exact
            else:  # no shared experts: a zero-width shared expert adds exactly 0
                shared = zero_width_mlp(sd[m + "router.weight"], hf + "mlp.shared_expert.")
            out.update(shared)
            out[hf + "mlp.shared_expert_gate.weight"] = sd[m + "router.weight"].new_zeros(1, D)
    return out


def mlp_to_hf(sd, ours, hf):
    """Our SwiGLU MLP at prefix `ours` (c_fc = [gate | up], c_proj) -> gate_proj, up_proj, down_proj at `hf`."""
    out = {}
    for leaf in ("weight", "bias"):
        if ours + "c_fc." + leaf in sd:
            gate, up = sd[ours + "c_fc." + leaf].chunk(2)
            out.update({hf + "gate_proj." + leaf: gate, hf + "up_proj." + leaf: up,
                        hf + "down_proj." + leaf: sd[ours + "c_proj." + leaf]})
    return out


def zero_width_mlp(like_ED, hf):
    """A SwiGLU MLP with no hidden units (it adds exactly 0), for formats whose shared expert is always there."""
    D = like_ED.size(1)
    return {hf + "gate_proj.weight": like_ED.new_zeros(0, D), hf + "up_proj.weight": like_ED.new_zeros(0, D),
            hf + "down_proj.weight": like_ED.new_zeros(D, 0)}


# ---- transformers -> ours

def model_args_from_hf(c, source):
    """Our model_args for a transformers config `c` of model_type llama | mixtral | qwen2_moe; a UserError
    naming every setting we cannot reproduce exactly."""
    family = c.model_type
    problems = []
    args = backbone_args(c, problems)
    if getattr(c, "sliding_window", None) and (family != "qwen2_moe" or c.use_sliding_window):
        problems.append(f"sliding_window={c.sliding_window} (only full attention)")
    if family == "llama" and c.attention_bias != c.mlp_bias:
        problems.append(f"attention_bias={c.attention_bias} with mlp_bias={c.mlp_bias} (one bias setting for both)")
    if family == "mixtral":
        args.update(n_experts=c.num_local_experts, moe_top_k=c.num_experts_per_tok, moe_every=1, moe_renorm=True,
                    first_dense_layers=0, expert_hidden=c.intermediate_size, n_shared_experts=0)
    elif family == "qwen2_moe":
        F_, shared = c.moe_intermediate_size, c.shared_expert_intermediate_size
        if shared % F_:
            problems.append(f"shared_expert_intermediate_size={shared} (only a multiple of moe_intermediate_size "
                            f"{F_}: n_shared_experts experts of that size)")
        args.update(qwen_moe_args(c, problems, n_shared_experts=shared // F_))
    return finish_args(args, c, family, source, problems)


def backbone_args(c, problems):
    """Our model_args for the backbone of a transformers config `c` (sizes, RoPE, RMSNorm eps, bias), adding to
    `problems` what we cannot reproduce."""
    H, D = c.num_attention_heads, c.hidden_size
    rope = getattr(c, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(c, "rope_theta", 1e4)}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type={rope.get('rope_type')!r} (only the default RoPE)")
    if getattr(c, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={c.hidden_act!r} (only silu: SwiGLU)")
    if not c.model_type.startswith("deepseek") and ((getattr(c, "head_dim", None) or D // H) != D // H or D % H):
        problems.append(f"head_dim={c.head_dim} (only hidden_size / num_attention_heads = {D // H})")
    if not getattr(c, "tie_word_embeddings", True):
        problems.append("tie_word_embeddings=False (an output head not tied to the token embedding; ours are tied)")
    return dict(vocab_size=c.vocab_size, n_layer=c.num_hidden_layers, n_head=H, n_embd=D, dropout=0.0,
                n_kv_head=None if c.num_key_value_heads == H else c.num_key_value_heads,
                block_size=c.max_position_embeddings, pos_emb="rope", rope_theta=float(rope.get("rope_theta", 1e4)),
                norm="rmsnorm", norm_eps=float(c.rms_norm_eps), mlp="swiglu",
                bias=bool(getattr(c, "attention_bias", False)))


def qwen_moe_args(c, problems, n_shared_experts=0):
    """The MoE settings of a Qwen2-MoE or Qwen3-MoE config `c`: its MoE layers (decoder_sparse_step,
    mlp_only_layers) as our moe_every and first_dense_layers; {} when every layer is dense."""
    moe_layers = [i for i in range(c.num_hidden_layers) if i not in (c.mlp_only_layers or [])
                  and (i + 1) % c.decoder_sparse_step == 0] if c.num_experts else []
    if not moe_layers:
        return {}  # our dense GPT
    return dict(n_experts=c.num_experts, moe_top_k=c.num_experts_per_tok, moe_renorm=bool(c.norm_topk_prob),
                expert_hidden=c.moe_intermediate_size, n_shared_experts=n_shared_experts,
                **moe_layer_settings(c.num_hidden_layers, moe_layers, c.decoder_sparse_step, problems))


def moe_layer_settings(n_layer, moe_layers, every, problems):
    """Our moe_every and first_dense_layers whose MoE layers are exactly `moe_layers` (trying moe_every=`every`
    first), or a problem named in `problems`."""
    for moe_every in [every] + [e for e in range(1, n_layer + 1) if e != every]:
        for first in range(n_layer):
            if [i for i in range(first, n_layer) if (i + 1) % moe_every == 0] == moe_layers:
                return dict(moe_every=moe_every, first_dense_layers=first)
    problems.append(f"MoE in layers {moe_layers} (only every moe_every-th layer after the first_dense_layers)")
    return dict(moe_every=1, first_dense_layers=0)


def finish_args(args, c, family, source, problems):
    """The checks every family's model_args end with: the dense MLP's width, top-1 renormalisation, defaults
    written as our defaults; a UserError naming every problem."""
    moe = args.get("n_experts", 0) > 0
    has_dense_layers = not moe or args["moe_every"] > 1 or args["first_dense_layers"] > 0
    if has_dense_layers and c.intermediate_size != dense_hidden(args):
        problems.append(f"intermediate_size={c.intermediate_size} in its dense layers (our dense SwiGLU MLP has "
                        f"64 * ceil(8 * hidden_size / 3 / 64) = {dense_hidden(args)})")
    if args.get("moe_renorm") and args["moe_top_k"] == 1:
        problems.append("one expert per token with its weight renormalised to 1.0 (the router would get no "
                        "gradient from the loss; our top-1 MoE weights the expert by its probability)")
    elif moe and args["moe_renorm"] == (args["moe_top_k"] > 1):
        args["moe_renorm"] = None  # our default says the same: renormalise when k > 1
    try:  # shapes that do not fit together (GPTConfig.validate): named like the rest
        (MoEConfig if moe else GPTConfig).from_dict(args)
    except UserError as e:
        problems.append(str(e))
    if problems:
        raise UserError(f"'{source}' has {family} settings this repository's model cannot reproduce exactly: "
                        f"{'; '.join(problems)}")
    if args.get("expert_hidden") == dense_hidden(args):
        args["expert_hidden"] = None  # the default: what sparse upcycling and our configs write
    return args


def from_hf_state(hf_sd, args, source, c=None):
    """The transformers model's state dict -> ours (model_args `args` from model_args_from_hf; the config `c`
    changes nothing in this layout). Takes the tensors it maps out of hf_sd; any left over is an error."""
    def take(name):
        return hf_sd.pop(name)

    sd = {"transformer.wte.weight": take("model.embed_tokens.weight"),
          "transformer.ln_f.weight": take("model.norm.weight")}
    head = hf_sd.pop("lm_head.weight", sd["transformer.wte.weight"])
    if head.shape != sd["transformer.wte.weight"].shape or not torch.equal(head, sd["transformer.wte.weight"]):
        raise UserError(f"'{source}' has an output head that is not tied to the token embedding "
                        f"(tie_word_embeddings=False); this repository's GPT ties them")
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    for i in range(args["n_layer"]):
        ours, hf = f"transformer.h.{i}.", f"model.layers.{i}."
        sd[ours + "ln_1.weight"] = take(hf + "input_layernorm.weight")
        sd[ours + "ln_2.weight"] = take(hf + "post_attention_layernorm.weight")
        for leaf in ("weight", "bias"):
            qkv = [hf_sd.pop(hf + f"self_attn.{n}_proj.{leaf}", None) for n in "qkv"]
            if qkv[0] is None:
                continue
            if leaf == "bias" and not args["bias"]:  # Qwen2-MoE's qkv_bias: exact only when all zero
                if any(t.any() for t in qkv):
                    raise UserError(f"'{source}' has non-zero q/k/v biases (qkv_bias) and no other biases; "
                                    f"this repository's attention has biases only with bias=True everywhere")
                continue
            sd[ours + "attn.c_attn." + leaf] = torch.cat(qkv)
            sd[ours + "attn.c_proj." + leaf] = take(hf + "self_attn.o_proj." + leaf)
        for n in ("q_norm", "k_norm"):
            if hf + f"self_attn.{n}.weight" in hf_sd:
                sd[ours + f"attn.{n}.weight"] = take(hf + f"self_attn.{n}.weight")
        m = ours + "mlp."
        if hf + "mlp.gate.weight" not in hf_sd:  # a dense layer
            sd.update(mlp_from_hf(hf_sd, hf + "mlp.", m))
            continue
        sd[m + "router.weight"] = take(hf + "mlp.gate.weight")
        sd[m + "experts.c_fc"] = take(hf + "mlp.experts.gate_up_proj")
        sd[m + "experts.c_proj"] = take(hf + "mlp.experts.down_proj")
        if hf + "mlp.shared_expert_gate.weight" in hf_sd:
            if take(hf + "mlp.shared_expert_gate.weight").any():
                raise UserError(f"'{source}' gates its shared expert with sigmoid(shared_expert_gate(x)), a "
                                f"per-token scale this repository's shared experts do not have (exact only when "
                                f"the gate weights are zero: a constant 0.5, which our export writes)")
            shared = mlp_from_hf(hf_sd, hf + "mlp.shared_expert.", m + "shared.")
            shared[m + "shared.c_proj.weight"] = shared[m + "shared.c_proj.weight"] / 2  # the zero gate's 0.5: exact
            if args["n_shared_experts"]:
                sd.update(shared)
    hf_sd.pop("model.rotary_emb.inv_freq", None)
    if hf_sd:
        raise UserError(f"'{source}' has weights this repository's model has no place for: "
                        f"{', '.join(sorted(hf_sd)[:5])}")
    return sd


def mlp_from_hf(hf_sd, hf, ours):
    """gate_proj, up_proj, down_proj at prefix `hf` (taken out of hf_sd) -> our SwiGLU MLP at `ours`."""
    sd = {}
    for leaf in ("weight", "bias"):
        if hf + "gate_proj." + leaf in hf_sd:
            gate, up = hf_sd.pop(hf + "gate_proj." + leaf), hf_sd.pop(hf + "up_proj." + leaf)
            sd[ours + "c_fc." + leaf] = torch.cat([gate, up])
            sd[ours + "c_proj." + leaf] = hf_sd.pop(hf + "down_proj." + leaf)
    return sd
