"""
Writing a file all or nothing, the one way every file we write in place is written (checkpoints, meta.json,
token files, logs): a temporary name in the same folder, fsync, an atomic rename.
"""
import errno
import os
import tempfile
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
        if is_disk_full(e):
            raise UserError(disk_full_message(path)) from None
        raise


def is_disk_full(e, depth=0):
    """e says the disk (or the quota) is full: an OSError, a library writing from native code (safetensors:
    "I/O error: No space left on device (os error 28)"), or an error that wraps one (its cause, or the ranks'
    failures of torch.distributed.checkpoint's CheckpointException)."""
    if e is None or depth > 5:
        return False
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if any(f"os error {n})" in str(e) or f"[Errno {n}]" in str(e) for n in (errno.ENOSPC, errno.EDQUOT)):
        return True
    wrapped = list(getattr(e, "failures", {}).values()) if isinstance(getattr(e, "failures", None), dict) else []
    wrapped = [w for v in wrapped for w in (v if isinstance(v, (list, tuple)) else [v])]
    return any(is_disk_full(w, depth + 1) for w in [e.__cause__, e.__context__, *wrapped])


def check_writable_folder(path, key, flag=None):
    """Fail before anything is written if the folder `path` (the setting `key`, given as `flag`: --key by
    default) cannot be used: empty, a file, under a file, or where we may not write (permissions, a read-only
    filesystem). It need not exist yet."""
    flag = flag or f"--{key}"
    if not path:
        raise UserError(f"{key} is empty: name a folder ({flag}=path)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{key} '{path}' is a file, not a folder (choose another {flag})")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):  # the nearest folder that exists must let us create the rest
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"cannot create {key} '{path}': '{existing}' is a file (choose another {flag})")
    if not os.access(existing, os.W_OK) or not can_create_files(existing):
        raise UserError(f"{key} '{path}' is not writable (choose another {flag} or fix its permissions)")


def can_create_files(folder):
    """Whether a file can be created in folder: os.access says yes to root on a read-only mount and on special
    filesystems (/proc, /sys), so try it (an empty temp file, removed at once)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.remove(probe)
    return True


def disk_full_message(path):
    return (f"the disk is full: no space left to write {path} (what was there before is unchanged); "
            f"free some space, then run the command again")


def read_utf8(path, what, fix):
    """A user's text file (a config file, a prompt) as str; one line naming the file when it is not UTF-8 or
    cannot be read. what: 'config file', 'prompt file'; fix: what to do about another encoding."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{what} '{path}' is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                        f"{fix}") from None
    except OSError as e:
        raise UserError(f"cannot read {what} '{path}': {e.strerror or e}") from None


def missing_folder(folder):
    """The outermost folder of `folder`'s path that does not exist yet (None if folder exists): what a failure
    must remove again."""
    folder, missing = os.path.abspath(folder), None
    while not os.path.exists(folder):
        folder, missing = os.path.dirname(folder), folder
    return missing


def remove_if_empty(created):
    """Remove the folders we created (created = the outermost of them, missing_folder's answer before we made
    them) if nothing was left in them: a failure leaves no empty folder of ours behind."""
    if created is None:
        return
    for root, dirs, files in os.walk(created, topdown=False):
        if files:
            return
        try:
            os.rmdir(root)
        except OSError:  # something appeared in it meanwhile: it is not ours alone any more
            return
