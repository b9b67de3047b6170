"""
Turn text into train.bin / val.bin / meta.json under data/<name>/, the files train.py reads.

    python prepare.py shakespeare_char              # tiny-shakespeare, one token per character (65)
    python prepare.py shakespeare                   # the same text, GPT-2 BPE (50257)
    python prepare.py text --input notes/ --name notes --tokenizer char
    python prepare.py text --input /usr/lib/python3.12 --name pystdlib --glob '*.py' --exclude site-packages \
        --max_chars 20000000                        # the Python standard library's own source

train.bin and val.bin are the token ids as a raw numpy array (uint16, or uint32 for vocabularies over
65536), so train.py can np.memmap them. The first (1 - val_fraction) of the tokens is train, the rest val;
for a char tokenizer that is the same cut as splitting the text on characters, like nanoGPT.
Every output is written with nanomoe.files.atomic_write (a temp name, then a rename at the end), so a failed run
leaves the previous good files as they were and no temp files behind.
"""
import codecs
import fnmatch
import json
import os
import re
import signal
import stat
import sys
import time

if __name__ == "__main__":  # Ctrl-C while the imports below load: exit quietly with 130, no traceback
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))

import numpy as np
import requests

from nanomoe.cli import ArgumentParser, Progress, run_cli
from nanomoe.errors import UserError
from nanomoe.files import atomic_write, missing_folder, remove_if_empty
from nanomoe.tokenizer import GPT2_EOT, Tokenizer, token_dtype, write_meta

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATASETS = ("shakespeare_char", "shakespeare", "text")


def parse_args(argv):
    p = ArgumentParser(prog="python prepare.py", description="Tokenize text into data/<name>/{train.bin,val.bin,meta.json}.")
    p.add_argument("dataset", choices=DATASETS, help="shakespeare_char, shakespeare, or text (your own files)")
    p.add_argument("--input", help="text file (or, for 'text', a folder read recursively) instead of downloading")
    p.add_argument("--name", help="text only: output folder name (default: the input's name without extension)")
    p.add_argument("--tokenizer", choices=("char", "gpt2"), help="text only: char (default) or gpt2")
    p.add_argument("--glob", action="append", default=None, metavar="PATTERN",
                   help="text folder only: read the files whose name matches (e.g. '*.py'); repeatable")
    p.add_argument("--exclude", action="append", default=[], metavar="NAME",
                   help="text folder only: skip folders with this name (e.g. site-packages); repeatable")
    p.add_argument("--max_chars", type=int, default=None,
                   help="text only: read at most this many characters (files in path order, the last one cut)")
    p.add_argument("--val_fraction", type=float, default=0.1, help="share of tokens held out for val (default 0.1)")
    p.add_argument("--data_root", default="data", help="where dataset folders go (default: data)")
    p.add_argument("--url", default=SHAKESPEARE_URL, help="shakespeare*: where to download input.txt from")
    p.add_argument("--retries", type=int, default=3, help="download retries after the first try (default 3)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a download may stall (default 30)")
    p.add_argument("--encoding", default="utf-8",
                   help="how the input text is encoded (default utf-8; e.g. latin-1, utf-16, cp1252)")
    p.add_argument("--force", action="store_true", help="replace a different dataset already in the output folder")
    p.add_argument("--progress", action="store_true", help="show progress even when stderr is not a terminal")
    args = p.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val_fraction must be between 0 and 1 (exclusive), got {args.val_fraction}")
    if args.timeout <= 0:
        raise UserError(f"--timeout must be more than 0 seconds, got {args.timeout}")
    if args.retries < 0:
        raise UserError(f"--retries must be 0 or more, got {args.retries}")
    try:
        codecs.lookup(args.encoding)
    except LookupError:
        raise UserError(f"--encoding {args.encoding!r} is not an encoding Python knows (e.g. utf-8, latin-1, "
                        f"utf-16, cp1252)") from None
    if args.max_chars is not None and args.max_chars < 1:
        raise UserError(f"--max_chars must be at least 1, got {args.max_chars}")
    if args.dataset == "text":
        if args.input is None:
            raise UserError("the text dataset needs --input PATH (a text file or a folder of them)")
    else:
        for opt in ("name", "tokenizer", "glob", "max_chars", "exclude"):
            if getattr(args, opt) not in (None, []):
                raise UserError(f"--{opt} is only for the text dataset "
                                f"(use: python prepare.py text --input PATH --{opt} ...)")
    return args


def mib(n):
    return f"{n / 2**20:.1f} MiB"


# -----------------------------------------------------------------------------
# download (tiny-shakespeare only)

class Truncated(Exception):
    """The body ended before Content-Length bytes (or was empty): worth a retry, never worth keeping."""


