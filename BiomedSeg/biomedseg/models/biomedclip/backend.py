"""The engine's backend for BiomedCLIP: labels with scores, never masks.

Four tasks (option ``task``), all on the same per-slice image embeddings (kept in a
``SliceFeatureCache`` keyed by the slice's exact model input, so a check or a ranking after a
recognition costs only the text side):

* ``classify`` (default with prompts): the prompts are the labels; each goes into ``template``
  ("this is a photo of {}", the model card's) and the softmax over them is each label's
  probability, on the mean embedding of ``slices`` representative slices.
* ``recognize`` (default without prompts): the same for the classes of ``vocabulary.json``,
  one softmax per family: modality, body site and, for volumes, view (on the middle slice as
  stored, i.e. the plane the volume was acquired in).
* ``check``: each prompt against ``alternatives`` (the targets the caller's model knows for this
  modality and site); a prompt whose probability is below ``ratio`` of the best alternative's is
  reported with a warning that names the better-fitting targets. It is a warning, not a block.
* ``rank``: every slice along the plane scored against each prompt; the ``top`` slices, best first.

Grey images are windowed to 8 bits first (``runtime.windows``: soft tissue for CT, percentiles
otherwise, or the ``window`` option); colour images go in as they are. With the real weights the
accuracy of these uses was not measured here (only the plumbing, on deterministic weights).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from biomedseg.errors import InputError
from biomedseg.models.base import Backend, LoadContext, Plan
from biomedseg.prompts import PromptSet
from biomedseg.results import Label, ModelOutput
from biomedseg.runtime.callbacks import check_cancel
from biomedseg.runtime.slice_features import SliceFeatureCache
from biomedseg.runtime.windows import choose_window
from biomedseg.volume import Volume

VOCABULARY = Path(__file__).with_name("vocabulary.json")


def vocabulary() -> dict:
    return json.loads(VOCABULARY.read_text())


def representative(n_slices: int, count: int) -> list[int]:
    """``count`` slice indices spread over the middle 80% of a stack (ends are often empty)."""
    if n_slices <= count:
        return list(range(n_slices))
    lo, hi = 0.1 * (n_slices - 1), 0.9 * (n_slices - 1)
    return sorted({int(round(v)) for v in np.linspace(lo, hi, count)})


def crop_offset(volume: Volume, axis: int) -> int:
    """Where ``volume`` starts along array ``axis`` in the image it was cut from (a slice range or ROI),
    so the slices reported are the whole image's (what ``--slice-range`` counts)."""
    box = volume.meta.get("cropped_from")
    return int(box[axis][0]) if box else 0


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64) - np.max(logits)
    e = np.exp(z)
    return e / e.sum()


