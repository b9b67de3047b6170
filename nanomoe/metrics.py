"""
out_dir/metrics.jsonl: one JSON object per line, written by train.py (MetricsLog) and read by tools.plot,
tools.study and the tests (read_metrics). Records have a "type" ("train" for a log line, "eval", "skip" for a skipped
non-finite step) and an "iter"; docs/reliability.md lists their fields.
"""
import errno
import json
import math
import os
import sys

from nanomoe.errors import UserError
from nanomoe.files import atomic_write, disk_full_message


class MetricsLog:
    """out_dir/metrics.jsonl: one JSON object per log line and per eval, appended and flushed, so it can be
    read (plotted) while the run goes on. mode: 'new' keeps an earlier run's log as metrics.jsonl.1 (.2, ...),
    'resume' drops the records after the checkpoint's iteration (the resumed run redoes them), 'append'
    (eval_only) leaves everything there."""

    def __init__(self, path, mode, resume_iter=None):
        self.path = path
        if mode == "resume" and os.path.exists(path):
            kept = records_before(path, resume_iter)
            with atomic_write(path, "w", encoding="utf-8") as f:
                f.writelines(kept)
        elif mode == "new" and os.path.exists(path):
            n = 1
            while os.path.exists(f"{path}.{n}"):
                n += 1
            os.replace(path, f"{path}.{n}")  # never mixed into the new run's log, never lost
        self.file = open(path, "a")

    def write(self, record):
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UserError(disk_full_message(self.path)) from None
            raise


def records_before(path, resume_iter):
    """The lines of a metrics log whose records come before iteration resume_iter (a resumed run redoes the
    rest). The last line may be torn by a crash mid-write: it is dropped. Any other line that is not a record
    (not UTF-8, not JSON, no number for iter) is a UserError naming it: resuming would lose or keep it blindly."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    last = max([n for n, line in enumerate(lines, 1) if line.strip()], default=0)
    kept = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
            it = record["iter"]
            assert isinstance(it, (int, float)) and not isinstance(it, bool) and math.isfinite(it)
        except Exception:
            if n == last:
                break  # torn by a crash mid-write
            raise UserError(f"{path} line {n} is damaged (not a JSON record with a number for 'iter'); fix or "
                            f"delete that line, or move the log away, then resume again") from None
        if it < resume_iter:
            kept.append(raw.decode("utf-8") + "\n")
    return kept


def read_metrics(run_dir):
    """The records of run_dir/metrics.jsonl in iteration order. A line that is not a record (not JSON, or a
    field of the wrong type: record_problem) is skipped with a warning naming the line; the last line is
    skipped silently when it is not JSON (train.py is writing it)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"no metrics.jsonl in '{run_dir}' (give the out_dir of a train.py run)")
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if i < len(lines) - 1 and any(rest.strip() for rest in lines[i + 1:]):
                print(f"warning: {path} line {i + 1} is not JSON; skipped", file=sys.stderr)
            continue
        problem = record_problem(record)
        if problem:
            print(f"warning: {path} line {i + 1} {problem}; skipped", file=sys.stderr)
            continue
        records.append(record)
    if not records:
        raise UserError(f"{path} has no records yet (the run logs its first one after the first eval or step)")
    return sorted(records, key=lambda r: r["iter"])  # stable: a step's eval stays before its train line


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def record_problem(record):
    """Why a metrics record cannot be plotted as train.py writes it (-> None when it can): a dict with a string
    type, a whole number iter, numbers (or null) for its other fields, and for an expert load (layers x
    experts) a non-empty table of numbers."""
    if not isinstance(record, dict):
        return f"is a JSON {type(record).__name__}, not a record"
    if not isinstance(record.get("type"), str):
        return "has no string 'type'"
    if not isinstance(record.get("iter"), int) or isinstance(record["iter"], bool) or record["iter"] < 0:
        return f"has iter {record.get('iter')!r}, not a whole number"
    for k, v in record.items():
        if k in ("type", "iter") or v is None or is_number(v):
            continue
        if k.endswith("expert_load"):
            if not (isinstance(v, list) and v and all(isinstance(row, list) and row and len(row) == len(v[0])
                                                      and all(map(is_number, row)) for row in v)):
                return f"has {k} {str(v)[:40]}, not a table of numbers (MoE layers x experts)"
            continue
        if not (isinstance(v, list) and all(map(is_number, v))):  # a per-layer list is fine
            return f"has {k} {v!r:.40}, not a number"
    return None
