"""Finding model weights: inside an installed package, in a local file, or on the hub.

Order of search: an explicit local path (file or folder) -> ``$BIOMEDSEG_WEIGHTS_DIR`` ->
the package that ships them -> the Hugging Face cache -> a download (unless offline).
Files with a known sha256 are verified once; the result is remembered per (path, size,
mtime) so a 2 GB checkpoint is not re-hashed on every run. The sha256 is the catalogue's,
or, for a file from the hub whose catalogue entry has none, the hub's own: large files live
in the hub cache under their Git LFS sha256, so a truncated or altered download is caught too. Failures say which file,
where it was looked for and how to get it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from ..errors import WeightsMissingError


def cache_dir() -> Path:
    return Path(os.environ.get("BIOMEDSEG_CACHE", Path.home() / ".cache" / "biomedseg"))


def offline_mode(offline: bool | None = None) -> bool:
    if offline is not None:
        return offline
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes")
               for v in ("BIOMEDSEG_OFFLINE", "HF_HUB_OFFLINE"))


def _package_file(package: str, rel: str) -> Path | None:
    from importlib import metadata

    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file(rel))
    return path if path.is_file() else None


def _from_local(spec: dict, local: Path) -> list[Path] | None:
    if local.is_file():
        return [local] if len(spec["files"]) == 1 else None
    if local.is_dir():
        paths = [local / Path(f).name for f in spec["files"]]
        if all(p.is_file() for p in paths):
            return paths
        paths = [local / f for f in spec["files"]]
        if all(p.is_file() for p in paths):
            return paths
    return None


def _hub_cached(spec: dict) -> list[Path] | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    paths = []
    for name in spec["files"]:
        hit = try_to_load_from_cache(spec["repo"], name, revision=spec.get("revision"))
        if not isinstance(hit, str):
            return None
        paths.append(Path(hit))
    return paths


def weights_state(spec: dict, local_path: str | os.PathLike | None = None) -> dict:
    """Where the weights are on this machine, without downloading or hashing anything.

    An explicit ``local_path`` (--weights) is the only place looked at: it is used or refused,
    never replaced by another source."""
    if local_path:
        local = Path(local_path)
        found = _from_local(spec, local)
        if found:
            return {"present": True, "paths": [str(p) for p in found], "detail": f"local file(s) in {local}",
                    "local": True}
        return {"present": False, "paths": [], "local": True, "detail": _local_miss(spec, local)}
    if os.environ.get("BIOMEDSEG_WEIGHTS_DIR"):
        local = Path(os.environ["BIOMEDSEG_WEIGHTS_DIR"])
        found = _from_local(spec, local)
        if found:
            return {"present": True, "paths": [str(p) for p in found], "detail": f"local file(s) in {local}",
                    "local": True}
    if spec["source"] == "package":
        found = [_package_file(spec["package"], f) for f in spec["files"]]
        if all(found):
            return {"present": True, "paths": [str(p) for p in found],
                    "detail": f"shipped inside the '{spec['package']}' package"}
        return {"present": False, "paths": [],
                "detail": f"install the '{spec['package']}' package (pip install {spec['package']})"}
    if spec["source"] == "hub":
        found = _hub_cached(spec)
        if found:
            return {"present": True, "paths": [str(p) for p in found], "detail": f"hub cache ({spec['repo']})"}
        size = spec.get("size_bytes")
        gated = (f" (gated: accept the licence on {model_page(spec['repo'])} and log in)" if spec.get("gated")
                 else "")
        return {"present": False, "paths": [],
                "detail": f"{', '.join(spec['files'])} from {spec['repo']}"
                          f"{f', {size / 1e9:.1f} GB' if size else ''}{gated}"}
    return {"present": False, "paths": [],
            "detail": spec.get("instructions", "pass the weights file with --weights")}


def _local_miss(spec: dict, local: Path) -> str:
    names = ", ".join(Path(f).name for f in spec["files"])
    if local.is_file() and len(spec["files"]) > 1:
        return f"'{local}' is one file, but this model needs {names}: pass a folder that holds them"
    if local.is_dir():
        return f"'{local}' does not hold {names}"
    return f"'{local}' does not exist"


def resolve_weights(spec: dict, local_path: str | os.PathLike | None = None, offline: bool | None = None,
                    token: str | None = None) -> list[Path]:
    """Paths of the weight files, downloading from the hub when allowed; verified if sha256 is known.

    Each file must be readable; a file that runs code when loaded (``spec['code']``: TorchScript) is
    taken from outside its package only when its sha256 is one ``spec['file_sha256']`` lists."""
    state = weights_state(spec, local_path)
    if state["present"]:
        paths = [Path(p) for p in state["paths"]]
    elif local_path:
        raise WeightsMissingError(f"Weights {', '.join(spec['files'])} were not found at '{local_path}': "
                                  f"{state['detail']}.",
                                  hint="Pass the checkpoint file itself, or a folder that holds every file it needs.")
    elif spec["source"] == "hub":
        paths = _download(spec, offline_mode(offline), token)
    else:
        looked = [str(p) for p in filter(None, [os.environ.get("BIOMEDSEG_WEIGHTS_DIR")])]
        raise WeightsMissingError(
            f"Weights {', '.join(spec['files'])} are not on this machine"
            f"{' (looked in ' + ', '.join(looked) + ')' if looked else ''}.",
            hint=state["detail"])
    for path in paths:
        if not os.access(path, os.R_OK):
            raise WeightsMissingError(f"The weights file '{path}' cannot be read (permission denied).",
                                      hint="Make it readable for this user, or pass another file with --weights.")
    if spec.get("code") and state.get("local"):
        _check_trusted_code(spec, paths)
    if spec.get("sha256") and len(paths) == 1:
        verify_sha256(paths[0], spec["sha256"])
    elif spec["source"] == "hub":
        for path in paths:
            expected = hub_content_sha256(path)
            if expected:
                verify_sha256(path, expected)
    return paths


def _check_trusted_code(spec: dict, paths: list[Path]) -> None:
    """Weight files that are programs (TorchScript runs its own code when loaded; ``weights_only`` does not
    apply to it): from outside the package, only the very files the catalogue's checksums name."""
    known = spec.get("file_sha256") or {}
    for path in paths:
        expected = known.get(path.name)
        if expected is None or sha256_of(path) != expected:
            raise WeightsMissingError(
                f"'{path}' is TorchScript, which runs its own code when loaded, and it is not the file BiomedSeg "
                f"knows ({'no checksum is listed for it' if expected is None else 'its sha256 differs'}).",
                hint=f"Use the files inside the '{spec.get('package', 'model')}' package (drop --weights), or check "
                     "where this file came from: BiomedSeg loads TorchScript only from the package or with the "
                     "catalogue's checksum.")


