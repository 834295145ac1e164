"""The running batch's KV cache in buffers with room to grow, so a decoding step writes one column per layer.

transformers' `DynamicLayer` concatenates every step: each layer's keys and values are copied whole, for every new
token. With 16 rows of ~50 tokens in KoGPT2's shape that copying took about half of a CPU step here (the copies
miss the caches, ~300 µs per layer tensor). `GrowingLayer` is a `DynamicLayer` whose `update` writes the new
columns into spare room at the end of its buffers and exposes the filled part as `keys`/`values` (views), growing
the buffers geometrically when the room runs out. Everything else a model asks of a layer (sequence length, mask
sizes) is `DynamicLayer`'s own, read from those views.
"""

from __future__ import annotations

import torch
from transformers import Cache, DynamicLayer

MIN_ROOM = 32  # spare columns a new buffer gets (a reply of up to ~32 more tokens never reallocates)


class GrowingLayer(DynamicLayer):
    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        self._reserve(keys, values, keys.shape[-2] + MIN_ROOM)

    def _reserve(self, keys: torch.Tensor, values: torch.Tensor, columns: int) -> None:
        """New buffers of `columns` columns holding `keys`/`values` at their start."""
        length = keys.shape[-2]
        shape = (*keys.shape[:2], columns, keys.shape[-1])
        self._keys, self._values = keys.new_empty(shape), values.new_empty(shape)
        self._keys[:, :, :length] = keys
        self._values[:, :, :length] = values
        self.keys, self.values = self._keys[:, :, :length], self._values[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            self._reserve(self.keys, self.values, 2 * end)
        self._keys[:, :, start:end] = key_states
        self._values[:, :, start:end] = value_states
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values


def growing_cache(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> Cache:
    """A cache over copies of each layer's (keys, values), with room for the next steps' columns."""
    return Cache(layers=[GrowingLayer(k, v) for k, v in layers])
