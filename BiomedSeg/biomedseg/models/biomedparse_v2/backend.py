"""The engine's backend for BiomedParse v2: text-prompted segmentation of volumes, slice by slice, each
slice shown to the network with its neighbours.

One run, in the order it happens:

1. ``plan`` (whole image, no weights): modality and site from the same sources as v1 (the option,
   the DICOM tags, the voxels), the intensity rule (``targets``: a CT window by site, else the 0.5 /
   99.5 percentiles of the positive voxels via v1's ``intensity_bounds``, or nothing when the voxels
   already lie in 0..255) with its bounds taken over the *whole* image, so a slice range gives the
   values a whole run gives there.
2. ``run``: the volume is cut into slices of the engine's plane in display orientation
   (``SliceOrientation``: transposes and flips only), scaled to uint8 with those bounds, padded to
   square and resized to 512 as the authors do (``preprocess.resize_to_model``), and each batch of
   ``slice_batch_size`` slices is packed as (slice i, i-1, i+1) with the authors' edge rule (slice 0
   takes slice 1 as previous, the last takes D-2 as next; ``preprocess.pack_slices``) and encoded
   once (``V2Inference.encode``), shared by all prompts.
3. Every batch is decoded for all prompts at once (``V2Inference.decode``; v2's masks depend on the
   prompt list, as in the authors' code) with one Boltzmann sampler per run seeded with ``seed``,
   consumed batch after batch: the same slices, prompts, batch size and seed give the same result,
   whether the features were cached or not.
4. Mask logits become 512x512 probabilities (``inference.probabilities_512``), then the authors'
   ``postprocess``: one prompt -> ``prob x (existence prob > threshold)`` per slice; several ->
   their slice NMS (``postprocess.slice_nms``, IoU 0.5, existence score threshold). The maps go back
   to each slice's own grid (``preprocess.restore_from_model``: nearest to the padded size, padding
   removed) and the stack back to the input's voxel grid (``from_display``).
5. A target whose existence probability is not above the threshold on any slice is absent
   (``Absence`` kind "existence", with its best score) and not returned; one the NMS dropped
   everywhere is absent with that reason. ``report["existence"][target]`` holds the per-slice
   existence probabilities in array order along the slice axis.

A feature cache (``slicewise.FeatureCache``: keyed by the voxels, geometry, intensity rule, plane and
batch size) keeps the encoded batches of the last volume on the device or in RAM when they fit
(v1's feature-size rule: v2's decoder inputs have v1's shapes at 512), so a new prompt on the same
volume runs only the decoder. Options are declared in model.json; the engine refuses others.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from biomedseg.errors import CancelledError, InputError
from biomedseg.geometry import Crop, crop_volume
from biomedseg.imaging_guess import guess_modality
from biomedseg.models.base import Backend, LoadContext, Plan
from biomedseg.models.biomedparse import targets as v1_targets
from biomedseg.models.biomedparse.preprocess import CT_WINDOWS as V1_CT_WINDOWS, intensity_bounds
from biomedseg.prompts import PromptSet
from biomedseg.results import Absence, ModelOutput
from biomedseg.runtime.device import device_kind
from biomedseg.runtime.slicewise import FeatureCache
from biomedseg.volume import Volume

from . import targets as tg

log = logging.getLogger(__name__)

MODEL_SIZE = 512
DEFAULT_BATCH = 4  # the authors' slice_batch_size
NMS_IOU = 0.5  # the authors' slice NMS


class _Network:
    """The network side's functions, named once here: ``inference`` (``V2Inference``, ``BoltzmannSampler``,
    ``probabilities_512``), ``preprocess`` (``resize_to_model``, ``pack_slices``, ``restore_from_model``),
    ``postprocess`` (``slice_nms``) and ``checkpoint`` (``build_biomedparse_v2``)."""

    def __init__(self):
        from . import inference, postprocess, preprocess

        self.inference, self.preprocess, self.postprocess = inference, preprocess, postprocess

    def build(self, path: Path, tokenizer, device: str):
        from .checkpoint import build_biomedparse_v2

        return self.inference.V2Inference(build_biomedparse_v2(checkpoint=path, device=device), tokenizer,
                                          device=device)

    def sampler(self, seed: int):
        return self.inference.BoltzmannSampler.seeded(int(seed))

    def resize(self, slices_u8: np.ndarray):
        return self.preprocess.resize_to_model(slices_u8)

    def pack(self, resized, start: int, stop: int):
        return self.preprocess.pack_slices(resized, start, stop)

    def restore(self, maps, geometry):
        """Nearest to the padded size, padding removed: the authors' rule for labels, so the maps thresholded
        at 0.5 are their masks."""
        return self.preprocess.restore_from_model(maps, *geometry, mode="nearest")

    def probabilities(self, mask_logits):
        return self.inference.probabilities_512(mask_logits)

    def nms(self, probs, existence, threshold: float):
        """(probs x keep, keep [P, D]) of the authors' slice NMS on [P, D, H, W] and [P, D]."""
        return self.postprocess.slice_nms(probs, existence, iou_threshold=NMS_IOU, score_threshold=threshold)