def trusted_code_bytes(path: str | os.PathLike, spec: dict) -> bytes:
    """The bytes of a weight file that runs code when loaded, read once and checked as read: the package's
    own file, or one whose sha256 the catalogue lists. Load from these bytes (never reopen the path),
    so the file cannot be swapped between the check and the load."""
    path = Path(path)
    data = path.read_bytes()
    packaged = spec.get("package") and _package_file(spec["package"], next(
        (f for f in spec["files"] if Path(f).name == path.name), path.name))
    if packaged and Path(packaged).resolve() == path.resolve():
        return data
    expected = (spec.get("file_sha256") or {}).get(path.name)
    if expected is None or hashlib.sha256(data).hexdigest() != expected:
        _check_trusted_code(spec, [path])  # raises with the sentence
        raise WeightsMissingError(f"'{path}' changed while it was being loaded.", hint="Load it again.")
    return data


def hub_content_sha256(path: Path) -> str | None:
    """The sha256 the hub cache names a file's blob by (Git LFS files only; small files are
    named by their git hash, 40 hex digits, and are not checked)."""
    blob = Path(path).resolve()
    if blob.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", blob.name):
        return blob.name
    return None


#: What a gated repository needs, said wherever its weights cannot be had.
_GATED_HINT = ("Its weights go only to logged-in users who accepted its licence: accept the licence on the model "
               "page while logged in there, then log in here with `hf auth login` (older huggingface_hub: "
               "`huggingface-cli login`) or set HF_TOKEN to an access token{then}. Model page: {page}")


