"""BiomedCLIP's four uses end to end on deterministic weights: recognition, prompt checks, slice
ranking and `classify`, through the engine, the worker and the CLI. The weights are a checkpoint and
a vocabulary this test writes, so the figures say nothing about accuracy (the real weights'
accuracy was not measured here); what is tested is the plumbing: probabilities, order, cache,
warnings, slice indices and exit codes."""
from __future__ import annotations

import json

import numpy as np
import pytest

from biomedseg.errors import InputError
from biomedseg.prompts import TextPrompt
from biomedseg.volume import Volume
from conftest import chest_like
from geometry_cases import DIRECTIONS



@pytest.fixture(scope="module")
def weights(biomedclip_weights):
    return biomedclip_weights


def run(volume, prompts, weights, **options):
    from biomedseg.engine import segment

    return segment(volume, "biomedclip", [TextPrompt(p) for p in prompts], weights=str(weights), options=options)


def test_recognition_gives_one_distribution_per_family_and_the_best_of_each(weights):
    result = run(chest_like(), [], weights)
    families = {}
    for label in result.labels:
        families.setdefault(label.target, []).append(label)
    assert set(families) == {"modality", "site", "view"}
    from biomedseg.models.biomedclip.backend import vocabulary

    vocab = vocabulary()
    for family, labels in families.items():
        assert [l.name for l in labels] and {l.name for l in labels} == set(vocab["families"][family])
        assert abs(sum(l.score for l in labels) - 1.0) < 1e-6
        assert [l.score for l in labels] == sorted((l.score for l in labels), reverse=True)
        assert result.report["recognized"][family] == labels[0].name
    assert result.report["plan"]["window"].startswith("CT soft-tissue window")
    assert not result.segments and result.report["slices"] == sorted(result.report["slices"])


def test_a_check_after_recognition_reuses_the_slice_embeddings_and_warns_by_the_ratio(weights):
    volume = chest_like()
    run(volume, [], weights)
    calm = run(volume, ["liver"], weights, task="check", alternatives="lung,heart,brain", ratio=0.0)
    assert calm.report["slices_embedded"] == 0 and calm.report["warnings"] == []
    prompt, *alternatives = calm.labels
    assert prompt.name == "liver" and {a.name for a in alternatives} == {"lung", "heart", "brain"}
    assert abs(sum(l.score for l in calm.labels) - 1.0) < 1e-6 and all(l.target == "liver" for l in calm.labels)
    strict = run(volume, ["liver"], weights, task="check", alternatives=["lung", "heart", "brain"], ratio=1.0)
    # with ratio 1 the prompt is flagged exactly when an alternative beats it, and those are named
    prompt, *alternatives = strict.labels
    better = [a.name for a in alternatives if a.score > prompt.score]
    assert bool(strict.report["warnings"]) == bool(better)
    if better:
        assert "'liver' fits this image far less than" in strict.report["warnings"][0]
        assert all(f"'{name}'" in strict.report["warnings"][0] for name in better[:3])
    with pytest.raises(InputError, match="compares each prompt with alternatives"):
        run(volume, ["liver"], weights, task="check")


