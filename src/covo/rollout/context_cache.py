"""Keys and values of trajectories from a forward that already ran over them.

The rollout's log-prob pass runs over every prompt + response; keeping its keys and values
lets the scorer attend to a trajectory without feeding it again.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import Tensor
from transformers import DynamicCache, LlamaModel
from transformers.cache_utils import DynamicLayer, StaticLayer

# A model's keys and values are `cache` (forward and generate argument, output field) from
# transformers 5.24 on and `past_key_values` before (the 5.x releases GPU images ship): covo
# passes and reads them under the installed release's name.
FORWARD_ARGS = inspect.signature(LlamaModel.forward).parameters
CACHE_NAME = "cache" if "cache" in FORWARD_ARGS else "past_key_values"


def with_cache(cache) -> dict:
    """`cache` as the keyword a model's forward or `generate` takes it under."""
    return {CACHE_NAME: cache}


def cache_of(output):
    """The keys and values a forward or `generate` output holds."""
    return getattr(output, CACHE_NAME)


@dataclass
class ContextCache:
    """Keys and values of one sequence's tokens from a forward that already ran over it.

    `layers[l]` = (keys, values) of layer l, each [1, kv_heads, len(ids), head_dim], computed
    at positions 0.. of `ids`. Scoring reads the context from here instead of feeding it again.
    """

    ids: list[int]
    layers: list[tuple[Tensor, Tensor]]

    def model_cache(self, length: int) -> DynamicCache:
        """A fresh model cache holding the first `length` tokens (a forward appends to it)."""
        return DynamicCache([(k[:, :, :length], v[:, :, :length]) for k, v in self.layers])


def plain_layers(cache) -> list | None:
    """The layers of a model cache that keeps every key and value (plain full attention);
    None for any other (a sliding window drops early keys)."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) not in (DynamicLayer, StaticLayer) for layer in layers):
        return None
    return layers


def split_cache(cache, rows: list[tuple[list[int], int]]) -> list[ContextCache] | None:
    """One `ContextCache` per batch row of a model cache; row r holds `ids` from column `start`.

    None when the cache is not plain full attention (`plain_layers`).
    """
    layers = plain_layers(cache)
    if layers is None:
        return None
    return [
        ContextCache(
            ids,
            [
                (
                    layer.keys[r : r + 1, :, start : start + len(ids)],
                    layer.values[r : r + 1, :, start : start + len(ids)],
                )
                for layer in layers
            ],
        )
        for r, (ids, start) in enumerate(rows)
    ]
