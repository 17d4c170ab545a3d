"""Command line: `biomedseg models | segment | doctor`.

Errors print one sentence and what to do, with an exit code by kind (2 bad input,
3 weights or dependencies missing, 4 out of memory, 5 cancelled, 1 anything else).
Outputs are never half-written and an existing output is not replaced without --overwrite.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import time
from pathlib import Path

from . import __version__
from .errors import BiomedSegError, InputError

EXIT_CODES = {"bad_input": 2, "weights_missing": 3, "dependency_missing": 3, "out_of_memory": 4, "cancelled": 5}


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def cmd_models(args) -> int:
    from .catalog import describe_options, load_catalog

    entries = []
    for e in load_catalog():
        w = e.weights
        entries.append({
            "id": e.id, "version": e.version, "family": e.family, "title": e.title, "task": e.task,
            "input": e.input, "prompt_kind": e.prompt_kind, "modalities": e.modalities,
            "targets": e.targets(), "weights": w, **{f"state_{k}": v for k, v in e.state().items()},
            "prompt_types": e.prompt_types, "results": e.results, "options": e.options,
            "interactive": e.interactive,
        })
    from .catalog import PROBLEMS

    for problem in PROBLEMS:
        print(f"warning: {problem}", file=sys.stderr)
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    rows = [[m["id"], m["input"].upper(), m["prompt_kind"], ",".join(m["modalities"][:3])
             + ("…" if len(m["modalities"]) > 3 else ""), m["weights"]["license"].split(" ")[0]
             + (" (gated)" if m["weights"]["gated"] else ""), m["state_state"]] for m in entries]
    _print_table(rows, ["model", "input", "prompt", "modalities", "licence", "state on this machine"])
    print()
    for m in entries:
        targets = ", ".join(m["targets"][:10]) + (f", … ({len(m['targets'])} in all)" if len(m["targets"]) > 10 else "")
        print(f"{m['id']}: {m['task']}")
        if targets:
            print(f"    prompts: {targets}")
        if m["prompt_types"] != ["text"]:
            print(f"    prompt types: {', '.join(m['prompt_types'])}; returns {', '.join(m['results'])}")
        if m["options"]:
            print(f"    options: {describe_options(m['options'])}")
        if not m["state_ready"]:
            print(f"    to use it: {m['state_detail']}")
    return 0


class _ProgressBar:
    """tqdm bar fed by the engine's progress(stage, done, total) callbacks."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.bar is None or self.bar.total != total:
            if self.bar is not None:
                self.bar.close()
            self.bar = tqdm(total=total, unit="step", file=sys.stderr, leave=False,
                            bar_format="{desc:<20} {bar} {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")
        self.bar.set_description_str(stage)
        self.bar.n = done
        self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def model_options(args) -> dict:
    """Options passed through to the model backend (each model's model.json declares the ones it takes)."""
    options = {}
    for key in ("modality", "site", "batch_size"):
        if getattr(args, key, None) is not None:
            options[key] = getattr(args, key)
    for item in args.option or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--option '{item}' must look like KEY=VALUE.")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def region_of(args):
    """The region to segment: --plane with --slice-range (any model; 2D models also cut along --plane)."""
    from .geometry import make_region

    return make_region(args.plane or "axial", list(args.slice_range) if args.slice_range else None)


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
    from .prompts import BoxPrompt, PointPrompt, TextPrompt, parse_text_prompts

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

    from .prompts import prompt_from_dict

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


def _report_extras(result, log) -> None:
    for label in result.labels:
        log(f"label: {label.name} ({label.score:.3f})" + (f" for '{label.target}'" if label.target else ""))
    for finding in result.findings:
        log(f"finding: {finding.text}" + (f" [{', '.join(finding.targets)}]" if finding.targets else ""))