def download_once(url, dest, timeout):
    """One try at url, written to dest all or nothing: a short or empty body leaves dest as it was."""
    # identity encoding: otherwise Content-Length counts gzip bytes and can't be checked against what we save
    with requests.get(url, stream=True, timeout=timeout, headers={"Accept-Encoding": "identity"}) as r:
        r.raise_for_status()
        expected = int(r.headers.get("Content-Length", 0)) or None
        got, progress = 0, Progress()
        with atomic_write(dest) as f:
            for chunk in r.iter_content(chunk_size=1 << 16):
                f.write(chunk)
                got += len(chunk)
                progress.update(f"downloading: {mib(got)}" + (f" / {mib(expected)}" if expected else ""))
            progress.done()
            # urllib3 usually raises on a short body itself; this check also covers servers/versions that don't
            if expected is not None and got != expected:
                raise Truncated(f"got {got} of {expected} bytes, the connection closed early")
            if got == 0:
                raise Truncated("the server sent an empty file")


def describe(e):
    """A short one-line reason: requests' own messages run to several hundred characters."""
    if isinstance(e, requests.HTTPError) and e.response is not None:
        return f"HTTP {e.response.status_code} {e.response.reason}"
    if isinstance(e, Truncated):
        return f"truncated: {e}"
    if isinstance(e, requests.exceptions.ChunkedEncodingError):
        return "truncated: the connection closed before the whole file arrived"
    # requests wraps the real cause (refused, DNS, timeout) in urllib3 errors; show only the innermost one
    reason = getattr(e.args[0], "reason", None) if e.args else None
    msg = " ".join(str(reason or e).split())
    if msg.startswith("HTTP"):
        msg = msg.split("): ", 1)[-1]  # drop the "HTTPSConnectionPool(host=..., port=...): " prefix
    return f"{type(e).__name__}: {msg[:160]}" + ("..." if len(msg) > 160 else "")


def download(url, dest, retries, timeout, dataset):
    """Fetch url into dest, retrying network trouble; an interrupted download never looks finished."""
    print(f"downloading {url}")
    created = missing_folder(os.path.dirname(dest))
    try:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        for attempt in range(retries + 1):
            try:
                download_once(url, dest, timeout)
                return
            except (requests.RequestException, Truncated) as e:
                error = e
                http_error = isinstance(e, requests.HTTPError) and e.response is not None
                status = e.response.status_code if http_error else None
                # 4xx (other than rate limiting) will not change on a retry; network trouble and 5xx may
                if (status is not None and status < 500 and status != 429) or attempt == retries:
                    break
                wait = 2 ** attempt
                print(f"download failed ({describe(e)}); retrying in {wait}s", file=sys.stderr)
                time.sleep(wait)
    except OSError as e:  # after RequestException, which is an OSError too: this one is our own disk
        remove_if_empty(created)
        raise UserError(f"could not write {dest} ({e.strerror or e})") from None
    except BaseException:
        remove_if_empty(created)
        raise
    remove_if_empty(created)  # a failed download leaves no empty dataset folder
    raise UserError(f"could not download tiny-shakespeare from {url} ({describe(error)}); download it by hand "
                    f"and run: python prepare.py {dataset} --input path/to/input.txt")


