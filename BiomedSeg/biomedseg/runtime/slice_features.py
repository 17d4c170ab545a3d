"""Per-slice image features already computed, keyed by the slice's exact model input, in bounded memory.

An image encoder is most of an interactive model's cost, and a person correcting a mask or
checking prompts runs the same slices many times: with a click, with another slice range,
after reopening the image. (``slicewise.FeatureCache`` keys whole volumes instead.)
Features are keyed by the exact model input of the slice (a digest of its normalised
pixels), so any of these reuses them, and a changed window or image can never hit a stale
entry. Policy: at most ``limit_bytes`` (a model option such as MedSAM2's ``cache_mb``); the least recently
used slice goes first; a slice that was dropped is encoded again when it is needed. Only
what differs between slices is stored: the position encodings are one shared copy.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict


def tensors_in(value):
    """Every tensor (torch or numpy) in nested dicts, lists and tuples."""
    if isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)
    elif hasattr(value, "nbytes") or (hasattr(value, "element_size") and hasattr(value, "nelement")):
        yield value


def _bytes(t) -> int:
    return int(t.element_size() * t.nelement()) if hasattr(t, "element_size") else int(t.nbytes)


def size_of(features, shared_ids=frozenset()) -> int:
    """Bytes held by ``features`` apart from the tensors in ``shared_ids``."""
    return sum(_bytes(t) for t in tensors_in(features) if id(t) not in shared_ids)


class SliceFeatureCache:
    def __init__(self, limit_bytes: int):
        self.limit_bytes = int(limit_bytes)
        self.entries: "OrderedDict[str, tuple[object, int]]" = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evicted = 0
        self.shared: dict[str, object] = {}

    @staticmethod
    def key(frame) -> str:
        array = frame.detach().cpu().contiguous().numpy()
        digest = hashlib.blake2b(array.tobytes(), digest_size=20)
        digest.update(repr((array.shape, str(array.dtype))).encode())
        return digest.hexdigest()

    def get_or_encode(self, frame, encode):
        """The features of ``frame`` (a [1,3,512,512] tensor), encoded by ``encode`` on a miss."""
        key = self.key(frame)
        found = self.entries.get(key)
        if found is not None:
            self.hits += 1
            self.entries.move_to_end(key)
            return found[0]
        self.misses += 1
        features = self._share(encode(frame))
        shared_ids = frozenset(id(t) for t in tensors_in(self.shared))
        size = size_of(features, shared_ids)
        self.entries[key] = (features, size)
        self.bytes += size
        while self.bytes > self.limit_bytes and len(self.entries) > 1:
            _, (_, dropped) = self.entries.popitem(last=False)
            self.bytes -= dropped
            self.evicted += 1
        return features

    def _share(self, features):
        """Replace position encodings equal to a stored one by that one (they are the same for every
        slice), so the cache holds them once."""
        pos = features.get("vision_pos_enc") if isinstance(features, dict) else None
        if not pos:
            return features
        import torch

        stored = self.shared.get("vision_pos_enc")
        if stored is not None and len(stored) == len(pos) and all(
                a.shape == b.shape and torch.equal(a, b) for a, b in zip(stored, pos)):
            return {**features, "vision_pos_enc": stored}
        self.shared["vision_pos_enc"] = pos
        return features

    def bytes_per_slice(self) -> int:
        return self.bytes // len(self.entries) if self.entries else 0

    def clear(self) -> None:
        self.entries.clear()
        self.shared.clear()
        self.bytes = 0

    def describe(self) -> dict:
        return {"slices": len(self.entries), "bytes": self.bytes, "limit_bytes": self.limit_bytes,
                "bytes_per_slice": self.bytes_per_slice(), "hits": self.hits, "misses": self.misses,
                "evicted": self.evicted}
