"""
The stages of an MoE layer, named as torch.profiler ranges so that `python -m tools.bench
--bench_profile=True` can say where the layer's time goes. moe_model.py and grouped_experts.py wrap each
stage's forward ops in `stage(name)`; bench adds to a stage the backward of every op run inside it (the
autograd sequence number links the two). Outside a profiler a range costs a few microseconds of Python (a
dozen per MoE layer per step; docs/clock.md measures no difference), and torch.compile traces through it.
"""
from torch.profiler import record_function

STAGES = {  # name -> what the bench table calls it
    "router": "router + top-k",
    "count": "counting (per-expert counts, capacity)",
    "permute": "permute (sort + gather)",
    "experts": "expert GEMMs (+ activation, shared)",
    "combine": "combine (weight + scatter)",
    "stats": "balance statistics",
}
PREFIX = "moe."


def stage(name):
    """A profiler range around one stage (a key of STAGES) of an MoE layer's forward."""
    return record_function(PREFIX + name)
