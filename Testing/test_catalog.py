"""The catalogue assembled from model folders (and $BIOMEDSEG_EXTRA_MODELS), checked by the schema."""
import copy
import json
import os
import shutil

import jsonschema
import numpy as np
import pytest

from biomedseg.catalog import MODELS_DIR, ModelEntry, check_prompts, get_model, load_catalog, validate_entries
from biomedseg.errors import InputError
from biomedseg.prompts import BoxPrompt, MaskPrompt, TextPrompt


@pytest.fixture
def fresh_catalog(monkeypatch):
    """Catalogue re-read with whatever $BIOMEDSEG_EXTRA_MODELS the test sets (restored afterwards)."""
    monkeypatch.delenv("BIOMEDSEG_EXTRA_MODELS", raising=False)
    load_catalog.cache_clear()
    yield monkeypatch
    load_catalog.cache_clear()


def bundled() -> list[dict]:
    return [json.loads((folder / "model.json").read_text()) for folder in sorted(MODELS_DIR.iterdir())
            if (folder / "model.json").is_file()]


def test_every_model_folder_matches_the_schema_and_names_files_it_has():
    from biomedseg.catalog import expand_variants

    data = [entry for raw in bundled() for entry in expand_variants(raw)]
    validate_entries(data)
    assert {m["id"] for m in data} == {e.id for e in load_catalog()} >= {"deepbet", "biomedparse-v1", "hermes",
                                                                          "medsam2", "medsam2-ct-lesion"}
    for entry in load_catalog():
        module, _, cls = entry.backend.partition(":")
        assert (entry.folder / f"{module}.py").is_file(), entry.id
        assert entry.package == f"biomedseg.models.{entry.folder.name}"
        if entry.data.get("targets_file"):
            assert entry.resource(entry.targets_file).is_file()
        for name, spec in entry.options.items():
            assert spec["help"] and spec["type"], (entry.id, name)


def test_schema_rejects_bad_entries():
    base = bundled()[0]
    for change in (lambda m: m.update(input="4d"),
                   lambda m: m["weights"].update(sha256="not-a-hash"),
                   lambda m: m.update(surprise=1),
                   lambda m: m.update(prompt_types=["text", "gesture"]),
                   lambda m: m.update(options={"Bad-Name": {"type": "int", "help": "x"}}),
                   lambda m: m.update(options={"n": {"type": "integer", "help": "x"}}),
                   lambda m: m.update(options={"n": {"type": "int"}}),
                   lambda m: m.update(targets_provider="not a module path")):
        bad = copy.deepcopy(base)
        change(bad)
        with pytest.raises(jsonschema.ValidationError):
            validate_entries([bad])
    with pytest.raises(ValueError, match="duplicate"):
        validate_entries([base, copy.deepcopy(base)])


def test_deepbet_is_ready_offline():
    state = get_model("deepbet").state()
    assert state == {"ready": True, "state": "ready", "detail": "shipped inside the 'deepbet' package"}


def test_biomedparse_targets_come_from_model_card():
    entry = get_model("biomedparse-v1")
    abdomen = entry.targets("CT", "abdomen")
    assert {"liver", "pancreas", "left kidney", "spleen"} <= set(abdomen)
    assert "neoplastic cells" in entry.targets("Pathology")
    assert entry.weights["gated"] is True and entry.weights["repo"] == "microsoft/BiomedParse"


def test_models_without_backend_say_so():
    entry = get_model("hermes")
    state = ModelEntry({**entry.data, "backend": None}, entry.folder, entry.package).state()
    assert state["ready"] is False and "not available" in state["state"]


def test_hermes_vocabulary_comes_from_its_targets_provider(monkeypatch):
    monkeypatch.delenv("BIOMEDSEG_WEIGHTS_DIR", raising=False)
    entry = get_model("hermes")
    assert entry.targets_provider == "tasks:catalog_targets"  # relative to the model's folder
    assert set(entry.target_table()) == set(entry.modalities)
    assert {"liver", "left kidney", "spleen", "pancreas"} <= set(entry.targets("CT", "abdomen"))
    assert "gray matter" in entry.targets("MRI-T1") and entry.targets("PET") == ["lesion"]
    state = entry.state()  # wired, but the user must bring the weights
    assert state["state"] == "weights missing" and "--weights" in state["detail"]


def test_prompt_check_refuses_unknown_prompts_with_close_matches():
    assert check_prompts("hermes", ["Liver", " left  kidney ", "liver", "IVC"]) == [
        TextPrompt("Liver"), TextPrompt("left kidney"), TextPrompt("IVC")]
    with pytest.raises(InputError, match="no task for 'spleeen'.*Did you mean: spleen"):
        check_prompts("hermes", ["liver", "spleeen"])