def test_ranking_order_follows_the_scores_and_names_array_slices_in_any_storage_order(weights):
    import torch

    from biomedseg.engine.loading import warm_backend

    flipped = DIRECTIONS[1][1]  # perm012, last axis flipped: display order differs from array order
    volume = chest_like(flipped)
    result = run(volume, ["lung", "liver"], weights, task="rank", top=4)
    ranking = result.report["ranking"]
    backend = warm_backend("biomedclip", result.device, str(weights))
    orientation = volume.slice_orientation("axial")
    for text in ("lung", "liver"):
        scores = [r["score"] for r in ranking[text]]
        assert scores == sorted(scores, reverse=True) and len(scores) == 4
        # independently: each named slice, cut from the array at that index, has that score
        with torch.inference_mode():
            text_emb = backend.embed_texts([text], "this is a photo of {}")[0]
        for entry in ranking[text]:
            cut = [slice(None)] * 3
            cut[orientation.slice_axis] = entry["slice"]
            shifted = volume.ijk_to_ras.copy()
            step = np.zeros(3)
            step[2 - orientation.slice_axis] = entry["slice"]
            shifted[:3, 3] += volume.ijk_to_ras[:3, :3] @ step
            one = Volume(np.expand_dims(volume.array[tuple(cut)], orientation.slice_axis), shifted)
            grey = backend.frames(one, result_plan(backend, one))[1](0)
            image = backend.embed([grey], lambda *a: None, lambda: False)[0]
            assert abs(backend.scale() * float(image @ text_emb) - entry["score"]) < 1e-4
    assert [l.target for l in result.labels] == ["lung"] * 4 + ["liver"] * 4
    # with a slice range the slices named are still the whole image's, with the same scores
    from biomedseg.engine import segment
    from biomedseg.geometry import make_region

    whole = run(volume, ["lung"], weights, task="rank", top=12).report["ranking"]["lung"]
    part = segment(volume, "biomedclip", [TextPrompt("lung")], weights=str(weights), region=make_region("axial", [3, 8]),
                   options={"task": "rank", "top": 12}).report["ranking"]["lung"]
    assert [r["slice"] for r in part] == [r["slice"] for r in whole if 3 <= r["slice"] <= 8]
    assert all(abs(p["score"] - w["score"]) < 1e-5 for p in part for w in whole if w["slice"] == p["slice"])


def result_plan(backend, volume):
    from biomedseg.prompts import PromptSet

    plan = backend.plan(volume, PromptSet(texts=["x"], targets=["x"]), {"task": "rank", "window": "soft-tissue"})
    return plan


def test_classify_from_the_cli_prints_probabilities_and_json_and_refuses_one_label(weights, tmp_path, capsys):
    from PIL import Image

    from biomedseg.cli import main

    rng = np.random.default_rng(0)
    image = tmp_path / "slide.png"
    Image.fromarray(rng.integers(0, 255, (300, 260, 3), dtype=np.uint8)).save(image)
    labels = ["adenocarcinoma histopathology", "squamous cell carcinoma histopathology", "normal tissue"]
    assert main(["classify", str(image), "--labels", *labels, "--weights", str(weights), "--in-process"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    printed = {line.rsplit(None, 1)[0].strip(): float(line.rsplit(None, 1)[1]) for line in lines}
    assert set(printed) == set(labels) and abs(sum(printed.values()) - 1.0) < 2e-4
    assert list(printed.values()) == sorted(printed.values(), reverse=True)
    # the same through the worker, as JSON
    assert main(["classify", str(image), "--labels", *labels, "--weights", str(weights), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [l["name"] for l in data["labels"]] == list(printed)
    assert all(abs(l["score"] - printed[l["name"]]) < 1e-4 for l in data["labels"])
    assert main(["classify", str(image), "--labels", "only one", "--weights", str(weights)]) == 2
    assert "at least two labels" in capsys.readouterr().err
    assert main(["classify", str(image), "--labels", "a", "b", "--weights", str(tmp_path / "none")]) == 3


def test_the_catalogue_entry_returns_labels_and_needs_its_two_files():
    from biomedseg.catalog import get_model

    entry = get_model("biomedclip")
    assert entry.results == ["labels"] and entry.prompt_types == ["text"]
    assert entry.weights["files"] == ["open_clip_pytorch_model.bin", "vocab.txt"]
    assert entry.weights["repo"] == "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"


def test_text_ids_cut_after_the_longest_phrase_give_the_authors_256_token_features(weights):
    import torch

    from biomedseg.models.biomedclip.network import load_checkpoint
    from conftest import parity_file

    expected = np.load(parity_file("biomedclip/expected.npz"))
    ids = torch.from_numpy(expected["text_ids"][:3])  # valid lengths 2, 5 and 20
    net = load_checkpoint(weights / "open_clip_pytorch_model.bin")
    with torch.inference_mode():
        cut = net.encode_text(ids[:, :20]).numpy()
    assert np.abs(cut - expected["text_features"][:3]).max() < 5e-5  # the fixture's tolerance
