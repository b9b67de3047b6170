"""
Llama, Mixtral, Qwen2-MoE, Qwen3, Qwen3-MoE and DeepSeek-V3 formats in and out (nanomoe/hf/: formats.py,
llama.py, qwen3.py, deepseek.py; tools.export, init_from='hf:DIR'):
our model -> Hugging Face folder -> transformers gives our logits and routing; a random transformers model
(built from a config, never downloaded) -> ours gives its logits and its greedy tokens; a dense folder
upcycles to its family's MoE format; every model without an exact equivalent and every damaged or foreign
folder is refused with one line and nothing written; a full disk or an unusable --hf_dir leaves no trace.
"""
import errno
import json
import os
import shutil
from dataclasses import asdict

import pytest
import torch

from conftest import assert_user_error, import_transformers, run_main, run_script, snapshot
from model import GPT, GPTConfig
from moe_model import MoE, MoEConfig
from nanomoe.errors import UserError
from nanomoe.factory import build_model
from nanomoe.hf.formats import FAMILIES as FAMILY_FILES
from nanomoe.hf.formats import export_checkpoint, load_hf, model_for_training, pick_format

transformers = None  # imported when a test of this file runs (it takes seconds)


@pytest.fixture(autouse=True, scope="module")
def _transformers():
    global transformers
    transformers = import_transformers()


pytestmark = pytest.mark.slow  # Hugging Face interop: `pytest -m "not slow"` skips it

CHARS = "\n !',.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
LLAMA = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=64, vocab_size=len(CHARS), bias=False,
             pos_emb="rope", norm="rmsnorm", mlp="swiglu", rope_theta=500.0)
MLA = dict(LLAMA, n_kv_head=None, attn="mla", kv_latent_dim=12, d_rope=4, norm_eps=1e-6)  # DeepSeek's eps
FAMILIES = {  # a model of ours for each format (and the variants a format's options cover)
    "llama": dict(LLAMA),
    "llama-bias": dict(LLAMA, bias=True, n_kv_head=None),
    "mixtral-top2": dict(LLAMA, n_experts=4, moe_top_k=2),
    "qwen2_moe-top2": dict(LLAMA, n_experts=4, moe_top_k=2, n_shared_experts=2, moe_every=2, n_layer=3),
    # our top-1 weights the expert by its probability (a renormalised single gate would be 1.0): Mixtral
    # always renormalises, so top-1 goes to Qwen2-MoE with norm_topk_prob=False
    "qwen2_moe-top1": dict(LLAMA, n_experts=4, moe_top_k=1, expert_hidden=48),
    "qwen3": dict(LLAMA, qk_norm=True, norm_eps=1e-6),
    "qwen3_moe-top2": dict(LLAMA, qk_norm=True, n_experts=4, moe_top_k=2, first_dense_layers=1, n_layer=3),
    "qwen3_moe-top1": dict(LLAMA, qk_norm=True, n_experts=4, moe_top_k=1, moe_every=2),
    # MLA without and with query compression, sigmoid scores with the aux-free bias, shared experts, a first
    # dense layer; top-1 weighted by its score
    "deepseek_v3-dense": dict(MLA, q_latent_dim=16),
    "deepseek_v3-aux_free": dict(MLA, n_experts=4, moe_top_k=2, router_score="sigmoid", balance_mode="aux_free",
                                 n_shared_experts=1, first_dense_layers=1, n_layer=3),
    "deepseek_v3-top1": dict(MLA, q_latent_dim=16, n_experts=4, moe_top_k=1, router_score="sigmoid"),
    # softmax scores: DeepSeek-V2, whose top-k weights are never renormalised
    "deepseek_v2": dict(MLA, n_experts=4, moe_top_k=2, moe_renorm=False, n_shared_experts=1, first_dense_layers=1,
                        n_layer=3),
}


def our_model(args, seed=0):
    """A random model of ours, its norm gains and biases moved away from 1 and 0 so a mix-up would show."""
    torch.manual_seed(seed)
    model = build_model(dict(args, moe_impl="loop"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "norm.weight", "bias")):
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("router.weight"):
                p.mul_(50)  # routers far from uniform, so each token's choice is clear
        for layer in getattr(model, "moe_layers", list)():
            if layer.expert_bias is not None:  # an aux-free bias that has moved, as after training
                layer.expert_bias.normal_(0, 0.1)
    return model.eval()