def model_page(repo: str) -> str:
    """The hub page of a model repository, where its licence is shown and accepted."""
    return f"https://huggingface.co/{repo}"


def _download(spec: dict, offline: bool, token: str | None) -> list[Path]:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise WeightsMissingError(
            f"Weights {', '.join(spec['files'])} must come from the hub ({spec['repo']}), but huggingface_hub "
            "is not installed.", hint="pip install huggingface_hub, or pass a local file with --weights.") from None
    paths = []
    for name in spec["files"]:
        try:
            paths.append(Path(hf_hub_download(spec["repo"], name, revision=spec.get("revision"), token=token,
                                              local_files_only=offline)))
        except GatedRepoError:
            raise WeightsMissingError(
                f"Access to {spec['repo']} was refused: the repository is gated.", hint=_GATED_HINT.format(
                    then="", page=model_page(spec["repo"]))) from None
        except RepositoryNotFoundError:
            raise WeightsMissingError(f"The hub repository {spec['repo']} was not found or needs a token.",
                                      hint="Log in (`hf auth login` or HF_TOKEN) or pass a local file.") from None
        except LocalEntryNotFoundError:
            where = "the hub cache" if offline else f"the hub ({spec['repo']}) or its cache"
            gated = f"; {spec['repo']} is a gated repository" if spec.get("gated") else ""
            hint = "Download them once while online, or pass a local file with --weights."
            if spec.get("gated"):
                hint = _GATED_HINT.format(then=", and download them once while online (or pass a local file with "
                                               "--weights)", page=model_page(spec["repo"]))
            raise WeightsMissingError(
                f"Weights {name} of {spec['repo']} are not in {where}"
                f"{' and offline mode is on' if offline else ' (no connection?)'}{gated}.", hint=hint) from None
    return paths


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _hash_record(path: Path) -> tuple[str, dict]:
    """(this version's key, the remembered checksums): a file is known by (path, size, mtime)."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        record = json.loads((cache_dir() / "verified.json").read_text())
    except (OSError, ValueError):
        record = {}
    return key, record


def _remember_hash(record: dict, key: str, sha256: str) -> None:
    record[key] = sha256
    record_file = cache_dir() / "verified.json"
    try:
        record_file.parent.mkdir(parents=True, exist_ok=True)
        record_file.write_text(json.dumps(record, indent=1))
    except OSError:
        pass  # an unwritable cache only costs a re-hash next time


def verify_sha256(path: Path, expected: str) -> None:
    """Check a file's sha256 once per (path, size, mtime); raise if it differs."""
    key, record = _hash_record(path)
    if record.get(key) == expected:
        return
    actual = sha256_of(path)
    if actual != expected:
        raise WeightsMissingError(
            f"Checksum mismatch for '{path}': expected sha256 {expected}, got {actual}.",
            hint="The file is corrupt or a different version; delete it and download again.")
    _remember_hash(record, key, expected)


def file_sha256(path: str | os.PathLike, spec: dict | None = None, compute: bool = True) -> str | None:
    """A weight file's sha256 for run reports: the catalogue's or the hub cache's when they name it, else
    one remembered per (path, size, mtime) beside the verified checksums, else (``compute``) hashed now."""
    path = Path(path)
    spec = spec or {}
    known = (spec.get("file_sha256") or {}).get(path.name) or hub_content_sha256(path)
    if known is None and spec.get("sha256") and len(spec.get("files", [])) == 1:
        known = spec["sha256"]  # verified when the file was resolved
    if known is not None:
        return known
    key, record = _hash_record(path)
    if key not in record and not compute:
        return None
    if key not in record:
        _remember_hash(record, key, sha256_of(path))
    return record[key]
