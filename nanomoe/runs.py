"""
A run's checkpoint as the tools that only read it see it (sample.py, tools.export, tools.experts): one dict
with the weights, whatever the run saved. Its own module because it needs both formats: nanomoe/checkpoint.py
(files) and nanomoe/distributed/checkpoint.py (sharded, which builds on the first; torch's DCP is imported only
when a sharded checkpoint is read, as it takes seconds to import).
"""
import os

from nanomoe.checkpoint import SHARDED, latest_checkpoint, load_checkpoint


def read_checkpoint(out_dir, name="ckpt.pt", needs=()):
    """out_dir/name, or the sharded ckpt.dcp (name ckpt.dcp, or the default ckpt.pt when a sharded run saved
    last) read from its shards in this process, without a consolidation step."""
    if name == SHARDED or name == "ckpt.pt" and latest_checkpoint(out_dir).endswith(SHARDED):
        from nanomoe.distributed.checkpoint import read_sharded
        return read_sharded(os.path.join(out_dir, SHARDED), needs)
    return load_checkpoint(os.path.join(out_dir, name), needs)
