"""
Llama, Mixtral and Qwen2-MoE formats in and out (nanomoe/hf/formats.py and llama.py, tools.export,
init_from='hf:DIR'):
our model -> Hugging Face folder -> transformers gives our logits and routing; a random transformers model
(built from a config, never downloaded) -> ours gives its logits and its greedy tokens; every model without an
exact equivalent is refused with one line and nothing written.
"""
import errno
import json
import os
from dataclasses import asdict

import pytest
import torch

from conftest import import_transformers, run_main
from model import GPT, GPTConfig
from moe_model import MoE, MoEConfig
from nanomoe.errors import UserError
from nanomoe.factory import build_model
from nanomoe.hf import llama as hf_llama
from nanomoe.hf.formats import export_checkpoint, load_hf, model_for_training, pick_format

transformers = None  # imported when a test of this file runs (it takes seconds)


@pytest.fixture(autouse=True, scope="module")
def _transformers():
    global transformers
    transformers = import_transformers()


pytestmark = pytest.mark.slow  # Llama/Mixtral/Qwen2-MoE interop: `pytest -m "not slow"` skips it

CHARS = "\n !',.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
LLAMA = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=64, vocab_size=len(CHARS), bias=False,
             pos_emb="rope", norm="rmsnorm", mlp="swiglu", rope_theta=500.0)
FAMILIES = {  # a model of ours for each format (and the variants a format's options cover)
    "llama": dict(LLAMA),
    "llama-bias": dict(LLAMA, bias=True, n_kv_head=None),
    "mixtral-top2": dict(LLAMA, n_experts=4, moe_top_k=2),
    "qwen2_moe-top2": dict(LLAMA, n_experts=4, moe_top_k=2, n_shared_experts=2, moe_every=2, n_layer=3),
    # our top-1 weights the expert by its probability (a renormalised single gate would be 1.0): Mixtral
    # always renormalises, so top-1 goes to Qwen2-MoE with norm_topk_prob=False
    "qwen2_moe-top1": dict(LLAMA, n_experts=4, moe_top_k=1, expert_hidden=48),
}


def our_model(args, seed=0):
    """A random model of ours, its norm gains and biases moved away from 1 and 0 so a mix-up would show."""
    torch.manual_seed(seed)
    model = build_model(dict(args, moe_impl="loop"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "bias")):
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("router.weight"):
                p.mul_(50)  # routers far from uniform, so each token's choice is clear
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
                                 "qwen2_moe": "Qwen2MoeForCausalLM"}[fmt]
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


@pytest.mark.parametrize("name", ["llama", "mixtral-top2", "qwen2_moe-top2"])
def test_export_in_bfloat16_is_close(name, idx, tmp_path):
    model = our_model(FAMILIES[name]).to(torch.bfloat16)
    export_checkpoint(checkpoint(model), tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    hf = hf_load(tmp_path / "hf", dtype=torch.bfloat16)
    ref = logits(model, idx)
    assert (logits(hf, idx) - ref).abs().max() <= 0.05 * ref.abs().max()


BLOCKS = {"mixtral": ("MixtralConfig", "modeling_mixtral", "MixtralSparseMoeBlock"),
          "qwen2_moe": ("Qwen2MoeConfig", "modeling_qwen2_moe", "Qwen2MoeSparseMoeBlock")}


@pytest.mark.parametrize("name", [n for n in FAMILIES if n.split("-")[0] in BLOCKS])
def test_moe_block_equals_the_transformers_block(name):
    """Our MoE block and transformers' Mixtral / Qwen2-MoE block with the same weights: the same output."""
    model = our_model(FAMILIES[name])
    family = name.split("-")[0]
    kwargs = hf_llama.hf_config(asdict(model.config), family)
    config_class, module, block_class = BLOCKS[family]
    theirs = getattr(getattr(getattr(transformers.models, family), module), block_class)(
        getattr(transformers, config_class)(**kwargs)).eval()
    layer = next(i for i, b in enumerate(model.transformer.h) if isinstance(b.mlp, MoE))
    prefix = f"model.layers.{layer}.mlp."
    hf_sd = hf_llama.to_hf_state(model.state_dict(), asdict(model.config), family)
    theirs.load_state_dict({k[len(prefix):]: v for k, v in hf_sd.items() if k.startswith(prefix)})
    x = torch.randn(2, 24, model.config.n_embd, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model.transformer.h[layer].mlp(x), rtol=1e-5, atol=1e-6)


# ---- random Hugging Face model -> ours

HF_SHAPE = dict(vocab_size=len(CHARS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
HF_MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(intermediate_size=128)),  # our MLP width for 32
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=48, num_local_experts=4,
                                                            num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        intermediate_size=128, moe_intermediate_size=48, shared_expert_intermediate_size=96, num_experts=4,
        num_experts_per_tok=2, decoder_sparse_step=2, norm_topk_prob=True, num_hidden_layers=4)),
}


