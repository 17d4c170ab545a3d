"""Errors as values with a kind and a sentence a person can act on.

Every layer raises (or, across the worker boundary, transports) a ``BiomedSegError``
whose ``kind`` tells the caller what class of problem happened, so the CLI and the
Slicer panel can react (retry, offer a download, show the sentence) without parsing text.
"""
from __future__ import annotations


class BiomedSegError(Exception):
    """Base error: ``kind`` is machine-readable, ``str(err)`` is for people."""

    kind = "error"

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message} {hint}")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "message": self.message, "hint": self.hint}


class InputError(BiomedSegError, ValueError):
    """The image, prompt or option given cannot be used as it is."""

    kind = "bad_input"


class ModalityMismatchError(InputError):
    """The image is not what the model was trained on; ``--force`` (the panel's *Use anyway*) runs it regardless."""

    kind = "wrong_modality"


class WeightsMissingError(BiomedSegError):
    """Model weights are not on this machine and cannot be fetched now."""

    kind = "weights_missing"


class OutOfMemoryError(BiomedSegError):
    kind = "out_of_memory"


class CancelledError(BiomedSegError):
    kind = "cancelled"


class WorkerCrashedError(BiomedSegError):
    kind = "worker_crashed"


class WorkerMismatchError(BiomedSegError):
    """The worker runs another version of the engine than its client (a stale environment or checkout)."""

    kind = "worker_mismatch"


class DependencyMissingError(BiomedSegError):
    """A Python package a model needs is not installed in the worker's environment."""

    kind = "dependency_missing"


class ServerUnavailableError(BiomedSegError):
    """A BiomedSeg server cannot be reached, or the connection to it was lost (the run can be retried)."""

    kind = "server_unavailable"


class AccessDeniedError(BiomedSegError):
    """A BiomedSeg server refused the request's token."""

    kind = "access_denied"


ERROR_KINDS = {cls.kind: cls for cls in (
    BiomedSegError, InputError, ModalityMismatchError, WeightsMissingError, OutOfMemoryError,
    CancelledError, WorkerCrashedError, WorkerMismatchError, DependencyMissingError, ServerUnavailableError,
    AccessDeniedError)}


def error_from_dict(data: dict) -> BiomedSegError:
    """Rebuild an error sent as JSON (the worker boundary)."""
    cls = ERROR_KINDS.get(data.get("kind"), BiomedSegError)
    return cls(data.get("message", "unknown error"), hint=data.get("hint"))
