"""`segment`, `refine` and `classify`: read, check, run (worker or in-process), write."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..errors import InputError
from .progress import ProgressBar
from .prompt_args import prompts_of


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
    options = model_options(args)
    options.setdefault("task", "classify")
    volume = read_volume(args.input, series_uid=args.series_uid)
    run = dict(device=args.device, weights=args.weights, options=options, region=region_of(args))
    if args.in_process:
        from ..engine import segment

        result = segment(volume, args.model, [TextPrompt(label) for label in labels], **run)
    else:
        from ..worker.client import WorkerClient

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
    from ..catalog import check_options, check_prompts, get_model
    from ..io import read_volume, write_segmentation
    from ..io.readers import suffix_of
    from ..io.atomic import check_target
    from ..io.writers import SEGMENTATION_SUFFIXES, outputs_for, write_result_json

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
    bar = ProgressBar(enabled=not args.quiet)
    run_options = dict(device=args.device, threshold=args.threshold, keep_largest=args.largest,
                       fill_holes=args.fill_holes, weights=args.weights, options=options, region=region)
    try:
        if args.in_process:
            from ..engine import segment

            result = segment(volume, args.model, prompts, progress=bar, **run_options)
        else:
            from ..worker.client import WorkerClient

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
        from ..preview import render_preview

        written.append(render_preview(args.preview, volume, result.segments, title=f"{volume.name} - {args.model}",
                                      overwrite=args.overwrite))
    for seg in result.segments:
        log(f"segment '{seg.name}': {int(seg.mask.sum())} voxels")
    for path in written:
        print(path)
    log(f"done in {time.perf_counter() - started:.1f} s")
    return 0