def checkpoint(model, tokenizer="char"):
    meta = {"char": {"tokenizer": "char", "vocab_size": len(CHARS), "chars": CHARS},
            "gpt2": {"tokenizer": "gpt2", "vocab_size": 50257}}[tokenizer]
    return {"model_args": asdict(model.config), "model": model.state_dict(), "tokenizer": meta}


def logits(model, idx):
    with torch.no_grad():
        if isinstance(model, GPT):
            return model(idx, idx)[0].float()  # with targets: logits at every position
        return model(idx).logits.float()


def routing(model, idx):
    """The experts each MoE layer chose for each token, sorted: [(T, k)] per MoE layer, ours or transformers'."""
    chosen = []
    if isinstance(model, GPT):
        for m in getattr(model, "moe_layers", list)():  # MoE.forward returns only its output: record what route() chose
            m.route = lambda x, route=m.route: (r := route(x), chosen.append(r[2].sort(-1).values))[0]
    else:
        for layer in model.model.layers:
            if hasattr(layer.mlp, "experts"):  # the router returns (logits, weights, chosen experts)
                layer.mlp.gate.register_forward_hook(lambda m, i, out: chosen.append(out[2].sort(-1).values))
    logits(model, idx)
    return chosen


@pytest.fixture
def idx():
    return torch.randint(0, len(CHARS), (2, 24), generator=torch.Generator().manual_seed(1))


def hf_load(folder, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()


# ---- ours -> Hugging Face -> ours

@pytest.mark.parametrize("name", FAMILIES)
def test_export_gives_our_logits_routing_and_weights_back(name, idx, tmp_path):
    model = our_model(FAMILIES[name])
    fmt = export_checkpoint(checkpoint(model), tmp_path / "hf")
    assert fmt == name.split("-")[0]
    hf = hf_load(tmp_path / "hf")
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM",
                                 "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3": "Qwen3ForCausalLM",
                                 "qwen3_moe": "Qwen3MoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
                                 "deepseek_v2": "DeepseekV2ForCausalLM"}[fmt]
    diff = (logits(hf, idx) - logits(model, idx)).abs().max().item()
    assert diff <= 1e-5, diff
    ours, theirs = routing(model, idx), routing(hf, idx)
    assert len(ours) == len(theirs) == len(getattr(model, "moe_layers", list)())
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)  # the same experts for every token
    back = load_hf(f"hf:{tmp_path / 'hf'}", {"moe_impl": "loop"})
    assert type(back) is type(model) and asdict(back.config) == asdict(model.config)
    sd = model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in back.state_dict().items())  # bit-exact, shared experts too


def test_format_override_qwen2_moe_holds_a_mixtral(idx, tmp_path):
    model = our_model(FAMILIES["mixtral-top2"])
    export_checkpoint(checkpoint(model), tmp_path / "hf", "qwen2_moe")  # zero-width shared expert, step 1
    assert (logits(hf_load(tmp_path / "hf"), idx) - logits(model, idx)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["llama", "mixtral-top2", "qwen2_moe-top2", "deepseek_v3-aux_free"])
