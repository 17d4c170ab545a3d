"""MedSAM2 preprocessing and image encoder against fixtures made with the authors' own code.

The fixture (shared/parity/medsam2, see its README) is the authors' SAM2.1 Hiera-T 512 pipeline run
on CPU with deterministic name-keyed weights (shared/parity/detweights.py) on slices 14..21 of
slicerio's CTChest4. Only the key frame (4) is encoded here, once per module (about 2 s). The
``key_fpn0/1`` corners are stored after the mask decoder's ``conv_s0``/``conv_s1``, so the test
applies those two 1x1 convs itself with their detweights. Tolerances are the README's (about 10x
the 1-vs-2-thread noise); preprocessing is exact.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import load_detweights, parity_file  # noqa: E402

from biomedseg.errors import InputError  # noqa: E402
from biomedseg.models.medsam2 import preprocess as pp  # noqa: E402
from biomedseg.models.medsam2.image_encoder import ImageEncoder, PositionEmbeddingSine  # noqa: E402

KEY = 4
WINDOW = (-1350.0, 150.0)
TOL = {"key_fpn0_corner": 5e-5, "key_fpn1_corner": 5e-5, "key_fpn2_corner": 5e-5, "key_fpn2_full": 1.5e-4}
HIGH_RES_CONVS = ("sam_mask_decoder.conv_s0", "sam_mask_decoder.conv_s1")


pytestmark = pytest.mark.usefixtures("two_torch_threads")  # the fixtures' thread count (conftest)


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(parity_file("medsam2/expected.npz")))


@pytest.fixture(scope="module")
def shapes():
    keys = json.loads(parity_file("medsam2/keys.json").read_text())
    return {name: tuple(entry["shape"]) for name, entry in keys.items()}


@pytest.fixture(scope="module")
def weights(shapes):
    """Detweights of the encoder and of the two high-res 1x1 convs of the mask decoder."""
    wanted = {k: s for k, s in shapes.items()
              if k.startswith("image_encoder.") or k.startswith(HIGH_RES_CONVS)}
    return load_detweights().det_state_dict(wanted)


@pytest.fixture(scope="module")
def holder(weights):
    """The encoder as attribute ``image_encoder`` of a parent, as the model assembles it."""
    parent = torch.nn.Module()
    parent.image_encoder = ImageEncoder()
    encoder_weights = {k: v for k, v in weights.items() if k.startswith("image_encoder.")}
    result = parent.load_state_dict(encoder_weights, strict=True)
    return parent.eval(), result


@pytest.fixture(scope="module")
def features(holder, weights, expected):
    parent, _ = holder
    frame = pp.normalise(expected["resized_uint8_rgb"][KEY])[None]
    with torch.inference_mode():
        out = parent.image_encoder(frame)
        s0, s1 = (torch.nn.functional.conv2d(out["backbone_fpn"][i], weights[f"{name}.weight"], weights[f"{name}.bias"])
                  for i, name in enumerate(HIGH_RES_CONVS))
    fpn2 = out["backbone_fpn"][2]
    return out, {"key_fpn0_corner": s0[0, :8, :4, :4], "key_fpn1_corner": s1[0, :8, :4, :4],
                 "key_fpn2_corner": fpn2[0, :8, :4, :4], "key_fpn2_full": fpn2[0]}


# ---- preprocessing: exact -------------------------------------------------------------------
def test_windowing_is_the_authors_clip_minmax_and_truncation(expected):
    got = pp.window_to_uint8(expected["volume_hu"], *WINDOW)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected["windowed_uint8"])


def test_pillow_resize_to_rgb_512_is_exact(expected):
    for z in range(expected["windowed_uint8"].shape[0]):
        got = pp.resize_rgb_512(expected["windowed_uint8"][z])
        assert got.shape == (3, 512, 512) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, expected["resized_uint8_rgb"][z], err_msg=f"slice {z}")


def test_key_frame_input_is_bitwise_the_authors(expected):
    got = pp.normalise(expected["resized_uint8_rgb"][KEY])
    assert got.dtype == torch.float32 and tuple(got.shape) == (3, 512, 512)
    np.testing.assert_array_equal(got.numpy().view(np.uint32), expected["key_frame_f32"].view(np.uint32))


def test_frames_from_volume_chains_the_three_steps(expected):
    hu = expected["volume_hu"]
    frames = pp.frames_from_volume(hu, *WINDOW)
    assert tuple(frames.shape) == (hu.shape[0], 3, 512, 512)
    assert torch.equal(frames[KEY], torch.from_numpy(expected["key_frame_f32"]))


def test_a_constant_volume_windows_to_zeros_not_nan():
    assert not pp.window_to_uint8(np.full((2, 4, 4), 40, np.int16), *WINDOW).any()
    # entirely above the window: clipped to one value, still no division by zero
    assert not pp.window_to_uint8(np.full((4, 4), 3000.0), *WINDOW).any()


@pytest.mark.parametrize("call, words", [
    (lambda: pp.window_to_uint8(np.zeros(5), *WINDOW), "shape (5,)"),
    (lambda: pp.window_to_uint8(np.zeros((3, 3)), 150, -1350), "lower < upper"),
    (lambda: pp.window_to_uint8(np.array([[0.0, np.nan]]), *WINDOW), "NaN"),
    (lambda: pp.resize_rgb_512(np.zeros((2, 8, 8), np.uint8)), "shape (2, 8, 8)"),
    (lambda: pp.resize_rgb_512(np.zeros((8, 8), np.int16)), "uint8"),
    (lambda: pp.normalise(np.zeros((3, 256, 256), np.uint8)), "(..., 3, 512, 512)"),
    (lambda: pp.normalise(np.zeros((1, 512, 512), np.uint8)), "shape (1, 512, 512)"),
    (lambda: pp.normalise(np.zeros((3, 512, 512), np.float32)), "uint8"),
])
def test_bad_preprocessing_input_says_what_is_wrong(call, words):
    with pytest.raises(InputError, match="MedSAM2|window|NaN|frames") as info:
        call()
    assert isinstance(info.value, ValueError)
    assert words in str(info.value)


# ---- image encoder ----------------------------------------------------------------------------
def test_state_dict_is_the_authors_names_and_shapes_in_order(holder, shapes):
    parent, _ = holder
    ours = [(k, tuple(v.shape)) for k, v in parent.state_dict().items()]
    theirs = [(k, s) for k, s in shapes.items() if k.startswith("image_encoder.")]
    assert len(theirs) == 162
    assert ours == theirs


def test_detweights_load_strictly(holder):
    _, result = holder
    assert not result.missing_keys and not result.unexpected_keys


def test_output_dict_layout(features):
    out, _ = features
    assert set(out) == {"vision_features", "vision_pos_enc", "backbone_fpn"}
    sizes = [128, 64, 32]
    assert [tuple(x.shape) for x in out["backbone_fpn"]] == [(1, 256, s, s) for s in sizes]
    assert [tuple(x.shape) for x in out["vision_pos_enc"]] == [(1, 256, s, s) for s in sizes]
    assert out["vision_features"] is out["backbone_fpn"][-1]
    assert all(x.dtype == torch.float32 for x in [*out["backbone_fpn"], *out["vision_pos_enc"]])


@pytest.mark.parametrize("key", sorted(TOL))
def test_key_frame_features_match_the_authors(features, expected, key):
    _, ours = features
    got = ours[key].numpy().astype(np.float64)
    want = expected[key].astype(np.float64)
    assert got.shape == want.shape
    err = np.abs(got - want).max()
    assert err <= TOL[key], f"{key}: max |diff| {err:.3g} > {TOL[key]:g}"


def test_sine_position_encoding_is_the_detr_formula():
    """Against a float64 evaluation of the formula (64 features on 32x32, as the memory encoder uses it)."""
    enc = PositionEmbeddingSine(64)
    pos = enc(torch.zeros(2, 1, 32, 32)).numpy().astype(np.float64)
    assert pos.shape == (2, 64, 32, 32) and np.array_equal(pos[0], pos[1])
    n = 32  # features per axis
    y = (np.arange(1, 33) / (32 + 1e-6) * 2 * math.pi)[:, None]
    dim_t = 10000.0 ** (2 * (np.arange(n) // 2) / n)
    ref_y = np.where(np.arange(n) % 2 == 0, np.sin(y / dim_t), np.cos(y / dim_t))  # [H, n]
    np.testing.assert_allclose(pos[0, :n, :, 0], ref_y.T, atol=2e-6)
    np.testing.assert_allclose(pos[0, n:, 0, :], ref_y.T, atol=2e-6)  # x features: the same table along W
    assert enc(torch.zeros(1, 1, 32, 32)).shape == (1, 64, 32, 32)  # cached, repeated per batch
