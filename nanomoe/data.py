"""
Token data on disk (data/<dataset>/{train,val}.bin written by prepare.py) and random batches from it, for
train.py and the tools that read a run's data. Batches come from an explicit torch.Generator, so a run's sequence of
batches depends only on that generator's state (saved in checkpoints for bit-exact resume).
"""
import hashlib
import os

import numpy as np
import torch

from nanomoe.errors import UserError
from nanomoe.tokenizer import load_meta, prepare_command


class TokenData:
    def __init__(self, data_root, dataset, block_size):
        self.dir = os.path.join(data_root, dataset)
        if not os.path.isdir(self.dir):
            raise UserError(f"dataset folder {self.dir} not found; create it with: "
                            f"{prepare_command(dataset, data_root)}")
        self.meta = load_meta(self.dir)
        self.dtype = np.dtype(self.meta["dtype"])
        self.block_size = block_size
        self.sizes = {}
        for split in ("train", "val"):
            path = self.path(split)
            if not os.path.isfile(path):
                raise UserError(f"{path} not found; create it with: {prepare_command(dataset, data_root)}")
            nbytes = os.path.getsize(path)
            if nbytes % self.dtype.itemsize:
                raise UserError(f"{path} has {nbytes} bytes, not a whole number of {self.meta['dtype']} tokens "
                                f"(the file is damaged; rerun: {prepare_command(dataset, data_root)})")
            n = nbytes // self.dtype.itemsize
            if n <= block_size:
                raise UserError(f"{path} has {n} tokens, too few for block_size={block_size} "
                                f"(use a smaller --block_size or more data)")
            self.sizes[split] = n
        # one cheap pass over the largest id catches data tokenized with another vocabulary
        for split in ("train", "val"):
            top = int(self.memmap(split).max())
            if top >= self.meta["vocab_size"]:
                raise UserError(f"{self.path(split)} holds token id {top} but meta.json says vocab_size="
                                f"{self.meta['vocab_size']} (data and meta come from different runs of prepare.py; "
                                f"rerun: {prepare_command(dataset, data_root)})")

    def tokenizer_meta(self):
        """The tokenizer's part of meta.json: what a checkpoint keeps so it can be sampled without the data."""
        return {k: self.meta[k] for k in ("tokenizer", "vocab_size", "chars") if k in self.meta}

    def fingerprint(self):
        """What identifies this data cheaply (no full-data hash per save): the dataset, a hash of meta.json and
        the token counts."""
        with open(os.path.join(self.dir, "meta.json"), "rb") as f:
            meta_sha256 = hashlib.sha256(f.read()).hexdigest()
        return {"dataset": os.path.basename(self.dir), "meta_sha256": meta_sha256, **self.sizes}

    def check_same_data(self, tokenizer, fingerprint):
        """For a resumed run: another tokenizer than the checkpoint's is refused (its token ids would mean other
        things); -> whether the files changed otherwise (the batches will differ, worth a note)."""
        if tokenizer != self.tokenizer_meta():
            raise UserError(f"the checkpoint was trained with the {describe_tokenizer(tokenizer)} tokenizer, but "
                            f"dataset {self.dir} has the {describe_tokenizer(self.tokenizer_meta())} one; resume on "
                            f"the checkpoint's dataset (--dataset, --data_root), or start a new run")
        return fingerprint not in (None, self.fingerprint())

    def path(self, split):
        return os.path.join(self.dir, f"{split}.bin")

    def memmap(self, split):
        # a fresh memmap per batch, as in nanoGPT, avoids a slow memory leak of long-lived memmaps
        return np.memmap(self.path(split), dtype=self.dtype, mode="r")

    def get_batch(self, split, batch_size, generator, device):
        """x, y: (batch_size, block_size) int64 inputs and next-token targets at random offsets."""
        data = self.memmap(split)
        T = self.block_size
        ix = torch.randint(len(data) - T, (batch_size,), generator=generator).tolist()
        x = torch.from_numpy(np.stack([data[i:i + T].astype(np.int64) for i in ix]))
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + T].astype(np.int64) for i in ix]))
        return to_device(x, device), to_device(y, device)


def to_device(t, device):
    """A CPU tensor (a batch) on the device. To a GPU from pinned memory without blocking: the host queues the
    copy and goes on, and the copy overlaps with the work already queued (a plain .to() waits for it)."""
    if device.startswith("cuda"):
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def describe_tokenizer(meta):
    return f"{meta['vocab_size']}-character" if meta.get("tokenizer") == "char" else str(meta.get("tokenizer"))
