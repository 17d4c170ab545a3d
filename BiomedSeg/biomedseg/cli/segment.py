"""`segment`, `refine` and `classify`: read, check, run (worker or in-process), write."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..errors import InputError
from .progress import ProgressBar
from .prompt_args import prompts_of


def add_model_run_arguments(p) -> None:
    """Device, threshold, clean-up and weights: how a model runs, the same for `segment`, `refine` and `batch`."""
    import argparse

    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold (default 0.5)")
    p.add_argument("--largest", action=argparse.BooleanOptionalAction, default=None,
                   help="keep only the largest 3D component (model default when not given)")
    p.add_argument("--fill-holes", action=argparse.BooleanOptionalAction, default=None,
                   help="fill holes inside each segment (model default when not given)")
    p.add_argument("--weights", help="local weights file or folder instead of the catalogue's source")


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
    from ..geometry import make_region

    return make_region(args.plane or "axial", list(args.slice_range) if args.slice_range else None)


def _report_extras(result, log) -> None:
    for label in result.labels:
        log(f"label: {label.name} ({label.score:.3f})" + (f" for '{label.target}'" if label.target else ""))
    for finding in result.findings:
        log(f"finding: {finding.text}" + (f" [{', '.join(finding.targets)}]" if finding.targets else ""))


def cmd_refine(args) -> int:
    """`refine`: a segment of a segmentation file as MedSAM2's prompt; the other segments are written
    beside the refined one unchanged (unless --only)."""
    from ..io.segmentation_reader import find_segment, read_segments
    from ..prompts import MaskPrompt

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
    from ..io import read_volume
    from ..prompts import TextPrompt

    labels = [" ".join(str(label).split()) for label in args.labels or []]
    labels = [label for label in labels if label]
    if len(labels) < 2:
        raise InputError("classify needs at least two labels to choose between.",
                         hint='e.g. --labels "adenocarcinoma histopathology" "squamous cell carcinoma histopathology"')
    from .serve import check_where

    check_where(args)
    options = model_options(args)
    options.setdefault("task", "classify")
    volume = read_volume(args.input, series_uid=args.series_uid)
    run = dict(device=args.device, weights=args.weights, options=options, region=region_of(args))
    if args.in_process:
        from ..engine import segment

        result = segment(volume, args.model, [TextPrompt(label) for label in labels], **run)
    else:
        from .serve import worker_for

        client = worker_for(args, args.model)
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


def _check_paths(args, entry, output: Path) -> list[Path]:
    """The other paths this run will write; every path checked before anything is read (a bad path costs
    nothing), by ``io.preflight.check_outputs`` without the image (the image's own checks follow it)."""
    from ..io.preflight import check_outputs
    from ..io.readers import suffix_of
    from ..io.writers import SEGMENTATION_SUFFIXES

    if suffix_of(output) not in SEGMENTATION_SUFFIXES + (".json",):
        raise InputError(f"Output '{output}' must end in one of {', '.join(SEGMENTATION_SUFFIXES + ('.json',))}.")
    for flag, value, suffix in (("--preview", args.preview, ".png"), ("--report", args.report, ".json"),
                                ("--probabilities", args.probabilities, ".nrrd")):
        if value and suffix_of(value) != suffix:
            raise InputError(f"{flag} '{value}' must end in {suffix}.")
    if "masks" not in entry.results and suffix_of(output) != ".json":
        raise InputError(f"Model '{args.model}' returns {', '.join(entry.results)}, not masks.",
                         hint="Write its result with -o NAME.json.")
    if args.probabilities and "masks" not in entry.results:
        raise InputError(f"Model '{args.model}' returns {', '.join(entry.results)}: it has no probabilities to write.")
    others = [Path(p) for p in (args.preview, args.report, args.probabilities) if p]
    check_outputs(output, None, overwrite=args.overwrite, others=others)
    return others


def _run(args, volume, prompts, bar, run_options):
    if args.in_process:
        from ..engine import segment

        return segment(volume, args.model, prompts, progress=bar,
                       keep_probabilities=bool(args.probabilities), **run_options)
    from .serve import worker_for

    client = worker_for(args, args.model)  # the server's, or a local one in the model's own environment
    try:
        return client.run(volume, args.model, prompts, probabilities=bool(args.probabilities),
                          on_progress=lambda job: bar(job.stage, job.done, job.total), **run_options)
    finally:
        client.close()


def cmd_segment(args, refine=None) -> int:
    """Check everything that can be checked (paths, prompts, options, the image's modality, the outputs'
    needs) before a worker starts; run; print what was decided and found; write."""
    from ..catalog import check_options, check_prompts, get_model
    from ..decisions import decide
    from ..io import read_volume, write_segmentation
    from ..io.preflight import check_outputs
    from ..io.readers import suffix_of
    from ..io.writers import write_result_json
    from ..run_report import build_report, ct_window, report_lines

    from .serve import check_where

    check_where(args)
    output = Path(args.output)
    if args.weights is not None and not args.weights.strip():  # "$W" with W unset: never the default instead
        raise InputError("--weights is empty.", hint="Give the checkpoint file or folder, or leave --weights out.")
    if not (0.0 < args.threshold < 1.0):  # NaN and infinities too
        raise InputError(f"Threshold {args.threshold} must lie strictly between 0 and 1.")
    entry = get_model(args.model)
    others = _check_paths(args, entry, output)
    prompts = check_prompts(args.model, prompts_of(args), args.free_text) if refine is None else []
    options = model_options(args)
    settled = check_options(args.model, entry.options, options)  # undeclared options fail before anything is read
    region = region_of(args)
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    started = time.perf_counter()
    volume = read_volume(args.input, series_uid=args.series_uid)
    times = {"read": time.perf_counter() - started}
    log(f"read {volume}")
    warnings = [str(w) for w in volume.meta.get("warnings", [])]
    for warning in warnings:
        log(f"warning: {warning}")
    beside, refined = [], None
    if refine is not None:
        prompts, beside, refined = refine(volume, log)
        prompts = check_prompts(args.model, prompts)
    check_outputs(output, volume, overwrite=args.overwrite, others=others)
    decisions = decide(entry, volume, prompts, options, force=args.force, free_text=args.free_text)
    for warning in decisions["warnings"]:
        log(f"warning: {warning}")
    bar = ProgressBar(enabled=not args.quiet)
    request = dict(device=args.device, threshold=args.threshold, keep_largest=args.largest,
                   fill_holes=args.fill_holes, weights=args.weights, options=options, region=region,
                   free_text=args.free_text, force=args.force)
    ran = time.perf_counter()
    try:
        result = _run(args, volume, prompts, bar, request)
    finally:
        bar.close()
    times["run"] = time.perf_counter() - ran
    _report_extras(result, log)
    found = bool(result.segments or result.labels or result.findings)
    writing = time.perf_counter()
    written: list[Path] = []
    if suffix_of(output) == ".json":
        written = [write_result_json(output, result, args.overwrite)]  # with the reasons, even if nothing was found
    elif result.segments:
        if refined is not None:  # the refined segment keeps its name, colour and terminology
            result.segments = [type(seg)(refined.name, seg.mask, refined.color or seg.color,
                                         refined.terminology or seg.terminology) for seg in result.segments]
        written = write_segmentation(output, volume, beside + result.segments, overwrite=args.overwrite)
    if args.preview and result.segments:
        from ..preview import render_preview

        written.append(render_preview(args.preview, volume, result.segments, title=f"{volume.name} - {args.model}",
                                      overwrite=args.overwrite, window=ct_window(result.report.get("plan") or {}),
                                      modality=decisions["modality"]["modality"]))
    if args.probabilities and result.probabilities:
        from ..io.probabilities import write_probabilities

        written.append(write_probabilities(args.probabilities, volume, result.probabilities, args.threshold,
                                           overwrite=args.overwrite, model_id=args.model))
    times["write"] = time.perf_counter() - writing
    times["total"] = time.perf_counter() - started
    request_record = {k: v for k, v in request.items() if k != "region"}
    request_record.update(region=region.to_dict(), input=str(args.input),
                          options={**settled, **{k: options[k] for k in ("modality", "site") if k in options}})
    report = build_report(result, volume, entry=entry, prompts=prompts, request=request_record, times=times,
                          outputs=written, warnings=warnings + decisions["warnings"])
    if args.report or args.verbose:
        _hash_weights(report)
    if args.report:
        written.append(_write_report(args.report, report, args.overwrite))
    for flag, path, made in (("--preview", args.preview, bool(result.segments)),
                             ("--probabilities", args.probabilities, bool(result.probabilities))):
        if path and not made:
            log(f"{flag} {path}: not written, there is nothing to show")
    for line in report_lines(report, verbose=args.verbose):
        log(line)
    for path in written:
        print(path)
    if not found:
        said = f"; {output} says why" if suffix_of(output) == ".json" else "; no segmentation written"
        print(f"error: nothing was found for {', '.join(map(repr, result.absent))}{said}.", file=sys.stderr)
        return 1
    return 0


def _hash_weights(report: dict) -> None:
    """Every weight file's sha256 (hashed here, once per file version, when the engine did not know it)."""
    from ..runtime.weights import file_sha256

    for weight in report["model"]["weights"]:
        if weight.get("sha256") is None and weight.get("path") and Path(weight["path"]).is_file():
            weight["sha256"] = file_sha256(weight["path"])


def _write_report(path, report: dict, overwrite: bool) -> Path:
    from ..io.atomic import atomic_write

    text = json.dumps(report, indent=2) + "\n"
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text), overwrite)
