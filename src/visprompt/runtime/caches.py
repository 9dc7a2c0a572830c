"""Bounded caches that let a follow-up question skip work already done.

* `ImageFeatureCache`: image content hash (`visprompt.images.image_fingerprint`) -> the encoder +
  connector output for that image, `[tokens_per_image, D]`. The same photo sent again (as a file,
  bytes or a data URL; equal pixels give equal keys) skips the vision encoder.
* `PrefixKVCache`: the KV entries of token sequences already run through the language model. A new
  prompt reuses the longest cached prefix it shares (token by token; image tokens compare by image
  content), so a follow-up in the same chat, or a new question about the same image with the same
  system prompt, only runs its new tokens.

Both are LRU caches bounded by bytes (`max_bytes`; 0 turns a cache off). Entries are tensors owned by
the cache (copies), so a caller can never change what a later lookup returns. Both are thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

MiB = 1 << 20


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ByteLRU:
    """key -> tensor, least recently used first out once the total passes max_bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> bool:
        """Store (replacing an old value). False when it does not fit at all."""
        with self._lock:
            self.pop(key)
            if nbytes > self.max_bytes:
                return False
            self._items[key] = (value, nbytes)
            self.bytes += nbytes
            while self.bytes > self.max_bytes:
                _, (_, old) = self._items.popitem(last=False)
                self.bytes -= old
            return True

    def pop(self, key: Hashable) -> Any | None:
        with self._lock:
            item = self._items.pop(key, None)
            if item is None:
                return None
            self.bytes -= item[1]
            return item[0]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def items(self) -> list[tuple[Hashable, Any]]:
        """Snapshot, most recently used last."""
        with self._lock:
            return [(k, v) for k, (v, _) in self._items.items()]

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._items),
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
        }


class ImageFeatureCache(ByteLRU):
    """fingerprint -> image embeddings [tokens_per_image, D] (a private copy)."""

    def __init__(self, max_bytes: int = 64 * MiB):
        super().__init__(max_bytes)

    def get(self, key: Hashable) -> torch.Tensor | None:  # type: ignore[override]
        return super().get(key)

    def put(self, key: Hashable, features: torch.Tensor) -> bool:  # type: ignore[override]
        features = features.detach().clone()
        return super().put(key, features, tensor_bytes(features))


def token_keys(
    ids: Sequence[int], image_token_id: int, image_keys: Sequence[str], image_lengths: Sequence[int] | None = None
) -> tuple:
    """Cache keys of a prompt: text tokens by id; the j-th token of image i by (image_keys[i], j).

    `image_keys` are the fingerprints of the prompt's images in order; each image is one run of
    placeholder tokens, `image_lengths[i]` long (tiled images differ), or runs of equal length (as
    `expand_image_placeholders` writes them without counts) when not given.
    """
    if not image_keys:
        return tuple(ids)
    if image_lengths is None:
        n_img = sum(1 for t in ids if t == image_token_id)
        image_lengths = [n_img // len(image_keys) if n_img else 0] * len(image_keys)
    # the owner (image index, token index) of every placeholder, in order
    owners = iter([(i, j) for i, n in enumerate(image_lengths) for j in range(n)])
    out: list[Any] = []
    for t in ids:
        owner = next(owners, None) if t == image_token_id else None
        if owner is not None:
            out.append((image_keys[owner[0]], owner[1]))
        else:
            out.append(t)
    return tuple(out)


@dataclass
class PrefixHit:
    length: int  # how many leading tokens are covered
    kv: torch.Tensor  # [layers, 2, length, kv_heads, head_dim] (a view of the cached entry: copy, never write)


class PrefixKVCache:
    """Token-key sequences -> their KV entries; lookup returns the longest shared prefix.

    An entry is the KV of a whole sequence (prompt and, after a reply, the reply's tokens too); a
    lookup compares a new prompt's keys with every entry's (a few hundred entries of a few hundred
    tokens at most: cheap next to one forward pass) and returns the longest common prefix.
    `min_tokens` avoids bothering with very short matches (a shared BOS).
    """

    def __init__(self, max_bytes: int = 256 * MiB, min_tokens: int = 4):
        self.lru = ByteLRU(max_bytes)
        self.min_tokens = min_tokens

    @property
    def max_bytes(self) -> int:
        return self.lru.max_bytes

    def lookup(self, keys: tuple, limit: int | None = None) -> PrefixHit | None:
        """The longest cached prefix of `keys` (at most `limit` tokens), or None."""
        limit = len(keys) if limit is None else min(limit, len(keys))
        best_key, best_n = None, 0
        for key, _ in self.lru.items():
            n = _common_prefix(key, keys, limit)
            if n > best_n:
                best_key, best_n = key, n
        if best_key is None or best_n < self.min_tokens:
            self.lru.misses += 1
            return None
        kv = self.lru.get(best_key)  # counts the hit, refreshes recency
        if kv is None:  # evicted meanwhile
            return None
        return PrefixHit(best_n, kv[:, :, :best_n])

    def covers(self, keys: tuple) -> bool:
        """True when a stored entry starts with `keys` (storing them would add nothing)."""
        n = len(keys)
        return (
            n < self.min_tokens
            or self.lru.max_bytes <= 0
            or any(len(k) >= n and k[:n] == keys for k, _ in self.lru.items())
        )

    def store(self, keys: tuple, kv: torch.Tensor) -> bool:
        """Remember the KV [layers, 2, len(keys), kv_heads, head_dim] of `keys` (kv is not copied:
        pass a tensor nobody else writes). An entry that is a prefix of a stored one adds nothing."""
        if len(keys) < self.min_tokens or self.lru.max_bytes <= 0:
            return False
        if kv.shape[2] != len(keys):
            raise ValueError(f"{len(keys)} keys but KV for {kv.shape[2]} positions")
        for key, _ in self.lru.items():
            if len(key) >= len(keys) and key[: len(keys)] == keys:
                self.lru.get(key)  # already covered: just refresh it
                return True
        # Entries that are prefixes of the new one become redundant.
        for key, _ in self.lru.items():
            if len(key) < len(keys) and keys[: len(key)] == key:
                self.lru.pop(key)
        return self.lru.put(keys, kv, tensor_bytes(kv))

    def clear(self) -> None:
        self.lru.clear()

    def stats(self) -> dict[str, int]:
        return self.lru.stats()


def _common_prefix(a: tuple, b: tuple, limit: int) -> int:
    n = min(len(a), len(b), limit)
    if n == 0 or a[0] != b[0]:
        return 0
    if a[:n] == b[:n]:
        return n
    lo, hi = 1, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]: binary search on tuple slices (C speed)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo
