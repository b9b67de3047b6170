"""
Writing a file all or nothing, the one way every file we write in place is written (checkpoints, meta.json,
token files, logs): a temporary name in the same folder, fsync, an atomic rename.
"""
import errno
import os
from contextlib import contextmanager

from nanomoe.errors import UserError


def temp_path(path):
    """Where path is written before it is renamed into place: a hidden name in the same folder (so the rename
    is atomic) with our pid (so two processes never write over each other's temp file). train.py removes
    leftovers of killed runs by the '.tmp-' prefix."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".tmp-{name}.{os.getpid()}")


def replace_durably(tmp, path):
    """Rename tmp over path and fsync the folder, so the rename itself survives a power cut."""
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path, mode="wb", **open_kwargs):
    """Write path all or nothing, the one way every file we write in place is written:

        with atomic_write("out/ckpt.pt") as f:
            torch.save(ckpt, f)

    The file is written under temp_path(path), flushed and fsync'ed, then renamed over path. On any failure
    (disk full, Ctrl-C) the temp file is removed and path is as it was; a full disk is a UserError that says
    so."""
    tmp = temp_path(path)
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the file
        replace_durably(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(disk_full_message(path)) from None
        raise


def disk_full_message(path):
    return (f"the disk is full: no space left to write {path} (what was there before is unchanged); "
            f"free some space, then run the command again")
