import copy
import json

import jsonschema
import pytest

from biomedseg.catalog import ModelEntry, get_model, load_catalog, validate_catalog
from biomedseg.errors import InputError
from biomedseg.catalog import _resource_text


def test_catalog_matches_schema_and_ids_are_unique():
    data = json.loads(_resource_text("models.json"))
    validate_catalog(data)
    assert len(load_catalog()) == len(data["models"]) >= 3


def test_schema_rejects_bad_entries():
    data = json.loads(_resource_text("models.json"))
    bad = copy.deepcopy(data)
    bad["models"][0]["input"] = "4d"
    with pytest.raises(jsonschema.ValidationError):
        validate_catalog(bad)
    bad = copy.deepcopy(data)
    bad["models"][0]["weights"]["sha256"] = "not-a-hash"
    with pytest.raises(jsonschema.ValidationError):
        validate_catalog(bad)
    dup = copy.deepcopy(data)
    dup["models"].append(copy.deepcopy(dup["models"][0]))
    with pytest.raises(ValueError, match="duplicate"):
        validate_catalog(dup)


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
    state = ModelEntry({**get_model("hermes").data, "backend": None}).state()
    assert state["ready"] is False and "not available" in state["state"]


def test_hermes_vocabulary_comes_from_its_targets_provider(monkeypatch):
    monkeypatch.delenv("BIOMEDSEG_WEIGHTS_DIR", raising=False)
    entry = get_model("hermes")
    assert entry.targets_provider == "biomedseg.models.hermes.tasks:catalog_targets"
    assert set(entry.target_table()) == set(entry.modalities)
    assert {"liver", "left kidney", "spleen", "pancreas"} <= set(entry.targets("CT", "abdomen"))
    assert "gray matter" in entry.targets("MRI-T1") and entry.targets("PET") == ["lesion"]
    state = entry.state()  # wired, but the user must bring the weights
    assert state["state"] == "weights missing" and "--weights" in state["detail"]


def test_prompt_check_refuses_unknown_prompts_with_close_matches():
    from biomedseg.catalog import check_prompts

    assert check_prompts("hermes", ["Liver", " left  kidney ", "liver", "IVC"]) == ["Liver", "left kidney", "IVC"]
    with pytest.raises(InputError, match="no task for 'spleeen'.*Did you mean: spleen"):
        check_prompts("hermes", ["liver", "spleeen"])


def test_schema_checks_provider_paths():
    data = json.loads(_resource_text("models.json"))
    bad = copy.deepcopy(data)
    hermes = next(m for m in bad["models"] if m["id"] == "hermes")
    hermes["targets_provider"] = "not a module path"
    with pytest.raises(jsonschema.ValidationError):
        validate_catalog(bad)


def test_unknown_model_lists_known_ones():
    with pytest.raises(InputError, match="Unknown model 'nope'.*deepbet"):
        get_model("nope")


def test_missing_dependency_reported():
    entry = ModelEntry({**get_model("deepbet").data, "requires": ["torch", "surely_not_installed_pkg"]})
    state = entry.state()
    assert state["state"] == "dependencies missing" and "surely_not_installed_pkg" in state["detail"]