def test_prompt_types_a_model_does_not_declare_are_refused():
    box = BoxPrompt((0, 0, 0), (1, 1, 1), "axial", "tumour")
    with pytest.raises(InputError, match="does not take box prompts; it takes text"):
        check_prompts("biomedparse-v1", ["liver", box])
    with pytest.raises(InputError, match="No prompt given.*Try: .*aorta"):
        check_prompts("biomedparse-v1", ["  ", ""])
    assert check_prompts("deepbet", ["  ", ""]) == [TextPrompt("brain")]  # its one target needs no prompt
    with pytest.raises(InputError, match="mask prompt for 'x' is empty"):
        check_prompts("deepbet", [MaskPrompt(np.zeros((2, 2, 2), bool), "x")])


def test_unknown_model_lists_known_ones():
    with pytest.raises(InputError, match="Unknown model 'nope'.*deepbet"):
        get_model("nope")


def test_missing_dependency_reported():
    entry = get_model("deepbet")
    state = ModelEntry({**entry.data, "requires": ["torch", "surely_not_installed_pkg"]}, entry.folder).state()
    assert state["state"] == "dependencies missing" and "surely_not_installed_pkg" in state["detail"]


def test_extra_models_from_a_folder_a_folder_of_folders_or_a_catalogue_file(tmp_path, fresh_catalog):
    """A copied model folder with a new id is a new model: its backend, provider and files resolve
    relative to the copy, imported as a package of its own."""
    copy_dir = tmp_path / "hermes_copy"
    shutil.copytree(MODELS_DIR / "hermes", copy_dir, ignore=shutil.ignore_patterns("__pycache__"))
    data = json.loads((copy_dir / "model.json").read_text())
    data["id"] = "hermes-copy"
    (copy_dir / "model.json").write_text(json.dumps(data))
    (tmp_path / "file").mkdir()
    (tmp_path / "file" / "catalogue.json").write_text(json.dumps(
        {"schema_version": 1, "models": [{**json.loads((MODELS_DIR / "deepbet" / "model.json").read_text()),
                                          "id": "deepbet-listed", "backend": "biomedseg.models.deepbet.backend:"
                                                                             "DeepBetBackend"}]}))
    for extra in (str(copy_dir), str(tmp_path)):
        fresh_catalog.setenv("BIOMEDSEG_EXTRA_MODELS", extra)
        load_catalog.cache_clear()
        entry = get_model("hermes-copy")
        assert entry.folder == copy_dir and entry.package.startswith("biomedseg_extra_models.hermes_copy_")
        assert entry.targets("CT", "abdomen") == get_model("hermes").targets("CT", "abdomen")
        tasks = entry.resolve("tasks:catalog_targets").__module__
        assert tasks == entry.package + ".tasks"  # the copy's own module, not the bundled one
        assert entry.resolve(entry.backend).__name__ == "HermesBackend"
    fresh_catalog.setenv("BIOMEDSEG_EXTRA_MODELS", str(tmp_path / "file" / "catalogue.json"))
    load_catalog.cache_clear()
    assert get_model("deepbet-listed").resolve(get_model("deepbet-listed").backend).__name__ == "DeepBetBackend"



def test_a_broken_extra_model_is_left_out_and_said_so(tmp_path, fresh_catalog, capsys):
    """A site's broken model.json (or a missing folder, or a taken id) never stops the bundled models."""
    from biomedseg.catalog import PROBLEMS
    from biomedseg.cli import main

    broken = tmp_path / "broken"
    broken.mkdir()
    data = json.loads((MODELS_DIR / "deepbet" / "model.json").read_text())
    (broken / "model.json").write_text(json.dumps({k: v for k, v in data.items() if k != "title"} | {"id": "x"}))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "model.json").write_text(json.dumps(data))
    fresh_catalog.setenv("BIOMEDSEG_EXTRA_MODELS", os.pathsep.join([str(broken), str(taken), str(tmp_path / "gone")]))
    load_catalog.cache_clear()
    from biomedseg.catalog import expand_variants

    bundled_ids = [e["id"] for raw in bundled() for e in expand_variants(raw)]
    assert sorted(e.id for e in load_catalog()) == sorted(bundled_ids)  # the broken ones left out, nothing else
    assert load_catalog()[0].id == "deepbet"  # the default first
    assert len(PROBLEMS) == 3
    assert f"'{broken / 'model.json'}' was left out: 'title' is a required property" in PROBLEMS[0]
    assert "the id 'deepbet' is taken" in PROBLEMS[1] and "does not exist" in PROBLEMS[2]
    assert main(["models"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: ") == 3 and "'title' is a required property" in err


def test_a_bundled_folder_name_that_is_no_python_name_still_imports(tmp_path, monkeypatch):
    """A copy such as models/hermes.v2/ (a dot is no package name) gets a package of its own."""
    from biomedseg import catalog

    root = tmp_path / "models"
    shutil.copytree(MODELS_DIR / "deepbet", root / "deep.bet", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(catalog, "MODELS_DIR", root)
    monkeypatch.delenv("BIOMEDSEG_EXTRA_MODELS", raising=False)
    load_catalog.cache_clear()
    try:
        (entry,) = load_catalog()
        assert entry.package.startswith("biomedseg_extra_models.deep_bet_")
        assert entry.resolve(entry.backend).__name__ == "DeepBetBackend"
    finally:
        load_catalog.cache_clear()