def cmd_refine(args) -> int:
    """`refine`: a segment of a segmentation file as MedSAM2's prompt; the other segments are written
    beside the refined one unchanged (unless --only)."""
    from .io.segmentation_reader import find_segment, read_segments
    from .prompts import MaskPrompt

    def prompts_for(volume, log):
        segments, notes = read_segments(args.segmentation, volume)
        for note in notes:
            log(f"segmentation: {note}")
        chosen = find_segment(segments, args.segment, args.segmentation)
        if not chosen.mask.any():
            raise InputError(f"Segment {chosen.name!r} in '{args.segmentation}' is empty on this image.")
        others = [] if args.only else [s for s in segments if s is not chosen]
        return [MaskPrompt(chosen.mask, chosen.name)], others, chosen

    args.prompt = args.box = args.point = args.exclude_point = None
    args.box_3d, args.target = False, None
    return cmd_segment(args, refine=prompts_for)


def cmd_classify(args) -> int:
    """`classify`: zero-shot labels with probabilities (BiomedCLIP), as the model card's widget."""
    from .io import read_volume
    from .prompts import TextPrompt

    labels = [" ".join(str(label).split()) for label in args.labels or []]
    labels = [label for label in labels if label]
    if len(labels) < 2:
        raise InputError("classify needs at least two labels to choose between.",
                         hint='e.g. --labels "adenocarcinoma histopathology" "squamous cell carcinoma histopathology"')
    options = model_options(args)
    options.setdefault("task", "classify")
    volume = read_volume(args.input, series_uid=args.series_uid)
    run = dict(device=args.device, weights=args.weights, options=options, region=region_of(args))
    if args.in_process:
        from .engine import segment

        result = segment(volume, args.model, [TextPrompt(label) for label in labels], **run)
    else:
        from .worker.client import WorkerClient

        client = WorkerClient(python=args.worker_python)
        try:
            result = client.run(volume, args.model, [TextPrompt(label) for label in labels], **run)
        finally:
            client.close()
    if args.json:
        print(json.dumps({"model": args.model, "device": result.device, "labels": [l.to_dict() for l in result.labels],
                          "report": result.summary_dict()["report"]}, indent=2))
    else:
        width = max(len(label.name) for label in result.labels)
        for label in result.labels:
            print(f"{label.name:<{width}}  {label.score:.4f}")
    return 0


