"""
The generation cache (a "KV cache" that also holds recurrent states): GPT.generate_stream fills it on the
prompt (prefill) and then runs one new token at a time against it.
"""
import torch


class GenerationCache:
    """What generation keeps between steps so that each new token costs one position's work. It holds more
    than keys and values: per layer, an attention layer appends the per-token tensors it needs again (MHA/GQA:
    keys and values; MLA: the compressed latent and the rope key) with append(); a layer with a fixed-size
    recurrent state (Mamba2: its conv inputs and SSM state) reads and replaces it with get()/put(). pos counts
    the positions already processed; ids keeps the last few token ids for the F-gram hash."""

    def __init__(self, n_layer):
        self.layers = [{} for _ in range(n_layer)]
        self.pos = 0
        self.ids = None

    def append(self, layer, **tensors):
        """Add the new positions' tensors (time on dim -2) to the layer's and return each one's whole history."""
        store = self.layers[layer]
        for name, t in tensors.items():
            store[name] = torch.cat([store[name], t], dim=-2) if name in store else t
        return [store[name] for name in tensors]

    def get(self, layer, name, default=None):
        return self.layers[layer].get(name, default)

    def put(self, layer, name, value):
        self.layers[layer][name] = value

    def nbytes(self):
        """Bytes of the layers' tensors (what grows with the context)."""
        return sum(t.numel() * t.element_size() for store in self.layers for t in store.values())


def cache_values_per_token(config):
    """Numbers a GenerationCache keeps per token, all attention layers together: keys and values of the kv heads
    (MHA/GQA), or the latent and the shared rope key (MLA); Mamba layers keep a fixed-size state instead.
    Times the dtype's bytes, it is the cache's bytes per token."""
    n_attn = config.n_layer - len(config.mamba_layers)
    if config.attn == "mla":
        return n_attn * (config.kv_latent_dim + config.d_rope)
    return n_attn * 2 * (config.n_kv_head or config.n_head) * (config.n_embd // config.n_head)
