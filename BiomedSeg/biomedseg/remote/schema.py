"""What a remote client may send, checked before anything acts on it; and the version handshake.

A job request is the worker's segment request with arrays named by content id (uploaded
before, see ``remote.arrays``) instead of shared-memory blocks. The checks are the worker's
own building blocks (``worker.messages``): strict JSON, bounded depth and size, known fields
only. Nothing in a request is a path, code or a pickle.
"""
from __future__ import annotations

import copy
import re

from .. import __version__
from ..worker import messages
from ..worker.protocol import ProtocolError, _version_tuple

#: Bumped whenever an endpoint or a body changes meaning; client and server must agree.
API_VERSION = 1
VERSION_HEADER = "X-BiomedSeg-Version"
API_HEADER = "X-BiomedSeg-API"
CONTENT_ID = {"type": "string", "pattern": r"^[0-9a-f]{64}(?![\s\S])"}
ARRAY_REF = {"type": "object", "required": ["array"], "additionalProperties": False,
             "properties": {"array": CONTENT_ID}}
CONTENT_ID_RE = re.compile(r"[0-9a-f]{64}")


def _remote_prompt() -> dict:
    prompt = copy.deepcopy(messages.PROMPT)
    prompt["anyOf"][1]["properties"]["mask"] = ARRAY_REF
    return prompt


JOB = {
    "type": "object", "required": ["model", "prompts"], "additionalProperties": False,
    "properties": {
        "model": {"type": "string", "maxLength": 128},
        "prompts": {"type": "array", "maxItems": 1000, "items": _remote_prompt()},
        "volume": {"anyOf": [{"type": "null"}, {
            "type": "object", "required": ["array", "ijk_to_ras"], "additionalProperties": False,
            "properties": {"array": CONTENT_ID, "name": messages.NAME, "channels_last": {"type": "boolean"},
                           "ijk_to_ras": {"type": "array", "minItems": 16, "maxItems": 16,
                                          "items": messages.NUMBER},
                           "meta": {"type": "object", "maxProperties": 64,
                                    "additionalProperties": messages.SCALAR}}}]},
        "probabilities": {"type": "boolean"},
        "device": messages.MAYBE["str"], "threshold": messages.MAYBE["number"],
        "keep_largest": messages.MAYBE["bool"], "fill_holes": messages.MAYBE["bool"],
        "weights": messages.MAYBE["str"],
        "options": {"type": ["object", "null"], "maxProperties": 64, "additionalProperties": messages.OPTION},
        "region": messages.REGION, "session": {"type": ["string", "null"], "maxLength": 128},
        "free_text": messages.MAYBE["bool"], "force": messages.MAYBE["bool"],
    },
}
_VALIDATOR = None


def check_job(body: bytes) -> dict:
    """The job request in ``body``, or a ``ProtocolError`` naming the first thing wrong with it."""
    global _VALIDATOR
    import jsonschema
    from jsonschema.exceptions import best_match

    message = messages.parse(body)
    if _VALIDATOR is None:
        _VALIDATOR = jsonschema.Draft202012Validator(JOB)
    error = best_match(_VALIDATOR.iter_errors(message))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "the request"
        raise ProtocolError(f"job request: {where}: {messages.clip(error.message, 200)}")
    return message


def mismatch(server_version: str, server_api, client_version: str, client_api, where: str) -> str | None:
    """None when both sides run the same BiomedSeg and API, else a sentence that says which side to update."""
    if server_version == client_version and server_api == client_api:
        return None
    what = (f"The BiomedSeg server at {where} runs {server_version} (API {server_api}); this client runs "
            f"{client_version} (API {client_api}).")
    if _version_tuple(server_version) < _version_tuple(client_version):
        return what + (" Update the server: install this version of BiomedSeg on the server machine and restart "
                       "`biomedseg serve`.")
    return what + (" Update this side: install BiomedSeg " + str(server_version) + " here (the Slicer extension "
                   "or `pip install -U biomedseg`), or connect to a server that runs " + client_version + ".")


def client_headers() -> dict:
    return {VERSION_HEADER: __version__, API_HEADER: str(API_VERSION)}
