"""
Hugging Face GPT-2 interop (nanomoe/hf/gpt2.py and formats.py, tools.export, train.py --init_from=hf:DIR) and
sparse upcycling. Offline: the "pretrained" GPT-2 is a tiny random transformers model saved to a temp folder.
"""
import json
import shutil
from dataclasses import asdict

import pytest
import torch

from conftest import TINY_MODEL, TINY_RUN, assert_ok, assert_user_error, import_transformers, run_script
from model import GPT, GPTConfig
from moe_model import MoEConfig, MoEGPT
from nanomoe.checkpoint import load_checkpoint, model_from_checkpoint
from nanomoe.errors import UserError
from nanomoe.hf.formats import model_for_training
from nanomoe.hf.gpt2 import export_hf, load_gpt2

transformers = None  # imported when a test of this file runs (it takes seconds)


@pytest.fixture(autouse=True, scope="module")
def _transformers():
    global transformers
    transformers = import_transformers()


pytestmark = pytest.mark.slow  # Hugging Face GPT-2 interop: `pytest -m 'not slow'` skips it for a quick loop

HF_SHAPE = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=100)


def hf_logits(folder, idx):
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return hf(idx).logits


def our_logits(model, idx):
    with torch.no_grad():
        return model.eval()(idx, idx)[0]  # with targets: logits at every position


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, _transformers):
    """A random GPT-2 in Hugging Face format, as save_pretrained writes it (GPT-2's own gelu_new MLP)."""
    folder = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_SHAPE, bos_token_id=0, eos_token_id=0))
    with torch.no_grad():  # biases and norm gains away from their 0/1 init, so a mix-up would show
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture
def idx():
    return torch.randint(0, HF_SHAPE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("prefix", ["hf:", ""])
def test_load_gpt2_gives_transformers_logits(hf_dir, idx, prefix):
    model = load_gpt2(f"{prefix}{hf_dir}")
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size, c.bias) == (2, 2, 32, 64, 100, True)
    assert c.mlp == "gelu_tanh"  # GPT-2's own activation ('gelu_new')
    assert model.lm_head.weight is model.transformer.wte.weight
    assert (our_logits(model, idx) - hf_logits(hf_dir, idx)).abs().max() <= 1e-5


def test_export_hf_round_trip(hf_dir, idx, tmp_path):
    model = load_gpt2(f"hf:{hf_dir}")
    export_hf(model, tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "export" / "config.json").read_text())["activation_function"] == "gelu_new"
    assert (hf_logits(tmp_path / "export", idx) - our_logits(model, idx)).abs().max() <= 1e-5
    assert load_gpt2(str(tmp_path / "export")).state_dict().keys() == model.state_dict().keys()


def test_export_hf_without_biases_writes_zero_biases(idx, tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=100, bias=False))
    export_hf(model, tmp_path / "nobias")
    assert (hf_logits(tmp_path / "nobias", idx) - our_logits(model, idx)).abs().max() <= 1e-5


@pytest.mark.parametrize("option, words", [
    (dict(pos_emb="rope"), ["pos_emb='learned'", "'rope'"]),
    (dict(norm="rmsnorm"), ["norm='layernorm'"]),
    (dict(mlp="swiglu"), ["mlp='gelu'"]),
    (dict(n_kv_head=1), ["n_kv_head"]),
])
def test_export_hf_names_the_option_gpt2_lacks(tmp_path, option, words):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50, **option))
    with pytest.raises(UserError) as e:
        export_hf(model, tmp_path / "x")
    assert all(w in str(e.value) for w in words), str(e.value)


def test_load_gpt2_errors_are_readable(tmp_path):
    with pytest.raises(UserError, match="no folder"):
        load_gpt2(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(UserError, match="no config.json"):
        load_gpt2(f"hf:{tmp_path}")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="not a GPT-2 model.*'llama'"):
        load_gpt2(f"hf:{tmp_path}")


