"""The engine's backend for BiomedParse v1: text-prompted segmentation of volumes, slice by slice.

The backend is both a runner backend (``predict``) and a ``SliceModel`` for the slice-wise
engine (``encode`` / ``decode``):

* ``encode`` runs once per slice, whatever the prompts: the authors' preprocessing of the
  batch (CT window or 0.5-99.5 percentile clip, min-max to 0..255, zero padding to a square,
  resize, three identical channels, truncation to 8 bits, ImageNet normalisation), then the
  FocalNet backbone and the pixel decoder. It returns the decoder's inputs (mask features and
  the three multi-scale maps) plus the 8-bit model image (for the p-value test).
* ``decode`` runs the mask decoder for the prompts on those features: each prompt on its
  own (default; a prompt's mask does not depend on the others) or all prompts in one
  grounding sequence (``joint``, the authors' ``interactive_infer_image``). Text embeddings
  are cached per prompt string. Probabilities come back on each slice's own grid (padding
  removed, ``preprocess.restore_geometry``).
* A ``FeatureCache`` on the backend keeps the per-slice features of the last volume (on the
  GPU when they fit, else in CPU memory in half precision; none when the volume is too big),
  so asking a new prompt on the same volume runs only the decoder.

Options of ``predict`` (all optional):
  modality    CT, MRI, MRI-FLAIR, MRI-T1-Gd, MRI-T2, MRI-ADC, X-Ray, Ultrasound, Pathology,
              Endoscope, Fundus, Dermoscopy, OCT, or a DICOM code (CT, MR, US, CR, DX, ...).
              Default: ``imaging_guess.guess_modality`` -- the image's DICOM modality
              (``volume.meta['modality']``, MR refined by the series description; PT, NM, MG ...
              are refused, codes that name no imaging modality such as OT fall through), else a
              guess from the voxels: colour -> Pathology, Hounsfield-like values (minimum below
              -500) -> CT, one grey slice -> X-Ray, otherwise MRI. Only CT uses a window; everything else uses percentiles.
  site        body site. For CT it selects the authors' window (abdomen, lung/chest, pelvis,
              liver, colon, pancreas); default from the DICOM body part / series description,
              else ``abdomen`` ([-150, 250] HU). For other modalities it only picks the p-value
              reference distributions and the recognition candidates.
  plane       axial (default), coronal or sagittal, chosen from the patient axes.
  slice_range (first, last) inclusive array indices along the slicing axis.
  roi         RAS box: {"min": [x, y, z], "max": [x, y, z]} or [[x, y, z], [x, y, z]].
  batch_size  slices per forward pass (default from free memory, see ``auto_batch_size``).
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
              "slice" (default) or "volume", see below.
  recognize   True: recognition mode, see below.
  cache       False: do not keep features for re-prompting.
  target_dist path of ``target_dist.json`` (default: beside the weights, then the hub).

p-values on volumes. The authors fitted their reference distributions to single 2D images
(each statistic is the mean over one image's mask), and v1 was trained on slices that
contain the target, so it draws something for any prompt. The test is therefore applied
where it was defined: per slice, on the model-grid image and probabilities, for every slice
whose map has a pixel >= 128/255. With scope "slice" a slice whose adjusted p-value is below
the threshold has that prompt's map set to zero; a prompt left with no voxel above the
threshold is reported absent by the runner instead of being written as noise. With scope
"volume" no slice is changed, and a prompt is zeroed (absent) only when no checked slice
passes. Prompts without a reference distribution for the modality/site are not checked
(``last_run['p_values']`` says why). The test needs ``target_dist.json`` (it comes with the
weights, from the same gated hub repository); without it the check is skipped and noted.

Recognition (``recognize=True``) follows the authors' ``interactive_infer_image_all``: every
candidate target (``targets.recognition_targets``: the catalogue's targets for the modality
and site that have a reference distribution; requested prompts must be among them) is
decoded on its own; per slice, candidates whose p-value is below the threshold are
rejected; the rest, best p-value first, are kept unless their mask (> 0.5) is empty or more
than half of it lies inside an already kept mask; then every pixel above 0.1 goes to the
kept candidate with the highest probability there, candidates that win less than half of
their own > 0.1 area are dropped (except the one with the highest mean probability), and
each pixel above 0.5 is assigned to the most probable remaining candidate. A target keeps
its probabilities on the pixels assigned to it and gets zero elsewhere. ``predict`` returns
every candidate (the runner reports the requested ones; ``last_run['recognized']`` lists all
found).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...catalog import get_model
from ...errors import CancelledError, InputError, OutOfMemoryError, WeightsMissingError
from ...imaging_guess import guess_modality
from ...inference.device import device_kind, free_memory_bytes, is_out_of_memory, release_memory
from ...inference.slicewise import FeatureCache, crop_for_roi, run_slicewise
from ...volume import SLICE_PLANES, Volume
from ...weights import offline_mode, resolve_weights
from . import targets as tg

log = logging.getLogger(__name__)

OPTIONS = ("modality", "site", "plane", "slice_range", "roi", "batch_size", "joint", "image_size",
           "exact_preprocessing", "amp", "p_value", "p_value_scope", "recognize", "cache", "target_dist")
DEFAULT_P_VALUE = 0.05
MODEL_SIZE = 1024
#: DICOM modalities BiomedParse v1 never saw (other unknown codes such as OT or SC make it look at the voxels).
UNTRAINED_DICOM_MODALITIES = {"PT", "NM", "MG", "XA", "RF", "IVUS", "ECG", "RTDOSE", "RTIMAGE", "RTSTRUCT", "SEG", "REG"}
#: Feature floats the decoder needs per model-input pixel: mask features (512 at 1/4) and the
#: three multi-scale maps (512 at 1/8, 1/16, 1/32).
FEATURE_FLOATS_PER_PIXEL = 512 * (1 / 16 + 1 / 64 + 1 / 256 + 1 / 1024)
#: Peak working memory of one slice through backbone and pixel decoder at 1024x1024, scaled with
#: the pixel count for other sizes. CPU float32: measured on the dev VM (0.95 GB above the loaded
#: model for one 1024^2 slice, 0.35 GB at 512^2), with a margin; CUDA: estimates from those
#: (half-precision activations under autocast), not measured on a GPU yet.
SLICE_BYTES_1024 = {"cpu": 1.2e9, "cuda_amp": 0.8e9, "cuda": 1.2e9, "mps": 1.2e9}
#: Most slices per pass. CPU: 1 -- two slices per pass took exactly twice as long as one on the
#: dev VM, so batching only adds memory there; a GPU wants full batches.
MAX_BATCH = {"cpu": 1, "mps": 4, "cuda": 16}
#: Shares of the free memory for activations and for the feature cache.
MEMORY_SHARE = 0.5
CACHE_SHARE = 0.4

TOKENIZER_SPEC = {"source": "hub", "repo": "openai/clip-vit-base-patch32", "files": ["vocab.json", "merges.txt"],
                  "revision": "main", "license": "MIT", "gated": False}
TARGET_DIST_SPEC = {"source": "hub", "repo": "microsoft/BiomedParse", "files": ["target_dist.json"],
                    "revision": "main", "license": "CC-BY-NC-SA-4.0", "gated": True}


def auto_batch_size(device: str, image_size: int = MODEL_SIZE, amp: bool = True, free_bytes: int | None = None) -> int:
    """Slices per pass that fit in ``MEMORY_SHARE`` of the free memory (at least 1, at most ``MAX_BATCH``)."""
    kind = device_kind(device)
    if free_bytes is None:
        free_bytes = free_memory_bytes(device)
    key = "cuda_amp" if kind == "cuda" and amp else kind
    per_slice = SLICE_BYTES_1024[key] * (image_size / MODEL_SIZE) ** 2
    return max(1, min(MAX_BATCH[kind], int(free_bytes * MEMORY_SHARE // per_slice)))


def feature_bytes(image_size: int, bytes_per_float: int) -> int:
    """Cached bytes per slice: decoder features plus the 8-bit RGB model image."""
    return int(FEATURE_FLOATS_PER_PIXEL * image_size ** 2 * bytes_per_float + 3 * image_size ** 2)


def load_tokenizer(folders=(), offline: bool | None = None):
    """CLIP tokenizer: vocab.json + merges.txt in ``folders`` (e.g. beside the weights), else the
    merges file of the open_clip wheel (or $BIOMEDSEG_CLIP_BPE), else ``openai/clip-vit-base-patch32``
    from $BIOMEDSEG_WEIGHTS_DIR, the hub cache or the hub."""
    from .tokenizer import ClipTokenizer, find_bpe_vocab

    for folder in folders:
        vocab, merges = Path(folder) / "vocab.json", Path(folder) / "merges.txt"
        if vocab.is_file() and merges.is_file():
            return ClipTokenizer(vocab_json=vocab, merges_txt=merges)
    try:
        return ClipTokenizer(find_bpe_vocab())
    except FileNotFoundError:
        pass
    try:
        vocab, merges = resolve_weights(TOKENIZER_SPEC, offline=offline)
    except WeightsMissingError as exc:
        raise WeightsMissingError(
            "BiomedParse needs the CLIP tokenizer vocabulary (vocab.json and merges.txt of "
            f"openai/clip-vit-base-patch32), and none was found: {exc.message}",
            hint="Put vocab.json and merges.txt beside the weights file, install the open_clip_torch wheel "
                 "(pip install open_clip_torch --no-deps), or go online once.") from None
    return ClipTokenizer(vocab_json=vocab, merges_txt=merges)


@dataclass
class Plan:
    """Everything one ``predict`` call will use, settled and checked before any heavy work."""

    modality: str
    modality_source: str
    site: str | None
    site_source: str
    window: tuple | None  # CT window (HU) or None for percentile clipping
    rgb: bool
    plane: str
    slice_range: tuple | None
    roi: tuple | None
    batch_size: int | None
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
    prompts: list = field(default_factory=list)  # what runs: the requested prompts, or the recognition candidates

    def context(self) -> dict:
        """What the features depend on (also the feature cache's key, with the plane and region)."""
        return {"preprocess": "rgb" if self.rgb else ("ct" if self.window else "percentile"),
                "window": self.window, "image_size": self.image_size, "exact": self.exact, "amp": self.amp}


@dataclass
class _DecodeState:
    joint: bool = False
    p_value: float = 0.0
    p_value_scope: str = "slice"
    recognize: bool = False
    checks: dict = field(default_factory=dict)  # prompt -> targets.Check
    params: dict = field(default_factory=dict)  # prompt -> [[a, b] x 4]
    records: dict = field(default_factory=dict)  # prompt -> {"checked", "rejected", "passed"}


class BiomedParseBackend:
    model_id = "biomedparse-v1"
    #: BiomedParse targets can be several pieces (tumours, lesions, cells): no clean-up unless asked.
    default_postprocess = {"keep_largest": False, "fill_holes": False}

    def __init__(self, device: str = "cpu", weights: str | None = None):
        import torch

        from .checkpoint import load_state_dict_from_checkpoint
        from .model import build_biomedparse_v1

        spec = get_model(self.model_id).weights
        paths = resolve_weights(spec, local_path=weights)  # gated/offline/missing: WeightsMissingError
        self.device = device
        self.weights_path = Path(paths[0])
        self._torch = torch
        state = load_state_dict_from_checkpoint(self.weights_path)
        self.model = build_biomedparse_v1(state_dict=state, device=device)
        del state
        folders = [self.weights_path.parent]
        if os.environ.get("BIOMEDSEG_WEIGHTS_DIR"):
            folders.append(Path(os.environ["BIOMEDSEG_WEIGHTS_DIR"]))
        self.tokenizer = load_tokenizer(folders)
        self.cache = FeatureCache(max_volumes=1)
        self._exact: bool | None = None
        self._text: dict = {}
        self._joint_text: dict = {}
        self._target_dist: dict | None = None
        self._target_dist_note = ""
        self._decode = _DecodeState()
        #: Slices that went through the encoder, over the backend's life (tests and logs).
        self.encoded_slices = 0
        #: What the last ``predict`` used and found (modality, site, p-values, cache, recognised targets).
        self.last_run: dict = {}

    # ---- planning ---------------------------------------------------------------------------
    def plan(self, volume: Volume, prompts: list[str], options: dict | None = None) -> Plan:
        """Check options and settle modality, site and sizes; raises InputError, does no heavy work."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise InputError(f"Unknown BiomedParse option(s): {', '.join(unknown)}.",
                             hint=f"Known options: {', '.join(OPTIONS)}.")
        modality, modality_source = self._modality(volume, options)
        site, site_source = self._site(volume, options, modality)
        window = None
        if modality == "CT":
            from .preprocess import CT_WINDOWS

            window = tuple(float(v) for v in CT_WINDOWS[site])
        plane = str(options.get("plane", "axial")).lower()
        if plane not in SLICE_PLANES:
            raise InputError(f"Unknown slice plane '{options.get('plane')}'; use axial, coronal or sagittal.")
        slice_range = options.get("slice_range")
        if slice_range is not None:
            if (not isinstance(slice_range, (list, tuple)) or len(slice_range) != 2
                    or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in slice_range)):
                raise InputError(f"slice_range must be two whole numbers (first, last), got {slice_range!r}.")
            slice_range = (int(slice_range[0]), int(slice_range[1]))
        roi = self._roi(options.get("roi"))
        batch = options.get("batch_size")
        if batch is not None and (isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1):
            raise InputError(f"BiomedParse option 'batch_size' must be a whole number of slices >= 1, got {batch!r}.")
        size = options.get("image_size", MODEL_SIZE)
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size % 32 or not 64 <= size <= 2048:
            raise InputError(f"image_size {size!r} must be a multiple of 32 between 64 and 2048 (trained at 1024).")
        flags = {}
        for name in ("joint", "exact_preprocessing", "amp", "recognize", "cache"):
            value = options.get(name)
            if value is not None and not isinstance(value, bool):
                raise InputError(f"BiomedParse option '{name}' must be true or false, got {value!r}.")
            flags[name] = value
        exact = flags["exact_preprocessing"]
        if exact is None:
            exact = device_kind(self.device) == "cpu"
        p_value = options.get("p_value", DEFAULT_P_VALUE)
        if p_value is None or p_value is False:
            p_value = 0.0
        if isinstance(p_value, bool) or not isinstance(p_value, (int, float)) or not 0 <= p_value < 1:
            raise InputError(f"p_value must be a threshold in [0, 1) (0 turns the test off), got {p_value!r}.")
        scope = options.get("p_value_scope", "slice")
        if scope not in ("slice", "volume"):
            raise InputError(f"p_value_scope must be 'slice' or 'volume', got {scope!r}.")
        recognize = bool(flags["recognize"])
        joint = bool(flags["joint"])
        if recognize and joint:
            raise InputError("Recognition decodes every candidate on its own, as the authors' recognition does; "
                             "it cannot be combined with joint=True.")
        target_dist = options.get("target_dist")
        if target_dist is not None and not Path(target_dist).is_file():
            raise InputError(f"target_dist file '{target_dist}' does not exist.")
        return Plan(modality=modality, modality_source=modality_source, site=site, site_source=site_source,
                    window=window, rgb=bool(volume.channels_last and volume.n_channels >= 3), plane=plane,
                    slice_range=slice_range, roi=roi, batch_size=None if batch is None else int(batch),
                    joint=joint, image_size=int(size), exact=bool(exact),
                    amp=flags["amp"] is not False and device_kind(self.device) == "cuda",
                    p_value=float(p_value), p_value_scope=scope, recognize=recognize,
                    cache=flags["cache"] is not False, target_dist_path=target_dist,
                    requested=list(prompts), prompts=list(prompts))

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

    @staticmethod
    def _roi(value):
        if value is None:
            return None
        try:
            if isinstance(value, dict):
                lo, hi = value.get("min", value.get("ras_min")), value.get("max", value.get("ras_max"))
            else:
                lo, hi = value
            lo, hi = np.asarray(lo, float).reshape(3), np.asarray(hi, float).reshape(3)
        except (TypeError, ValueError):
            raise InputError(f"roi must be a RAS box {{'min': [x, y, z], 'max': [x, y, z]}}, got {value!r}.") from None
        return tuple(np.minimum(lo, hi)), tuple(np.maximum(lo, hi))

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

    def _text_for(self, prompt: str):
        """(valid token embeddings [T, 512], class embedding [512]) of one prompt encoded alone (cached)."""
        key = (self._exact, prompt)
        if key not in self._text:
            torch = self._torch
            tokens = self.tokenizer([prompt])
            ids = tokens["input_ids"].to(self.device)
            with torch.no_grad():
                token_emb, class_emb = self.model.text_features(ids)
            valid = tokens["attention_mask"][0].bool().to(self.device)
            self._text[key] = (token_emb[0][valid], class_emb[0])
        return self._text[key]

    def _joint_text_for(self, prompts: list[str]):
        """(concatenated valid tokens [T, 512], class embeddings [P, 512]) of a list encoded as one batch,
        exactly as the authors' joint inference encodes it (cached per list)."""
        key = (self._exact, tuple(prompts))
        if key not in self._joint_text:
            torch = self._torch
            tokens = self.tokenizer(list(prompts))
            ids = tokens["input_ids"].to(self.device)
            with torch.no_grad():
                token_emb, class_emb = self.model.text_features(ids)
            self._joint_text[key] = (token_emb[tokens["attention_mask"].bool().to(self.device)], class_emb)
            while len(self._joint_text) > 32:
                self._joint_text.pop(next(iter(self._joint_text)))
        return self._joint_text[key]

    # ---- SliceModel: encode -----------------------------------------------------------------
    def encode(self, slices: np.ndarray, context: dict) -> dict:
        """(B, rows, cols[, C]) raw intensities in display orientation -> decoder features with leading B:
        ``mask_features``, ``ms0``..``ms2`` (multi-scale maps), ``image`` (uint8 [B, 3, S, S] model image)
        and ``slice_shape`` ([B, 2])."""
        torch = self._torch
        size = int(context.get("image_size", MODEL_SIZE))
        exact = bool(context.get("exact", device_kind(self.device) == "cpu"))
        self._use_layout(exact)
        slices = np.asarray(slices)
        rows, cols = slices.shape[1:3]
        with torch.no_grad():
            if exact:
                images = torch.from_numpy(np.stack([self._prepare_exact(s, context, size) for s in slices]))
                images = images.permute(0, 3, 1, 2).to(self.device)
            else:
                images = self._prepare_torch(slices, context, size)
            x = self.model.normalize(images.float())
            with self._autocast(context):
                feats = self.model.image_features(x)
        self.encoded_slices += len(slices)
        ms = feats["multi_scale_features"]
        return {"mask_features": feats["mask_features"], "ms0": ms[0], "ms1": ms[1], "ms2": ms[2],
                "image": images.contiguous(),
                "slice_shape": torch.tensor([[rows, cols]] * len(slices), dtype=torch.int64)}

    def _autocast(self, context: dict):
        import contextlib

        torch = self._torch
        if context.get("amp") and device_kind(self.device) == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    @staticmethod
    def _prepare_exact(image: np.ndarray, context: dict, size: int) -> np.ndarray:
        """One slice -> uint8 [S, S, 3] with the authors' numpy/scipy steps (``preprocess``)."""
        from .preprocess import pad_to_square, resize_spline, scale_to_255

        if context.get("preprocess") == "rgb":
            rgb = np.asarray(image[..., :3])
            if rgb.dtype != np.uint8:
                rgb = scale_to_255(rgb.astype(np.float64), float(rgb.min()), float(rgb.max()))
            padded = pad_to_square(rgb.astype(np.float64))
            return np.stack([resize_spline(padded[..., c], size) for c in range(3)], axis=-1).astype(np.uint8)
        image = np.asarray(image, dtype=np.float64)
        if image.ndim == 3:  # one- or two-channel images: their mean
            image = image.mean(axis=-1)
        window = context.get("window")
        if window is not None:
            lo, hi = window
        else:
            positive = image[image > 0]
            lo, hi = (np.percentile(positive, 0.5), np.percentile(positive, 99.5)) if positive.size else (0.0, 0.0)
        resized = resize_spline(pad_to_square(scale_to_255(image, lo, hi)), size)
        return np.repeat(resized[..., None], 3, axis=-1).astype(np.uint8)

    def _prepare_torch(self, slices: np.ndarray, context: dict, size: int):
        """The same steps batched on the device: uint8 [B, 3, S, S]. Bicubic instead of the spline resize."""
        import torch.nn.functional as F

        from .preprocess import square_padding

        torch = self._torch
        x = torch.as_tensor(np.ascontiguousarray(slices), device=self.device).float()
        b = x.shape[0]
        if context.get("preprocess") == "rgb":
            x = x[..., :3].permute(0, 3, 1, 2)
            if slices.dtype != np.uint8:
                lo = x.amin(dim=(1, 2, 3), keepdim=True)
                span = x.amax(dim=(1, 2, 3), keepdim=True) - lo
                x = torch.where(span > 0, (x - lo) / span.clamp_min(1e-30) * 255.0, torch.zeros_like(x))
        else:
            if x.dim() == 4:
                x = x.mean(dim=-1)
            window = context.get("window")
            if window is not None:
                lo = torch.full((b, 1, 1), float(window[0]), device=x.device)
                hi = torch.full((b, 1, 1), float(window[1]), device=x.device)
            else:
                bounds = [self._percentiles(s[s > 0]) for s in x]
                lo = torch.stack([v[0] for v in bounds]).view(b, 1, 1)
                hi = torch.stack([v[1] for v in bounds]).view(b, 1, 1)
            x = torch.maximum(torch.minimum(x, hi), lo)
            mn = x.amin(dim=(1, 2), keepdim=True)
            span = x.amax(dim=(1, 2), keepdim=True) - mn
            x = torch.where(span > 0, (x - mn) / span.clamp_min(1e-30) * 255.0, torch.zeros_like(x))[:, None]
        (top, bottom), (left, right) = square_padding(tuple(x.shape[-2:]))
        x = F.pad(x, (left, right, top, bottom))
        top_value = x.amax(dim=(1, 2, 3), keepdim=True)
        x = self._gaussian_prefilter(x, size)
        # bicubic samples at the output pixel centres, zeros outside the image (the reference's constant mode)
        centres = (torch.arange(size, device=x.device, dtype=torch.float32) + 0.5) / size * 2 - 1
        gy, gx = torch.meshgrid(centres, centres, indexing="ij")
        grid = torch.stack((gx, gy), dim=-1)[None].expand(x.shape[0], -1, -1, -1)
        y = F.grid_sample(x, grid, mode="bicubic", padding_mode="zeros", align_corners=False)
        y = torch.minimum(y.clamp_min(0.0), top_value).floor().to(torch.uint8)
        return y.expand(-1, 3, -1, -1) if y.shape[1] == 1 else y

    def _gaussian_prefilter(self, x, size: int):
        """The reference's anti-aliasing before downsampling: a Gaussian of sigma (factor - 1) / 2 per axis,
        zeros outside the image, truncated at 4 sigma (as scipy does); a no-op when upsampling."""
        import torch.nn.functional as F

        torch = self._torch
        for axis in (2, 3):
            sigma = max(0.0, (x.shape[axis] / size - 1) / 2)
            if sigma <= 0:
                continue
            radius = int(4.0 * sigma + 0.5)
            taps = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
            kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
            kernel = kernel / kernel.sum()
            kernel = kernel.view(1, 1, -1, 1) if axis == 2 else kernel.view(1, 1, 1, -1)
            c = x.shape[1]
            padding = (radius, 0) if axis == 2 else (0, radius)
            x = F.conv2d(x, kernel.expand(c, 1, -1, -1).contiguous(), padding=padding, groups=c)
        return x

    def _percentiles(self, values):
        """(0.5, 99.5) percentiles with numpy's linear interpolation; zeros for an empty set."""
        torch = self._torch
        if values.numel() == 0:
            return torch.zeros(2, device=values.device)
        v = values.flatten().sort().values
        pos = torch.tensor([0.005, 0.995], device=v.device, dtype=torch.float64) * (v.numel() - 1)
        low = pos.floor().long()
        high = torch.clamp(low + 1, max=v.numel() - 1)
        frac = (pos - low).float()
        return v[low] + (v[high] - v[low]) * frac

    # ---- SliceModel: decode -----------------------------------------------------------------
    def decode(self, features: dict, prompts: list[str], context: dict):
        """Features of B slices -> probabilities (B, P, rows, cols) float32 on each slice's own grid.

        Decoding settings (joint, p-value test, recognition) are backend state set by ``predict``
        (``configure_decoding`` for direct use), not context, so changing them keeps cached features valid."""
        import torch.nn.functional as F

        from .preprocess import restore_geometry

        torch = self._torch
        size = int(context.get("image_size", MODEL_SIZE))
        # torch's CPU bilinear kernel rounds differently for a multi-channel image than for single planes,
        # so every map is resized as its own plane (a prompt's result then never depends on the others);
        # joint mode keeps the reference's layout for the first resize (prompts as channels).
        feats = {k: v.to(self.device, non_blocking=True) for k, v in features.items()}
        if device_kind(self.device) != "cuda" or not context.get("amp"):
            for k in ("mask_features", "ms0", "ms1", "ms2"):
                feats[k] = feats[k].float()
        state = self._decode
        self._use_layout(bool(context.get("exact", device_kind(self.device) == "cpu")))
        with torch.no_grad():
            logits = self._select_logits(feats, prompts, state.joint, context)
            b, p, h, w = logits.shape
            if state.joint:
                probs = F.interpolate(logits.float(), (size, size), mode="bilinear").sigmoid()  # [B, P, S, S]
            else:
                probs = F.interpolate(logits.float().reshape(b * p, 1, h, w), (size, size), mode="bilinear")
                probs = probs.reshape(b, p, size, size).sigmoid()
            images = feats["image"]
            if state.recognize:
                probs = self._recognize(probs, images, prompts, state)
            elif state.p_value > 0 and state.checks:
                probs = self._apply_p_values(probs, images, prompts, state)
            rows, cols = (int(v) for v in features["slice_shape"][0])
            planes = probs.reshape(b * p, 1, size, size)
            out = torch.cat([restore_geometry(plane, (rows, cols)) for plane in planes])
        return out.reshape(b, p, rows, cols)

    def configure_decoding(self, joint: bool = False, p_value: float = 0.0, p_value_scope: str = "slice",
                           recognize: bool = False, checks: dict | None = None, params: dict | None = None) -> None:
        self._decode = _DecodeState(joint=joint, p_value=p_value, p_value_scope=p_value_scope, recognize=recognize,
                                    checks=dict(checks or {}), params=dict(params or {}),
                                    records={p: {"checked": 0, "rejected": 0, "passed": 0} for p in (checks or {})})

    def _select_logits(self, feats: dict, prompts: list[str], joint: bool, context: dict):
        """Mask logits [B, P, S/4, S/4] of the query best matching each prompt (per slice); the decoder runs
        under autocast when enabled, the query-prompt similarity always in float32."""
        torch = self._torch
        inputs = {"mask_features": feats["mask_features"],
                  "multi_scale_features": [feats["ms0"], feats["ms1"], feats["ms2"]]}
        b = feats["mask_features"].shape[0]
        if joint:
            tokens, class_emb = self._joint_text_for(prompts)
            groups = [(list(range(len(prompts))), tokens, class_emb)]
        else:
            groups = []
            for i, prompt in enumerate(prompts):
                tokens, class_emb = self._text_for(prompt)
                groups.append(([i], tokens, class_emb[None]))
        selected = [None] * len(prompts)
        for members, tokens, class_emb in groups:
            with self._autocast(context):
                out = self.model.decode(inputs, tokens[:, None].expand(-1, b, -1))
            masks, captions = out["pred_masks"], out["pred_captions"].float()
            per_slice = []
            for s in range(b):
                ids = self.model.similarity(captions[s], class_emb.float()).max(0)[1]
                per_slice.append(masks[s, ids])
            chosen = torch.stack(per_slice)  # [B, len(members), h, w]
            for j, p in enumerate(members):
                selected[p] = chosen[:, j]
        return torch.stack(selected, dim=1)

    # ---- the authors' p-value test and recognition rules -------------------------------------
    def _slice_p_values(self, probs, images, prompts, state) -> dict:
        """{(slice, prompt index): adjusted p-value} for the checked prompts' non-empty maps."""
        from .pvalue import p_value_of_stats

        out = {}
        mask = probs.double() * 255
        rgb = images.double()
        for i, prompt in enumerate(prompts):
            params = state.params.get(prompt)
            if params is None:
                continue
            for s in range(probs.shape[0]):
                m = mask[s, i]
                if float(m.max()) <= 127:
                    continue  # no mask on this slice: nothing to test
                sel = m >= 128
                n = sel.sum()
                if int(n) == 0:
                    continue
                stats = [float(m[sel].sum() / n / 256)] + [float(rgb[s, c][sel].sum() / n / 256) for c in range(3)]
                out[(s, i)] = p_value_of_stats(stats, params).p_value
        return out

    def _apply_p_values(self, probs, images, prompts, state):
        pvals = self._slice_p_values(probs, images, prompts, state)
        for (s, i), p in pvals.items():
            record = state.records[prompts[i]]
            record["checked"] += 1
            if p < state.p_value:
                record["rejected"] += 1
                if state.p_value_scope == "slice":
                    probs[s, i] = 0
            else:
                record["passed"] += 1
        return probs

    def _recognize(self, probs, images, prompts, state):
        """The authors' recognition rules per slice (see the module docstring); probabilities kept on the
        pixels each target wins, zero elsewhere."""
        pvals = self._slice_p_values(probs, images, prompts, state)
        out = self._torch.zeros_like(probs)
        for s in range(probs.shape[0]):
            kept = []
            for i, prompt in enumerate(prompts):
                p = pvals.get((s, i))
                if p is None:
                    continue
                record = state.records[prompt]
                record["checked"] += 1
                if state.p_value > 0 and p < state.p_value:
                    record["rejected"] += 1
                    continue
                kept.append((p, i))
            order = [i for _, i in sorted(kept, key=lambda t: -t[0])]  # stable: ties keep the candidate order
            masks = recognize_slice(probs[s], order)
            for i, mask in masks.items():
                out[s, i] = probs[s, i] * mask
                state.records[prompts[i]]["passed"] += 1
        return out

    # ---- runner backend ---------------------------------------------------------------------
    def context_for(self, volume: Volume, options: dict | None = None) -> dict:
        """The ``context`` for ``run_slicewise(volume, backend, ...)`` used directly (no predict)."""
        return self.plan(volume, ["x"], options).context()

    def predict(self, volume: Volume, prompts: list[str], *, progress, cancelled, options=None):
        torch = self._torch
        plan = self.plan(volume, prompts, options)
        if cancelled():
            raise CancelledError("Segmentation was cancelled; nothing was written.")
        progress("BiomedParse: preparing", 0, 1)
        crop = crop_for_roi(volume, *plan.roi) if plan.roi else None
        dist = None
        if plan.p_value > 0 or plan.recognize:
            dist = self.target_dist(plan.target_dist_path)
            if dist is None and plan.recognize:
                raise WeightsMissingError("Recognition needs the authors' target_dist.json, which was not found: "
                                          f"{self._target_dist_note}.",
                                          hint="Put target_dist.json from microsoft/BiomedParse beside the weights "
                                               "file, or pass it with options['target_dist'].")
        if plan.recognize:
            candidates = tg.recognition_targets(plan.modality, plan.site, dist)
            if not candidates:
                raise InputError(f"Recognition has no candidate targets for {plan.modality}"
                                 f"{' ' + plan.site if plan.site else ''}: none of the catalogue's targets there has a "
                                 "reference distribution.", hint="Segment the targets by name instead.")
            lower = {c.lower(): c for c in candidates}
            bad = [p for p in plan.requested if " ".join(p.lower().split()) not in lower]
            if bad:
                raise InputError(f"Recognition can only test targets with a reference distribution for "
                                 f"{plan.modality}{' ' + plan.site if plan.site else ''}; "
                                 f"{', '.join(map(repr, bad))} {'has' if len(bad) == 1 else 'have'} none.",
                                 hint="Candidates: " + ", ".join(candidates) + ".")
            chosen = [lower[" ".join(p.lower().split())] for p in plan.requested]
            plan.prompts = list(plan.requested) + [c for c in candidates if c not in chosen]
        checks = {p: tg.find_check(p, plan.modality, plan.site, dist) for p in plan.prompts} if dist else {}
        params = {p: dist[c.modality_type][c.target] for p, c in checks.items() if c.modality_type}
        self._use_layout(plan.exact)
        self.configure_decoding(joint=plan.joint, p_value=plan.p_value if dist else 0.0,
                                p_value_scope=plan.p_value_scope, recognize=plan.recognize, checks=checks,
                                params=params)
        context = plan.context()
        n_slices = self._slice_count(volume, plan, crop)
        cache, cache_note = self._cache_for(plan, n_slices)
        batch = plan.batch_size or auto_batch_size(self.device, plan.image_size, plan.amp)
        encoded_before = self.encoded_slices
        while True:
            try:
                probs = run_slicewise(volume, self, plan.prompts, context=context, plane=plan.plane,
                                      slice_range=plan.slice_range, crop=crop, batch_size=batch,
                                      progress=progress, cancelled=cancelled, cache=cache)
                break
            except (CancelledError, InputError):
                raise
            except Exception as exc:  # noqa: BLE001 - torch's OOM types differ by device
                if not is_out_of_memory(exc):
                    raise
                self._free_memory()
                if plan.batch_size is None and batch > 1:  # our own guess was too big: halve, keep the cache
                    batch //= 2
                    progress(f"BiomedParse: out of memory, retrying with {batch} slice(s) per pass", 0, 1)
                    continue
                raise OutOfMemoryError(f"BiomedParse ran out of memory on {self.device} with {batch} slice(s) of "
                                       f"{plan.image_size}x{plan.image_size} per pass.",
                                       hint="Use batch_size 1, a slice range or ROI, or a GPU.") from None
        records = self._decode.records
        if plan.p_value > 0 and dist and plan.p_value_scope == "volume" and not plan.recognize:
            for prompt, record in records.items():
                if record["checked"] and not record["passed"]:
                    probs[prompt][...] = 0
        self.last_run = {
            "modality": plan.modality, "modality_source": plan.modality_source, "site": plan.site,
            "site_source": plan.site_source, "window": plan.window, "plane": plan.plane,
            "image_size": plan.image_size, "exact_preprocessing": plan.exact, "amp": plan.amp,
            "batch_size": batch, "joint": plan.joint, "cache": cache_note, "slices": n_slices,
            "encoded_slices": self.encoded_slices - encoded_before,
            "p_values": self._p_value_report(plan, checks, records, dist),
        }
        if plan.recognize:
            self.last_run["recognized"] = [p for p in plan.prompts if probs[p].max() > 0.5]
        if device_kind(self.device) == "cuda":
            torch.cuda.empty_cache()
        progress("BiomedParse: done", 1, 1)
        return {p: np.ascontiguousarray(probs[p], dtype=np.float32) for p in plan.prompts}

    def _p_value_report(self, plan, checks, records, dist) -> dict:
        if plan.p_value <= 0 and not plan.recognize:
            return {p: "off" for p in plan.prompts}
        if dist is None:
            return {p: f"not checked: {self._target_dist_note}" for p in plan.prompts}
        out = {}
        for p in plan.prompts:
            check = checks.get(p)
            if check is None or check.modality_type is None:
                out[p] = f"not checked: {check.reason if check else 'no distribution'}"
            else:
                out[p] = {"modality_type": check.modality_type, "target": check.target, **records.get(p, {})}
        return out

    @staticmethod
    def _slice_count(volume: Volume, plan: Plan, crop) -> int:
        axis = volume.slice_orientation(plan.plane).slice_axis
        start, stop = 0, volume.shape[axis]
        if crop is not None:
            start, stop = crop.start[axis], crop.stop[axis]
        if plan.slice_range is not None:
            start, stop = max(start, plan.slice_range[0]), min(stop, plan.slice_range[1] + 1)
        return max(0, stop - start)

    def _cache_for(self, plan: Plan, n_slices: int):
        """The feature cache for this run, or None when the volume's features would not fit.

        CPU: float32 in RAM if ``CACHE_SHARE`` of the available memory holds them, else float16, else
        none. CUDA: on the GPU (in the autocast dtype) if they fit there, else CPU float16, else none.
        Memory the cache already holds counts as available (it is replaced by the new volume's)."""
        torch = self._torch
        if not plan.cache:
            self.cache.clear()
            return None, "off (option)"
        import psutil

        held = self._cache_bytes()
        ram = (psutil.virtual_memory().available + (held if device_kind(self.device) == "cpu" else 0)) * CACHE_SHARE
        kind = device_kind(self.device)

        def to_cpu_half(features):
            return {k: v.to("cpu", torch.float16) if v.is_floating_point() else v.to("cpu")
                    for k, v in features.items()}

        if kind == "cuda":
            free = (torch.cuda.mem_get_info(torch.device(self.device))[0] + held) * CACHE_SHARE
            need = n_slices * feature_bytes(plan.image_size, 2 if plan.amp else 4)
            if need <= free:
                self.cache.offload = None
                return self.cache, f"on the GPU ({need / 1e9:.2f} GB)"
        elif kind == "cpu":
            need = n_slices * feature_bytes(plan.image_size, 4)
            if need <= ram:
                self.cache.offload = None
                return self.cache, f"float32 in RAM ({need / 1e9:.2f} GB)"
        need = n_slices * feature_bytes(plan.image_size, 2)
        if need <= ram:
            self.cache.offload = to_cpu_half
            return self.cache, f"float16 in RAM ({need / 1e9:.2f} GB)"
        self.cache.clear()
        return None, f"off: {n_slices} slices need {need / 1e9:.1f} GB (more than {ram / 1e9:.1f} GB)"

    def _cache_bytes(self) -> int:
        return sum(v.element_size() * v.nelement() for entry in self.cache.entries.values()
                   for per_slice in entry.values() for v in per_slice.values())

    def _free_memory(self) -> None:
        release_memory(self.device)


def recognize_slice(probs, order: list[int]) -> dict:
    """The authors' overlap rules on one slice's probability maps ``probs`` [P, H, W] (torch).

    ``order``: indices of the candidates that passed the p-value test, best p-value first.
    Returns {index: bool mask} of the targets recognised on this slice.
    1. Keep a candidate unless its mask (> 0.5) is empty or more than half of it lies in the mask of
       an already kept candidate.
    2. Over the pixels where some kept candidate is above 0.1, give each pixel to the candidate with
       the highest probability (first in ``order`` on ties). Drop a candidate that wins less than half
       of its own > 0.1 area, unless it has the highest mean probability over that area.
    3. Each pixel goes to the most probable remaining candidate that is above 0.5 there.
    """
    import torch

    kept, kept_masks = [], []
    for i in order:
        region = probs[i] > 0.5
        area = int(region.sum())
        if area == 0:
            continue
        if any(int((region & other).sum()) > 0.5 * area for other in kept_masks):
            continue
        kept.append(i)
        kept_masks.append(region)
    if not kept:
        return {}
    maps = probs[kept]  # [K, H, W] in kept order
    above = maps > 0.1
    area = above.flatten(1).sum(1)
    mean = torch.where(area > 0, (maps * above).flatten(1).sum(1) / area.clamp_min(1), torch.zeros_like(maps[:, 0, 0]))
    covered = above.any(0)
    winner = torch.where(above, maps, torch.full_like(maps, -1.0)).argmax(0)
    won = torch.stack([((winner == k) & covered).sum() for k in range(len(kept))])
    best = int(mean.argmax())  # first of the most confident
    keep = [k for k in range(len(kept)) if k == best or not bool(won[k] < 0.5 * area[k])]
    candidates = maps[keep]
    eligible = candidates > 0.5
    choice = torch.where(eligible, candidates, torch.full_like(candidates, -1.0)).argmax(0)
    assigned = eligible.any(0)
    return {kept[k]: (choice == j) & assigned for j, k in enumerate(keep)}
