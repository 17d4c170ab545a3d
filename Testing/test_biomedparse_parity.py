"""BiomedParse v1 re-implementation against fixtures made with the authors' own code.

The fixtures (shared/parity/biomedparse_v1, see its README) come from the authors' model and
inference code run on CPU with deterministic name-keyed weights (shared/parity/detweights.py)
on a real CT slice (pydicom's CT_small.dcm) with the prompts 'liver', 'left kidney',
'COVID-19 infection'. Tolerances are the README's (about 10x the 1-vs-2-thread noise).
The model is built and run once per module (about a minute on 2 CPU cores), through
``inference`` -- the same encode, text, decode and upsampling functions the engine's backend
calls -- and the preprocessing through ``preprocess.prepare_exact`` / ``prepare_torch``, which
the backend calls too.
The tokenizer reads CLIP's BPE merges from the open_clip_torch wheel's data
(``pip install open_clip_torch --no-deps``; open_clip itself is never imported).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import load_detweights, parity_file, require_bpe_vocab  # noqa: E402

PROMPTS = ["liver", "left kidney", "COVID-19 infection"]
MODALITY = {"liver": "CT-Abdomen", "left kidney": "CT-Abdomen", "COVID-19 infection": "CT-Chest"}

# README "Numerical noise and recommended tolerances" (absolute).
TOL = {
    "backbone.res2": 1e-4, "backbone.res3": 3e-4, "backbone.res4": 3e-3, "backbone.res5": 5e-3,
    "pixel_decoder.transformer_encoder_features": 1.5e-3,
    "pixel_decoder.multi_scale_features.0": 1e-3, "pixel_decoder.multi_scale_features.1": 1e-3,
    "pixel_decoder.multi_scale_features.2": 1e-3, "pixel_decoder.mask_features": 3e-4,
    "pred_masks": 4e-3, "model_input_normalized": 1e-6,
}
EMB_ATOL = 1e-5
CAPTION_ATOL = 5e-4
SIM_ATOL = 5e-5
LOGIT_ATOL = 2.5e-3
PROB_ATOL = 4e-4


def _fixture(name: str) -> Path:
    return parity_file(f"biomedparse_v1/{name}")


def _assert_close(name, actual, expected, atol):
    actual = actual.detach().cpu().numpy() if torch.is_tensor(actual) else np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    assert err.max() <= atol, f"{name}: max |diff| {err.max():.3g} > {atol:g}"


def _png(name: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(_fixture(name)))


# ---- module fixtures: weights, model, one joint forward ------------------------------------
pytestmark = pytest.mark.usefixtures("two_torch_threads")  # the fixtures' thread count (conftest)


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(_fixture("expected.npz")))


@pytest.fixture(scope="module")
def detweights():
    return load_detweights()


@pytest.fixture(scope="module")
def keys() -> dict:
    return {k: tuple(v["shape"]) for k, v in json.loads(_fixture("keys.json").read_text()).items()}


@pytest.fixture(scope="module")
def used_keys(keys) -> dict:
    from biomedseg.models.biomedparse.checkpoint import is_unused_key

    return {k: s for k, s in keys.items() if not is_unused_key(k)}


@pytest.fixture(scope="module")
def det_state(detweights, used_keys):
    return detweights.det_state_dict(used_keys)


@pytest.fixture(scope="module")
def model(det_state):
    from biomedseg.models.biomedparse.checkpoint import build_biomedparse_v1

    return build_biomedparse_v1(state_dict=det_state)


@pytest.fixture(scope="module")
def tokenizer():
    from biomedseg.models.biomedparse.tokenizer import ClipTokenizer

    require_bpe_vocab()
    return ClipTokenizer()


@pytest.fixture(scope="module")
def ct_rgb():
    return np.ascontiguousarray(_png("ct_abdomen_window_1024.png")[..., :3])


@pytest.fixture(scope="module")
def joint(model, tokenizer, ct_rgb):
    """One joint-mode run (the authors' interactive_infer_image), shared by the tests below."""
    from biomedseg.models.biomedparse.inference import segment

    return segment(model, tokenizer, ct_rgb, PROMPTS, mode="joint")


# ---- names and loading ---------------------------------------------------------------------
def test_model_names_and_shapes_are_the_checkpoints_minus_the_listed_unused(keys):
    from biomedseg.models.biomedparse.checkpoint import UNUSED_KEYS, UNUSED_PREFIXES, expected_shapes

    model_shapes = expected_shapes()
    dropped = {k for k in keys if k.startswith(UNUSED_PREFIXES) or k in UNUSED_KEYS}
    assert len(keys) == 1131 and len(dropped) == 199 + 7
    assert set(UNUSED_KEYS) <= set(keys)
    assert model_shapes == {k: s for k, s in keys.items() if k not in dropped}


def test_checkpoint_file_loads_strictly_after_dropping_listed_keys(tmp_path, detweights, keys, det_state, caplog):
    from biomedseg.models.biomedparse.checkpoint import build_biomedparse_v1, load_state_dict_from_checkpoint

    unused = detweights.det_state_dict({k: s for k, s in keys.items() if k not in det_state})
    path = tmp_path / "biomedparse_v1.pt"
    # saved with a 'model.' prefix, as some exports do
    torch.save({f"model.{k}": v for k, v in {**det_state, **unused}.items()}, path)
    del unused
    with caplog.at_level("INFO"):
        state = load_state_dict_from_checkpoint(path)
    assert "206 unused" in caplog.text and "dilation_kernel" in caplog.text
    assert set(state) == set(det_state)
    path.unlink()
    model = build_biomedparse_v1(state_dict=state)
    name = "sem_seg_head.predictor.lang_encoder.lang_proj"
    assert torch.equal(model.state_dict()[name], det_state[name])


def test_missing_unexpected_or_misshaped_weights_raise_clear_errors(tmp_path, det_state):
    from biomedseg.models.biomedparse.checkpoint import (CheckpointMismatchError, build_biomedparse_v1,
                                                         load_state_dict_from_checkpoint)

    missing = dict(det_state)
    del missing["backbone.norm3.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"1 missing key\(s\): backbone.norm3.weight"):
        build_biomedparse_v1(state_dict=missing)

    wrong = dict(det_state)
    wrong["sem_seg_head.predictor.query_feat.weight"] = torch.zeros(100, 512)
    with pytest.raises(CheckpointMismatchError, match=r"query_feat.weight: file \(100, 512\) vs model \(101, 512\)"):
        build_biomedparse_v1(state_dict=wrong)

    extra = dict(det_state)
    extra["sem_seg_head.predictor.bbox_embed.weight"] = torch.zeros(4)
    with pytest.raises(CheckpointMismatchError, match="1 unexpected key"):
        build_biomedparse_v1(state_dict=extra)

    small = tmp_path / "small.pt"
    torch.save({"model.backbone.norm0.weight": torch.ones(192)}, small)
    with pytest.raises(CheckpointMismatchError, match=r"924 missing key\(s\)"):
        load_state_dict_from_checkpoint(small)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match="Could not read"):
        load_state_dict_from_checkpoint(tmp_path / "junk.pt")


# ---- tokenizer -----------------------------------------------------------------------------
def test_tokenizer_ids_match(tokenizer, expected):
    tokens = tokenizer(PROMPTS)
    assert tokenizer.vocab_size == 49408
    np.testing.assert_array_equal(tokens["input_ids"].numpy(), expected["input_ids"])
    np.testing.assert_array_equal(tokens["attention_mask"].numpy(), expected["attention_mask"])
    assert tokenizer.encode("COVID-19 infection") == [622, 9284, 268, 272, 280, 14774]
    long = tokenizer(["word " * 200])
    assert long["attention_mask"].sum() == 77 and long["input_ids"][0, -1] == 49407


def test_tokenizer_from_vocab_json_and_merges_txt(tmp_path, tokenizer):
    from biomedseg.models.biomedparse.tokenizer import ClipTokenizer

    inverse = {i: t for t, i in tokenizer.encoder.items()}
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    (tmp_path / "vocab.json").write_text(json.dumps({inverse[i]: i for i in range(len(inverse))}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    hf = ClipTokenizer(vocab_json=tmp_path / "vocab.json", merges_txt=tmp_path / "merges.txt")
    for text in PROMPTS + ["Don't   <b>stop</b> &amp; 3.5cm² lesion's naïve"]:
        assert hf.encode(text) == tokenizer.encode(text)


# ---- preprocessing -------------------------------------------------------------------------
def test_preprocessing_matches_authors_images_exactly():
    from biomedseg.models.biomedparse.preprocess import process_intensity_image

    pre = np.load(_fixture("preprocessing.npz"))
    hu = pre["ct_hu"].astype(np.float64)  # already HU (slope 1, intercept applied), passed as float64
    ct = process_intensity_image(hu, is_ct=True, site="abdomen")
    np.testing.assert_array_equal(ct, _png("ct_abdomen_window_1024.png")[..., :3])
    mr = process_intensity_image(pre["mr_raw"].astype(np.float64), is_ct=False)
    np.testing.assert_array_equal(mr, _png("mr_percentile_1024.png")[..., :3])


def test_dicom_reader_gives_the_fixture_hu():
    pydicom_data = pytest.importorskip("pydicom.data")
    from biomedseg.models.biomedparse.preprocess import read_dicom_hu

    pre = np.load(_fixture("preprocessing.npz"))
    hu = read_dicom_hu(pydicom_data.get_testdata_file("CT_small.dcm"))
    np.testing.assert_array_equal(hu, pre["ct_hu"].astype(np.float64))


def test_torch_resize_path_is_close_but_not_parity():
    from biomedseg.models.biomedparse.preprocess import process_intensity_image

    pre = np.load(_fixture("preprocessing.npz"))
    for raw, ct, png in ((pre["ct_hu"], True, "ct_abdomen_window_1024.png"),
                         (pre["mr_raw"], False, "mr_percentile_1024.png")):
        fast = process_intensity_image(raw.astype(np.float64), is_ct=ct, site="abdomen", resize="torch")
        diff = np.abs(fast.astype(int) - _png(png)[..., :3].astype(int))
        assert diff.max() <= 16 and diff.mean() < 1.0, (png, diff.max(), diff.mean())


def test_spline_resize_equals_scikit_image_when_downsampling_and_padding():
    transform = pytest.importorskip("skimage.transform")
    from biomedseg.models.biomedparse.preprocess import pad_to_square, resize_spline

    image = pad_to_square(np.random.default_rng(0).random((1300, 1100)) * 255)
    assert image.shape == (1300, 1300)
    ref = transform.resize(image, (1024, 1024), order=3, mode="constant", preserve_range=True, anti_aliasing=True)
    np.testing.assert_array_equal(resize_spline(image), ref)


def test_restore_geometry_removes_the_square_padding():
    from biomedseg.models.biomedparse.preprocess import restore_geometry

    probs = torch.zeros(2, 1024, 1024)
    probs[:, :, 256:768] = 1.0  # the 100x50 slice occupies the middle half of the padded square
    out = restore_geometry(probs, (100, 50))
    assert out.shape == (2, 100, 50)
    assert out.min() > 0.99


# ---- forward, stage by stage ---------------------------------------------------------------
def _check_stats(expected, name, tensor):
    prefix = f"stats/{name}/"
    atol = TOL[name]
    t = tensor.detach().double()
    assert tuple(t.shape) == tuple(expected[prefix + "shape"]), name
    corner = t[0, :8, :8, :8] if t.dim() == 4 else t
    _assert_close(f"{name} corner", corner.float(), expected[prefix + "corner"], atol)
    _assert_close(f"{name} mean", t.mean(), expected[prefix + "mean"], atol)
    _assert_close(f"{name} std", t.std(unbiased=False), expected[prefix + "std"], atol)
    _assert_close(f"{name} min", t.min(), expected[prefix + "min"], atol)
    _assert_close(f"{name} max", t.max(), expected[prefix + "max"], atol)


def test_normalised_model_input(model, ct_rgb, expected):
    x = model.normalize(torch.from_numpy(ct_rgb.copy()).permute(2, 0, 1)[None])
    assert x.dtype == torch.float32
    prefix = "stats/model_input_normalized/"
    _assert_close("input corner", x[0, :, :8, :8], expected[prefix + "corner"], TOL["model_input_normalized"])
    _assert_close("input mean", x.double().mean(), expected[prefix + "mean"], 1e-9)


@pytest.mark.parametrize("level", ["res2", "res3", "res4", "res5"])
def test_backbone_features(joint, expected, level):
    _check_stats(expected, f"backbone.{level}", joint.extras["features"][level])


def test_pixel_decoder_features(joint, expected):
    feats = joint.extras["features"]
    _check_stats(expected, "pixel_decoder.transformer_encoder_features", feats["transformer_encoder_features"])
    for i in range(3):
        _check_stats(expected, f"pixel_decoder.multi_scale_features.{i}", feats["multi_scale_features"][i])
    _check_stats(expected, "pixel_decoder.mask_features", feats["mask_features"])


def test_text_embeddings(joint, expected):
    (text,) = joint.extras["texts"]  # joint: the list encoded as one batch
    _assert_close("token_emb", text.token_emb, expected["token_emb"], EMB_ATOL)
    _assert_close("class_emb", text.class_emb, expected["class_emb"], EMB_ATOL)
    grounding = text.token_emb[text.attention_mask.bool()]
    _assert_close("grounding_tokens", grounding, expected["grounding_tokens"], EMB_ATOL)
    assert torch.equal(text.tokens, grounding)  # what the decoder reads


def test_decoder_outputs(model, joint, expected):
    out = joint.extras["decoder_outputs"][0]
    _assert_close("logit_scale", model.lang_encoder.logit_scale, expected["logit_scale"], 0)
    _assert_close("pred_captions", out["pred_captions"][0], expected["pred_captions"], CAPTION_ATOL)
    _check_stats(expected, "pred_masks", out["pred_masks"])
    masks = out["pred_masks"][0].double()
    _assert_close("per-query mask mean", masks.mean((1, 2)), expected["pred_masks_per_query_mean"], TOL["pred_masks"])
    _assert_close("per-query mask std", masks.std((1, 2), unbiased=False), expected["pred_masks_per_query_std"],
                  TOL["pred_masks"])


def test_similarity_matching_and_probabilities(joint, expected):
    _assert_close("sim", joint.sim[0], expected["sim"], SIM_ATOL)
    np.testing.assert_array_equal(joint.matched_id[0].numpy(), expected["matched_id"])
    _assert_close("sel_mask_logits", joint.logits[0], expected["sel_mask_logits"], LOGIT_ATOL)
    _assert_close("probs", joint.probs[0], expected["probs"], PROB_ATOL)


def test_contiguous_layout_with_frozen_parameters_stays_within_tolerance(model, tokenizer, joint, expected):
    """The engine's alternative for frozen weights (contiguous sequences, requires_grad False)."""
    from biomedseg.models.biomedparse.inference import TextCache, decode

    feats = joint.extras["features"]
    model.set_exact_layout(False).requires_grad_(False)
    try:
        texts = TextCache(model, tokenizer).groups(PROMPTS, joint=True)
        _assert_close("token_emb (frozen)", texts[0].token_emb, expected["token_emb"], EMB_ATOL)
        pred = decode(model, feats, texts, (1024, 1024), joint=True)
    finally:
        model.set_exact_layout(True).requires_grad_(True)
    np.testing.assert_array_equal(pred.matched_id[0].numpy(), expected["matched_id"])
    _assert_close("sim (contiguous)", pred.sim[0], expected["sim"], SIM_ATOL)
    _assert_close("sel_mask_logits (contiguous)", pred.logits[0], expected["sel_mask_logits"], LOGIT_ATOL)
    _assert_close("probs (contiguous)", pred.probs[0], expected["probs"], PROB_ATOL)


def test_per_prompt_mode_decodes_each_prompt_alone(model, tokenizer, joint):
    from biomedseg.models.biomedparse.inference import TextCache, decode

    feats = joint.extras["features"]
    pair = ["COVID-19 infection", "liver"]
    per = decode(model, feats, TextCache(model, tokenizer).groups(pair), (1024, 1024), keep_outputs=True)
    alone = decode(model, feats, TextCache(model, tokenizer).groups(["liver"], joint=True), (1024, 1024), joint=True)
    assert per.probs.shape == (1, 2, 1024, 1024) and per.sim.shape == (1, 101, 2)
    assert len(per.extras["decoder_outputs"]) == 2
    # the liver result does not depend on the other prompt: bit-identical to decoding 'liver' by itself
    assert torch.equal(per.probs[0, 1], alone.probs[0, 0])
    assert per.matched_id[0, 1] == alone.matched_id[0, 0]
    # joint decoding mixes the prompts, so its liver mask differs
    assert (joint.probs[0, 0] - per.probs[0, 1]).abs().max() > 1e-3



def test_a_batch_of_slices_decodes_as_the_reference(model, tokenizer, joint, expected):
    """The backend decodes B slices per pass with the same functions: each slice of a batch (here the
    fixture's features twice) still matches the authors' outputs, prompt by prompt and jointly."""
    from biomedseg.models.biomedparse.inference import TextCache, decode

    feats = joint.extras["features"]
    batch = {"mask_features": torch.cat([feats["mask_features"]] * 2),
             "multi_scale_features": [torch.cat([m] * 2) for m in feats["multi_scale_features"]]}
    texts = TextCache(model, tokenizer)
    both = decode(model, batch, texts.groups(PROMPTS, joint=True), (1024, 1024), joint=True)
    assert both.probs.shape == (2, 3, 1024, 1024) and both.sim.shape == (2, 101, 3)
    for s in range(2):
        np.testing.assert_array_equal(both.matched_id[s].numpy(), expected["matched_id"])
        _assert_close(f"sim (slice {s})", both.sim[s], expected["sim"], SIM_ATOL)
        _assert_close(f"sel_mask_logits (slice {s})", both.logits[s], expected["sel_mask_logits"], LOGIT_ATOL)
        _assert_close(f"probs (slice {s})", both.probs[s], expected["probs"], PROB_ATOL)
    one = decode(model, feats, texts.groups(PROMPTS), (1024, 1024))
    per = decode(model, batch, texts.groups(PROMPTS), (1024, 1024))
    for s in range(2):
        _assert_close(f"per-prompt probs (slice {s})", per.probs[s], one.probs[0], PROB_ATOL)

# ---- p-values ------------------------------------------------------------------------------
def test_p_values_match(joint, ct_rgb):
    from biomedseg.models.biomedparse.pvalue import check_mask_stats, load_target_dist, mask_p_value

    ref = json.loads(_fixture("pvalues.json").read_text())
    dist = load_target_dist(_fixture("target_dist.json"))
    synthetic = _png("pvalue_synthetic_mask.png")
    for i, prompt in enumerate(PROMPTS):
        r = ref[prompt]
        syn = mask_p_value(ct_rgb, synthetic, MODALITY[prompt], prompt, dist)
        np.testing.assert_allclose(syn.p_value, r["synthetic_mask"]["p_value"], rtol=1e-12)
        np.testing.assert_allclose(syn.ks_pvalues, r["synthetic_mask"]["ks_pvalues"], rtol=1e-12)
        np.testing.assert_allclose(syn.mask_stats, r["synthetic_mask"]["mask_stats"], rtol=1e-12)
        ours = mask_p_value(ct_rgb, joint.probs[0, i].numpy() * 255, MODALITY[prompt], prompt, dist)
        assert ours.p_value == r["model_mask"]["p_value"] == 0.0
        np.testing.assert_allclose(ours.mask_stats[0], r["model_mask"]["mask_stats"][0], atol=PROB_ATOL)
        np.testing.assert_allclose(ours.mask_stats[1:], r["model_mask"]["mask_stats"][1:], rtol=1e-6)
        np.testing.assert_allclose(ours.ks_pvalues, r["model_mask"]["ks_pvalues"], atol=1e-6)
        assert check_mask_stats(ct_rgb, synthetic, MODALITY[prompt], prompt, dist) == syn.p_value
    with pytest.raises(ValueError, match="Unknown target"):
        mask_p_value(ct_rgb, synthetic, "CT-Chest", "liver", dist)
