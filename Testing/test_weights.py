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
