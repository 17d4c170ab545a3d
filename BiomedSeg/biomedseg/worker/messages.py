"""What every request to the worker may hold, checked before anything acts on it.

A line from the client is parsed strictly (no NaN or infinite numbers, no nesting deeper than
any real request has) and then checked against the schema of its op: known fields only, each
of its type and size (ids are short, shapes are a few bounded whole numbers, block names are
this client's). Anything else is a ``ProtocolError`` -- answered as a bad request while the
worker keeps serving -- never an exception in the reader or the job thread.
"""
from __future__ import annotations

import json
import math

from .protocol import ALLOWED_DTYPES, MAX_MESSAGE_BYTES, ProtocolError

#: No real request nests deeper than this (a segment's prompts and region: about 5).
MAX_DEPTH = 16
#: No real request holds more values (1000 prompts of a few fields each, 64 options of 64 values).
MAX_VALUES = 20000
#: Largest array a request may describe (1 TiB): beyond any volume, far below integer overflow.
MAX_ARRAY_BYTES = 1 << 40

ID = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 2 ** 53}, {"type": "string", "maxLength": 128}]}
NAME = {"type": "string", "maxLength": 1000}
#: ``(?![\s\S])`` is "end of text" (``$`` would also accept a trailing newline)
BLOCK = {"type": "string", "pattern": r"^/?bmseg_[0-9]{1,10}_[0-9a-f]{1,32}(?![\s\S])"}
ARRAY = {"type": "object", "required": ["shm", "shape", "dtype"], "additionalProperties": False,
         "properties": {"shm": BLOCK, "dtype": {"enum": sorted(ALLOWED_DTYPES)},
                        "shape": {"type": "array", "maxItems": 5,
                                  "items": {"type": "integer", "minimum": 0, "maximum": 2 ** 31}}}}
NUMBER = {"type": "number"}
MAYBE = {"str": {"type": ["string", "null"], "maxLength": 4096}, "bool": {"type": ["boolean", "null"]},
         "number": {"type": ["number", "null"]}}
PROMPT = {"anyOf": [{"type": "string", "maxLength": 1000},
                    {"type": "object", "maxProperties": 8, "required": ["type"],
                     "properties": {"type": {"enum": ["text", "box", "point", "mask"]}, "text": NAME,
                                    "target": {"type": ["string", "null"], "maxLength": 1000},
                                    "plane": {"type": ["string", "null"], "maxLength": 16},
                                    "include": {"type": "boolean"}, "mask": ARRAY,
                                    "ras": {"type": "array", "maxItems": 3, "items": NUMBER},
                                    "ras_min": {"type": "array", "maxItems": 3, "items": NUMBER},
                                    "ras_max": {"type": "array", "maxItems": 3, "items": NUMBER}},
                     "additionalProperties": False}]}
REGION = {"type": ["object", "null"], "additionalProperties": False,
          "properties": {"plane": {"type": ["string", "null"], "maxLength": 16},
                         "slice_range": {"type": ["array", "null"], "maxItems": 2,
                                         "items": {"type": "integer", "minimum": -(2 ** 31), "maximum": 2 ** 31}},
                         "roi": {"type": ["array", "null"], "maxItems": 2,
                                 "items": {"type": "array", "maxItems": 3, "items": NUMBER}}}}
SCALAR = {"type": ["string", "number", "boolean", "null"], "maxLength": 4096}
OPTION = {"anyOf": [SCALAR, {"type": "array", "maxItems": 64, "items": {"anyOf": [SCALAR, {
    "type": "array", "maxItems": 64, "items": SCALAR}]}}, {"type": "object", "maxProperties": 64,
                                                           "additionalProperties": {"anyOf": [SCALAR, {
                                                               "type": "array", "maxItems": 64,
                                                               "items": SCALAR}]}}]}


def _op(op_name: str, required=(), **fields) -> dict:
    properties = {"op": {"const": op_name}, "id": ID, **fields}
    return {"type": "object", "required": ["op", *required], "properties": properties, "additionalProperties": False}


