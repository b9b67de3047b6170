"""
What every script does the same way: bad input ends as one 'error: ...' line with exit code 2 (run_cli), argparse
usage mistakes too (ArgumentParser), a progress line on a terminal, durations at a glance, matplotlib when a
tool draws.
"""
import argparse
import os
import sys
import time

from nanomoe.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse for prepare.py and tools/, whose usage mistakes end like every other bad input: one
    'error: ...' line and exit 2, instead of argparse's usage dump. No abbreviations: argparse would read
    `--seed 3` as `--seeds 3`, a different setting than the one written."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        raise UserError(f"{message} (see: {self.prog} --help)")


def run_cli(main):
    """Run main() the way every script runs: a UserError is one 'error: ...' line on stderr and exit code 2
    (no traceback); Ctrl-C before a script handles it exits quietly with 130; a reader that closes our
    stdout (`train.py | head`) stops the printing, not the run. Under torchrun every rank meets the same bad
    input: rank 0 alone prints the line (torchrun's own failure summary may follow it)."""
    stdout, sys.stdout = sys.stdout, PipeSafeStdout(sys.stdout)
    try:
        main()
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        sys.stdout.flush()
        sys.stdout = stdout


class PipeSafeStdout:
    """sys.stdout that, once its reader has gone (BrokenPipeError), sends the rest to /dev/null."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.stream.fileno())  # what is still buffered goes there too
        os.close(devnull)

    def __getattr__(self, name):
        return getattr(self.stream, name)


class Progress:
    """A single status line on stderr, rewritten with \\r; only on a terminal, so logs stay clean."""

    force_on = False  # a script's --progress flag: also when stderr is not a terminal

    def __init__(self):
        self.on = self.force_on or sys.stderr.isatty()
        self.last = 0.0
        self.shown = False

    def update(self, msg, force=False):
        now = time.monotonic()
        if self.on and (force or now - self.last > 0.1):  # ~10 redraws/s is plenty and costs nothing
            print(f"\r{msg}\033[K", end="", file=sys.stderr, flush=True)
            self.last, self.shown = now, True

    def done(self):
        if self.shown:
            print(file=sys.stderr)


def pyplot(who_needs_it):
    """matplotlib's pyplot, for the tools that draw files, imported only when one does (it is optional, and slow
    to import); missing, it is one error line: '<who_needs_it>: pip install matplotlib'."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(f"{who_needs_it}: pip install matplotlib") from None
    return plt


def duration(seconds):
    """48d07h, 3h05m, 4m10s, 12s: how long, at a glance."""
    seconds = int(seconds)
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"
