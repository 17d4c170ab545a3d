"""What the adapter expects of the authors' remote code, checked before transformers runs any of it.

UniBiomed is loaded with ``trust_remote_code``: the Python files of the hub snapshot become part of
the worker. The adapter relies on a few facts about them (read from the authors' GitHub code,
``projects/unibiomed/hf/models``): ``config.json`` maps AutoModel to ``Sa2VAChatModel``;
``predict_forward`` takes ``image``/``video``, ``text`` and ``tokenizer`` and returns
``prediction`` and ``prediction_masks``; the language model reads the first 5 frames of a video;
the tokenizer knows ``[SEG]``; and every package the files import is one the environment installs.
``check_snapshot`` reads (never imports) a snapshot folder and lists what differs, so a changed
upload is refused with a sentence instead of failing somewhere inside generation. The snapshot
folder's name is the hub commit; it goes into the run report.
"""
from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

REPO = "Luffy503/UniBiomed"
#: The remote-code files the model's classes come from.
CODE_FILES = ("modeling_sa2va_chat.py", "configuration_sa2va_chat.py", "sam2.py", "templates.py",
              "modeling_intern_vit.py", "configuration_intern_vit.py")
#: What transformers needs besides the weights: code, configs, tokenizer files (a few MB in all).
SMALL_FILES = ["*.py", "*.json", "*.txt", "*.model"]
AUTO_MODEL = "modeling_sa2va_chat.Sa2VAChatModel"
#: Import names the environment provides (model.json ``requires`` adds its own).
PROVIDED = {"numpy", "tqdm", "packaging", "tokenizers", "sentencepiece", "safetensors", "huggingface_hub",
            "transformers", "torch", "torchvision"}
#: Imported by the remote code, but optional: the loader lets transformers go on without it.
OPTIONAL = {"flash_attn"}


def _imports(path: Path) -> set[str]:
    """Top-level absolute imports outside try blocks (what transformers' own check demands)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()

    def visit(node):
        if isinstance(node, ast.Try):
            return
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _mentions_seg(folder: Path) -> bool:
    for name in ("added_tokens.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        path = folder / name
        if path.is_file() and "[SEG]" in path.read_text(encoding="utf-8", errors="replace"):
            return True
    return False


def check_snapshot(folder: str | Path, requires=()) -> dict:
    """{'revision', 'problems', 'language_frames', 'imports', 'optional_imports'} of a snapshot folder."""
    folder = Path(folder)
    out = {"revision": folder.name, "problems": [], "language_frames": None, "imports": [], "optional_imports": []}
    problems = out["problems"]
    missing = [name for name in ("config.json",) + CODE_FILES if not (folder / name).is_file()]
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    try:
        auto = json.loads((folder / "config.json").read_text()).get("auto_map", {}).get("AutoModel")
        if auto != AUTO_MODEL:
            problems.append(f"config.json maps AutoModel to {auto!r}, not {AUTO_MODEL!r}")
    except (OSError, ValueError) as exc:
        if "config.json" not in missing:
            problems.append(f"config.json cannot be read ({exc})")
    modeling = folder / "modeling_sa2va_chat.py"
    if modeling.is_file():
        code = modeling.read_text(encoding="utf-8")
        signature = re.search(r"def predict_forward\(\s*self\s*,([^)]*)\)", code)
        params = {p.split("=")[0].strip() for p in signature.group(1).split(",")} if signature else set()
        lacking = {"image", "video", "text", "tokenizer"} - params
        if not signature or lacking:
            problems.append("predict_forward is missing" if not signature else
                            f"predict_forward takes no {', '.join(sorted(lacking))}")
        for key in ("prediction", "prediction_masks"):
            if f"'{key}'" not in code and f'"{key}"' not in code:
                problems.append(f"predict_forward returns no '{key}'")
        frames = re.search(r"frame_idx\s*<\s*(\d+)", code)
        out["language_frames"] = int(frames.group(1)) if frames else None
        if frames is None:
            problems.append("the language model's frame count (frame_idx < N) was not found")
    if not _mentions_seg(folder):
        problems.append("the tokenizer files do not define [SEG]")
    needed: set[str] = set()
    for path in sorted(folder.glob("*.py")):
        try:
            needed |= _imports(path)
        except (SyntaxError, UnicodeDecodeError) as exc:
            problems.append(f"{path.name} cannot be parsed ({exc.__class__.__name__})")
    needed -= set(sys.stdlib_module_names)
    out["imports"] = sorted(needed)
    out["optional_imports"] = sorted(needed & OPTIONAL)
    unknown = sorted(needed - OPTIONAL - PROVIDED - set(requires))
    if unknown:
        problems.append(f"the remote code imports {', '.join(unknown)}, which the unibiomed environment does not "
                        "install")
    return out


def snapshot_folder(weight_path: str | Path) -> Path:
    """The snapshot folder (hub cache ``snapshots/<commit>``) a resolved weight file lives in."""
    return Path(weight_path).parent


def fetch_small_files(folder: Path, offline: bool) -> bool:
    """Download the code, config and tokenizer files of the snapshot's own commit into the hub cache
    (the catalogue downloads only the weights); False when that cannot be done here."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return False
    if offline or not re.fullmatch(r"[0-9a-f]{40}", folder.name):
        return False
    try:
        snapshot_download(REPO, revision=folder.name, allow_patterns=SMALL_FILES)
    except Exception:  # noqa: BLE001 -- no connection, repository moved: the caller says what is missing
        return False
    return True
