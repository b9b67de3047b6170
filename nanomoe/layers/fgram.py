"""
Hashed n-gram input embeddings ("F-gram"): the model gets the preceding few tokens at its input, before any
attention. model.py adds them to the token embedding with fgram_max_n > 0.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanomoe.errors import UserError


def check_fgram_config(config):
    if config.fgram_max_n == 1:
        raise UserError("fgram_max_n=1 has no n-grams to add (they start at n=2); use 0 for off or 2 or more")


class FGram(nn.Module):
    """Hashed n-gram input embeddings ("F-gram"): for n = 2..fgram_max_n, the last n token ids at each
    position are hashed into one of fgram_buckets rows of that n's table, and scale_n * row is added to the
    token embedding. Causal by construction (only the current and earlier ids). The tables start at zero, so
    a new model computes what it would without them; the scales start at 1 so the tables get gradients."""

    def __init__(self, config):
        super().__init__()
        self.ns = list(range(2, config.fgram_max_n + 1))
        self.buckets = config.fgram_buckets
        # plain zero tensors, not nn.Embedding: they draw no random numbers, so the rest of the model gets the
        # same initial weights from the same seed as without them
        self.tables = nn.ParameterList([nn.Parameter(torch.zeros(config.fgram_buckets, config.n_embd))
                                        for _ in self.ns])
        self.scale = nn.Parameter(torch.ones(len(self.ns)))

    def forward(self, idx, cache=None):
        """idx (B, T) -> (B, T, n_embd). With a cache, the hash also reads the ids before idx kept there."""
        T = idx.size(1)
        ids = idx if cache is None or cache.ids is None else torch.cat([cache.ids, idx], dim=1)
        if cache is not None:
            cache.ids = ids[:, -(self.ns[-1] - 1):]  # the next step's n-grams need the last n_max - 1 ids
        out = 0
        for i, n in enumerate(self.ns):
            rows = ngram_hash(ids, n, self.buckets)[:, -T:]
            out = out + self.scale[i] * F.embedding(rows, self.tables[i])
        return out


def ngram_hash(ids, n, buckets):
    """(B, T) ids -> (B, T) bucket of the n-gram ending at each position: a polynomial hash modulo the
    prime 2^31 - 1 of its n ids (+1; positions before the start count as 0), then modulo buckets."""
    T = ids.size(1)
    padded = F.pad(ids + 1, (n - 1, 0))  # (B, n - 1 + T)
    h = torch.zeros_like(ids)
    for j in range(n):  # h < 2^31, so h * 1000003 + id fits in int64
        h = (h * 1_000_003 + padded[:, j:j + T]) % 2_147_483_647
    return h % buckets
