"""One call from a Volume and prompts to named segments, for every model.

The same steps whether the worker or ``--in-process`` calls it:
1. check the request against the catalogue: prompts (types, vocabulary), declared options,
   threshold, region -- before any weights are needed;
2. cut the region (slice range / ROI) and put geometric prompts on the region's voxel grid;
3. ``plan`` (the backend validates and sizes the work on the whole image);
4. load or reuse the warm backend (device, weights);
5. ``run`` under the one out-of-memory policy: free the device's memory, halve the plan's
   batch and retry, down to one unit; then an ``OutOfMemoryError`` that says what to try;
6. threshold and clean up each target's map, put it back on the full grid, name and colour
   it; targets with nothing left are reported absent with the reason, never written empty.
"""
from __future__ import annotations

import math
import time

import numpy as np

from ..catalog import check_options, check_prompts, get_model
from ..errors import BiomedSegError, CancelledError, InputError, OutOfMemoryError
from ..geometry import Region, crop_volume, region_box, uncrop
from ..prompts import crop_prompts, to_grid
from ..results import Absence, ModelOutput, SegmentationResult
from ..runtime.cancel import interruptible
from ..runtime.device import device_kind, is_out_of_memory, release_memory, resolve_device
from ..runtime.postprocess import postprocess
from ..segments import Segment, prepare_segments
from ..volume import Volume
from . import loading
from ..decisions import decide

#: Smallest edge a 3D model's input may have.
MIN_3D_EDGE = 8


def _nothing(*args) -> None:
    return None


def _never() -> bool:
    return False


def segment(volume: Volume | None, model_id: str, prompts, *, device: str = "auto", threshold: float = 0.5,
            keep_largest: bool | None = None, fill_holes: bool | None = None, weights: str | None = None,
            progress=None, cancelled=None, keep_probabilities: bool = False, options: dict | None = None,
            region: Region | None = None, session: str | None = None, free_text: bool = False,
            force: bool = False) -> SegmentationResult:
    """Segment ``volume`` with ``model_id`` for each prompt; masks are on the input grid.

    ``session`` names an interactive session: with a volume it (re)opens it (the old one is closed
    first, so a failed re-open never leaves the previous image behind), without one it runs the
    new prompts on the session's image, in the session's region unless ``region`` names another
    (see ``engine.sessions``). ``free_text`` sends text prompts the model does not list; ``force``
    runs a model on an image its modalities exclude (``decisions``).
    """
    from .sessions import SESSIONS

    progress, cancelled = progress or _nothing, cancelled or _never
    start = time.perf_counter()
    if not 0.0 < float(threshold) < 1.0:  # NaN fails this too
        raise InputError(f"Threshold {threshold} must lie strictly between 0 and 1.")
    entry = get_model(model_id)
    prompts = check_prompts(model_id, prompts, free_text)
    stated = dict(options or {})
    options = check_options(model_id, entry.options, options)
    loading.check_runnable(entry)
    resolved, reason = resolve_device(device)
    if volume is None:
        if session is None:
            raise InputError("No image was given.")
        stored = SESSIONS.get(session, model_id, resolved, weights)
        volume, region = stored.volume, region if region is not None else stored.region
    elif session is not None:
        SESSIONS.close(session)
    decisions = decide(entry, volume, prompts, stated, force=force, free_text=free_text)
    region = region or Region()
    box = region_box(volume, region)
    work = crop_volume(volume, box) if box is not None else volume
    if entry.input == "3d" and min(work.shape) < MIN_3D_EDGE:
        what = "the region to segment" if box is not None else f"'{volume.name or 'the input'}'"
        raise InputError(f"Model '{model_id}' needs a 3D volume, but {what} has shape {work.shape} (k, j, i).",
                         hint="Choose a 3D image, a larger region, or a slice-wise (2D) model.")
    grid = to_grid(crop_prompts(prompts, box), work, where="the region to segment" if box else "the image")
    warm = loading.warm_backend(model_id, resolved, weights)
    fresh = warm or loading.new_backend(entry, resolved)
    plan = fresh.plan(volume, to_grid(prompts, volume) if box is not None else grid, options, plane=region.plane)
    backend = load_with_memory_policy(model_id, resolved, weights, fresh, entry.title)
    if session is not None:
        runner = SESSIONS.runner(session, model_id, resolved, weights, volume, region, options, backend, work, grid,
                                 entry, progress, cancelled)
    else:
        def runner(plan_now):
            return backend.run(work, grid, plan_now, progress=progress, cancelled=cancelled)
    planned = plan.batch_size
    with interruptible(backend.modules(), cancelled):
        output, retries = run_with_memory_policy(runner, plan, entry.title, backend.device, progress)
    if cancelled():
        raise CancelledError("Segmentation was cancelled; nothing was written.")
    check_output(model_id, entry, output, grid.targets, work.shape)
    result = to_result(output, entry, volume, box, grid.targets, threshold, keep_largest, fill_holes,
                       keep_probabilities)
    result.device, result.device_reason, result.model_id = backend.device, reason, model_id
    result.report.update({"model": model_id, "decisions": decisions, "plan": plan.report, "region": box.to_list() if box else None,
                          "batch_size": {"planned": planned, "ran": plan.batch_size, "units": plan.units},
                          "memory_retries": retries,
                          "weights": loading.weights_used(model_id, backend.device, weights)})
    result.seconds = time.perf_counter() - start
    return result


def _attempt(call):
    """(result, False), or (None, True) when ``call`` ran out of memory; any other error propagates.
    Returning here drops the exception and the frames that hold its tensors before memory is freed."""
    try:
        return call(), False
    except BiomedSegError:
        raise
    except Exception as exc:  # noqa: BLE001 -- torch's OOM types differ by device; matched by name/text
        if not is_out_of_memory(exc):
            raise
    return None, True