def cmd_segment(args, refine=None) -> int:
    from .catalog import check_options, check_prompts, get_model
    from .io import read_volume, write_segmentation
    from .io.readers import suffix_of
    from .io.atomic import check_target
    from .io.writers import SEGMENTATION_SUFFIXES, outputs_for, write_result_json

    output = Path(args.output)
    if suffix_of(output) not in SEGMENTATION_SUFFIXES + (".json",):
        raise InputError(f"Output '{output}' must end in one of {', '.join(SEGMENTATION_SUFFIXES + ('.json',))}.")
    if args.preview and suffix_of(args.preview) != ".png":
        raise InputError(f"The preview '{args.preview}' must end in .png.")
    if args.weights is not None and not args.weights.strip():  # "$W" with W unset: never the default instead
        raise InputError("--weights is empty.", hint="Give the checkpoint file or folder, or leave --weights out.")
    if not (0.0 < args.threshold < 1.0):  # NaN and infinities too
        raise InputError(f"Threshold {args.threshold} must lie strictly between 0 and 1.")
    targets = [output] if suffix_of(output) == ".json" else outputs_for(output)
    for target in targets + ([Path(args.preview)] if args.preview else []):
        check_target(target, args.overwrite)  # before anything is read: a bad path costs nothing
    prompts = check_prompts(args.model, prompts_of(args)) if refine is None else []
    entry = get_model(args.model)
    options = model_options(args)
    check_options(args.model, entry.options, options)  # undeclared options fail before anything is read
    region = region_of(args)
    if "masks" not in entry.results and suffix_of(output) != ".json":
        raise InputError(f"Model '{args.model}' returns {', '.join(entry.results)}, not masks.",
                         hint="Write its result with -o NAME.json.")
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    started = time.perf_counter()
    volume = read_volume(args.input, series_uid=args.series_uid)
    log(f"read {volume}")
    beside, refined = [], None
    if refine is not None:
        prompts, beside, refined = refine(volume, log)
        prompts = check_prompts(args.model, prompts)
    bar = _ProgressBar(enabled=not args.quiet)
    run_options = dict(device=args.device, threshold=args.threshold, keep_largest=args.largest,
                       fill_holes=args.fill_holes, weights=args.weights, options=options, region=region)
    try:
        if args.in_process:
            from .engine import segment

            result = segment(volume, args.model, prompts, progress=bar, **run_options)
        else:
            from .worker.client import WorkerClient

            client = WorkerClient(python=args.worker_python)
            try:
                result = client.run(volume, args.model, prompts,
                                    on_progress=lambda job: bar(job.stage, job.done, job.total), **run_options)
            finally:
                client.close()
    finally:
        bar.close()
    log(f"{args.model} ran on {result.device_reason} in {result.seconds:.1f} s")
    for name in result.absent:
        log(f"not found: '{name}' ({result.absent_reasons.get(name, 'no voxel above the threshold')}); "
            "no segment written for it")
    _report_extras(result, log)
    found = bool(result.segments or result.labels or result.findings)
    if suffix_of(output) == ".json":
        written = [write_result_json(output, result, args.overwrite)]  # with the reasons, even if nothing was found
        if not found:
            print(f"error: nothing was found for {', '.join(map(repr, result.absent))}; {output} says why.",
                  file=sys.stderr)
            print(output)
            return 1
    elif not result.segments:
        print(f"error: nothing was found for {', '.join(map(repr, result.absent))}; no file written.",
              file=sys.stderr)
        return 1
    else:
        if refined is not None:  # the refined segment keeps its name, colour and terminology
            result.segments = [type(seg)(refined.name, seg.mask, refined.color or seg.color,
                                         refined.terminology or seg.terminology) for seg in result.segments]
        written = write_segmentation(output, volume, beside + result.segments, overwrite=args.overwrite)
    if args.preview and result.segments:
        from .preview import render_preview

        written.append(render_preview(args.preview, volume, result.segments, title=f"{volume.name} - {args.model}",
                                      overwrite=args.overwrite))
    for seg in result.segments:
        log(f"segment '{seg.name}': {int(seg.mask.sum())} voxels")
    for path in written:
        print(path)
    log(f"done in {time.perf_counter() - started:.1f} s")
    return 0


