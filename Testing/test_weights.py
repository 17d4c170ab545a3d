"""Weights resolution on files the tests create (no hub access here)."""
import hashlib

import pytest

from biomedseg.errors import WeightsMissingError
from biomedseg.runtime.weights import resolve_weights, weights_state


def _spec(tmp_path, sha=None, source="hub"):
    return {"source": source, "repo": "example-org/definitely-not-cached-model", "files": ["ckpt.pt"],
            "revision": "main", "sha256": sha, "license": "MIT", "gated": True, "size_bytes": 10}


def test_local_file_used_and_checksum_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("BIOMEDSEG_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"weights" * 100)
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert resolve_weights(_spec(tmp_path, sha), local_path=ckpt) == [ckpt]
    # remembered: the record now holds the verified hash
    assert sha in (tmp_path / "cache" / "verified.json").read_text()
    # folder form works too
    assert resolve_weights(_spec(tmp_path, sha), local_path=tmp_path) == [ckpt]


def test_checksum_mismatch_is_an_actionable_error(tmp_path, monkeypatch):
    monkeypatch.setenv("BIOMEDSEG_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"corrupted")
    with pytest.raises(WeightsMissingError, match="Checksum mismatch.*ckpt.pt") as err:
        resolve_weights(_spec(tmp_path, "0" * 64), local_path=ckpt)
    assert "download again" in err.value.hint


def test_missing_local_path(tmp_path):
    with pytest.raises(WeightsMissingError, match="not found at"):
        resolve_weights(_spec(tmp_path), local_path=tmp_path / "nowhere.pt")


def test_offline_mode_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    state = weights_state(_spec(tmp_path))
    assert state["present"] is False and "gated" in state["detail"]
    with pytest.raises(WeightsMissingError, match="not in the hub cache and offline mode is on"):
        resolve_weights(_spec(tmp_path), offline=True)


def test_weights_dir_environment(tmp_path, monkeypatch):
    (tmp_path / "ckpt.pt").write_bytes(b"x")
    monkeypatch.setenv("BIOMEDSEG_WEIGHTS_DIR", str(tmp_path))
    state = weights_state(_spec(tmp_path, source="user_file"))
    assert state["present"] and state["paths"] == [str(tmp_path / "ckpt.pt")]


def test_user_file_missing_gives_instructions(tmp_path, monkeypatch):
    monkeypatch.delenv("BIOMEDSEG_WEIGHTS_DIR", raising=False)
    spec = {**_spec(tmp_path, source="user_file"), "instructions": "Download X from the authors."}
    with pytest.raises(WeightsMissingError, match="not on this machine") as err:
        resolve_weights(spec)
    assert err.value.hint == "Download X from the authors."


def _fake_hub_cache(root, repo, filename, content: bytes, blob_name: str):
    """The hub cache's layout: blobs named by content hash, a snapshot symlink, refs/main."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "blobs").mkdir(parents=True)
    (repo_dir / "blobs" / blob_name).write_bytes(content)
    snapshot = repo_dir / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / filename).symlink_to(f"../../blobs/{blob_name}")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("a" * 40)
    return snapshot / filename


@pytest.mark.parametrize("intact", [True, False])
def test_hub_file_checked_against_its_lfs_sha256_when_the_catalogue_has_none(tmp_path, monkeypatch, intact):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("BIOMEDSEG_CACHE", str(tmp_path / "cache"))
    spec = _spec(tmp_path)
    content = b"checkpoint bytes" * 1000
    sha = hashlib.sha256(content).hexdigest()
    cached = _fake_hub_cache(tmp_path / "hub", spec["repo"], "ckpt.pt", content if intact else content[:-7], sha)
    if intact:
        assert resolve_weights(spec, offline=True) == [cached]
        assert sha in (tmp_path / "cache" / "verified.json").read_text()
    else:
        with pytest.raises(WeightsMissingError, match=f"Checksum mismatch.*expected sha256 {sha}"):
            resolve_weights(spec, offline=True)


def test_small_hub_files_named_by_git_hash_are_not_checked(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from biomedseg.runtime.weights import hub_content_sha256

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = {**_spec(tmp_path), "files": ["vocab.json"]}
    cached = _fake_hub_cache(tmp_path / "hub", spec["repo"], "vocab.json", b"{}", "b" * 40)
    assert hub_content_sha256(cached) is None
    assert resolve_weights(spec, offline=True) == [cached]


# ---- an explicit --weights is used or refused, never replaced ----------------------------------
def test_explicit_weights_are_never_replaced_by_another_source(tmp_path, monkeypatch, capsys):
    """deepbet with --weights FILE used the packaged weights and exited 0; hermes with --weights MISSING
    took $BIOMEDSEG_WEIGHTS_DIR/hermes_resunet.pth. Both now refuse, naming the file (exit 3)."""
    from biomedseg.cli import main

    image = tmp_path / "img.nii.gz"
    import nibabel as nib
    import numpy as np

    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.int16), np.eye(4)), image)
    any_file = tmp_path / "any.pt"
    any_file.write_bytes(b"whatever")
    assert main(["segment", str(image), "--prompt", "brain", "--weights", str(any_file), "-o",
                 str(tmp_path / "a.seg.nrrd")]) == 3
    err = capsys.readouterr().err
    assert f"'{any_file}' is one file, but this model needs bbox_model.pt, model.pt" in err
    elsewhere = tmp_path / "weights_dir"
    elsewhere.mkdir()
    (elsewhere / "hermes_resunet.pth").write_bytes(b"would be taken before")
    monkeypatch.setenv("BIOMEDSEG_WEIGHTS_DIR", str(elsewhere))
    missing = tmp_path / "nonexistent.pth"
    assert main(["segment", str(image), "--model", "hermes", "--prompt", "liver", "--modality", "CT",
                 "--weights", str(missing), "-o", str(tmp_path / "h.seg.nrrd")]) == 3
    assert f"'{missing}' does not exist" in capsys.readouterr().err
    assert list(p.name for p in tmp_path.iterdir() if p.suffix == ".nrrd") == []


def test_torchscript_from_outside_the_package_must_be_the_known_files(tmp_path, monkeypatch):
    """TorchScript runs code when loaded (weights_only does not cover it): a user folder is used only
    when its files have the catalogue's checksums."""
    import shutil

    from biomedseg.catalog import get_model

    monkeypatch.setenv("BIOMEDSEG_CACHE", str(tmp_path / "cache"))
    spec = get_model("deepbet").weights
    packaged = resolve_weights(spec)
    same = tmp_path / "copy"
    same.mkdir()
    for path in packaged:
        shutil.copy(path, same / path.name)
    assert [p.name for p in resolve_weights(spec, local_path=same)] == ["bbox_model.pt", "model.pt"]
    (same / "model.pt").write_bytes((same / "model.pt").read_bytes() + b"\0")  # any change: other code
    with pytest.raises(WeightsMissingError, match="model.pt' is TorchScript, which runs its own code") as err:
        resolve_weights(spec, local_path=same)
    assert "its sha256 differs" in str(err.value) and "drop --weights" in err.value.hint
    monkeypatch.setenv("BIOMEDSEG_WEIGHTS_DIR", str(same))  # the same rule for the weights folder
    with pytest.raises(WeightsMissingError, match="runs its own code"):
        resolve_weights(spec)


def test_a_damaged_weights_file_names_itself(tmp_path, monkeypatch):
    """Not a checkpoint at all: the error names the file (it was 'Internal error in the worker')."""
    from biomedseg.engine import load_backend
    from biomedseg.errors import InputError

    bad = tmp_path / "hermes_resunet.pth"
    bad.write_bytes(b"<html>not a checkpoint</html>")
    with pytest.raises((WeightsMissingError, InputError), match=str(bad)):
        load_backend("hermes", "cpu", str(bad))


def test_torchscript_swapped_after_the_check_is_not_loaded(tmp_path, monkeypatch):
    """Checked and loaded from the same bytes: a file replaced between resolving and loading is refused."""
    import shutil

    from biomedseg.catalog import get_model
    from biomedseg.runtime.weights import trusted_code_bytes

    monkeypatch.setenv("BIOMEDSEG_CACHE", str(tmp_path / "cache"))
    spec = get_model("deepbet").weights
    folder = tmp_path / "copy"
    folder.mkdir()
    for path in resolve_weights(spec):
        shutil.copy(path, folder / path.name)
    paths = resolve_weights(spec, local_path=folder)  # checked
    assert trusted_code_bytes(paths[1], spec) == paths[1].read_bytes()
    paths[1].write_bytes(b"other code")  # swapped before loading
    with pytest.raises(WeightsMissingError, match="runs its own code"):
        trusted_code_bytes(paths[1], spec)
