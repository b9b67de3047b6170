"""
Write a sharded checkpoint (OUT_DIR/ckpt.dcp, saved by train.py --fsdp or --ep_size) as one ordinary
checkpoint file, for an unsharded resume or to copy elsewhere (sample.py, tools.export and tools.experts read
ckpt.dcp directly and need no consolidation):

    python -m tools.consolidate out-gpt2-moe                 # -> out-gpt2-moe/consolidated.pt
    python -m tools.consolidate out-gpt2-moe --dest moe.pt

A file that exists already is replaced only with --force; a --dest without an extension gets .pt.
"""
import os
import sys

from nanomoe.checkpoint import CONSOLIDATED, SHARDED
from nanomoe.cli import ArgumentParser, run_cli
from nanomoe.distributed.checkpoint import consolidate
from nanomoe.errors import UserError
from nanomoe.files import check_writable_folder


def main(argv):
    parser = ArgumentParser(prog="python -m tools.consolidate",
                            description="Write a sharded checkpoint (OUT_DIR/ckpt.dcp, saved by train.py --fsdp or "
                                        "--ep_size) as one ordinary checkpoint file.")
    parser.add_argument("out_dir", help="the training run's folder")
    parser.add_argument("--dest", help=f"the file to write (default OUT_DIR/{CONSOLIDATED}; .pt is added to a "
                                       f"name without an extension)")
    parser.add_argument("--force", action="store_true", help="replace the file if it exists")
    args = parser.parse_args(argv)
    if not os.path.lexists(os.path.join(args.out_dir, SHARDED)):
        raise UserError(f"{args.out_dir} has no sharded checkpoint ({SHARDED}); a run without --fsdp / --ep_size "
                        f"saves ckpt.pt, which needs no conversion")
    dest = check_dest(os.path.join(args.out_dir, CONSOLIDATED) if args.dest is None else args.dest, args.force)
    dest = consolidate(args.out_dir, dest)
    beside = os.path.dirname(os.path.abspath(dest)) == os.path.abspath(args.out_dir)
    print(f"wrote {dest}" + (f": python sample.py --out_dir={args.out_dir} --ckpt={os.path.basename(dest)}"
                             if beside else ""))


def check_dest(dest, force):
    """The file to write, checked before the checkpoint is read: a name (completed with .pt), in a folder that
    exists and takes files, not over a folder, nor over a file without --force."""
    if not dest or dest.endswith(("/", os.sep)) or os.path.isdir(dest):
        raise UserError(f"--dest {dest!r} is not a file name: name the file to write, e.g. --dest moe.pt")
    if not os.path.splitext(dest)[1]:
        dest += ".pt"
    folder = os.path.dirname(dest) or "."
    check_writable_folder(folder, "the folder of --dest", "--dest")
    if not os.path.isdir(folder):
        raise UserError(f"--dest {dest}: the folder {folder} does not exist; create it first")
    if os.path.exists(dest) and not force:
        raise UserError(f"{dest} already exists; add --force to replace it, or choose another --dest")
    return dest


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
