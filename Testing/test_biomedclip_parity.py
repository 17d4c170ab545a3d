"""BiomedCLIP against the authors' open_clip, and its tokenizer against transformers' reference BERT tokenizer.

The fixture (shared/parity/biomedclip, see its README) is open_clip's ``CustomTextCLIP`` run on CPU in
float32 with deterministic name-keyed weights (shared/parity/detweights.py). Here the weights are
made from ``keys.json`` alone (the authors' names and shapes, not this network's), saved with
``torch.save`` beside the ``position_ids`` buffer that transformers < 4.31 wrote into such files, and
loaded through ``load_checkpoint`` (strict), so the parity run also proves the loading path. Every
key of ``expected.npz`` is compared within the README's tolerance (about 10x the float64-rerun
deviation). ``text_last_hidden_first8`` is compared at valid positions only: row 0 positions 0-1,
row 1 positions 0-4, rows 2 and 3 all 8; the rest are pad queries, which never reach a feature.

The token ids of the fixture are synthetic (the real vocabulary is not available here), so the
tokenizer is tested on a vocabulary this file writes, against the pure-Python BERT tokenizer of
transformers. About 15-25 s on the 2-core VM, most of it making 196M weights and the two towers.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from PIL import Image  # noqa: E402

from conftest import load_detweights, parity_file  # noqa: E402

from biomedseg.errors import InputError, WeightsMissingError  # noqa: E402
from biomedseg.models.biomedclip.network import (POSITION_IDS_KEY, CheckpointMismatchError,  # noqa: E402
                                                 apply_renames, check_state_dict, load_checkpoint)
from biomedseg.models.biomedclip.preprocess import prepare_batch, prepare_image, preprocess_pil  # noqa: E402
from biomedseg.models.biomedclip.tokenizer import encode, tokenize  # noqa: E402

#: README "Numerical noise and recommended tolerances" (absolute)
TOL = {"image_features": 3e-5, "image_features_norm": 2e-6, "text_features": 5e-5, "text_features_norm": 4e-6,
       "logits_per_image": 4e-6, "logits_per_text": 4e-6, "vis_last_block_cls": 1e-4, "vis_norm_cls": 3e-5,
       "vis_pooled_pre_proj": 3e-5, "text_pooled": 1e-4, "text_last_hidden_first8": 1e-4,
       "logit_scale_exp": 1e-6, "logit_scale_param": 0.0, "images_pre": 1e-6, "extra_cell_pre": 1e-6}
EXACT = ("images_uint8", "text_ids", "text_attention_mask", "image_names")
VALID_LENGTHS = (2, 5, 20, 256)  # of the four text rows


pytestmark = pytest.mark.usefixtures("two_torch_threads")  # the fixtures' thread count (conftest)


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(parity_file("biomedclip/expected.npz")))


@pytest.fixture(scope="module")
def keys():
    return json.loads(parity_file("biomedclip/keys.json").read_text())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, keys):
    """(path, {name: float64 sum}) of a checkpoint made from keys.json with the detweights rule."""
    state = load_detweights().det_state_dict({k: tuple(v["shape"]) for k, v in keys.items()})
    sums = {k: float(v.sum(dtype=torch.float64)) for k, v in state.items()}
    state[POSITION_IDS_KEY] = torch.arange(512).unsqueeze(0)  # as transformers < 4.31 saved it
    path = tmp_path_factory.mktemp("biomedclip") / "open_clip_pytorch_model.bin"
    torch.save(state, path)
    return path, sums


@pytest.fixture(scope="module")
def net(checkpoint):
    return load_checkpoint(checkpoint[0])


@pytest.fixture(scope="module")
def outputs(net, expected):
    """Every model key of expected.npz, computed here; intermediates through hooks, as the fixture's."""
    seen = {}
    trunk = net.visual.trunk
    hooks = [trunk.blocks[11].register_forward_hook(lambda m, i, o: seen.__setitem__("vis_last_block_cls", o[:, 0])),
             trunk.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("vis_norm_cls", o[:, 0])),
             net.visual.head.register_forward_pre_hook(lambda m, i: seen.__setitem__("vis_pooled_pre_proj", i[0])),
             net.text.pooler.register_forward_hook(lambda m, i, o: seen.__setitem__("text_pooled", o)),
             net.text.transformer.register_forward_hook(
                 lambda m, i, o: seen.__setitem__("text_last_hidden_first8", o.last_hidden_state[:, :8]))]
    try:
        with torch.no_grad():
            image = net.encode_image(torch.from_numpy(expected["images_pre"]))
            text = net.encode_text(torch.from_numpy(expected["text_ids"]))
            per_image, per_text = net.logits_from_features(image, text)
            scale = net.logit_scale.detach()
            out = {"image_features": image, "text_features": text,
                   "image_features_norm": torch.nn.functional.normalize(image, dim=-1),
                   "text_features_norm": torch.nn.functional.normalize(text, dim=-1),
                   "logits_per_image": per_image, "logits_per_text": per_text,
                   "logit_scale_param": scale, "logit_scale_exp": scale.exp(), **seen}
    finally:
        for hook in hooks:
            hook.remove()
    return {k: v.numpy() for k, v in out.items()}