def already_prepared(out_dir, kind):
    """Whether out_dir holds a complete dataset of this tokenizer (meta.json, and .bin files of the sizes it
    records): then `prepare.py shakespeare_char` again has nothing to do, and does not go to the network."""
    try:
        with open(os.path.join(out_dir, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        itemsize = np.dtype(meta["dtype"]).itemsize
        return meta["tokenizer"] == kind and all(
            os.path.getsize(os.path.join(out_dir, f"{split}.bin")) == meta[f"{split}_tokens"] * itemsize
            for split in ("train", "val"))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def shakespeare_input(args, out_dir):
    """(path, source) of the text: --input if given, else an input.txt already on disk (shakespeare can reuse
    shakespeare_char's), else a fresh download, recorded in meta.json by its URL."""
    if args.input is not None:
        if not os.path.isfile(args.input):
            raise UserError(f"input file not found: {args.input} (pass the path to tiny-shakespeare's input.txt, "
                            f"or leave out --input to download it)")
        return args.input, args.input
    for folder in (out_dir, os.path.join(args.data_root, "shakespeare_char")):
        path = os.path.join(folder, "input.txt")
        if os.path.isfile(path):
            print(f"using {path}")
            return path, path
    dest = os.path.join(out_dir, "input.txt")
    download(args.url, dest, args.retries, args.timeout, args.dataset)
    return dest, args.url


# -----------------------------------------------------------------------------
# reading text

def read_text(path, encoding="utf-8"):
    """File contents as str, or None for a binary file or one not in `encoding`. Bytes are decoded as-is (no
    newline translation), so the prepared tokens decode back to exactly the file's text."""
    with open(path, "rb") as f:
        data = f.read()
    if b"\0" in data and not encoding.lower().replace("-", "").startswith(("utf16", "utf32")):
        return None  # NUL bytes: an image, a .pyc, a zip... not text even if it happens to decode
    if codecs.lookup(encoding).name == "utf-8":
        encoding = "utf-8-sig"  # drops a leading byte-order mark, which is not part of the text
    try:
        return data.decode(encoding)
    except UnicodeDecodeError:
        return None


def list_files(folder, skip_dir, globs=None, exclude=()):
    """Every plain file under folder, sorted by path, leaving out hidden files and folders (.git, .venv, ...),
    named pipes, devices and symlinks that lead out of folder,
    the output folder itself (when preparing a folder that contains data/) and folders named in exclude;
    with globs, only files whose name matches one of them."""
    paths = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in exclude
                   and os.path.realpath(os.path.join(root, d)) != os.path.realpath(skip_dir)]
        paths += [os.path.join(root, f) for f in files if not f.startswith(".")
                  and (globs is None or any(fnmatch.fnmatch(f, g) for g in globs))]
    return sorted(p for p in paths if is_regular_file_inside(p, folder))


def is_regular_file_inside(path, folder):
    """A plain file (reading a named pipe or a device would hang or never end) that is inside folder, also
    when path is a symlink (a link may lead anywhere on the machine)."""
    real, top = os.path.realpath(path), os.path.realpath(folder)
    try:
        return stat.S_ISREG(os.stat(real).st_mode) and os.path.commonpath([real, top]) == top
    except (OSError, ValueError):
        return False  # a broken link, or one to another drive


def cap_chars(docs, max_chars):
    """The documents, in order, up to max_chars characters in all (the last one cut); all of them for None."""
    if max_chars is None:
        return docs
    out, total = [], 0
    for d in docs:
        if total >= max_chars:
            break
        out.append(d[:max_chars - total])
        total += len(out[-1])
    return out


def read_documents(path, out_dir, globs=None, exclude=(), encoding="utf-8"):
    """The input as a list of texts: one for a file, one per readable text file for a folder."""
    if os.path.isfile(path):
        try:
            text = read_text(path, encoding)
        except OSError as e:
            raise UserError(f"could not read {path} ({e.strerror})")
        if text is None:
            raise UserError(f"{path} is not {encoding} text (it is binary or in another encoding); give its "
                            f"encoding with --encoding (e.g. --encoding latin-1 or --encoding utf-16)")
        return [text]
    if not os.path.isdir(path):
        raise UserError(f"input not found: {path} (give a text file or a folder of text files)")
    paths = list_files(path, out_dir, globs, exclude)
    docs, skipped, progress = [], 0, Progress()
    for i, p in enumerate(paths):
        try:
            text = read_text(p, encoding)
        except OSError:  # unreadable (permissions, a dangling link): skip it like a binary file
            text = None
        if text is None:
            skipped += 1
        elif text:
            docs.append(text)
        progress.update(f"reading files: {i + 1}/{len(paths)}", force=i + 1 == len(paths))
    progress.done()
    skip_note = f", skipped {skipped} binary, not {encoding} or unreadable" if skipped else ""
    print(f"read {len(docs)} text files from {path}{skip_note}")
    return docs


def tokenize(tok, docs):
    """Token ids of all documents in order, with a separator between two documents: a newline for char,
    <|endoftext|> for gpt2 (GPT-2's own document boundary). A long document is encoded piece by piece, so
    a large single file shows progress too."""
    dtype = token_dtype(tok.vocab_size)
    total, done = sum(map(len, docs)), 0
    parts, progress = [], Progress()
    for i, doc in enumerate(docs):
        if i:
            parts.append(np.array(tok.encode(GPT2_EOT if tok.kind == "gpt2" else "\n"), dtype=dtype))
        for piece in pieces(doc):
            # one numpy array per piece: a python list of ints for a big corpus would take ~30x the memory
            parts.append(np.array(tok.encode(piece), dtype=dtype))
            done += len(piece)
            files = f" files: {i + 1}/{len(docs)}," if len(docs) > 1 else ":"
            progress.update(f"tokenizing{files} {done / total:.0%}", force=done == total)
    progress.done()
    return np.concatenate(parts)


# a cut right after a newline that has a non-space character on each side: GPT-2's pre-tokenizer never joins
# text across such a newline (unlike one inside a run of whitespace), so the pieces encode to the same ids as
# the whole; for char any cut would do
SAFE_CUT = re.compile(r"\S\n(?=\S)")
PIECE_CHARS = 1 << 20  # ~0.2 s of GPT-2 encoding: the progress line moves a few times a second


def pieces(text):
    """text in pieces of about PIECE_CHARS characters, cut only at SAFE_CUT (one piece if it has none)."""
    start = 0
    while len(text) - start > PIECE_CHARS:
        cut = SAFE_CUT.search(text, start + PIECE_CHARS)
        if cut is None:
            break
        yield text[start:cut.end()]
        start = cut.end()
    yield text[start:]


# -----------------------------------------------------------------------------
# writing

def write_outputs(out_dir, train_ids, val_ids, meta):
    """train.bin and val.bin written in full, then renamed into place together, then meta.json last: a
    meta.json always sits beside complete .bin files, and a failure before the renames (a full disk) changes
    nothing and leaves no folder of ours behind."""
    created = missing_folder(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
        with atomic_write(os.path.join(out_dir, "train.bin")) as train_f, \
                atomic_write(os.path.join(out_dir, "val.bin")) as val_f:
            train_ids.tofile(train_f)
            val_ids.tofile(val_f)
        write_meta(out_dir, meta)
    except OSError as e:
        remove_if_empty(created)
        raise UserError(f"could not write to {out_dir} ({e.strerror or e})") from None
    except BaseException:
        remove_if_empty(created)
        raise


def is_different_dataset(out_dir, train_ids, val_ids, meta):
    """Whether out_dir holds dataset files that are not exactly the ones about to be written."""
    paths = [os.path.join(out_dir, f) for f in ("meta.json", "train.bin", "val.bin")]
    if not any(os.path.exists(p) for p in paths):
        return False
    try:
        with open(paths[0], encoding="utf-8") as f:
            same_meta = json.load(f) == meta
        return not (same_meta and all(np.array_equal(np.fromfile(p, dtype=ids.dtype), ids)
                                      for p, ids in zip(paths[1:], (train_ids, val_ids))))
    except (OSError, ValueError):
        return True  # damaged or partial: different


def build_tokenizer(kind, docs):
    if kind == "gpt2":
        return Tokenizer("gpt2")
    chars = set().union(*map(set, docs))
    if len(docs) > 1:
        chars.add("\n")  # the separator tokenize() puts between documents
    return Tokenizer("char", "".join(sorted(chars)))  # ids in code point order, like nanoGPT


def main(argv=None):
    args = parse_args(argv)
    Progress.force_on = args.progress
    if args.dataset == "text":
        name = args.name or os.path.splitext(os.path.basename(os.path.abspath(args.input)))[0]
        kind = args.tokenizer or "char"
    else:
        name, kind = args.dataset, "char" if args.dataset == "shakespeare_char" else "gpt2"
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise UserError(f"--name must be a plain folder name, got '{name}'")
    out_dir = os.path.join(args.data_root, name)

    if args.dataset == "text":
        path, source = args.input, args.input
    else:
        if args.input is None and not args.force and already_prepared(out_dir, kind):
            print(f"{name} is already prepared in {out_dir}; nothing to do (--force prepares it again)")
            return
        path, source = shakespeare_input(args, out_dir)
    docs = read_documents(path, out_dir, args.glob, args.exclude, args.encoding) if args.dataset == "text" \
        else read_documents(path, out_dir, encoding=args.encoding)
    docs = cap_chars(docs, args.max_chars)
    if not any(docs):
        raise UserError(f"no text found in {path} (it has no non-empty UTF-8 text files)")

    tok = build_tokenizer(kind, docs)
    ids = tokenize(tok, docs)
    n_train = int(len(ids) * (1 - args.val_fraction))
    if n_train == 0 or n_train == len(ids):
        raise UserError(f"the text is only {len(ids)} tokens, too short to split with --val_fraction "
                        f"{args.val_fraction} (train or val would be empty); give more text")
    train_ids, val_ids = ids[:n_train], ids[n_train:]

    meta = tok.meta()
    meta.update(train_tokens=len(train_ids), val_tokens=len(val_ids), source=source)
    if is_different_dataset(out_dir, train_ids, val_ids, meta) and not args.force:
        raise UserError(f"{out_dir} already holds a different dataset; add --force to replace it (runs trained "
                        f"on the old one will refuse to resume on a new tokenizer), or choose another --name")
    write_outputs(out_dir, train_ids, val_ids, meta)
    print(f"{name}: {kind} tokenizer, vocab {tok.vocab_size:,}, train {len(train_ids):,} tokens, "
          f"val {len(val_ids):,} tokens ({meta['dtype']}) -> {out_dir}")


if __name__ == "__main__":
    run_cli(main)