def test_export_in_bfloat16_is_close(name, idx, tmp_path):
    model = our_model(FAMILIES[name]).to(torch.bfloat16)
    export_checkpoint(checkpoint(model), tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    hf = hf_load(tmp_path / "hf", dtype=torch.bfloat16)
    ref = logits(model, idx)
    assert (logits(hf, idx) - ref).abs().max() <= 0.05 * ref.abs().max()


BLOCKS = {"mixtral": ("MixtralConfig", "modeling_mixtral", "MixtralSparseMoeBlock"),
          "qwen2_moe": ("Qwen2MoeConfig", "modeling_qwen2_moe", "Qwen2MoeSparseMoeBlock"),
          "qwen3_moe": ("Qwen3MoeConfig", "modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock"),
          "deepseek_v3": ("DeepseekV3Config", "modeling_deepseek_v3", "DeepseekV3MoE"),
          "deepseek_v2": ("DeepseekV2Config", "modeling_deepseek_v2", "DeepseekV2Moe")}


@pytest.mark.parametrize("name", [n for n in FAMILIES if n.split("-")[0] in BLOCKS and "n_experts" in FAMILIES[n]])
def test_moe_block_equals_the_transformers_block(name):
    """Our MoE block and transformers' (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3) with the same weights: the
    same output."""
    model = our_model(FAMILIES[name])
    family = name.split("-")[0]
    kwargs = FAMILY_FILES[family].hf_config(asdict(model.config), family)
    config_class, module, block_class = BLOCKS[family]
    theirs = getattr(getattr(getattr(transformers.models, family), module), block_class)(
        getattr(transformers, config_class)(**kwargs)).eval()
    layer = next(i for i, b in enumerate(model.transformer.h) if isinstance(b.mlp, MoE))
    prefix = f"model.layers.{layer}.mlp."
    hf_sd = FAMILY_FILES[family].to_hf_state(model.state_dict(), asdict(model.config), family)
    theirs.load_state_dict({k[len(prefix):]: v for k, v in hf_sd.items() if k.startswith(prefix)})
    x = torch.randn(2, 24, model.config.n_embd, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model.transformer.h[layer].mlp(x), rtol=1e-5, atol=1e-6)


# ---- random Hugging Face model -> ours

HF_SHAPE = dict(vocab_size=len(CHARS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
DEEPSEEK = dict(intermediate_size=128, num_key_value_heads=4, rms_norm_eps=1e-6, q_lora_rank=None, kv_lora_rank=12,
                qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                n_group=1, topk_group=1, first_k_dense_replace=1, n_shared_experts=1, moe_intermediate_size=48,
                routed_scaling_factor=1.0, norm_topk_prob=True)
HF_MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(intermediate_size=128)),  # our MLP width for 32
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=48, num_local_experts=4,
                                                            num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        intermediate_size=128, moe_intermediate_size=48, shared_expert_intermediate_size=96, num_experts=4,
        num_experts_per_tok=2, decoder_sparse_step=2, norm_topk_prob=True, num_hidden_layers=4)),
    # Qwen's eps 1e-6; Qwen3-MoE's first layer dense (mlp_only_layers), top-2 not renormalised
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(intermediate_size=128, head_dim=8, rms_norm_eps=1e-6)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        intermediate_size=128, head_dim=8, rms_norm_eps=1e-6, moe_intermediate_size=48, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[0], num_hidden_layers=3)),
    # MLA with query compression and interleaved rope pairs, a dense first layer, a shared expert, the bias
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(DEEPSEEK, q_lora_rank=16, num_hidden_layers=3)),
    # without query compression, rope as halves (rope_interleave=False), top-1 not renormalised, no shared expert
    "deepseek_v3-halves": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        DEEPSEEK, rope_interleave=False, num_experts_per_tok=1, norm_topk_prob=False, first_k_dense_replace=0,
        n_shared_experts=0)),
    "deepseek_v3-dense": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(DEEPSEEK, first_k_dense_replace=2)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        {k: v for k, v in DEEPSEEK.items() if k not in ("n_group", "topk_group")}, q_lora_rank=16,
        norm_topk_prob=False, num_hidden_layers=3)),
}
DENSE_FAMILIES = ("llama", "qwen3", "deepseek_v3-dense")


def random_hf(family, folder):
    """A random transformers model of the family, saved with save_pretrained to folder."""
    config_class, model_class, extra = HF_MODELS[family]
    torch.manual_seed(0)
    hf = getattr(transformers, model_class)(getattr(transformers, config_class)(**{**HF_SHAPE, **extra}))
    with torch.no_grad():
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)  # DeepSeek-V3's aux-free bias, as training leaves it
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("shared_expert_gate.weight"):
                p.zero_()  # our shared experts have no gate: a zero gate is a constant 0.5 (see nanomoe/hf/llama.py)
            elif name.endswith("self_attn.q_proj.bias") or name.endswith(("k_proj.bias", "v_proj.bias")):
                p.zero_()  # Qwen2-MoE's qkv_bias: exact only at zero (our bias=False has none)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0, 1.0)
    hf.save_pretrained(str(folder))
    return hf.eval()