def _pngs(expected):
    return [parity_file(f"biomedclip/image_{name}.png") for name in expected["image_names"]]


# -- weights and loading -------------------------------------------------------------------------


def test_state_dict_is_the_authors(net, keys):
    state = net.state_dict()
    assert list(state) == list(keys)  # names and order of open_clip's CustomTextCLIP, 351 entries
    assert {k: list(v.shape) for k, v in state.items()} == {k: v["shape"] for k, v in keys.items()}
    assert all(v.dtype == torch.float32 for v in state.values())
    assert not any("pooler" in k for k in state) and POSITION_IDS_KEY not in state
    assert not net.training


def test_strict_load_gives_every_tensor_of_the_file(net, checkpoint):
    sums = checkpoint[1]
    got = {k: float(v.sum(dtype=torch.float64)) for k, v in net.state_dict().items()}
    assert got == sums


def test_wrong_checkpoints_are_refused_with_the_keys_named(net, tmp_path):
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}  # only shapes are read
    state.pop("visual.head.proj.weight")
    state["text.transformer.pooler.dense.weight"] = torch.zeros(768, 768)
    state["text.proj.0.weight"] = torch.zeros(640, 512)
    with pytest.raises(CheckpointMismatchError) as err:
        check_state_dict(state, shapes)
    message = str(err.value)
    assert "1 missing key(s): visual.head.proj.weight" in message
    assert "1 unexpected key(s): text.transformer.pooler.dense.weight" in message
    assert "text.proj.0.weight: file (640, 512) vs model (640, 768)" in message

    small = tmp_path / "other.bin"
    torch.save({"state_dict": {"visual.trunk.cls_token": torch.zeros(1, 1, 768), "image_encoder.x": torch.zeros(1)},
                "epoch": 3}, small)
    with pytest.raises(CheckpointMismatchError, match=r"350 missing key\(s\).*unexpected key\(s\): image_encoder.x"):
        load_checkpoint(small)
    (tmp_path / "junk.bin").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointMismatchError, match="Could not read"):
        load_checkpoint(tmp_path / "junk.bin")
    with pytest.raises(InputError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.bin")


def test_documented_renames_only():
    state = {"module.logit_scale": torch.ones(1), f"module.{POSITION_IDS_KEY}": torch.arange(512)[None],
             "module.text.proj.0.weight": torch.zeros(2)}
    renamed = apply_renames(state)
    assert set(renamed) == {"logit_scale", "text.proj.0.weight"} and renamed["logit_scale"].shape == ()
    assert set(apply_renames({"module.a": torch.zeros(1), "b": torch.zeros(1)})) == {"module.a", "b"}
    with pytest.raises(CheckpointMismatchError, match="position_ids"):
        apply_renames({POSITION_IDS_KEY: torch.arange(512).flip(0)[None]})


# -- preprocessing --------------------------------------------------------------------------------


def test_preprocessing_matches_the_authors(expected):
    pngs = _pngs(expected)
    pre = np.stack([preprocess_pil(Image.open(p)) for p in pngs])
    assert pre.dtype == np.float32 and pre.shape == expected["images_pre"].shape
    assert np.abs(pre - expected["images_pre"]).max() <= TOL["images_pre"]
    assert np.array_equal(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in pngs]), expected["images_uint8"])
    cell = Image.open(parity_file("biomedclip/preprocess_extra_cell_660x550.png"))
    assert cell.size == (550, 660)  # shortest side 550 -> 224x268, crop at top 22
    assert np.abs(preprocess_pil(cell) - expected["extra_cell_pre"]).max() <= TOL["extra_cell_pre"]