def doctor_report() -> dict:
    import os

    from .catalog import load_catalog

    report = {"biomedseg": __version__, "python": sys.version.split()[0], "executable": sys.executable,
              "platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        import psutil

        vm = psutil.virtual_memory()
        report["memory_total_gb"] = round(vm.total / 2**30, 1)
        report["memory_available_gb"] = round(vm.available / 2**30, 1)
    except ImportError:
        report["memory_total_gb"] = None
    try:
        import torch

        report["torch"] = torch.__version__
        report["torch_cuda_build"] = torch.version.cuda
        report["cuda_devices"] = [
            {"index": i, "name": torch.cuda.get_device_name(i),
             "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
            for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
        report["mps"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
        from .runtime.device import resolve_device

        report["default_device"] = "{} - {}".format(*resolve_device("auto"))
    except ImportError:
        report["torch"] = None
        report["default_device"] = "none: torch is not installed (pip install torch)"
    report["models"] = {e.id: e.state() for e in load_catalog()}
    from .catalog import PROBLEMS

    if PROBLEMS:
        report["catalogue_problems"] = list(PROBLEMS)
    return report


def worker_report(python: str | None) -> dict:
    """Start a worker with ``python`` and check it answers and moves data through shared memory."""
    import numpy as np

    from .worker.client import WorkerClient

    client = WorkerClient(python=python, startup_timeout=60)
    try:
        started = time.perf_counter()
        pong = client.request("ping", timeout=60)
        array = np.arange(64 * 64 * 64, dtype=np.int16).reshape(64, 64, 64) - 1000
        ok = bool(np.array_equal(client.echo(array), (array > 0).astype(np.uint8)))
        return {"python": client.python, "pid": pong["pid"], "shared_memory": "ok" if ok else "WRONG DATA",
                "round_trip_s": round(time.perf_counter() - started, 3)}
    except BiomedSegError as err:
        return {"python": client.python, "error": str(err)}
    except (OSError, TimeoutError) as exc:
        return {"python": client.python, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        client.close()


def cmd_doctor(args) -> int:
    report = doctor_report()
    if args.worker:
        report["worker"] = worker_report(args.worker_python)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for key, value in report.items():
        if key in ("models", "cuda_devices"):
            continue
        print(f"{key:>20}: {value}")
    for dev in report.get("cuda_devices") or []:
        print(f"{'cuda:' + str(dev['index']):>20}: {dev['name']} ({dev['memory_gb']} GB)")
    print()
    for model_id, state in report["models"].items():
        print(f"{model_id:>20}: {state['state']} - {state['detail']}")
    if "worker" in report:
        print()
        for key, value in report["worker"].items():
            print(f"{'worker ' + key:>20}: {value}")
        return 1 if "error" in report["worker"] else 0
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="biomedseg", description="Biomedical foundation-model segmentation.")
    parser.add_argument("--version", action="version", version=f"biomedseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the model catalogue and each model's state here")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("segment", help="segment an image file or DICOM folder")
    p.add_argument("input", help="NIfTI, NRRD, MHA, DICOM file or folder, PNG/JPEG/TIFF")
    p.add_argument("--model", default="deepbet", help="model id from `biomedseg models` (default: deepbet)")
    _prompt_arguments(p)
    _run_arguments(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("refine", help="refine a segment of a segmentation file with MedSAM2 (the segment is "
                                      "the prompt)")
    p.add_argument("input", help="the image the segmentation belongs to")
    p.add_argument("--segmentation", required=True, help=".seg.nrrd or labelmap holding the segment")
    p.add_argument("--segment", required=True, help="name of the segment to refine")
    p.add_argument("--model", default="medsam2", help="a model that takes mask prompts (default: medsam2)")
    p.add_argument("--only", action="store_true", help="write only the refined segment, not the others beside it")
    _run_arguments(p)
    p.set_defaults(func=cmd_refine)

    p = sub.add_parser("classify", help="zero-shot classification of an image with your labels (BiomedCLIP)")
    p.add_argument("input", help="image file (PNG/JPEG/TIFF, NIfTI, NRRD, DICOM...)")
    p.add_argument("--labels", nargs="+", required=True, help="two or more labels, each in quotes")
    p.add_argument("--model", default="biomedclip", help="a model that returns labels (default: biomedclip)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--series-uid", help="DICOM series to read when a folder holds several")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--weights", help="local weights file or folder instead of the catalogue's source")
    p.add_argument("--plane", choices=["axial", "coronal", "sagittal"], help="slice plane of a volume (default axial)")
    p.add_argument("--slice-range", type=int, nargs=2, metavar=("FIRST", "LAST"), help="only these slices")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="model option, e.g. template=...")
    p.add_argument("--in-process", action="store_true", help="run in this process instead of the worker")
    p.add_argument("--worker-python", help="Python executable for the worker")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("doctor", help="report Python, torch, devices, memory and model readiness")
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", action="store_true", help="also start a worker and check it end to end")
    p.add_argument("--worker-python", help="Python executable for the worker to check")
    p.set_defaults(func=cmd_doctor)
    return parser


def _prompt_arguments(p) -> None:
    p.add_argument("--prompt", action="append", help="target to segment; repeat for several, or separate by commas")
    p.add_argument("--box", action="append", nargs="+", metavar="R1,A1,S1,R2,A2,S2",
                   help="box prompt: two RAS corners in mm (comma-separated or six numbers), drawn on --plane "
                        "(or 3D with --box-3d); repeatable")
    p.add_argument("--box-3d", action="store_true", help="--box prompts are 3D boxes, not boxes on one slice")
    p.add_argument("--point", action="append", nargs="+", metavar="R,A,S[,exclude]",
                   help="point prompt on the object (RAS mm; ',exclude' marks background); repeatable")
    p.add_argument("--exclude-point", action="append", nargs="+", metavar="R,A,S",
                   help="point prompt on the background (RAS mm); repeatable")
    p.add_argument("--prompts", metavar="FILE.json",
                   help="prompts for several objects and slices (see the README: a list of prompts, or objects)")
    p.add_argument("--target", help="name of the object the box and point prompts describe (default: object)")


def _run_arguments(p) -> None:
    p.add_argument("-o", "--output", required=True,
                   help="output: .seg.nrrd, .nii.gz, .nrrd labelmap, .dcm (DICOM SEG), or .json (labels, findings, "
                        "segment summary; for models that return no masks)")
    p.add_argument("--preview", help="also write a PNG with outlines on three orthogonal slices")
    p.add_argument("--series-uid", help="DICOM series to read when a folder holds several")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold (default 0.5)")
    p.add_argument("--largest", action=argparse.BooleanOptionalAction, default=None,
                   help="keep only the largest 3D component (model default when not given)")
    p.add_argument("--fill-holes", action=argparse.BooleanOptionalAction, default=None,
                   help="fill holes inside each segment (model default when not given)")
    p.add_argument("--weights", help="local weights file or folder instead of the catalogue's source")
    p.add_argument("--modality", help="image modality for the model (e.g. CT, MRI, MRI-T1); guessed from DICOM "
                                      "tags and intensities when not given")
    p.add_argument("--site", help="anatomic site (e.g. abdomen, head), for models with site-specific preprocessing")
    p.add_argument("--plane", choices=["axial", "coronal", "sagittal"],
                   help="slice plane: 2D (slice-wise) models cut along it, --slice-range and box prompts count "
                        "along it (default axial)")
    p.add_argument("--slice-range", type=int, nargs=2, metavar=("FIRST", "LAST"),
                   help="only slices FIRST..LAST (array indices along the --plane axis), for any model")
    p.add_argument("--batch-size", type=int, help="slices or windows per model call (default: chosen from free memory)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="any other backend option (value parsed as JSON when possible); repeatable")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--in-process", action="store_true",
                   help="run the model in this process instead of the background worker (debugging)")
    p.add_argument("--worker-python", help="Python executable for the worker (default: this one, or "
                                           "$BIOMEDSEG_WORKER_PYTHON)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the written paths")


GEOMETRY_FLAGS = ("--box", "--point", "--exclude-point")
_GEOMETRY_VALUE = re.compile(r"^(-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|include|exclude)(,(-?(\d+\.?\d*|\.\d+)"
                             r"([eE][-+]?\d+)?|include|exclude))*,?$", re.IGNORECASE)


def joined_geometry_arguments(argv: list[str]) -> list[str]:
    """``--box -29,-29,10 -10,-10,10`` as ``--box=-29,-29,10,-10,-10,10``: argparse would take a value
    that starts with a minus sign and holds a comma for an option. Every number (or comma list, or
    include/exclude) right after a geometry flag joins it."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token not in GEOMETRY_FLAGS:
            out.append(token)
            continue
        values = []
        while i < len(argv) and _GEOMETRY_VALUE.match(argv[i]):
            values.append(argv[i].rstrip(","))
            i += 1
        out.append(f"{token}={','.join(values)}" if values else token)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(joined_geometry_arguments(argv))
    try:
        return args.func(args)
    except BiomedSegError as err:
        print(f"error: {err.message}", file=sys.stderr)
        if err.hint:
            print(f"  what to do: {err.hint}", file=sys.stderr)
        return EXIT_CODES.get(err.kind, 1)
    except KeyboardInterrupt:
        print("cancelled; nothing was written.", file=sys.stderr)
        return EXIT_CODES["cancelled"]


if __name__ == "__main__":
    sys.exit(main())