SCHEMAS = {
    "ping": _op("ping"),
    "status": _op("status"),
    "unload": _op("unload"),
    "shutdown": _op("shutdown"),
    "cancel": _op("cancel", ["target"], target=ID),
    "forget": _op("forget", ["blocks"], blocks={"type": "array", "maxItems": 4096, "items": BLOCK}),
    "close_session": _op("close_session", ["session"], session={"type": "string", "maxLength": 128}),
    "echo": _op("echo", ["id", "input", "output"], input=ARRAY, output=ARRAY, threshold=NUMBER),
    "echo_file": _op("echo_file", ["id", "input_path", "output_path"], input_path={"type": "string", "maxLength": 4096},
                     output_path={"type": "string", "maxLength": 4096}, threshold=NUMBER),
    "segment": _op("segment", ["id", "model", "prompts", "output"],
                   model={"type": "string", "maxLength": 128},
                   prompts={"type": "array", "maxItems": 1000, "items": PROMPT},
                   input={"anyOf": [ARRAY, {"type": "null"}]}, output=ARRAY,
                   probabilities={"anyOf": [ARRAY, {"type": "null"}]},
                   ijk_to_ras={"type": ["array", "null"], "minItems": 16, "maxItems": 16, "items": NUMBER},
                   name=NAME, channels_last={"type": "boolean"},
                   meta={"type": "object", "maxProperties": 64, "additionalProperties": SCALAR},
                   device=MAYBE["str"], threshold=MAYBE["number"], keep_largest=MAYBE["bool"],
                   fill_holes=MAYBE["bool"], weights=MAYBE["str"],
                   options={"type": ["object", "null"], "maxProperties": 64, "additionalProperties": OPTION},
                   region=REGION, session={"type": ["string", "null"], "maxLength": 128},
                   free_text=MAYBE["bool"], force=MAYBE["bool"]),
}
OPS = tuple(SCHEMAS)


def _reject_constant(name: str):
    raise ProtocolError(f"'{name}' is not a number a request may hold")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ProtocolError(f"the number {text[:40]} is out of range")
    return value


def _shape_of(value) -> tuple[int, int]:
    """(nesting depth, number of values) of parsed JSON, stopping once either passes its limit."""
    stack, deepest, count = [(value, 1)], 0, 0
    while stack:
        item, level = stack.pop()
        deepest, count = max(deepest, level), count + 1
        if deepest > MAX_DEPTH or count > MAX_VALUES:
            break
        if isinstance(item, dict):
            stack += [(v, level + 1) for v in item.values()]
        elif isinstance(item, list):
            stack += [(v, level + 1) for v in item]
    return deepest, count


def short(value, limit: int = 120) -> str:
    """A repr of ``value`` short enough for an error reply."""
    return clip(repr(value), limit)


def clip(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters (a reply never echoes a whole oversized field)."""
    text = str(text)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def parse(line: bytes | str) -> dict:
    """The JSON object of one line, or a ProtocolError that says what is wrong with it."""
    if len(line) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(line)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit; "
                            "voxels go through shared memory")
    try:
        message = json.loads(line, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise ProtocolError(f"message nests deeper than {MAX_DEPTH} levels") from None
    except ProtocolError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"message is not valid JSON ({str(exc)[:120]})") from None
    depth, count = _shape_of(message)
    if depth > MAX_DEPTH:
        raise ProtocolError(f"message nests deeper than {MAX_DEPTH} levels")
    if count > MAX_VALUES:  # checking it would keep the reader (and so every ping and cancel) busy
        raise ProtocolError(f"message holds more than {MAX_VALUES} values; voxels go through shared memory")
    if not isinstance(message, dict):
        raise ProtocolError("message must be a JSON object")
    return message


_VALIDATORS: dict = {}


def _validator(op: str):
    if op not in _VALIDATORS:
        import jsonschema

        _VALIDATORS[op] = jsonschema.Draft202012Validator(SCHEMAS[op])
    return _VALIDATORS[op]


def check(message: dict) -> dict:
    """``message`` if it is a request the worker knows, in the shape its op allows; else a ProtocolError
    naming the first thing wrong (shortened: a reply never echoes a whole oversized field)."""
    op = message.get("op")
    if not isinstance(op, str) or op not in SCHEMAS:
        raise ProtocolError(f"unknown op {short(op, 60)}; known: {', '.join(OPS)}")
    if op == "segment" and not _is_id(message.get("id")):
        raise ProtocolError("a segment request needs an 'id' (a whole number or a short string)")
    from jsonschema.exceptions import best_match

    error = best_match(_validator(op).iter_errors(message))  # descends into anyOf to the field that is wrong
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "the message"
        raise ProtocolError(f"'{op}' request: {where}: {clip(error.message, 200)}")
    for key in ("input", "output", "probabilities"):
        spec = message.get(key)
        if isinstance(spec, dict):
            _check_size(spec, key)
    for prompt in message.get("prompts") or []:
        if isinstance(prompt, dict) and isinstance(prompt.get("mask"), dict):
            _check_size(prompt["mask"], "a mask prompt")
    return message


def _is_id(value) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 2 ** 53) or (
        isinstance(value, str) and len(value) <= 128)


def _check_size(spec: dict, what: str) -> None:
    import numpy as np

    need = math.prod(spec["shape"]) * np.dtype(spec["dtype"]).itemsize
    if need > MAX_ARRAY_BYTES:
        raise ProtocolError(f"{what} of shape {spec['shape']} ({need} bytes) is larger than any volume")


def safe_id(message) -> object:
    """The request's id when it is one a reply may carry, else None."""
    value = message.get("id") if isinstance(message, dict) else None
    return value if _is_id(value) else None