def test_slices_and_arrays_become_the_same_model_input(expected):
    grey = np.asarray(Image.open(parity_file("biomedclip/preprocess_extra_cell_660x550.png")).convert("L"))
    want = expected["extra_cell_pre"]
    for slice_ in (grey, grey.astype(np.float32), grey.astype(np.int16), grey[..., None]):
        assert np.abs(prepare_image(slice_) - want).max() <= 1e-6
    batch = prepare_batch(list(expected["images_uint8"]))
    assert batch.dtype == torch.float32 and batch.shape == (3, 3, 224, 224)
    assert np.abs(batch.numpy() - expected["images_pre"]).max() <= 1e-6
    rgba = np.concatenate([expected["images_uint8"][1], np.full((224, 224, 1), 7, np.uint8)], axis=2)
    assert np.array_equal(prepare_image(rgba), expected["images_pre"][1])  # alpha dropped after the resize
    for bad, why in ((grey.astype(np.float32) * 4 - 300, "window the image"), (np.zeros((4, 4, 2)), "shape"),
                     (np.full((8, 8), np.nan), "NaN")):
        with pytest.raises(InputError, match=why):
            prepare_image(bad)


# -- the towers -----------------------------------------------------------------------------------


def _worst(got, want, key):
    if key == "text_last_hidden_first8":  # valid positions only: pad queries never reach a feature
        return max(float(np.abs(got[r, :min(8, n)] - want[r, :min(8, n)]).max()) for r, n in enumerate(VALID_LENGTHS))
    return float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())


def test_every_key_within_the_readme_tolerance(outputs, expected):
    model_keys = set(expected) - set(EXACT) - {"images_pre", "extra_cell_pre"}
    assert model_keys == set(outputs)
    for key in sorted(model_keys):
        assert outputs[key].shape == expected[key].shape, key
    worst = {key: _worst(outputs[key], expected[key], key) for key in sorted(model_keys)}
    print("\nmax |delta|: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    assert {k: v for k, v in worst.items() if v > TOL[k]} == {}
    assert float(outputs["logit_scale_param"]) == float(expected["logit_scale_param"])  # exact


def test_fixture_inputs_are_as_described(expected):
    ids, mask = expected["text_ids"], expected["text_attention_mask"]
    assert [int(n) for n in (ids != 0).sum(1)] == list(VALID_LENGTHS) and np.array_equal(mask, ids != 0)
    assert all(ids[r, 0] == 2 and ids[r, n - 1] == 3 for r, n in enumerate(VALID_LENGTHS))


def test_ranking_and_pooling_follow_the_authors(outputs, expected):
    assert outputs["logits_per_image"].argmax(1).tolist() == expected["logits_per_image"].argmax(1).tolist() == [3, 2, 0]
    assert np.array_equal(outputs["vis_pooled_pre_proj"], outputs["vis_norm_cls"])  # token pooling, no fc_norm
    assert np.array_equal(outputs["text_pooled"], outputs["text_last_hidden_first8"][:, 0])  # CLS, no tanh pooler


def test_pads_do_not_reach_the_features(net, expected):
    ids = torch.from_numpy(expected["text_ids"][:2, :8].copy())  # rows of length 2 and 5, cut to 8
    with torch.no_grad():
        short = net.encode_text(ids)
    assert np.abs(short.numpy() - expected["text_features"][:2]).max() <= TOL["text_features"]
    for bad in (ids.float(), ids[0], torch.full((1, 3), 30522), torch.zeros(1, 513, dtype=torch.long)):
        with pytest.raises(InputError):
            net.encode_text(bad)


# -- the tokenizer --------------------------------------------------------------------------------

WORDS = ["the", "of", "a", "in", "and", "with", "left", "right", "liver", "kidney", "tumor", "lesion", "ct", "scan",
         "mri", "brain", "chest", "x", "ray", "lung", "abdomin", "naive", "sjogren", "cm", "1", "2", "5", "肝",
         "##s", "##al", "##ing", "##ed", "##0", "##ic", "##ne", "##ma", "##x", "cancer", "metasta", "##sis"]
PUNCT = list(".,;:!?()-/'\"%+=&<>[]")
TEXTS = ["CT scan of the LIVER.", "Left kidney, tumor (2.5 cm)!", "lungs; abdominal lesions", "naïve Sjögren chest X-ray",
         "xyzzy unknownword metastasis", "tumor & lesion < 10 cm", "  MRI\tbrain\n\nscan  ", "肝 and 脾 in CT",
         "chest\u200bx\x00ray", "", "ct" + "x" * 120, "the liver " * 400, "Left-right/abdominal...!!!", "cancers metastasised"]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *PUNCT, *WORDS]) + "\n", encoding="utf-8")
    return path


