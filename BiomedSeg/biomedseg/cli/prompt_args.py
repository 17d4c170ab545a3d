"""Prompts from the command line: --prompt, --box, --point, --exclude-point and --prompts FILE."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import InputError


def _numbers(values, counts: tuple[int, ...], what: str, words: tuple[str, ...] = ()) -> tuple[list[float], list[str]]:
    """Numbers given as separate arguments or comma-separated ('R,A,S'), plus trailing words."""
    parts = [p for v in values for p in str(v).replace(",", " ").split()]
    found_words = [p.lower() for p in parts if p.lower() in words]
    numbers = [p for p in parts if p.lower() not in words]
    try:
        floats = [float(p) for p in numbers]
    except ValueError:
        raise InputError(f"{what} takes {' or '.join(map(str, counts))} numbers (RAS mm), got {' '.join(values)!r}.") from None
    if len(floats) not in counts or not all(math.isfinite(v) for v in floats):
        raise InputError(f"{what} takes {' or '.join(map(str, counts))} finite numbers (RAS mm), got "
                         f"{' '.join(values)!r}.")
    return floats, found_words


def prompts_of(args) -> list:
    """Text prompts (--prompt, comma-separated like the panel), geometric ones (--box, --point,
    --exclude-point: RAS mm, as separate numbers or comma-separated) and --prompts FILE.json."""
    from ..prompts import BoxPrompt, PointPrompt, TextPrompt, parse_text_prompts

    prompts: list = [TextPrompt(text) for text in parse_text_prompts(";".join(args.prompt or []))]
    target = " ".join((args.target or "object").split())
    plane = None if args.box_3d else (args.plane or "axial")
    for box in args.box or []:
        values, _ = _numbers(box, (6,), "--box")
        prompts.append(BoxPrompt(tuple(values[:3]), tuple(values[3:]), plane, target))
    for point, include in [(p, True) for p in args.point or []] + [(p, False) for p in args.exclude_point or []]:
        values, words = _numbers(point, (3,), "--point", ("exclude", "include"))
        include = include and "exclude" not in words
        prompts.append(PointPrompt(tuple(values), include, args.plane or "axial", target))
    if getattr(args, "prompts", None):
        prompts += prompts_file(args.prompts, args.plane or "axial")
    return prompts


def prompts_file(path: str, plane: str) -> list:
    """Prompts from a JSON file: a list of prompts in the worker's form ({"type": "box", "ras_min": ...,
    "ras_max": ..., "plane": ..., "target": ...}), or {"objects": [{"target": NAME, "plane": ..., "boxes":
    [[R1,A1,S1,R2,A2,S2]], "points": [[R,A,S]], "exclude_points": [[R,A,S]]}]} for several objects."""
    import numpy as np

    from ..prompts import prompt_from_dict

    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InputError(f"--prompts '{path}' cannot be read ({exc.strerror or exc}).") from None
    except ValueError as exc:
        raise InputError(f"--prompts '{path}' is not JSON ({exc}).") from None
    if isinstance(data, list):
        return [prompt_from_dict(item) for item in data]
    if not isinstance(data, dict) or not isinstance(data.get("objects"), list):
        raise InputError(f"--prompts '{path}' must hold a list of prompts or {{\"objects\": [...]}}.")
    out: list = []
    known = {"target", "plane", "boxes", "points", "exclude_points"}
    for n, obj in enumerate(data["objects"]):
        if not isinstance(obj, dict):
            raise InputError(f"Object {n + 1} in '{path}' is not an object with a target and its prompts.")
        unknown = sorted(set(obj) - known)
        if unknown:
            raise InputError(f"Object {n + 1} in '{path}' has unknown field(s) {', '.join(map(repr, unknown))}; "
                             f"an object takes {', '.join(sorted(known))}.")
        target = obj.get("target") or f"object {n + 1}"
        obj_plane = obj.get("plane", plane)
        for key in ("boxes", "points", "exclude_points"):
            if not isinstance(obj.get(key, []), list):
                raise InputError(f"'{key}' of {target!r} in '{path}' must be a list, got {json.dumps(obj[key])}.")
        for box in obj.get("boxes", []):
            try:
                values = np.asarray(box, dtype=float).ravel()
            except (TypeError, ValueError):
                values = np.zeros(0)
            if values.size != 6 or not np.all(np.isfinite(values)):
                raise InputError(f"A box of {target!r} in '{path}' must be six RAS numbers (two corners), got "
                                 f"{json.dumps(box)}.")
            out.append(prompt_from_dict({"type": "box", "ras_min": values[:3].tolist(), "ras_max": values[3:].tolist(),
                                         "plane": obj_plane, "target": target}))
        for key, include in (("points", True), ("exclude_points", False)):
            for point in obj.get(key, []):
                out.append(prompt_from_dict({"type": "point", "ras": point, "include": include, "plane": obj_plane,
                                             "target": target}))
    return out
