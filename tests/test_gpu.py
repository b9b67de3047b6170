"""
What a GPU run relies on, checked on the CPU: a training step and generation never make the host wait for the
device (conftest.HostSyncs counts every place that would), a save reads its finiteness check once, float32
matmuls on CUDA use TF32, and MFU reads each GPU against its own peak. (Expert parallel and DDP: the same count
in test_distributed.py; the compiled bf16 MoE: test_moe_grouped.py.)
"""
import os
from types import SimpleNamespace

import pytest
import torch

import train
from conftest import HostSyncs
from nanomoe.device import peak_flops_of, pick_device
from nanomoe.factory import build_model
from nanomoe.optim import configure_optimizers

TINY = dict(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
MOE = dict(TINY, n_experts=4, moe_top_k=2)
MAMBA = dict(mamba_layers=[0], mamba2_num_heads=4, mamba2_head_dim=16, mamba2_state_size=8, mamba2_chunk_size=4)
ONE_PROCESS = SimpleNamespace(ddp=False, world_size=1, sharding=(), device_type="cpu")

# a GPU run's defaults: bf16 autocast, moe_impl='auto' (the grouped kernel), fused AdamW
STEPS = {"dense": TINY, "moe": MOE, "moe-capacity": dict(MOE, capacity_factor=1.0),
         "moe-aux_free": dict(MOE, balance_mode="aux_free"), "moe-global-balance": dict(MOE, balance_scope="global"),
         "hybrid-moe": dict(MOE, n_layer=3, **MAMBA)}


@pytest.mark.parametrize("case", STEPS)
def test_a_training_step_never_waits_for_the_device(case):
    """train.train_step, two micro-steps under bf16 autocast: the loss, the auxiliary losses, clipping, the
    non-finite check and the skip all stay on the device (the log reads them, at log steps only)."""
    torch.manual_seed(0)
    model = build_model(STEPS[case])
    optimizer = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 32, (2, 16), generator=gen), torch.randint(0, 32, (2, 16), generator=gen))
               for _ in range(2)]
    ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    with HostSyncs() as syncs:
        for _ in range(2):  # the first step creates Adam's moments
            stats, _, skipped = train.train_step(model, model, optimizer, scaler, batches, ctx, ONE_PROCESS, 1.0)
    assert syncs.total() == 0, syncs
    assert torch.isfinite(stats["loss"]) and not skipped  # it did train


def test_generation_never_waits_for_the_device():
    """Top-k sampling with the cache: the token ids stay on the device until the caller reads them."""
    torch.manual_seed(0)
    model = build_model(dict(MOE, n_layer=3, **MAMBA)).eval()
    with HostSyncs() as syncs:
        out = model.generate(torch.zeros(2, 3, dtype=torch.long), 20, top_k=5)
    assert syncs.total() == 0, syncs
    assert out.shape == (2, 23)


def test_a_save_reads_its_finiteness_check_once(tmp_path):
    """One check over every parameter on the device, one read of its answer; a non-finite parameter is still
    caught and nothing is written."""
    torch.manual_seed(0)
    model = build_model(MOE)
    run = SimpleNamespace(cfg=SimpleNamespace(out_dir=str(tmp_path)), proc=SimpleNamespace(ddp=False, sharding=(),
                                                                                          master=True),
                          raw_model=model, optimizer=configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu"),
                          scaler=torch.amp.GradScaler("cpu", enabled=False), batch_gen=torch.Generator(),
                          tokenizer={}, data_fingerprint={}, ckpt_path=str(tmp_path / "ckpt.pt"))
    assert len(list(model.parameters())) > 10
    with HostSyncs() as syncs:
        train.save(run, "test", 1, 2.0)
    assert syncs.total() == 1, syncs
    assert os.path.exists(run.ckpt_path)
    os.remove(run.ckpt_path)
    with torch.no_grad():
        model.transformer.h[1].mlp.experts.c_proj[2, 0, 0] = float("nan")
    train.save(run, "test", 2, 2.0)
    assert not os.path.exists(run.ckpt_path)


def test_cuda_runs_float32_matmuls_on_tf32(monkeypatch):
    before = torch.get_float32_matmul_precision()
    try:
        assert pick_device("cpu") == "cpu" and torch.get_float32_matmul_precision() == before == "highest"
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert pick_device("auto") == "cuda"
        assert torch.get_float32_matmul_precision() == "high"  # TF32 (nanomoe/device.use_tf32 says why)
    finally:
        torch.set_float32_matmul_precision(before)


# what torch.cuda.get_device_name says on each part -> its bf16 dense peak (NVIDIA's datasheets)
GPU_NAMES = {
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA B200": 2250e12,
    "NVIDIA L4": 121e12,
    # unknown: no MFU rather than another part's peak
    "NVIDIA L40S": None,
    "NVIDIA GH200 480GB": None,
    "NVIDIA GB200": None,
    "Tesla V100-SXM2-16GB": None,
}


@pytest.mark.parametrize("name", GPU_NAMES)
def test_mfu_reads_each_gpu_against_its_own_peak(name):
    assert peak_flops_of(name) == GPU_NAMES[name]
