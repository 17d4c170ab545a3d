"""The engine's backend for BiomedParse v1: text-prompted segmentation of volumes, slice by slice.

The backend keeps the model contract (``plan``, ``load``, ``run``) and is a ``SliceModel`` for the
slice-wise strategy (``encode`` / ``decode``):

* ``encode`` runs once per slice, whatever the prompts: the authors' preprocessing of the
  batch (``preprocess.prepare_exact`` or ``prepare_torch``), then the FocalNet backbone and the
  pixel decoder (``inference.encode_images``). It returns the decoder's inputs (mask features and
  the three multi-scale maps) plus the 8-bit model image (for the p-value test).
* ``decode`` runs the mask decoder for the prompts on those features: each prompt on its
  own (default; a prompt's mask does not depend on the others) or all prompts in one
  grounding sequence (``joint``, the authors' ``interactive_infer_image``), through
  ``inference.decode`` -- the code the parity tests check. Text embeddings are cached per
  prompt string (``inference.TextCache``). Probabilities come back on each slice's own grid
  (padding removed, ``preprocess.restore_geometry``).
* A ``FeatureCache`` on the backend keeps the per-slice features of the last volume (on the
  GPU when they fit, else in CPU memory in half precision; none when the volume is too big),
  so asking a new prompt on the same volume runs only the decoder.

Options (declared in model.json; the engine refuses others and fills the defaults):
  modality    CT, MRI, MRI-FLAIR, MRI-T1-Gd, MRI-T2, MRI-ADC, X-Ray, Ultrasound, Pathology,
              Endoscope, Fundus, Dermoscopy, OCT, or a DICOM code (CT, MR, US, CR, DX, ...).
              Default: ``imaging_guess.guess_modality`` on the whole image -- its DICOM modality
              (``volume.meta['modality']``, MR refined by the series description; PT, NM, MG ...
              are refused, codes that name no imaging modality such as OT fall through), else a
              guess from the voxels: colour -> Pathology, Hounsfield-like values (minimum below
              -500) -> CT, one grey slice -> X-Ray, otherwise MRI. Only CT uses a window; everything
              else uses percentiles.
  site        body site. For CT it selects the authors' window (abdomen, lung/chest, pelvis,
              liver, colon, pancreas); default from the DICOM body part / series description,
              else ``abdomen`` ([-150, 250] HU). For other modalities it only picks the p-value
              reference distributions and the recognition candidates.
  batch_size  slices per forward pass (default from free memory, see ``sizing.auto_batch_size``).
  joint       True: the authors' joint decoding of all prompts (masks depend on the list).
  image_size  model input edge, multiple of 32 (default 1024, as trained; smaller is faster
              but off the training distribution, for tests and CPU benches).
  exact_preprocessing
              True (default on CPU): the authors' CPU path -- scipy spline resize per slice and
              the reference tensor layouts, bit-identical to their outputs on CPU. False
              (default on GPU): batched torch bicubic resize on the device and contiguous
              layouts with frozen weights (a few grey levels apart, much faster).
  amp         False turns CUDA autocast (bfloat16, else float16) off.
  p_value     threshold of the authors' plausibility test (default 0.05; 0 turns it off).
  p_value_scope
              "slice" (default) or "volume", see ``recognition``.
  recognize   True: recognition mode, see ``recognition``.
  cache       False: do not keep features for re-prompting.
  target_dist path of ``target_dist.json`` (default: beside the weights, then the hub).
The slice plane is the engine's (``plane``); a slice range or ROI arrives as the cropped volume.

p-values and recognition: the authors' test is applied per slice and their recognition rules
per slice, as ``recognition`` describes. Prompts without a reference distribution for the
modality/site are not checked (the report's ``p_values`` says why). The test needs
``target_dist.json`` (it comes with the weights, from the same gated hub repository); without
it the check is skipped and noted. A prompt the test rejects on every slice it was drawn on is
reported absent with that reason; in recognition mode the report lists every candidate found.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from biomedseg.errors import CancelledError, InputError, WeightsMissingError
from biomedseg.imaging_guess import guess_modality
from biomedseg.models.base import Backend, LoadContext, Plan
from biomedseg.prompts import PromptSet
from biomedseg.results import Absence, ModelOutput
from biomedseg.runtime.device import device_kind
from biomedseg.runtime.slicewise import FeatureCache, run_slicewise
from biomedseg.runtime.weights import offline_mode, resolve_weights
from biomedseg.volume import Volume

from . import targets as tg
from .preprocess import CT_WINDOWS, MODEL_SIZE, prepare_exact, prepare_torch, restore_geometry
from .recognition import SliceChecks, p_value_report, recognition_prompts
from .sizing import auto_batch_size, cache_bytes, cache_placement, feature_bytes, to_cpu_half  # noqa: F401
from .tokenizer import load_tokenizer

#: The authors' mask threshold (127.5 of 255): a target with nothing above it after the test has no mask.
MASK_THRESHOLD = 0.5

log = logging.getLogger(__name__)

DEFAULT_P_VALUE = 0.05
#: DICOM modalities BiomedParse v1 never saw (other unknown codes such as OT or SC make it look at the voxels).
UNTRAINED_DICOM_MODALITIES = {"PT", "NM", "MG", "XA", "RF", "IVUS", "ECG", "RTDOSE", "RTIMAGE", "RTSTRUCT", "SEG", "REG"}
TARGET_DIST_SPEC = {"source": "hub", "repo": "microsoft/BiomedParse", "files": ["target_dist.json"],
                    "revision": "main", "license": "CC-BY-NC-SA-4.0", "gated": True}


@dataclass
class Settings:
    """Everything one run will use, settled and checked by ``plan`` before any heavy work."""

    modality: str
    modality_source: str
    site: str | None
    site_source: str
    window: tuple | None  # CT window (HU) or None for percentile clipping
    rgb: bool
    plane: str
    joint: bool
    image_size: int
    exact: bool
    amp: bool
    p_value: float
    p_value_scope: str
    recognize: bool
    cache: bool
    target_dist_path: str | None
    requested: list = field(default_factory=list)

    def context(self) -> dict:
        """What the features depend on (also the feature cache's key, with the plane)."""
        return {"preprocess": "rgb" if self.rgb else ("ct" if self.window else "percentile"),
                "window": self.window, "image_size": self.image_size, "exact": self.exact, "amp": self.amp}


class BiomedParseBackend(Backend):
    """BiomedParse v1 under the model contract. Targets can be several pieces (tumours, lesions, cells):
    no clean-up unless asked (model.json's postprocess)."""

    model = None
    weights_path = None

    def __init__(self, device: str = "cpu"):
        super().__init__(device)
        self.cache = FeatureCache(max_volumes=1)
        self._exact: bool | None = None
        self._texts = None
        self._target_dist: dict | None = None
        self._target_dist_note = ""
        #: Decode-time settings (``configure_decoding``): joint decoding and the per-slice test.
        self._joint = False
        self._checks = SliceChecks()
        #: Slices that went through the encoder, over the backend's life (tests and logs).
        self.encoded_slices = 0
        #: What the last ``run`` used and found (modality, site, p-values, cache, recognised targets).
        self.last_run: dict = {}

    def load(self, context: LoadContext) -> None:
        from .checkpoint import build_biomedparse_v1, load_state_dict_from_checkpoint
        from .inference import TextCache

        self.weights_path = Path(context.weights[0])
        state = load_state_dict_from_checkpoint(self.weights_path)
        self.model = build_biomedparse_v1(state_dict=state, device=self.device)
        del state
        folders = [self.weights_path.parent]
        if os.environ.get("BIOMEDSEG_WEIGHTS_DIR"):
            folders.append(Path(os.environ["BIOMEDSEG_WEIGHTS_DIR"]))
        self.tokenizer = load_tokenizer(folders)
        self._texts = TextCache(self.model, self.tokenizer, self.device)

    def release(self) -> None:
        self.cache.clear()

    def modules(self) -> list:
        return [self.model] if self.model is not None else []

    # ---- planning ---------------------------------------------------------------------------
    def plan(self, volume: Volume, prompts: PromptSet, options: dict, *, plane: str = "axial") -> Plan:
        """Settle modality, site and sizes from the (type-checked) options; InputError, no heavy work."""
        modality, modality_source = self._modality(volume, options)
        site, site_source = self._site(volume, options, modality)
        window = tuple(float(v) for v in CT_WINDOWS[site]) if modality == "CT" else None
        size = options.get("image_size") or MODEL_SIZE
        if size % 32 or not 64 <= size <= 2048:
            raise InputError(f"image_size {size!r} must be a multiple of 32 between 64 and 2048 (trained at 1024).")
        exact = options.get("exact_preprocessing")
        if exact is None:
            exact = device_kind(self.device) == "cpu"
        p_value = options.get("p_value")
        p_value = DEFAULT_P_VALUE if p_value is None else float(p_value)
        if not 0 <= p_value < 1:
            raise InputError(f"p_value must be a threshold in [0, 1) (0 turns the test off), got {p_value!r}.")
        recognize, joint = bool(options.get("recognize")), bool(options.get("joint"))
        if recognize and joint:
            raise InputError("Recognition decodes every candidate on its own, as the authors' recognition does; "
                             "it cannot be combined with joint=True.")
        target_dist = options.get("target_dist")
        if target_dist is not None and not Path(target_dist).is_file():
            raise InputError(f"target_dist file '{target_dist}' does not exist.")
        amp = options.get("amp") is not False and device_kind(self.device) == "cuda"
        settings = Settings(modality=modality, modality_source=modality_source, site=site, site_source=site_source,
                            window=window, rgb=bool(volume.channels_last and volume.n_channels >= 3),
                            plane=plane, joint=joint, image_size=int(size), exact=bool(exact), amp=amp,
                            p_value=p_value, p_value_scope=options.get("p_value_scope") or "slice",
                            recognize=recognize, cache=options.get("cache") is not False,
                            target_dist_path=target_dist, requested=list(prompts.texts))
        batch = options.get("batch_size") or auto_batch_size(self.device, settings.image_size, amp)
        report = {"modality": modality, "modality_source": modality_source, "site": site,
                  "site_source": site_source, "window": window, "plane": plane, "image_size": settings.image_size,
                  "exact_preprocessing": settings.exact, "amp": amp}
        return Plan(batch_size=batch, units=f"slice(s) of {size}x{size}", details=settings, report=report)

    @staticmethod
    def _modality(volume: Volume, options: dict) -> tuple[str, str]:
        value = options.get("modality")
        if value not in (None, ""):
            return tg.resolve_modality(value), "option"
        tag = volume.meta.get("modality")
        if isinstance(tag, str) and tag.strip().upper() in UNTRAINED_DICOM_MODALITIES:
            raise InputError(f"BiomedParse v1 was not trained on '{tag}' images (the image's DICOM modality).",
                             hint="Choose another model, or state the modality if the tag is wrong.")
        name, why = guess_modality(volume)
        return tg.resolve_modality(name), why

    @staticmethod
    def _site(volume: Volume, options: dict, modality: str) -> tuple[str | None, str]:
        value = options.get("site")
        if value not in (None, ""):
            site = tg.resolve_site(modality, value)
            if site is None and modality == "CT":
                raise InputError(f"BiomedParse v1 has no CT window for site '{value}'.",
                                 hint="Use one of " + ", ".join(tg.site_choices("CT")) + " (chest = lung).")
            return site, "option"
        for key in ("body_part", "series_description"):
            text = volume.meta.get(key)
            if isinstance(text, str) and text.strip():
                for word in text.replace("^", " ").replace("_", " ").split():
                    site = tg.resolve_site(modality, word)
                    if site is not None:
                        return site, f"DICOM {key.replace('_', ' ')} '{text}'"
        if modality == "CT":
            return tg.DEFAULT_CT_SITE, "default"
        return None, "unknown"

    # ---- model state ------------------------------------------------------------------------
    def _use_layout(self, exact: bool) -> None:
        """Exact: the reference layouts with parameters requiring grad (bit-identical on CPU, run under
        no_grad); fast: frozen parameters and contiguous layouts."""
        if self._exact is exact:
            return
        self.model.set_exact_layout(exact).requires_grad_(exact)
        self._exact = exact

    def target_dist(self, path: str | None = None) -> dict | None:
        """The authors' reference distributions: ``path``, else beside the weights, else $BIOMEDSEG_WEIGHTS_DIR,
        the hub cache or the hub (same gated repository as the weights). None (and a note) when unavailable."""
        from .pvalue import load_target_dist

        if path is not None:
            return load_target_dist(path)
        if self._target_dist is not None:
            return self._target_dist
        beside = self.weights_path.parent / "target_dist.json"
        try:
            found = beside if beside.is_file() else resolve_weights(TARGET_DIST_SPEC, offline=offline_mode())[0]
            self._target_dist = load_target_dist(found)
        except (WeightsMissingError, OSError, ValueError) as exc:
            self._target_dist_note = f"target_dist.json unavailable ({exc})"
            log.warning("BiomedParse: p-value test off: %s", self._target_dist_note)
            return None
        return self._target_dist

    # ---- SliceModel: encode / decode ---------------------------------------------------------
    def encode(self, slices: np.ndarray, context: dict) -> dict:
        """(B, rows, cols[, C]) raw intensities in display orientation -> decoder features with leading B:
        ``mask_features``, ``ms0``..``ms2`` (multi-scale maps), ``image`` (uint8 [B, 3, S, S] model image)
        and ``slice_shape`` ([B, 2])."""
        from .inference import encode_images

        import torch
        size = int(context.get("image_size", MODEL_SIZE))
        exact = bool(context.get("exact", device_kind(self.device) == "cpu"))
        self._use_layout(exact)
        slices = np.asarray(slices)
        rows, cols = slices.shape[1:3]
        window, rgb = context.get("window"), context.get("preprocess") == "rgb"
        with torch.no_grad():
            if exact:
                images = np.stack([prepare_exact(s, size, window=window, rgb=rgb) for s in slices])
                images = torch.from_numpy(images).permute(0, 3, 1, 2).to(self.device)
            else:
                images = prepare_torch(slices, size, window=window, rgb=rgb, device=self.device)
            feats = encode_images(self.model, images, amp=bool(context.get("amp")))
        self.encoded_slices += len(slices)
        ms = feats["multi_scale_features"]
        return {"mask_features": feats["mask_features"], "ms0": ms[0], "ms1": ms[1], "ms2": ms[2],
                "image": images.contiguous(),
                "slice_shape": torch.tensor([[rows, cols]] * len(slices), dtype=torch.int64)}

    def decode(self, features: dict, prompts: list[str], context: dict):
        """Features of B slices -> probabilities (B, P, rows, cols) float32 on each slice's own grid.

        Decoding settings (joint, p-value test, recognition) are backend state set by ``predict``
        (``configure_decoding`` for direct use), not context, so changing them keeps cached features valid.
        Every map is brought back to the slice grid as its own plane."""
        from .inference import decode as decode_batch

        import torch
        size = int(context.get("image_size", MODEL_SIZE))
        feats = {k: v.to(self.device, non_blocking=True) for k, v in features.items()}
        self._use_layout(bool(context.get("exact", device_kind(self.device) == "cpu")))
        with torch.no_grad():
            texts = self._texts.groups(prompts, joint=self._joint, variant=self._exact)
            inputs = {"mask_features": feats["mask_features"],
                      "multi_scale_features": [feats["ms0"], feats["ms1"], feats["ms2"]]}
            probs = decode_batch(self.model, inputs, texts, (size, size), joint=self._joint,
                                 amp=bool(context.get("amp"))).probs  # [B, P, S, S]
            probs = self._checks.apply(probs, feats["image"], prompts)
            b, p = probs.shape[:2]
            rows, cols = (int(v) for v in features["slice_shape"][0])
            planes = probs.reshape(b * p, 1, size, size)
            out = torch.cat([restore_geometry(plane, (rows, cols)) for plane in planes])
        return out.reshape(b, p, rows, cols)

    def configure_decoding(self, joint: bool = False, p_value: float = 0.0, p_value_scope: str = "slice",
                           recognize: bool = False, checks: dict | None = None, params: dict | None = None) -> None:
        """Decode-time settings for the following ``decode`` calls (``predict`` sets them; counts start afresh)."""
        self._joint = joint
        self._checks = SliceChecks(p_value=p_value, scope=p_value_scope, recognize=recognize,
                                   checks=dict(checks or {}), params=dict(params or {}))

    # ---- the run ----------------------------------------------------------------------------
    def context_for(self, volume: Volume, options: dict | None = None, plane: str = "axial") -> dict:
        """The ``context`` for ``run_slicewise(volume, backend, ...)`` used directly (no run)."""
        return self.plan(volume, PromptSet(texts=["x"], targets=["x"]), dict(options or {}),
                         plane=plane).details.context()

    def run(self, volume: Volume, prompts: PromptSet, plan: Plan, *, progress, cancelled) -> ModelOutput:
        settings: Settings = plan.details
        if cancelled():
            raise CancelledError("Segmentation was cancelled; nothing was written.")
        progress("BiomedParse: preparing", 0, 1)
        dist = None
        if settings.p_value > 0 or settings.recognize:
            dist = self.target_dist(settings.target_dist_path)
            if dist is None and settings.recognize:
                raise WeightsMissingError("Recognition needs the authors' target_dist.json, which was not found: "
                                          f"{self._target_dist_note}.",
                                          hint="Put target_dist.json from microsoft/BiomedParse beside the weights "
                                               "file, or pass it with --option target_dist=PATH.")
        decoded = list(prompts.texts)
        if settings.recognize:
            decoded = recognition_prompts(decoded, settings.modality, settings.site, dist)
        checks = {p: tg.find_check(p, settings.modality, settings.site, dist) for p in decoded} if dist else {}
        params = {p: dist[c.modality_type][c.target] for p, c in checks.items() if c.modality_type}
        self._use_layout(settings.exact)
        # counts start afresh on every call, so a retry after running out of memory counts once
        self.configure_decoding(joint=settings.joint, p_value=settings.p_value if dist else 0.0,
                                p_value_scope=settings.p_value_scope, recognize=settings.recognize, checks=checks,
                                params=params)
        n_slices = volume.shape[volume.slice_orientation(settings.plane).slice_axis]
        cache, cache_note = self._cache_for(settings, n_slices)
        encoded_before = self.encoded_slices
        probs = run_slicewise(volume, self, decoded, context=settings.context(), plane=settings.plane,
                              batch_size=plan.batch_size, progress=progress, cancelled=cancelled, cache=cache)
        records = self._checks.records
        absent = {}
        for prompt in self._checks.absent_in_volume():
            probs[prompt][...] = 0
        for prompt, record in records.items():
            if prompt not in prompts.texts or not record["checked"]:
                continue
            best = record.get("best_p")
            figure = f"best p-value {best:.3g} against the cut-off {settings.p_value:g}" if best is not None else \
                f"p < {settings.p_value:g}"
            if not record["passed"]:
                absent[prompt] = Absence(f"the authors' plausibility test rejected it on all {record['checked']} "
                                         f"slice(s) where the model drew it ({figure})", "plausibility", best,
                                         settings.p_value)
            elif record["rejected"] and float(probs[prompt].max()) <= MASK_THRESHOLD:
                rejected = record.get("best_rejected_p")  # the rejected slice closest to passing
                absent[prompt] = Absence(f"the authors' plausibility test rejected it on {record['rejected']} of "
                                         f"{record['checked']} slice(s) (the closest had p = {rejected:.3g} against the "
                                         f"cut-off {settings.p_value:g}) and the rest held nothing above "
                                         f"{MASK_THRESHOLD:g}; --option p_value=0 turns the test off", "plausibility",
                                         rejected, settings.p_value)
        report = {"batch_size": plan.batch_size, "joint": settings.joint, "cache": cache_note, "slices": n_slices,
                  "encoded_slices": self.encoded_slices - encoded_before,
                  "p_values": p_value_report(decoded, settings.p_value, settings.recognize, dist, checks, records,
                                             self._target_dist_note)}
        if settings.recognize:
            report["recognized"] = [p for p in decoded if probs[p].max() > 0.5]
        self.last_run = {**plan.report, **report}
        if device_kind(self.device) == "cuda":
            import torch

            torch.cuda.empty_cache()
        progress("BiomedParse: done", 1, 1)
        return ModelOutput({p: np.ascontiguousarray(probs[p], dtype=np.float32) for p in prompts.texts},
                           absent=absent, report=report)

    def _cache_for(self, settings: Settings, n_slices: int):
        """The feature cache for this run (``sizing.cache_placement``), or None when the features would not fit."""
        if not settings.cache:
            self.cache.clear()
            return None, "off (option)"
        where, note = cache_placement(self.device, n_slices, settings.image_size, settings.amp,
                                      cache_bytes(self.cache))
        if where is None:
            self.cache.clear()
            return None, note
        self.cache.offload = to_cpu_half if where == "float16" else None
        return self.cache, note