class BiomedCLIPBackend(Backend):
    def __init__(self, device: str = "cpu"):
        super().__init__(device)
        self.net = None
        self.vocab_path = None
        self.text_cache: dict[str, np.ndarray] = {}
        self.embeddings = SliceFeatureCache(256 * 2 ** 20)

    # ---- plan ----------------------------------------------------------------------------
    def plan(self, volume: Volume, prompts: PromptSet, options: dict, *, plane: str = "axial") -> Plan:
        task = options.get("task") or ("classify" if prompts.texts else "recognize")
        if task in ("classify", "check", "rank") and not prompts.texts:
            raise InputError(f"BiomedCLIP's {task} needs text prompts"
                             + (" (the labels)." if task == "classify" else " (the targets)."),
                             hint="Give them with --prompt, or use --option task=recognize.")
        if task == "classify" and len(prompts.texts) < 2:
            raise InputError("Classifying needs at least two labels to choose between.",
                             hint='Give two or more, e.g. --labels "CT scan" "MRI scan".')
        alternatives = options.get("alternatives")
        if task == "check":
            if isinstance(alternatives, str):
                alternatives = [a.strip() for a in alternatives.split(",") if a.strip()]
            if not isinstance(alternatives, list) or not alternatives or not all(isinstance(a, str) for a in alternatives):
                raise InputError("BiomedCLIP's check compares each prompt with alternatives, and none were given.",
                                 hint="Pass --option alternatives=a,b,c (the panel passes the model's targets).")
        template = options.get("template") or "this is a photo of {}"
        if "{}" not in template:
            raise InputError(f"The template {template!r} has no {{}} for the label.")
        grey = not volume.channels_last
        lo, hi, rule = choose_window(volume, options.get("window")) if grey else (0.0, 255.0, "colour image as it is")
        details = {"task": task, "template": template, "window": (lo, hi), "grey": grey, "plane": plane,
                   "slices": int(options.get("slices") or 5), "top": int(options.get("top") or 5),
                   "alternatives": alternatives, "ratio": float(0.25 if options.get("ratio") is None
                                                                else options["ratio"]),
                   "cache_bytes": int((options.get("cache_mb") or 256) * 2 ** 20)}
        return Plan(units="slices", details=details, report={"task": task, "window": rule})

    # ---- weights -------------------------------------------------------------------------
    def load(self, context: LoadContext) -> None:
        from .network import load_checkpoint

        self.net = load_checkpoint(context.weight("open_clip_pytorch_model.bin")).to(self.device).eval()
        self.vocab_path = context.weight("vocab.txt")
        self.text_cache: dict[str, np.ndarray] = {}

    def modules(self) -> list:
        return [self.net] if self.net is not None else []

    def release(self) -> None:
        self.embeddings.clear()

    # ---- embeddings ----------------------------------------------------------------------
    def frames(self, volume: Volume, plan: Plan):
        """(count, get): the number of slices along the plan's plane and a function giving slice ``i``
        (display orientation) as uint8, windowed one slice at a time (a whole float copy of a 300-slice
        volume would cost gigabytes for the five slices a recognition looks at)."""
        d = plan.details
        display = volume.slice_orientation(d["plane"]).to_display(volume.array)
        lo, hi = d["window"]

        def get(i: int) -> np.ndarray:
            one = display[i]
            if volume.channels_last:
                return np.ascontiguousarray(one if one.dtype == np.uint8 else np.clip(one, 0, 255).astype(np.uint8))
            return np.rint(np.clip((one.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)

        return display.shape[0], get

    def embed(self, images, progress, cancelled) -> np.ndarray:
        """Normalised image embeddings [n, 512] of uint8 slices, from the cache where it has them."""
        import torch

        from .preprocess import prepare_image

        out = []
        for n, image in enumerate(images):
            check_cancel(cancelled, "BiomedCLIP")
            pixels = torch.from_numpy(prepare_image(image)).unsqueeze(0)
            features = self.embeddings.get_or_encode(pixels, self._encode)
            out.append(features["image"])
            progress("BiomedCLIP: embedding slices", n + 1, len(images))
        return np.concatenate(out)

    def _encode(self, pixels) -> dict:
        import torch

        with torch.inference_mode():
            return {"image": self.net.encode_image(pixels.to(self.device), normalize=True).float().cpu().numpy()}

    def embed_texts(self, texts: list[str], template: str) -> np.ndarray:
        """Normalised text embeddings [n, 512], each phrase computed once per loaded model.

        The ids are cut after the longest phrase's [SEP]: the model masks pads, so the features equal
        the authors' 256-token ones within the fixture's tolerance (tested), at a fraction of the cost."""
        import torch

        from .tokenizer import tokenize

        phrases = [template.format(t) for t in texts]
        missing = [p for p in dict.fromkeys(phrases) if p not in self.text_cache]
        if missing:
            ids = tokenize(missing, self.vocab_path)
            longest = int((ids != 0).sum(dim=1).max())
            with torch.inference_mode():
                found = self.net.encode_text(ids[:, :longest].to(self.device), normalize=True).float().cpu().numpy()
            self.text_cache.update(zip(missing, found))
        return np.stack([self.text_cache[p] for p in phrases])

    def scale(self) -> float:
        return float(self.net.logit_scale.detach().exp().cpu())

    # ---- run -----------------------------------------------------------------------------
    def run(self, volume: Volume, prompts: PromptSet, plan: Plan, *, progress, cancelled) -> ModelOutput:
        d = plan.details
        self.embeddings.limit_bytes = d["cache_bytes"]
        count, get = self.frames(volume, plan)
        misses = self.embeddings.misses
        task = d["task"]
        report = {"task": task}
        if task == "rank":
            orientation = volume.slice_orientation(d["plane"])
            offset = crop_offset(volume, orientation.slice_axis)
            labels, ranking = self._rank([get(i) for i in range(count)], prompts.texts, d, progress, cancelled,
                                         lambda i: orientation.display_slice_index(i, count) + offset)
            report["ranking"] = ranking
        else:
            chosen = representative(count, d["slices"])
            image = self._mean(self.embed([get(i) for i in chosen], progress, cancelled))
            orientation = volume.slice_orientation(d["plane"])
            offset = crop_offset(volume, orientation.slice_axis)
            report["slices"] = [orientation.display_slice_index(i, count) + offset for i in chosen]
            if task == "classify":
                labels = self._classify(image, prompts.texts, d["template"], "classify")
            elif task == "recognize":
                labels = self._recognize(image, volume, d, progress, cancelled)
                report["recognized"] = {family: next(l.name for l in labels if l.target == family)
                                        for family in dict.fromkeys(l.target for l in labels)}
            else:
                labels, report["warnings"] = self._check(image, prompts.texts, d)
        report["slices_embedded"] = self.embeddings.misses - misses
        return ModelOutput({}, labels=labels, report=report)

    @staticmethod
    def _mean(embeddings: np.ndarray) -> np.ndarray:
        mean = embeddings.mean(axis=0)
        return mean / max(float(np.linalg.norm(mean)), 1e-12)

    def _probabilities(self, image: np.ndarray, texts: list[str], template: str) -> np.ndarray:
        return softmax(self.scale() * (self.embed_texts(texts, template) @ image))

    def _classify(self, image, names, template, target, phrases=None) -> list[Label]:
        probs = self._probabilities(image, phrases or names, template)
        order = np.argsort(-probs, kind="stable")
        return [Label(names[i], float(probs[i]), target) for i in order]

    def _recognize(self, image, volume, d, progress, cancelled) -> list[Label]:
        vocab = vocabulary()
        labels = []
        for family, classes in vocab["families"].items():
            source = image
            if family == "view":
                if min(volume.shape) == 1 or volume.channels_last:
                    continue  # a 2D image has no view to tell
                # the middle slice as stored: the plane the volume was acquired in
                lo, hi = d["window"]
                middle = volume.array.take(volume.shape[0] // 2, axis=0).astype(np.float64)
                grey = np.rint(np.clip((middle - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
                source = self.embed([grey], progress, cancelled)[0]
            names = list(classes)
            labels += self._classify(source, names, vocab["template"], family, [classes[n] for n in names])
        return labels

    def _check(self, image, texts, d) -> tuple[list[Label], list[str]]:
        labels, warnings = [], []
        for text in texts:
            candidates = [text] + [a for a in d["alternatives"] if a.lower() != text.lower()]
            probs = self._probabilities(image, candidates, d["template"])
            best = int(np.argmax(probs[1:])) + 1 if len(candidates) > 1 else 0
            # the prompt first, then every alternative by probability, all answering this prompt
            labels.append(Label(text, float(probs[0]), text))
            labels += [Label(candidates[i], float(probs[i]), text) for i in np.argsort(-probs, kind="stable") if i != 0]
            better = [candidates[i] for i in np.argsort(-probs) if i != 0 and probs[i] > probs[0]][:3]
            if len(candidates) > 1 and probs[0] < d["ratio"] * probs[best]:
                warnings.append(f"'{text}' fits this image far less than {', '.join(repr(b) for b in better)} "
                                f"({probs[0]:.0%} against {probs[best]:.0%}); check the prompt, the modality and "
                                "the site.")
        return labels, warnings

    def _rank(self, stack, texts, d, progress, cancelled, array_index) -> tuple[list[Label], dict]:
        """Per prompt, the ``top`` slices by score; slices are array indices along the plane's axis
        (what ``--slice-range`` counts), not display positions."""
        embeddings = self.embed(list(stack), progress, cancelled)
        texts_emb = self.embed_texts(texts, d["template"])
        scores = self.scale() * (embeddings @ texts_emb.T)  # [slices, prompts]
        labels, ranking = [], {}
        for n, text in enumerate(texts):
            order = np.argsort(-scores[:, n], kind="stable")
            ranking[text] = [{"slice": array_index(int(i)), "score": round(float(scores[i, n]), 6)}
                             for i in order[:d["top"]]]
            labels += [Label(f"slice {array_index(int(i))}", float(scores[i, n]), text) for i in order[:d["top"]]]
        return labels, ranking