@pytest.mark.parametrize("family", HF_MODELS)
def test_import_gives_transformers_logits_and_greedy_tokens(family, idx, tmp_path):
    hf = random_hf(family, tmp_path / family)
    model = load_hf(f"hf:{tmp_path / family}").eval()
    assert type(model).__name__ == ("GPT" if family in DENSE_FAMILIES else "MoEGPT")
    diff = (logits(model, idx) - logits(hf, idx)).abs().max().item()
    assert diff <= 1e-5, diff
    prompt = idx[:1, :8]
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                         pad_token_id=0)
    ours = model.generate(prompt, max_new_tokens=12, top_k=1)  # top_k=1: sampling is the argmax
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("family, moe_format", [("llama", "mixtral"), ("qwen3", "qwen3_moe"),
                                                ("deepseek_v3-dense", "deepseek_v3")])
def test_upcycling_a_dense_folder_keeps_its_logits_and_exports_to_its_moe_format(family, moe_format, idx, tmp_path):
    random_hf(family, tmp_path / family)
    from train import KEYS
    cfg = {**{k: key.default for k, key in KEYS.items()}, "init_from": f"hf:{tmp_path / family}",
           "block_size": 32, "n_experts": 4, "moe_top_k": 2,
           "router_score": "sigmoid" if moe_format == "deepseek_v3" else "softmax"}
    moe = model_for_training(cfg).eval()
    dense = load_hf(f"hf:{tmp_path / family}").eval()
    assert (type(moe).__name__, moe.config.block_size, moe.config.mlp) == ("MoEGPT", 32, "swiglu")
    torch.testing.assert_close(logits(moe, idx), logits(dense, idx), rtol=1e-5, atol=1e-5)
    assert export_checkpoint(checkpoint(moe), tmp_path / "moe") == moe_format
    assert (logits(hf_load(tmp_path / "moe"), idx) - logits(moe, idx)).abs().max() <= 1e-5


def test_train_init_from_an_moe_folder_keeps_its_experts(tmp_path):
    random_hf("mixtral", tmp_path / "mixtral")
    from train import KEYS
    cfg = {**{k: key.default for k, key in KEYS.items()}, "init_from": f"hf:{tmp_path / 'mixtral'}",
           "block_size": 32, "moe_impl": "grouped"}
    model = model_for_training(cfg)  # n_experts=0 in the run's defaults: the folder's 4 experts stay
    c = model.config
    assert (type(model).__name__, c.n_experts, c.moe_top_k, c.expert_hidden, c.moe_impl) == ("MoEGPT", 4, 2, 48,
                                                                                           "grouped")
    with pytest.raises(UserError, match="n_experts: config 8 vs checkpoint 4"):
        model_for_training({**cfg, "n_experts": 8}, explicit={"n_experts"})


def test_import_refuses_a_gated_shared_expert(tmp_path):
    hf = random_hf("qwen2_moe", tmp_path / "q")
    with torch.no_grad():
        hf.model.layers[1].mlp.shared_expert_gate.weight.normal_()
    hf.save_pretrained(str(tmp_path / "q"))
    with pytest.raises(UserError, match="shared_expert_gate"):
        load_hf(f"hf:{tmp_path / 'q'}")


# ---- damaged and foreign folders: train.py --init_from=hf:DIR says what is wrong in one line, writes nothing

def edit_config(folder, change):
    path = folder / "config.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def edit_weights(folder, change):
    from safetensors.torch import load_file, save_file
    path = str(folder / "model.safetensors")
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