def with_neighbours(volume: Volume, whole: Volume | None, orient, plane: str) -> tuple[Volume, int, int]:
    """(the region with the slice the whole image has on each side of it along the slice axis, context slices
    before and after it in display order): a slice range's first and last slice are packed with their true
    neighbours, as in a run on the whole image; only at the image's own edges does the authors' rule apply."""
    box = volume.meta.get("cropped_from")
    if box is None or whole is None:
        return volume, 0, 0
    axis = orient.slice_axis
    start, stop = [int(b[0]) for b in box], [int(b[1]) for b in box]
    lo, hi = max(0, start[axis] - 1), min(whole.shape[axis], stop[axis] + 1)
    below, above = start[axis] - lo, hi - stop[axis]
    if not (below or above):
        return volume, 0, 0
    start[axis], stop[axis] = lo, hi
    extended = crop_volume(whole, Crop(tuple(start), tuple(stop)))
    return (extended, above, below) if extended.slice_orientation(plane).flip_slices else (extended, below, above)


@dataclass
class Settings:
    """Everything one run will use, settled and checked by ``plan`` before any heavy work."""

    modality: str
    modality_source: str
    site: str | None
    site_source: str
    ct_window: str
    window: tuple | None  # the CT window (HU), or None
    bounds: tuple | None  # intensities that become 0 and 255; None: used as they are
    rule: str
    plane: str
    threshold: float
    seed: int
    cache: bool
    #: the whole image ``plan`` was given: a region's first and last slice take their true neighbours from it
    whole: Volume | None = None

    def context(self) -> dict:
        """What the features depend on (the feature cache's key, with the voxels, plane and batch size)."""
        return {"model": "biomedparse-v2", "bounds": self.bounds, "size": MODEL_SIZE}


