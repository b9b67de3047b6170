"""
Write a sharded checkpoint (OUT_DIR/ckpt.dcp, saved by train.py --fsdp or --ep_size) as one ordinary
checkpoint file, for sample.py, tools.export and an unsharded resume:

    python -m tools.consolidate out-gpt2-moe                 # -> out-gpt2-moe/consolidated.pt
    python -m tools.consolidate out-gpt2-moe --dest moe.pt
"""
import os
import sys

from nanomoe.checkpoint import CONSOLIDATED, SHARDED
from nanomoe.cli import ArgumentParser, run_cli
from nanomoe.distributed.checkpoint import consolidate
from nanomoe.errors import UserError


def main(argv):
    parser = ArgumentParser(prog="python -m tools.consolidate",
                            description="Write a sharded checkpoint (OUT_DIR/ckpt.dcp, saved by train.py --fsdp or "
                                        "--ep_size) as one ordinary checkpoint file.")
    parser.add_argument("out_dir", help="the training run's folder")
    parser.add_argument("--dest", help=f"the file to write (default OUT_DIR/{CONSOLIDATED})")
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(args.out_dir, SHARDED)):
        raise UserError(f"{args.out_dir} has no sharded checkpoint ({SHARDED}); a run without --fsdp / --ep_size "
                        f"saves ckpt.pt, which needs no conversion")
    dest = consolidate(args.out_dir, args.dest)
    beside = os.path.dirname(os.path.abspath(dest)) == os.path.abspath(args.out_dir)
    print(f"wrote {dest}" + (f": python sample.py --out_dir={args.out_dir} --ckpt={os.path.basename(dest)}"
                             if beside else ""))


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