K_NORM = "model.layers.0.self_attn.k_norm.weight"
DAMAGED = [  # (case, an export of ours: qwen3 or deepseek_v3, what is done to it, words of the one error line)
    ("no-config", "qwen3", lambda f: (f / "config.json").unlink(), ["no config.json"]),
    ("foreign-model-type", "qwen3", lambda f: edit_config(f, lambda c: {**c, "model_type": "bert"}),
     ["'bert' model", "init_from reads"]),
    # only a model_type: the family's defaults (DeepSeek-V3: 671B parameters) are refused before any allocation
    ("bare-config", "qwen3", lambda f: (f / "config.json").write_text('{"model_type": "deepseek_v3"}'),
     ["deepseek_v3 settings", "cannot reproduce", "v_head_dim=128"]),
    ("missing-tensor", "qwen3", lambda f: edit_weights(f, lambda t: t.pop(K_NORM)),
     ["lacks", K_NORM, "random values"]),
    ("misshapen-tensor", "qwen3", lambda f: edit_weights(f, lambda t: t.update({K_NORM: torch.ones(5)})),
     ["other shapes", K_NORM, "(5,) instead of (8,)"]),
    ("foreign-tensor", "qwen3", lambda f: edit_weights(f, lambda t: t.update({"model.extra.weight": torch.ones(2)})),
     ["no place for", "model.extra.weight"]),
    ("truncated-weights", "qwen3", lambda f: os.truncate(f / "model.safetensors", 100), ["cannot load"]),
    ("rope-scaling", "qwen3", lambda f: edit_config(f, lambda c: {**c, "rope_parameters": {
        "rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}}), ["rope_type='linear'"]),
    ("sliding-window", "qwen3", lambda f: edit_config(f, lambda c: {
        **c, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}), ["sliding-window"]),
    ("untied-head", "qwen3", lambda f: edit_config(f, lambda c: {**c, "tie_word_embeddings": False}), ["not tied"]),
    ("dense-width", "qwen3", lambda f: edit_config(f, lambda c: {**c, "intermediate_size": 100}),
     ["intermediate_size=100"]),
    # transformers gives DeepSeek-V3's latent norms eps 1e-6 whatever rms_norm_eps says: one eps for all, or none
    ("mla-norm-eps", "deepseek_v3", lambda f: edit_config(f, lambda c: {**c, "rms_norm_eps": 1e-5}),
     ["rms_norm_eps=1e-05", "1e-6"]),
    ("group-limited-routing", "deepseek_v3-moe", lambda f: edit_config(f, lambda c: {**c, "n_group": 2,
                                                                                     "topk_group": 1}),
     ["group-limited routing", "n_group=2"]),
]


@pytest.fixture(scope="module")
def good_folders(tmp_path_factory, _transformers):
    """Exports of ours to damage."""
    folder = tmp_path_factory.mktemp("good")
    for name, family in (("qwen3", "qwen3"), ("deepseek_v3", "deepseek_v3-dense"),
                         ("deepseek_v3-moe", "deepseek_v3-top1")):
        export_checkpoint(checkpoint(our_model(FAMILIES[family])), folder / name)
    return folder


@pytest.mark.parametrize("case, source, damage, words", DAMAGED, ids=[d[0] for d in DAMAGED])
def test_damaged_or_foreign_folder_is_one_line_and_nothing_written(good_folders, shakespeare_data, tmp_path, case,
                                                                  source, damage, words):
    folder = tmp_path / "hf"
    shutil.copytree(good_folders / source, folder)
    damage(folder)
    before = snapshot(tmp_path)
    r = run_script(["train.py", "--dataset=shakespeare_char", f"--data_root={shakespeare_data}", "--device=cpu",
                    "--compile=False", f"--out_dir={tmp_path / 'out'}", f"--init_from=hf:{folder}", "--block_size=32",
                    "--max_iters=1"], cwd=tmp_path)
    assert_user_error(r, *words)
    assert snapshot(tmp_path) == before  # no out_dir, the folder untouched


# ---- what export.py refuses, and how it writes

QWEN3 = dict(qk_norm=True)
DEEPSEEK_MOE = dict(MLA, n_experts=4, router_score="sigmoid")
REFUSED = [  # (format or None = picked, model_args changes, words of the one error line)
    (None, dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, n_experts=4),
     ["closest, gpt2", "has no experts"]),
    ("mixtral", dict(n_experts=4, bias=True), ["no biases"]),
    ("mixtral", dict(n_experts=4, n_shared_experts=1),
     ["no shared experts", "formats with: qwen2_moe, deepseek_v3, deepseek_v2)"]),
    ("mixtral", dict(n_experts=4, moe_every=2), ["dense layers"]),
    ("llama", dict(n_experts=4), ["LlamaForCausalLM has no experts"]),
    ("llama", dict(norm="layernorm"), ["RMSNorm"]),
    ("llama", QWEN3, ["no QK-norm", "(formats with: qwen3)"]),
    ("qwen3", dict(), ["needs QK-norm"]),
    ("qwen3_moe", dict(QWEN3, n_experts=4, n_shared_experts=1), ["Qwen3MoeForCausalLM has no shared experts"]),
    ("gpt2", dict(), ["pos_emb='learned'"]),
    (None, dict(n_experts=4, capacity_factor=1.25), ["capacity_factor"]),
    (None, dict(fgram_max_n=3), ["F-gram"]),
    (None, dict(mamba_layers=[1]), ["Mamba"]),
    # DeepSeek-V3: MLA goes nowhere else, and it has neither softmax scores nor DeepSeek's eps for other eps
    ("mixtral", dict(DEEPSEEK_MOE, n_kv_head=None), ["no multi-head latent attention", "deepseek_v3"]),
    (None, dict(n_experts=4, router_score="sigmoid"), ["no sigmoid router scores", "(formats with: deepseek_v3)"]),
    (None, dict(n_experts=4, balance_mode="aux_free"), ["no aux-free routing bias", "formats with: deepseek_v3)"]),
    ("deepseek_v3", dict(DEEPSEEK_MOE, router_score="softmax"), ["no softmax router scores"]),
    ("deepseek_v3", dict(DEEPSEEK_MOE, norm_eps=1e-5), ["eps 1e-6", "norm_eps=1e-05"]),
    ("deepseek_v3", dict(DEEPSEEK_MOE, moe_every=2, n_layer=4), ["MoE in layers [1, 3]", "first_dense_layers"]),
    ("deepseek_v3", dict(DEEPSEEK_MOE, bias=True), ["no biases"]),
    ("deepseek_v2", dict(DEEPSEEK_MOE, router_score="softmax", moe_top_k=2), ["renormalises its top-2",
                                                                               "moe_renorm=False"]),
    ("deepseek_v2", dict(DEEPSEEK_MOE, moe_renorm=False), ["DeepseekV2ForCausalLM has no sigmoid"]),
]


@pytest.mark.parametrize("fmt, changes, words", REFUSED)
def test_export_refuses_what_has_no_exact_equivalent(tmp_path, fmt, changes, words):
    args = {**asdict(MoEConfig(**LLAMA, n_experts=4)), "n_experts": 0, **changes}
    ckpt = {"model_args": args, "model": {}, "tokenizer": {}}  # refused before the weights are read
    with pytest.raises(UserError) as e:
        export_checkpoint(ckpt, tmp_path / "hf", fmt)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_pick_format_follows_the_architecture():
    base = asdict(MoEConfig(**LLAMA, n_experts=4))
    dense = {**base, "n_experts": 0}
    assert pick_format(dense) == "llama"
    assert pick_format(asdict(GPTConfig())) == "gpt2"
    assert pick_format(base) == "mixtral"
    for change in (dict(n_shared_experts=1), dict(moe_every=2), dict(first_dense_layers=1), dict(moe_renorm=False)):
        assert pick_format({**base, **change}) == "qwen2_moe"
    assert pick_format({**dense, **QWEN3}) == "qwen3"
    assert pick_format({**base, **QWEN3}) == "qwen3_moe"
    assert pick_format({**dense, **MLA}) == "deepseek_v3"
    assert pick_format({**base, **DEEPSEEK_MOE, "balance_mode": "aux_free", "n_shared_experts": 1}) == "deepseek_v3"
    assert pick_format({**base, **DEEPSEEK_MOE, "router_score": "softmax", "moe_renorm": False}) == "deepseek_v2"


def test_export_notes_the_gpt2_tokenizer(tmp_path):
    model = our_model(dict(LLAMA, vocab_size=50304))
    export_checkpoint(checkpoint(model, tokenizer="gpt2"), tmp_path / "hf")
    assert "GPT-2 BPE" in (tmp_path / "hf" / "README.md").read_text()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["vocab_size"], config["eos_token_id"], config["rope_theta"]) == (50304, 50256, 500.0)


def test_export_shards_and_force_leaves_no_stale_files(tmp_path):
    model = our_model(FAMILIES["mixtral-top2"])
    export_checkpoint(checkpoint(model), tmp_path / "hf", max_shard_size="20KB")
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert "model.safetensors.index.json" in files and "model-00001-of-" in " ".join(files)
    with pytest.raises(UserError, match="not empty.*--force"):
        export_checkpoint(checkpoint(model), tmp_path / "hf")
    export_checkpoint(checkpoint(model), tmp_path / "hf", force=True)
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert "model.safetensors" in files and not any(f.startswith("model-0") or f.endswith(".index.json")
                                                    for f in files), files
    assert {"config.json", "tokenizer.json", "README.md"} <= files
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "Hello, world!\nAnd you?"
    assert tok.encode(text, add_special_tokens=False) == [CHARS.index(c) for c in text]
    assert tok.decode([CHARS.index(c) for c in text]) == text


def export_cli(argv, capsys):
    """tools.export's command line in this process (transformers is slow to import): (exit code, stdout,
    stderr)."""
    from tools import export
    return run_main(export.main, argv, capsys)


def test_export_cli(tmp_path, capsys):
    """tools.export: a Qwen2-MoE from a checkpoint file; a refusal is one line, and nothing is written."""
    model = our_model(FAMILIES["qwen2_moe-top2"])
    torch.save(checkpoint(model), tmp_path / "ckpt.pt")
    code, out, err = export_cli([f"--out_dir={tmp_path}"], capsys)
    assert code == 0, err
    assert "Qwen2MoeForCausalLM.from_pretrained" in out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["Qwen2MoeForCausalLM"]

    refused = checkpoint(model)
    refused["model_args"]["capacity_factor"] = 1.0
    (tmp_path / "refused").mkdir()
    torch.save(refused, tmp_path / "refused" / "ckpt.pt")
    for argv in ([f"--out_dir={tmp_path / 'refused'}"], [f"--out_dir={tmp_path}", "--format=mixtral"],
                 [f"--out_dir={tmp_path}", "--format=llama3"]):
        code, out, err = export_cli(argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "capacity_factor" in export_cli([f"--out_dir={tmp_path / 'refused'}"], capsys)[2]
    assert sorted(p.name for p in (tmp_path / "refused").iterdir()) == ["ckpt.pt"]


@pytest.mark.parametrize("where", ["weights", "tokenizer"])
def test_export_on_a_full_disk_is_one_line_and_keeps_the_last_export(where, tmp_path, monkeypatch, capsys):
    """The disk fills up while the weights are written (safetensors' native writer stops half-way with its own
    error) or the tokenizer: one line, the earlier export in --hf_dir as it was, no temporary folder."""
    torch.save(checkpoint(our_model(FAMILIES["qwen3"])), tmp_path / "ckpt.pt")
    assert export_cli([f"--out_dir={tmp_path}"], capsys)[0] == 0  # the export a forced one would replace
    torch.save(checkpoint(our_model(FAMILIES["qwen3"], seed=1)), tmp_path / "ckpt.pt")
    before = snapshot(tmp_path)

    def full_disk_in_safetensors(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        from safetensors import SafetensorError
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    if where == "weights":
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk_in_safetensors)
    else:
        from nanomoe.hf import formats
        monkeypatch.setattr(formats, "write_tokenizer", full_disk)
    code, out, err = export_cli([f"--out_dir={tmp_path}", "--force=True"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: the disk is full"), err
    assert snapshot(tmp_path) == before


def test_export_to_an_unusable_hf_dir_is_one_line_and_writes_nothing(tmp_path, capsys):
    torch.save(checkpoint(our_model(FAMILIES["llama"])), tmp_path / "ckpt.pt")
    (tmp_path / "a-file").write_text("not a folder")
    cases = [("", "hf_dir is empty"), (tmp_path / "a-file", "is a file, not a folder"),
             (tmp_path / "a-file" / "hf", "a-file' is a file")]
    if os.path.isdir("/proc/self"):  # a special filesystem: os.access says root may write /proc; a probe says not
        cases += [("/proc/self/nanomoe-hf", "is not writable"), ("/proc/nanomoe-hf", "is not writable")]
    before = snapshot(tmp_path)
    for hf_dir, words in cases:
        code, out, err = export_cli([f"--out_dir={tmp_path}", f"--hf_dir={hf_dir}"], capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and words in err, (hf_dir, err)
    assert snapshot(tmp_path) == before


def test_hugging_face_weights_cannot_start_a_hybrid(tmp_path):
    """init_from='hf:...' (or 'gpt2') with mamba_layers: the weights have attention in every layer."""
    from train import KEYS
    random_hf("llama", tmp_path / "llama")
    cfg = {**{k: key.default for k, key in KEYS.items()}, "init_from": f"hf:{tmp_path / 'llama'}",
           "block_size": 32, "mamba_layers": [0], "mamba2_num_heads": 4, "mamba2_head_dim": 16}
    with pytest.raises(UserError, match=r"another model shape \(mamba_layers: config \[0\] vs checkpoint \[\]\)"):
        model_for_training(cfg, explicit={"mamba_layers"})