class BiomedParseV2Backend(Backend):
    """BiomedParse v2 under the model contract; no clean-up unless asked (targets can be several pieces)."""

    def __init__(self, device: str = "cpu"):
        super().__init__(device)
        self.inference = None
        self.cache = FeatureCache(max_volumes=1)
        self._network: _Network | None = None
        #: Calls of ``V2Inference.encode`` / slices encoded / decoder calls, over the backend's life.
        self.encode_calls = self.encoded_slices = self.decode_calls = 0
        self.last_run: dict = {}

    @property
    def network(self) -> _Network:
        if self._network is None:
            self._network = _Network()
        return self._network

    def load(self, context: LoadContext) -> None:
        from biomedseg.models.biomedparse.tokenizer import load_tokenizer

        path = Path(context.weights[0])
        folders = [path.parent] + ([Path(os.environ["BIOMEDSEG_WEIGHTS_DIR"])]
                                   if os.environ.get("BIOMEDSEG_WEIGHTS_DIR") else [])
        self.inference = self.network.build(path, load_tokenizer(folders), self.device)

    def release(self) -> None:
        self.cache.clear()

    def modules(self) -> list:
        net = getattr(self.inference, "net", None)
        return [net] if net is not None and hasattr(net, "modules") else []

    # ---- planning ---------------------------------------------------------------------------
    def plan(self, volume: Volume, prompts: PromptSet, options: dict, *, plane: str = "axial") -> Plan:
        modality, modality_source = self._modality(volume, options)
        ct_window = options.get("ct_window") or "v2"
        site, site_source = self._site(volume, options, modality, ct_window)
        window = None
        if modality == "CT":
            window = tuple(float(v) for v in (tg.V2_CT_WINDOWS if ct_window == "v2" else V1_CT_WINDOWS)[site])
        bounds = intensity_bounds_of(volume.grayscale(), window, modality)
        rule = tg.describe_rule(modality, ct_window, site, window, bounds is None)
        threshold = options.get("existence_threshold")
        threshold = 0.5 if threshold is None else float(threshold)
        if not 0 <= threshold < 1:
            raise InputError(f"existence_threshold must lie in [0, 1), got {threshold!r}.")
        given = {k: options[k] for k in ("batch_size", "slice_batch_size") if options.get(k) is not None}
        if len(set(given.values())) > 1:
            raise InputError(f"batch_size {given['batch_size']} and slice_batch_size {given['slice_batch_size']} "
                             "disagree; they are the same setting.", hint="Give one of them.")
        batch = int(next(iter(given.values()), DEFAULT_BATCH))
        seed = int(options.get("seed") or 0)
        settings = Settings(modality, modality_source, site, site_source, ct_window, window, bounds, rule, plane,
                            threshold, seed, options.get("cache") is not False, volume)
        report = {"modality": modality, "modality_source": modality_source, "site": site, "site_source": site_source,
                  "window": list(window) if window else None, "intensity_rule": rule,
                  "intensity_bounds": list(bounds) if bounds else None, "plane": plane, "image_size": MODEL_SIZE,
                  "existence_threshold": threshold, "seed": seed}
        if modality != "CT" and bounds is not None:
            report["intensity_window"] = list(bounds)
        return Plan(batch_size=batch, units="slice(s) of 512x512 with their neighbours", details=settings,
                    report=report)

    @staticmethod
    def _modality(volume: Volume, options: dict) -> tuple[str, str]:
        value = options.get("modality")
        if value not in (None, ""):
            return tg.resolve_modality(value), "option"
        name, why = guess_modality(volume)
        return tg.resolve_modality(name, why), why

    @staticmethod
    def _site(volume: Volume, options: dict, modality: str, ct_window: str) -> tuple[str | None, str]:
        """v2 windows: the v2 README's sites; v1 windows: v1's sites and v1's resolution (chest = lung)."""
        if modality == "CT":
            v1 = ct_window == "v1"
            resolve = (lambda w: v1_targets.resolve_site("CT", w)) if v1 else tg.v2_site
            default = v1_targets.DEFAULT_CT_SITE if v1 else tg.DEFAULT_V2_SITE
            choices = v1_targets.site_choices("CT") if v1 else tg.v2_site_choices()
        else:
            resolve, default, choices = (lambda w: tg.v2_site(w) and str(w).strip().lower()), None, []
        value = options.get("site")
        if value not in (None, ""):
            site = resolve(value)
            if site is None and modality == "CT":
                raise InputError(f"BiomedParse v2 has no CT window for site '{value}' ({ct_window} windows).",
                                 hint="Use one of " + ", ".join(choices) + ".")
            return (site or str(value).strip().lower()), "option"
        site, source = tg.site_from_tags(volume.meta, resolve)
        if site is not None:
            return site, source
        return default, "default" if default else "unknown"

    # ---- the run ----------------------------------------------------------------------------
    def run(self, volume: Volume, prompts: PromptSet, plan: Plan, *, progress, cancelled) -> ModelOutput:
        import torch

        settings: Settings = plan.details
        texts = list(prompts.texts)
        if cancelled():
            raise CancelledError("Segmentation was cancelled; nothing was written.")
        orient = volume.slice_orientation(settings.plane)
        source, lead, trail = with_neighbours(volume, settings.whole, orient, settings.plane)
        display = source.slice_orientation(settings.plane).to_display(source.grayscale())  # (lead + n + trail, ...)
        total, rows, cols = display.shape
        n = total - lead - trail
        batch = max(1, int(plan.batch_size or DEFAULT_BATCH))
        store, cache_note = self._store(source, settings, total, batch)
        net = self.network
        out = {p: np.zeros((total, rows, cols), np.float32) for p in texts}
        exist = np.zeros((total, len(texts)), np.float64)
        flags = {name: np.zeros((total, len(texts)), bool) for name in ("passed", "kept", "drawn")}
        resized, encoded_before = None, self.encoded_slices
        progress("BiomedParse v2: slices", 0, total)
        with torch.no_grad():
            tokens = self.inference.prompt_tokens(texts)
            sampler = net.sampler(settings.seed)
            for start in range(0, total, batch):
                stop = min(start + batch, total)
                if cancelled():
                    raise CancelledError("Segmentation was cancelled; nothing was written.")
                features = store["chunks"].get(start) if store is not None else None
                if features is None:
                    if resized is None:
                        resized, *geometry = net.resize(to_uint8(display, settings.bounds))
                        if store is not None:
                            store["geometry"] = tuple(geometry)
                    packed = torch.as_tensor(net.pack(resized, start, stop)).to(self.device)
                    features = self.inference.encode(packed)
                    self.encode_calls += 1
                    self.encoded_slices += stop - start
                    if store is not None:
                        store["chunks"][start] = features if store["where"] == "device" else features.cpu()
                geometry = store["geometry"] if store is not None else geometry
                mask_logits, existence_logits = self.inference.decode(features.to(self.device), tokens, sampler)
                self.decode_calls += 1
                probs, scores, batch_flags = self._postprocess(mask_logits, existence_logits, settings.threshold)
                b, p = probs.shape[:2]
                maps = torch.as_tensor(net.restore(probs.reshape(b * p, MODEL_SIZE, MODEL_SIZE), geometry))
                maps = maps.reshape(b, p, rows, cols).float().cpu().numpy()
                for j, prompt in enumerate(texts):
                    out[prompt][start:stop] = maps[:, j]
                exist[start:stop] = scores
                for name, value in batch_flags.items():
                    flags[name][start:stop] = value
                progress("BiomedParse v2: slices", stop, total)
        inner = slice(lead, total - trail)  # the context slices were encoded for their neighbours only
        out = {p: maps[inner] for p, maps in out.items()}
        exist = exist[inner]
        flags = {name: value[inner] for name, value in flags.items()}
        order = slice(None, None, -1) if orient.flip_slices else slice(None)  # display order -> array order
        absent = self._absences(texts, exist, flags, settings.threshold, n)
        report = {"existence": {p: [round(float(v), 5) for v in exist[order, j]] for j, p in enumerate(texts)},
                  "existence_slices": self._slice_axis_note(volume, orient, settings.plane),
                  "kept_slices": {p: int(flags["kept"][:, j].sum()) for j, p in enumerate(texts)},
                  "existence_threshold": settings.threshold, "seed": settings.seed, "slice_batch_size": batch,
                  "postprocess": "slice NMS (IoU 0.5)" if len(texts) > 1 else "existence gate",
                  "slices": n, "context_slices": lead + trail,
                  "encoded_slices": self.encoded_slices - encoded_before, "cache": cache_note,
                  "intensity_rule": settings.rule}
        self.last_run = {**plan.report, **report}
        if device_kind(self.device) == "cuda":
            torch.cuda.empty_cache()
        progress("BiomedParse v2: done", 1, 1)
        probabilities = {p: np.ascontiguousarray(orient.from_display(out[p])) for p in texts if p not in absent}
        return ModelOutput(probabilities, absent=absent, report=report)

    def _postprocess(self, mask_logits, existence_logits, threshold: float):
        """The authors' ``postprocess`` on one batch: [B, P, 512, 512] kept probabilities, [B, P] existence
        probabilities and per-slice flags (existence passed, mask kept, mask drawn above 0.5)."""
        import torch

        probs = self.network.probabilities(mask_logits.float())
        scores = torch.sigmoid(existence_logits.float())
        drawn = (probs > 0.5).flatten(2).any(-1)
        if probs.shape[1] == 1:
            passed = scores > threshold
            kept_probs = probs * passed[..., None, None]
            kept = passed
        else:  # the authors' slice NMS works on [P, D, H, W] and [P, D]
            kept_probs, keep = self.network.nms(probs.transpose(0, 1), scores.transpose(0, 1), threshold)
            kept_probs, kept = kept_probs.transpose(0, 1), keep.transpose(0, 1).bool()
            passed = scores >= threshold  # the NMS stops at the first score below the threshold
        flags = {"passed": passed.cpu().numpy(), "kept": kept.cpu().numpy(), "drawn": drawn.cpu().numpy()}
        return kept_probs, scores.double().cpu().numpy(), flags

    @staticmethod
    def _absences(texts, exist, flags, threshold: float, n: int) -> dict:
        absent = {}
        for j, prompt in enumerate(texts):
            best = float(exist[:, j].max()) if n else 0.0
            if not flags["passed"][:, j].any():
                absent[prompt] = Absence(f"BiomedParse v2's existence head gave it at most {best:.3g} on all {n} "
                                         f"slice(s), not above the threshold {threshold:g}", "existence", best,
                                         threshold)
            elif not flags["kept"][:, j].any() and (flags["passed"][:, j] & flags["drawn"][:, j]).any():
                dropped = int((flags["passed"][:, j] & flags["drawn"][:, j]).sum())
                absent[prompt] = Absence(f"present by its existence head on {dropped} slice(s), but the authors' "
                                         "slice NMS dropped it there: its mask overlapped a higher-scoring target's "
                                         f"by IoU > {NMS_IOU:g}", "model", best, threshold)
        return absent

    @staticmethod
    def _slice_axis_note(volume: Volume, orient, plane: str) -> dict:
        """Where the per-slice existence lists sit: array index along the slice axis of the region segmented."""
        box = volume.meta.get("cropped_from")
        first = int(box[orient.slice_axis][0]) if box else 0
        return {"plane": plane, "axis": "kji"[orient.slice_axis], "first_index": first,
                "order": "array index along the axis, from first_index"}

    def _store(self, volume: Volume, settings: Settings, n: int, batch: int):
        """This volume's cache entry ({"chunks": {start: features}, "geometry", "where"}) or None, and a note."""
        if not settings.cache:
            self.cache.clear()
            return None, "off (option)"
        where, note = cache_placement(self.device, n, held=self.cache_bytes())
        if where is None:
            self.cache.clear()
            return None, note
        key = FeatureCache.key(volume, {**settings.context(), "plane": settings.plane, "batch": batch})
        store = self.cache.get(key)
        hit = bool(store.get("chunks"))
        store.setdefault("chunks", {})
        store["where"] = where
        if hit:
            self.cache.hits += 1
        else:
            self.cache.misses += 1
        return store, ("reused: " if hit else "") + note

    def cache_bytes(self) -> int:
        """Bytes the feature cache holds (v1's per-slice estimate times the slices kept)."""
        from biomedseg.models.biomedparse.sizing import feature_bytes

        slices = sum(len(f) for entry in self.cache.entries.values() for f in entry.get("chunks", {}).values())
        return slices * feature_bytes(MODEL_SIZE, 4)