def test_load_gpt2_refuses_a_folder_missing_a_tensor(hf_dir, tmp_path):
    """transformers would start the missing tensor from random values, and training would go on with them."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(hf_dir, tmp_path / "damaged")
    tensors = load_file(str(tmp_path / "damaged" / "model.safetensors"))
    del tensors["transformer.h.1.attn.c_proj.weight"]
    save_file(tensors, str(tmp_path / "damaged" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"lacks transformer\.h\.1\.attn\.c_proj\.weight.*random values"):
        load_gpt2(f"hf:{tmp_path / 'damaged'}")


# top-k > 1 only: with top-1 the gate is the router's probability (renormalising it would make it 1.0 and
# starve the router, so MoEConfig refuses that), and the upcycled model is the dense one scaled per token
@pytest.mark.parametrize("top_k, every, impl", [(2, 1, "loop"), (2, 2, "loop"), (2, 1, "grouped"), (4, 1, "loop")])
def test_upcycled_moe_computes_the_dense_logits(hf_dir, idx, top_k, every, impl):
    dense = load_gpt2(f"hf:{hf_dir}")
    moe = MoEGPT.from_dense(dense, MoEConfig(**asdict(dense.config), n_experts=4, moe_top_k=top_k,
                                             moe_every=every, moe_impl=impl))
    assert len(moe.moe_layers()) == (2 if every == 1 else 1)
    for layer in moe.moe_layers():
        assert torch.equal(layer.experts.c_fc[3], layer.experts.c_fc[0])  # every expert is the same MLP
        assert 0 < layer.router.weight.std() < 0.05
    torch.testing.assert_close(our_logits(moe, idx), our_logits(dense, idx), rtol=1e-5, atol=1e-5)


def test_upcycle_refuses_experts_that_cannot_copy_the_mlp(hf_dir):
    dense = load_gpt2(f"hf:{hf_dir}")
    with pytest.raises(UserError, match="expert_hidden"):
        MoEGPT.from_dense(dense, MoEConfig(**asdict(dense.config), n_experts=4, expert_hidden=64))
    with pytest.raises(UserError, match="n_embd"):
        MoEGPT.from_dense(dense, MoEConfig(**{**asdict(dense.config), "n_embd": 64}, n_experts=4))


def test_model_for_training_takes_shape_from_checkpoint(hf_dir):
    from train import KEYS
    cfg = {**{k: key.default for k, key in KEYS.items()}, "init_from": f"hf:{hf_dir}", "block_size": 32, "n_experts": 4, "moe_every": 2}
    model = model_for_training(cfg)  # DEFAULTS' n_layer=12 etc. are not explicit: the checkpoint's win
    assert (type(model).__name__, model.config.n_layer, model.config.block_size) == ("MoEGPT", 2, 32)
    with pytest.raises(UserError, match="n_layer: config 12 vs checkpoint 2"):
        model_for_training(cfg, explicit={"n_layer"})
    with pytest.raises(UserError, match="block_size=128 is larger"):
        model_for_training({**cfg, "block_size": 128})


# ---- the command lines (in this process: most of a subprocess's time would be importing torch and transformers)

@pytest.fixture(scope="module")
def runs(tmp_path_factory, shakespeare_data, hf_dir):
    """Three tiny train.py runs: 'scratch' (dense, 3 iterations), and 2 iterations from the Hugging Face
    folder with --init_from=hf:DIR, 'dense' and 'moe' (upcycled to 4 experts, top-2)."""
    work = tmp_path_factory.mktemp("runs")
    common = ["train.py", "--dataset=shakespeare_char", f"--data_root={shakespeare_data}", *TINY_MODEL, *TINY_RUN]
    from_hf = [f"--init_from=hf:{hf_dir}", "--max_iters=2", "--eval_interval=2"]
    extra = {"scratch": ["--max_iters=3", "--eval_interval=3"], "dense": from_hf,
             "moe": [*from_hf, "--n_experts=4", "--moe_top_k=2"]}
    for name, args in extra.items():
        assert_ok(run_script([*common, f"--out_dir={work / name}", *args], cwd=work))
    return {name: work / name for name in extra}


def metrics(out_dir):
    with open(out_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_train_from_hf_upcycled_first_step_loss_equals_dense(runs):
    dense, moe = metrics(runs["dense"]), metrics(runs["moe"])
    first = [next(r for r in recs if r["type"] == "train" and r["iter"] == 0) for recs in (dense, moe)]
    assert "balance" in first[1] and "balance" not in first[0]
    # 'loss' is the cross-entropy alone (the balance and z losses are logged beside it)
    assert first[1]["loss"] == pytest.approx(first[0]["loss"], rel=1e-5)
    evals = [next(r for r in recs if r["type"] == "eval" and r["iter"] == 0) for recs in (dense, moe)]
    assert evals[1]["val_loss"] == pytest.approx(evals[0]["val_loss"], rel=1e-5)
    ckpt = load_checkpoint(str(runs["moe"] / "ckpt.pt"))
    assert ckpt["model_args"]["n_experts"] == 4
    assert ckpt["model_args"]["block_size"] == 32 and ckpt["model_args"]["vocab_size"] == 100


def test_export_cli_writes_what_transformers_loads(tmp_path, runs):
    out = runs["scratch"]
    ok = run_script(["tools.export", f"--out_dir={out}", f"--hf_dir={tmp_path / 'hf'}"], cwd=tmp_path)
    assert_ok(ok)
    moe = run_script(["tools.export", f"--out_dir={runs['moe']}"], cwd=tmp_path)
    assert "GPT2LMHeadModel.from_pretrained" in ok.stdout
    model = model_from_checkpoint(load_checkpoint(str(out / "ckpt.pt")))
    idx = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2))
    assert (hf_logits(tmp_path / "hf", idx) - our_logits(model, idx)).abs().max() <= 1e-5

    assert_user_error(moe, "GPT2LMHeadModel has no experts")
    assert not (runs["moe"] / "hf").exists()
