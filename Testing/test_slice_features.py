"""The per-slice feature cache models share (runtime/slice_features.py): keyed by the exact model input,
bounded in bytes, least recently used out first, position encodings held once."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from biomedseg.runtime.slice_features import SliceFeatureCache, size_of  # noqa: E402


def frame(value: float):
    return torch.full((1, 3, 4, 4), float(value))


def test_bounded_lru_recomputes_what_it_dropped_and_never_confuses_inputs():
    calls = []

    def encode(f):
        calls.append(float(f[0, 0, 0, 0]))
        return {"image": np.full((1, 512), calls[-1], np.float32)}  # 2048 bytes

    cache = SliceFeatureCache(limit_bytes=2 * 2048)
    for v in (1, 2, 1, 3, 2):
        out = cache.get_or_encode(frame(v), encode)
        assert out["image"][0, 0] == v  # the features of this input, never another's
    # 1, 2 encoded; 1 hit (now most recent); 3 encoded, 2 dropped (least recent); 2 encoded again
    assert calls == [1, 2, 3, 2] and cache.hits == 1 and cache.evicted == 2
    assert cache.bytes == 2 * 2048 == cache.bytes_per_slice() * 2
    assert frame(1).numel() and cache.key(frame(1)) != cache.key(frame(1).double())  # dtype is part of the key


def test_position_encodings_equal_for_every_slice_are_held_once():
    pos = [torch.ones(1, 8, 16, 16)]

    def encode(f):
        return {"backbone_fpn": [torch.zeros(1, 4, 4, 4) + f.mean()], "vision_pos_enc": [p.clone() for p in pos]}

    cache = SliceFeatureCache(limit_bytes=10 ** 9)
    a = cache.get_or_encode(frame(1), encode)
    b = cache.get_or_encode(frame(2), encode)
    assert a["vision_pos_enc"] is b["vision_pos_enc"]
    assert cache.bytes == 2 * size_of({"x": torch.zeros(1, 4, 4, 4)})  # the shared copy is not counted per slice