def random_hf(family, folder):
    """A random transformers model of the family, saved with save_pretrained to folder."""
    config_class, model_class, extra = HF_MODELS[family]
    torch.manual_seed(0)
    hf = getattr(transformers, model_class)(getattr(transformers, config_class)(**{**HF_SHAPE, **extra}))
    with torch.no_grad():
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
    assert type(model).__name__ == ("GPT" if family == "llama" else "MoEGPT")
    diff = (logits(model, idx) - logits(hf, idx)).abs().max().item()
    assert diff <= 1e-5, diff
    prompt = idx[:1, :8]
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    ours = model.generate(prompt, max_new_tokens=12, top_k=1)  # top_k=1: sampling is the argmax
    assert torch.equal(ours, theirs)


def test_upcycling_a_llama_keeps_its_logits(idx, tmp_path):
    random_hf("llama", tmp_path / "llama")
    from train import KEYS
    cfg = {**{k: key.default for k, key in KEYS.items()}, "init_from": f"hf:{tmp_path / 'llama'}",
           "block_size": 32, "n_experts": 4, "moe_top_k": 2}
    moe = model_for_training(cfg).eval()
    dense = load_hf(f"hf:{tmp_path / 'llama'}").eval()
    assert (type(moe).__name__, moe.config.block_size, moe.config.mlp) == ("MoEGPT", 32, "swiglu")
    torch.testing.assert_close(logits(moe, idx), logits(dense, idx), rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("change, words", [
    (lambda c: c.update(rms_norm_eps=1e-6), ["rms_norm_eps=1e-06"]),
    (lambda c: c.update(intermediate_size=100), ["intermediate_size=100"]),
    (lambda c: c.update(tie_word_embeddings=False), ["not tied"]),
])
def test_import_refuses_llamas_we_cannot_reproduce(tmp_path, change, words):
    _, _, extra = HF_MODELS["llama"]
    kwargs = {**HF_SHAPE, **extra}
    change(kwargs)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).save_pretrained(str(tmp_path / "x"))
    with pytest.raises(UserError) as e:
        load_hf(f"hf:{tmp_path / 'x'}")
    assert all(w in str(e.value) for w in words), str(e.value)


def test_import_refuses_a_gated_shared_expert(tmp_path):
    hf = random_hf("qwen2_moe", tmp_path / "q")
    with torch.no_grad():
        hf.model.layers[1].mlp.shared_expert_gate.weight.normal_()
    hf.save_pretrained(str(tmp_path / "q"))
    with pytest.raises(UserError, match="shared_expert_gate"):
        load_hf(f"hf:{tmp_path / 'q'}")


# ---- what export.py refuses, and how it writes

REFUSED = [  # (format or None = picked, model_args changes, words of the one error line)
    (None, dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, n_experts=4), ["MoE", "no experts"]),
    ("mixtral", dict(n_experts=4, bias=True), ["no biases"]),
    ("mixtral", dict(n_experts=4, n_shared_experts=1), ["shared experts", "qwen2_moe"]),
    ("mixtral", dict(n_experts=4, moe_every=2), ["dense layers"]),
    ("llama", dict(n_experts=4), ["no experts"]),
    ("llama", dict(norm="layernorm"), ["RMSNorm"]),
    ("gpt2", dict(), ["pos_emb='learned'"]),
    (None, dict(n_experts=4, capacity_factor=1.25), ["capacity_factor"]),
    # settings of newer checkpoints: refused by name once they exist
    (None, dict(attn="mla"), ["attn='mla'"]),
    (None, dict(fgram_max_n=3), ["F-gram"]),
    (None, dict(n_experts=4, balance_mode="aux_free"), ["aux_free"]),
    (None, dict(n_experts=4, router_score="sigmoid"), ["sigmoid"]),
    (None, dict(mamba_layers=[1]), ["Mamba"]),
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
    assert pick_format({**base, "n_experts": 0}) == "llama"
    assert pick_format(asdict(GPTConfig())) == "gpt2"
    assert pick_format(base) == "mixtral"
    for change in (dict(n_shared_experts=1), dict(moe_every=2), dict(moe_renorm=False)):
        assert pick_format({**base, **change}) == "qwen2_moe"


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


def test_export_on_a_full_disk_is_one_message_and_leaves_nothing(tmp_path, monkeypatch):
    from nanomoe.hf import formats

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(formats, "write_tokenizer", full_disk)  # after the weights: a half-written export
    with pytest.raises(UserError, match="disk is full"):
        export_checkpoint(checkpoint(our_model(FAMILIES["llama"])), tmp_path / "hf")
    assert os.listdir(tmp_path) == []  # neither the export folder nor its temporary folder


def test_hugging_face_weights_cannot_start_a_hybrid(tmp_path):
    """init_from='hf:...' (or 'gpt2') with mamba_layers: the weights have attention in every layer."""
    from train import KEYS
    random_hf("llama", tmp_path / "llama")
    cfg = {**{k: key.default for k, key in KEYS.items()}, "init_from": f"hf:{tmp_path / 'llama'}",
           "block_size": 32, "mamba_layers": [0], "mamba2_num_heads": 4, "mamba2_head_dim": 16}
    with pytest.raises(UserError, match=r"another model shape \(mamba_layers: config \[0\] vs checkpoint \[\]\)"):
        model_for_training(cfg, explicit={"mamba_layers"})
