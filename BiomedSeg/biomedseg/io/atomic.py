"""Outputs are never half-written: every writer writes a temporary sibling first and renames it."""
from __future__ import annotations

from pathlib import Path


def partial_path(path: Path) -> Path:
    """The temporary sibling a writer fills before ``os.replace`` puts it in place."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")