def load_with_memory_policy(model_id: str, device: str, weights, fresh, title: str):
    """The loaded backend; running out of memory while loading is an OutOfMemoryError (exit 4), not a crash."""
    backend, out_of_memory = _attempt(lambda: loading.load_backend(model_id, device, weights, backend=fresh)[0])
    if not out_of_memory:
        return backend
    release_memory(device)
    raise OutOfMemoryError(f"{title} ran out of memory on {device} while loading its weights.",
                           hint=_memory_hint(device, loading=True))


def _memory_hint(device: str, loading: bool = False) -> str:
    gpu = device_kind(device) == "cuda"
    what = "Close other programs that use the " + ("GPU" if gpu else "memory")
    if loading:
        return what + (", or use --device cpu." if gpu else ", or use a machine with more memory.")
    return what + ", choose a smaller slice range or ROI" + (", or use --device cpu." if gpu else ".")


def run_with_memory_policy(runner, plan, title: str, device: str, progress):
    """``runner(plan)`` with the one out-of-memory policy; returns (output, retries)."""
    retries = []
    while True:
        output, out_of_memory = _attempt(lambda: runner(plan))
        if not out_of_memory:
            return output, retries
        release_memory(device)
        batch = plan.batch_size
        if batch is not None and batch > 1:
            plan.batch_size = batch // 2
            retries.append({"from": batch, "to": plan.batch_size})
            progress(f"out of memory: retrying with batch size {plan.batch_size}", 0, 1)
            continue
        raise OutOfMemoryError(
            f"{title} ran out of memory on {device} with {batch or 1} {plan.units} per pass"
            f"{' (after halving the batch)' if retries else ''}.", hint=_memory_hint(device))


def check_output(model_id: str, entry, output: ModelOutput, targets: list[str], shape) -> None:
    """The backend kept the contract: every target answered on the grid it was given, finite label scores.
    A breach is the backend's bug: an error that says so (exit 1), never a result with it."""
    def broken(what: str):
        return BiomedSegError(f"Model '{model_id}' {what}.", hint="This is a bug in the model's backend; please "
                                                                   "report it with the worker log.")

    if not isinstance(output, ModelOutput):
        raise broken(f"returned {type(output).__name__}, not a ModelOutput")
    for label in output.labels:
        if not isinstance(label.score, (int, float)) or not math.isfinite(label.score):
            raise broken(f"returned the label '{label.name}' with score {label.score!r}")
    if "masks" in entry.results:
        for target in targets:
            prob = output.probabilities.get(target)
            if prob is None and target not in output.absent:
                raise broken(f"returned no result for '{target}'")
            if prob is not None and tuple(prob.shape) != tuple(shape):
                raise broken(f"returned shape {prob.shape} for '{target}', not the input's {tuple(shape)}")
    # masks named after the phrases of a text answer (model.json ``phrase_masks``: at most that many)
    extra = [name for name in output.probabilities if name not in targets]
    if len(extra) > int(entry.data.get("phrase_masks", 0)):
        raise broken(f"returned {len(extra)} mask(s) beyond its prompts ({', '.join(map(repr, extra[:5]))}); its "
                     f"model.json allows {int(entry.data.get('phrase_masks', 0))}")
    for name in extra:
        if tuple(np.shape(output.probabilities[name])) != tuple(shape):
            raise broken(f"returned shape {np.shape(output.probabilities[name])} for '{name}', not the input's "
                         f"{tuple(shape)}")


def to_result(output: ModelOutput, entry, volume: Volume, box, targets: list[str], threshold: float,
              keep_largest: bool | None, fill_holes: bool | None, keep_probabilities: bool) -> SegmentationResult:
    """Threshold, clean up and place each target's map on the full grid; name and colour the segments."""
    defaults = entry.postprocess_defaults
    largest = defaults["keep_largest"] if keep_largest is None else keep_largest
    fill = defaults["fill_holes"] if fill_holes is None else fill_holes
    segments, absent, details, probabilities = [], [], {}, {}
    for target in targets + [name for name in output.probabilities if name not in targets]:  # then phrase masks
        prob = output.probabilities.get(target)
        if prob is None:
            if target in output.absent or "masks" in entry.results:
                absent.append(target)
                details[target] = Absence.of(output.absent.get(target, "the model returned nothing for it"))
            continue
        prob = np.asarray(prob)
        mask = postprocess(prob, threshold, keep_largest=largest, fill=fill)
        if keep_probabilities:
            probabilities[target] = uncrop(np.asarray(prob, np.float32), box, volume.shape)
        if mask.any():
            segments.append(Segment(target, uncrop(mask, box, volume.shape)))
        else:
            absent.append(target)
            details[target] = Absence.of(output.absent[target]) if target in output.absent else \
                _below_threshold(prob, threshold)
    if segments:  # names -> colours and terminology, once, for every consumer
        segments = prepare_segments(segments, volume.shape)
    return SegmentationResult(segments, absent, entry.id, "", "", 0.0, probabilities,
                              {t: d.reason for t, d in details.items()}, list(output.labels),
                              list(output.findings), dict(output.report), details)


def _below_threshold(prob: np.ndarray, threshold: float) -> Absence:
    highest = float(prob.max()) if prob.size else 0.0
    above = "a voxel at or above it was removed by post-processing" if highest > threshold else \
        f"the highest probability is {highest:.3g}"
    return Absence(f"no voxel above the threshold {threshold:g} ({above})", "threshold", highest, float(threshold))
