"""Running step graphs with the reference interpreter the way the generation runtime does:
cache slots, positions and the 0/-inf masks (causal + padding, and the sliding window), and the
recurrent state of Mamba-2, gated DeltaNet and short-convolution layers (zeros at first, one plane
read and rewritten each step); the KV caches in any of the cache types (ember.models.kv_cache)."""
from __future__ import annotations

import numpy as np

from ember.ir.interpreter import run_reference
from ember.models import F16_CACHE, KVCacheTypes, Model
from ember.runtime.memory import cache_array


class ReferenceSession:
    """One sequence in a KV cache of n_kv rows; slot i holds position i."""

    def __init__(self, model: Model, n_kv: int, cache: KVCacheTypes = F16_CACHE):
        self.model, self.n_kv, self.cache = model, n_kv, cache
        self.slot_pos = np.full(n_kv, -1)          # position held by each cache row, -1: empty
        self.caches = {}                           # in the order of the graph's inputs and outputs
        for il in model.attention_layers:
            self.caches[f"k_cache.{il}"] = cache_array(cache.k, *model.cache_shape(n_kv, "k", il))
            self.caches[f"v_cache.{il}"] = cache_array(cache.v, *model.cache_shape(n_kv, "v", il))
        for name, shape in model.state_shapes().items():     # one plane each
            self.caches[name] = np.zeros((1, int(np.prod(shape))), np.float32)
        self.state_inputs = {"state_src": np.zeros(1, np.int32), "state_slots": np.zeros(1, np.int32)} \
            if model.recurrent_layers else {}

    def masks(self, pos: np.ndarray) -> dict[str, np.ndarray]:
        keys = self.slot_pos[None, :]
        query = pos[:, None]
        visible = (keys >= 0) & (keys <= query)
        out = {"mask": np.where(visible, 0.0, -np.inf).astype(np.float32)}
        hp = self.model.hparams
        if hp.uses_swa:
            in_window = visible & (query - keys < hp.sliding_window)
            out["mask_swa"] = np.where(in_window, 0.0, -np.inf).astype(np.float32)
        return out

    def step(self, tokens, out_ids=None) -> np.ndarray:
        """Decode tokens at the next positions; returns logits of out_ids (default: all)."""
        tokens = np.asarray(tokens, dtype=np.int32)
        start = int(self.slot_pos.max()) + 1
        pos = np.arange(start, start + len(tokens), dtype=np.int32)
        slots = pos.copy()
        out_ids = np.arange(len(tokens), dtype=np.int32) if out_ids is None \
            else np.asarray(out_ids, dtype=np.int32)
        self.slot_pos[slots] = pos          # the graph writes the cache before attending
        graph = self.model.build_step(len(tokens), self.n_kv, len(out_ids), cache=self.cache)
        inputs = dict(tokens=tokens, pos=pos, slots=slots, out_ids=out_ids, **self.masks(pos),
                      **self.state_inputs, **self.caches)
        logits, *caches = run_reference(graph, inputs)
        self.caches = dict(zip(self.caches, caches))
        return logits


def reference_logits(model: Model, tokens, n_kv: int = 16) -> np.ndarray:
    """Logits of every position of one prompt, in one step."""
    return ReferenceSession(model, n_kv).step(tokens)


def nmse(actual: np.ndarray, expected: np.ndarray) -> float:
    expected = expected.astype(np.float64)
    return float(np.sum((actual - expected) ** 2) / max(np.sum(expected ** 2), 1e-30))
