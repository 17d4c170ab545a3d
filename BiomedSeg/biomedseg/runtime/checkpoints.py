"""Checking a checkpoint's tensors against a model before a strict load, with a sentence a person
can act on: which keys are missing, unexpected or of another shape (a wrong file, another model
size or version), rather than torch's wall of names."""
from __future__ import annotations

from ..errors import InputError


class CheckpointMismatchError(InputError):
    """The weights file does not hold the tensors this model needs (wrong file, size or version)."""


def mismatches(state: dict, expected: dict) -> list[str]:
    """Phrases for what differs between ``state`` {name: tensor} and ``expected`` {name: shape}."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k])}"
                   for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k]))

    def show(items):
        return ", ".join(items[:8]) + (f" ... (+{len(items) - 8} more)" if len(items) > 8 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {show(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {show(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} shape mismatch(es): {show(wrong)}")
    return parts


def check_state_dict(state: dict, expected: dict, *, model: str, hint: str) -> None:
    """Raise ``CheckpointMismatchError`` unless names and shapes equal ``expected`` exactly;
    ``model`` names the model in the sentence, ``hint`` says which file to use."""
    parts = mismatches(state, expected)
    if parts:
        raise CheckpointMismatchError(f"The {model} weights do not match the model: " + "; ".join(parts) + ".",
                                      hint=hint)


def read_state_dict_file(path, *, model: str, wrapper: str) -> dict:
    """The {name: tensor} of a torch file, read with ``weights_only=True`` (nothing in it runs); the
    dict under ``wrapper`` ("model", "state_dict") if the file has one, else the file's own dict.
    A missing file is an InputError, an unreadable one or one without tensors a CheckpointMismatchError."""
    import os

    import torch

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{model} checkpoint '{path}' does not exist.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated download, not a torch file, pickled code
        raise CheckpointMismatchError(
            f"Could not read {model} weights from '{path}' ({type(exc).__name__}: {exc}).",
            hint="The file may be damaged or partial; download it again.") from exc
    state = obj.get(wrapper) if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict) else obj
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        keys = ", ".join(sorted(map(str, obj))[:12]) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointMismatchError(f"'{path}' holds no {model} state dict (found: {keys}).")
    return state