def intensity_bounds_of(grey: np.ndarray, window: tuple | None, modality: str) -> tuple | None:
    """The intensities that become 0 and 255: the clipped volume's own minimum and maximum (the challenge's
    min-max after clipping), for a CT window or v1's percentiles of the positive voxels; None when the
    voxels are integers already in 0..255 (used as they are, as the v2 README says)."""
    low, high = (float(grey.min()), float(grey.max())) if grey.size else (0.0, 0.0)
    if window is None:
        if np.issubdtype(grey.dtype, np.integer) and low >= 0 and high <= 255:
            return None
        window = tuple(float(v) for v in intensity_bounds(np.asarray(grey), is_ct=False))
    return max(window[0], low), min(window[1], high)


def to_uint8(display: np.ndarray, bounds: tuple | None, chunk: int = 16) -> np.ndarray:
    """(n, rows, cols) intensities -> uint8: clip to ``bounds``, min-max to 0..255 in float64, truncate
    (``astype``), a few slices at a time so no float64 copy of the volume is made."""
    if bounds is None:
        return np.ascontiguousarray(display, dtype=np.uint8)
    lo, hi = bounds
    out = np.zeros(display.shape, np.uint8)
    if hi <= lo:
        return out  # a constant image: the reference would divide by zero; blank is the sane answer
    for i in range(0, display.shape[0], chunk):
        part = np.clip(np.asarray(display[i:i + chunk], np.float64), lo, hi)
        out[i:i + chunk] = ((part - lo) / (hi - lo) * 255.0).astype(np.uint8)
    return out


def cache_placement(device: str, n_slices: int, held: int = 0):
    """Where the features of ``n_slices`` slices go: ("device" | "cpu" | None, note). v1's sizes and shares
    (``sizing.feature_bytes`` at 512, ``CACHE_SHARE`` of the free memory); what the cache holds now counts
    as free, since the new volume replaces it. Float32 only: the decoder takes the features as encoded."""
    import psutil

    from biomedseg.models.biomedparse.sizing import CACHE_SHARE, feature_bytes

    need = n_slices * feature_bytes(MODEL_SIZE, 4)
    if device_kind(device) == "cuda":
        import torch

        free = (torch.cuda.mem_get_info(torch.device(device))[0] + held) * CACHE_SHARE
        if need <= free:
            return "device", f"on the GPU ({need / 1e9:.2f} GB)"
        held = 0
    ram = (psutil.virtual_memory().available + held) * CACHE_SHARE
    if need <= ram:
        return "cpu", f"in RAM ({need / 1e9:.2f} GB)"
    return None, f"off: {n_slices} slices need {need / 1e9:.1f} GB (more than {ram / 1e9:.1f} GB)"
