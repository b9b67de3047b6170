"""
The tokenizer and its meta.json, written once here. prepare.py writes meta.json beside train.bin/val.bin;
train.py, sample.py and tools/ read it back with load_meta() and Tokenizer.from_meta(), so nothing
re-derives the vocabulary on its own.

meta.json:
    {"tokenizer": "char" | "gpt2",   # which Tokenizer encodes this dataset
     "vocab_size": int,              # char: number of distinct characters; gpt2: 50257
     "dtype": "uint16" | "uint32",   # numpy dtype of the token ids in train.bin / val.bin
     "chars": str,                   # char only: every character in id order (id i = chars[i])
     "train_tokens": int, "val_tokens": int,
     "source": str}                  # the input path or URL the text came from
"""
import json
import os

import numpy as np

from nanomoe.errors import UserError
from nanomoe.files import atomic_write

GPT2_EOT = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257


def token_dtype(vocab_size):
    """The smallest dtype that holds every id: uint16 covers ids 0..65535, i.e. up to 65536 tokens."""
    return np.uint16 if vocab_size <= 65536 else np.uint32


def prepare_command(dataset, data_root="data"):
    """The command that (re)builds data/<dataset>/, for error messages here and in train.py."""
    if dataset in ("shakespeare_char", "shakespeare"):
        cmd = f"python prepare.py {dataset}"
    else:
        cmd = f"python prepare.py text --input PATH --name {dataset}"
    if os.path.normpath(data_root) != "data":
        cmd += f" --data_root {data_root}"
    return cmd


def write_meta(data_dir, meta):
    """Write meta.json all or nothing (common.atomic_write), so a reader never sees half a file."""
    with atomic_write(os.path.join(data_dir, "meta.json"), "w", encoding="utf-8") as f:
        # ensure_ascii=False keeps a char vocabulary readable in the file (and half the size)
        json.dump(meta, f, ensure_ascii=False, indent=1)
        f.write("\n")


def load_meta(data_dir):
    """Read <data_dir>/meta.json; every way it can be missing or broken ends in 'run this command'."""
    data_dir = os.path.normpath(data_dir)
    dataset = os.path.basename(data_dir)
    fix = prepare_command(dataset, os.path.dirname(data_dir) or ".")
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise UserError(f"no tokenizer meta at {path}; prepare the dataset first: {fix}")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"could not read {path} ({e}); prepare the dataset again: {fix}")
    if not isinstance(meta, dict):
        raise UserError(f"{path} is not a JSON object; prepare the dataset again: {fix}")
    for key in ("tokenizer", "vocab_size", "dtype"):
        if key not in meta:
            raise UserError(f"{path} has no '{key}' field; prepare the dataset again: {fix}")
    # check the tokenizer fields here without building the tokenizer: train.py needs only vocab_size and
    # dtype, and building a gpt2 Tokenizer would load tiktoken's BPE files for nothing
    kind, vocab_size = meta["tokenizer"], meta["vocab_size"]
    if kind == "char":
        ok = isinstance(meta.get("chars"), str) and len(meta["chars"]) == vocab_size
    elif kind == "gpt2":
        ok = vocab_size == GPT2_VOCAB_SIZE
    else:
        raise UserError(f"{path} names an unknown tokenizer '{kind}' (expected char or gpt2); "
                        f"prepare the dataset again: {fix}")
    if not ok:
        raise UserError(f"{path} has a vocab_size ({vocab_size}) that does not match its {kind} tokenizer; "
                        f"prepare the dataset again: {fix}")
    if meta["dtype"] != np.dtype(token_dtype(vocab_size)).name:
        raise UserError(f"{path} has dtype '{meta['dtype']}' but {vocab_size} tokens need "
                        f"{np.dtype(token_dtype(vocab_size)).name}; prepare the dataset again: {fix}")
    return meta


class Tokenizer:
    """
    kind 'char': one id per character, vocabulary = the characters seen in the training text.
    kind 'gpt2': GPT-2's BPE from tiktoken (50257 ids). encode() treats the literal text '<|endoftext|>'
    as the special end-of-text token 50256, as nanoGPT's sample.py does, so a prompt or a prepared
    document can mark a document boundary; all other text is encoded as ordinary BPE.
    """

    def __init__(self, kind, chars=None):
        self.kind = kind
        if kind == "char":
            if not chars:
                raise UserError("a char tokenizer needs its characters (meta.json 'chars' is empty or missing)")
            self.chars = chars
            self.stoi = {c: i for i, c in enumerate(chars)}
            if len(self.stoi) != len(chars):
                raise UserError("meta.json 'chars' lists a character twice; prepare the dataset again")
            self.vocab_size = len(chars)
        elif kind == "gpt2":
            self.enc = _gpt2_encoding()
            self.vocab_size = self.enc.n_vocab
        else:
            raise UserError(f"unknown tokenizer '{kind}' (use char or gpt2)")

    @classmethod
    def from_meta(cls, meta):
        tok = cls(meta.get("tokenizer"), meta.get("chars"))
        if meta.get("vocab_size") != tok.vocab_size:
            raise UserError(f"meta.json says vocab_size {meta.get('vocab_size')} but its {tok.kind} "
                            f"tokenizer has {tok.vocab_size} tokens; prepare the dataset again")
        return tok

    def meta(self):
        """The tokenizer's part of meta.json; prepare.py adds the token counts and the source."""
        meta = {"tokenizer": self.kind, "vocab_size": self.vocab_size,
                "dtype": np.dtype(token_dtype(self.vocab_size)).name}
        if self.kind == "char":
            meta["chars"] = self.chars
        return meta

    def encode(self, text):
        if self.kind == "gpt2":
            return self.enc.encode(text, allowed_special={GPT2_EOT})
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            # name the unknown characters (the first ten, sorted) so the fix is obvious
            unknown = sorted(set(text) - self.stoi.keys())
            shown = ", ".join(repr(c) for c in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
            raise UserError(f"{len(unknown)} character(s) not in the char vocabulary: {shown} "
                            f"(the vocabulary comes from the training data; use only characters it contains)")

    def decode(self, ids):
        # an id this tokenizer lacks (one of the padding rows of a GPT-2 model's 50304-entry vocabulary, which
        # a barely trained model can still sample) comes out as U+FFFD instead of stopping a sample halfway
        pieces, run = [], []
        for i in map(int, ids):
            if 0 <= i < self.vocab_size:
                run.append(i)
            else:
                pieces += [self._decode(run), "\ufffd"]
                run = []
        return "".join(pieces) + self._decode(run)

    def _decode(self, ids):
        if self.kind == "gpt2":
            return self.enc.decode(ids)
        return "".join(self.chars[i] for i in ids)


def _gpt2_encoding():
    import tiktoken  # only the gpt2 path needs it
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline without a cache shows up as requests/urllib errors; any failure means the same
        raise UserError(f"could not load GPT-2 BPE files for tiktoken ({type(e).__name__}); tiktoken downloads them "
                        f"once and caches them: connect once, or set TIKTOKEN_CACHE_DIR to a folder that holds them")