def _reference(vocab_path):
    """transformers' pure-Python BERT tokenizer (``BertTokenizerLegacy`` from 5.0, ``BertTokenizer`` before)."""
    try:
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as Slow
    except ImportError:
        from transformers import BertTokenizer as Slow
    slow = Slow(str(vocab_path), do_lower_case=True)
    assert not slow.is_fast
    return lambda texts: np.array(slow(texts, max_length=256, padding="max_length", truncation=True)["input_ids"])


def test_tokenizer_matches_the_reference_bert_tokenizer(vocab):
    want = _reference(vocab)(TEXTS)
    got = tokenize(TEXTS, vocab)
    assert got.dtype == torch.int64 and got.shape == (len(TEXTS), 256)
    assert np.array_equal(got.numpy(), want)
    long_row = got[TEXTS.index("the liver " * 400)]
    assert long_row[0] == 2 and long_row[255] == 3 and (long_row != 0).all()  # truncated, [SEP] kept last
    assert got[TEXTS.index("")].tolist()[:3] == [2, 3, 0]
    assert 1 in got[TEXTS.index("xyzzy unknownword metastasis")].tolist()  # [UNK]
    assert (got[:, 0] == 2).all()


def test_tokenizer_cleans_html_entities_as_open_clip(vocab):
    got = encode(["tumor &amp;amp; lesion &lt; 10 cm"], vocab)
    assert np.array_equal(got, _reference(vocab)(["tumor & lesion < 10 cm"]))


def test_tokenizer_json_and_folders_give_the_same_ids(vocab, tmp_path):
    import transformers
    from transformers import BertTokenizerFast

    # transformers 5 ignores vocab_file= silently; it takes the file as vocab=
    kwargs = {"vocab": str(vocab)} if int(transformers.__version__.split(".")[0]) >= 5 else {"vocab_file": str(vocab)}
    BertTokenizerFast(do_lower_case=True, **kwargs).save_pretrained(tmp_path / "hub")
    want = encode(TEXTS, vocab)
    assert np.array_equal(encode(TEXTS, tmp_path / "hub" / "tokenizer.json"), want)
    assert np.array_equal(encode(TEXTS, tmp_path / "hub"), want)  # the folder's tokenizer.json
    assert np.array_equal(encode(TEXTS, vocab.parent), want)  # the folder's vocab.txt


def test_tokenizer_refuses_what_the_model_cannot_take(tmp_path):
    with pytest.raises(WeightsMissingError):
        encode("liver", tmp_path / "absent.txt")
    bad = tmp_path / "pad_not_0.txt"
    bad.write_text("[UNK]\n[PAD]\n[CLS]\n[SEP]\n[MASK]\nliver\n")
    with pytest.raises(InputError, match=r"\[PAD\] must be 0"):
        encode("liver", bad)
    partial = tmp_path / "no_mask.txt"
    partial.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nliver\n")
    with pytest.raises(InputError, match=r"lacks \[MASK\]"):
        encode("liver", partial)
    with pytest.raises(InputError):
        encode([b"liver"], partial)
