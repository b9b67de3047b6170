"""
The optimizer, built in one place for train.py, tools/ and the sharded-checkpoint reader: AdamW, with weight
decay decided by what a parameter is.
"""
import inspect

import torch
import torch.nn as nn

from nanomoe.layers.fgram import FGram
from nanomoe.layers.mamba2 import Mamba2


def decays(module, name):
    """Whether parameter `name` of `module` gets weight decay: the weight matrices do (linear layers,
    embeddings, the router, the experts' stacked weights); biases, norm gains, the F-gram scales and Mamba2's
    A_log and D do not (dt_bias ends in "bias": none, as Mamba2 does). Decided by kind, not by rank: the
    experts' stacked biases are 2-D and the F-gram tables are embeddings."""
    if name.endswith("bias") or isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return False
    if isinstance(module, FGram) and name == "scale":
        return False
    if isinstance(module, Mamba2) and name in ("A_log", "D"):
        return False
    return True


def configure_optimizers(model, weight_decay, learning_rate, betas, device_type):
    """AdamW over model's trainable parameters: one group with weight_decay (decays()), one without. Fused
    where torch has the kernel (CUDA, CPU): it can also skip a step on the device (the training step's
    non-finite check sets optimizer.found_inf, no host sync)."""
    no_decay = {id(p) for m in model.modules() for name, p in m.named_parameters(recurse=False)
                if not decays(m, name)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]
    # FSDP with expert parallel (distributed/parallel.shard): FSDP's parameters are DTensors, the experts plain
    # tensors, and one fused update cannot take both kinds: each kind gets groups of its own
    sharded = {id(p) for p in params if hasattr(p, "to_local")}  # DTensor, without importing it
    if 0 < len(sharded) < len(params):
        groups = [{**g, "params": [p for p in g["params"] if (id(p) in sharded) == kind]}
                  for kind in (True, False) for g in groups]
    fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))
