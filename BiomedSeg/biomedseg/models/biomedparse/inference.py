"""BiomedParse v1's forward pass on model images: the one path the engine's backend and the parity tests share.

``encode_images`` turns a batch of uint8 model images into the decoder's inputs (once per slice);
``encode_text`` embeds prompts, ``TextCache`` keeps those embeddings; ``decode`` runs the mask decoder
for a batch of B slices, picks per slice the query whose caption is most similar to each prompt
(``select_masks``) and turns the chosen 1/4-resolution logits into probabilities (``upsample``).
``segment`` is the same path for one RGB image (the authors' ``interactive_infer_image``).

Two ways to decode a list of prompts:
* per prompt (engine default): each prompt is encoded alone and its valid tokens are the whole
  grounding sequence, so a prompt's mask never depends on which other prompts were asked for;
* joint: the prompts are encoded as one batch and their valid tokens concatenated into one
  grounding sequence, as the authors do. Masks then depend on the whole list; this mode
  reproduces the reference outputs.

Numerics the parity fixtures and the bit-identity tests rely on:
* torch's CPU bilinear kernel rounds differently for a multi-channel image than for single
  planes, so in per-prompt mode every map is resized as its own plane; joint mode keeps the
  reference's layout (prompts as channels).
* autocast (bfloat16 where supported, else float16) only on CUDA and only when asked; the
  query-prompt similarity is always computed in float32.
* the model's tensor layout (``set_exact_layout``, see ``model.py``) changes rounding, text
  embeddings included, so cached embeddings are kept per layout (``TextCache``'s ``variant``).
Run everything under ``torch.no_grad()`` (the functions here do).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .model import BiomedParseV1
from .preprocess import MODEL_SIZE, resize_to_model
from .tokenizer import ClipTokenizer

MODES = ("per_prompt", "joint")


def autocast(device, enabled: bool):
    """CUDA autocast (bfloat16 where supported, else float16) when ``enabled`` on a CUDA device; else a no-op,
    so CPU and MPS always run in float32."""
    if enabled and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def encode_images(model: BiomedParseV1, images: torch.Tensor, amp: bool = False) -> dict:
    """uint8 RGB [B, 3, S, S] model images -> backbone maps, ``mask_features`` and ``multi_scale_features``
    (ImageNet normalisation in float32, the networks under ``autocast`` when ``amp``)."""
    x = model.normalize(images.float())
    with autocast(images.device, amp):
        return model.image_features(x)


@dataclass
class PromptText:
    """One batch through the text encoder: ids and mask [N, 77], token embeddings [N, 77, 512], class
    embeddings [N, 512], and ``tokens`` [T, 512]: the valid tokens of the N prompts in order, i.e. the
    grounding sequence the decoder reads for these prompts."""

    prompts: tuple
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_emb: torch.Tensor
    class_emb: torch.Tensor
    tokens: torch.Tensor


@torch.no_grad()
def encode_text(model: BiomedParseV1, tokenizer: ClipTokenizer, prompts, device=None) -> PromptText:
    """Embed ``prompts`` as one batch (one prompt: that prompt alone; a list: the authors' joint encoding)."""
    device = device or next(model.parameters()).device
    enc = tokenizer(list(prompts))
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    token_emb, class_emb = model.text_features(ids)
    return PromptText(tuple(prompts), ids, mask, token_emb, class_emb, token_emb[mask.bool()])


class TextCache:
    """Text embeddings kept by prompt (encoded alone) and by prompt list (joint), so asking again runs no text
    encoder. ``groups`` returns what ``decode`` takes: one ``PromptText`` per prompt, or one for the list."""

    MAX_LISTS = 32

    def __init__(self, model: BiomedParseV1, tokenizer: ClipTokenizer, device=None):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self._alone: dict = {}
        self._joint: dict = {}

    def groups(self, prompts, joint: bool = False, variant=None) -> list[PromptText]:
        """``variant``: what else the embeddings depend on (the model's layout), part of the key."""
        if joint:
            key = (variant, tuple(prompts))
            if key not in self._joint:
                self._joint[key] = encode_text(self.model, self.tokenizer, prompts, self.device)
                while len(self._joint) > self.MAX_LISTS:
                    self._joint.pop(next(iter(self._joint)))
            return [self._joint[key]]
        out = []
        for prompt in prompts:
            key = (variant, prompt)
            if key not in self._alone:
                self._alone[key] = encode_text(self.model, self.tokenizer, [prompt], self.device)
            out.append(self._alone[key])
        return out

    def clear(self) -> None:
        self._alone.clear()
        self._joint.clear()


@dataclass
class Decoded:
    """What ``decode`` found for B slices and P prompts (prompt order as given)."""

    logits: torch.Tensor           # [B, P, h, w] mask logits of the chosen queries (1/4 model resolution)
    matched_id: torch.Tensor       # [B, P] chosen query per slice and prompt
    sim: torch.Tensor              # [B, Q, P] similarity of every query to each prompt (within its group)
    probs: torch.Tensor | None = None  # [B, P, H, W] float32 probabilities, set by ``decode``
    extras: dict = field(default_factory=dict)  # decoder outputs per group (``keep_outputs``), and more


@torch.no_grad()
def select_masks(model: BiomedParseV1, features: dict, texts: list[PromptText], amp: bool = False,
                 keep_outputs: bool = False) -> Decoded:
    """Run the decoder once per text group over the B slices of ``features`` (``mask_features`` [B, ...] and
    ``multi_scale_features``) and keep, per slice and prompt, the mask of the most similar query.

    Without autocast, features from a half-precision cache are brought back to float32 first."""
    mask_features, multi_scale = features["mask_features"], list(features["multi_scale_features"])
    device = mask_features.device
    if not (amp and device.type == "cuda"):
        mask_features, multi_scale = mask_features.float(), [m.float() for m in multi_scale]
    inputs = {"mask_features": mask_features, "multi_scale_features": multi_scale}
    b = mask_features.shape[0]
    logits, matched, sims, outputs = [], [], [], []
    for text in texts:
        with autocast(device, amp):
            out = model.decode(inputs, text.tokens[:, None].expand(-1, b, -1))
        masks, captions = out["pred_masks"], out["pred_captions"].float()
        class_emb = text.class_emb.float()
        sim = [model.similarity(captions[s], class_emb) for s in range(b)]  # [Q, K] per slice
        ids = [s_sim.max(0)[1] for s_sim in sim]
        logits.append(torch.stack([masks[s, ids[s]] for s in range(b)]))
        matched.append(torch.stack(ids))
        sims.append(torch.stack(sim))
        if keep_outputs:
            outputs.append(out)
    decoded = Decoded(logits=torch.cat(logits, 1), matched_id=torch.cat(matched, 1), sim=torch.cat(sims, 2))
    if keep_outputs:
        decoded.extras["decoder_outputs"] = outputs
    return decoded


def upsample(logits: torch.Tensor, shape: tuple[int, int], joint: bool = False) -> torch.Tensor:
    """Chosen logits [B, P, h, w] -> float32 probabilities [B, P, H, W]: bilinear resize, then sigmoid. Per prompt,
    each map is its own plane; ``joint`` resizes the prompts as channels of one image (the reference)."""
    b, p, h, w = logits.shape
    logits = logits.float()
    if joint:
        return F.interpolate(logits, tuple(shape), mode="bilinear").sigmoid()
    planes = F.interpolate(logits.reshape(b * p, 1, h, w), tuple(shape), mode="bilinear")
    return planes.reshape(b, p, *shape).sigmoid()


@torch.no_grad()
def decode(model: BiomedParseV1, features: dict, texts: list[PromptText], shape: tuple[int, int],
           joint: bool = False, amp: bool = False, keep_outputs: bool = False) -> Decoded:
    """``select_masks`` then ``upsample`` to ``shape`` (the model grid for the engine). ``texts``:
    ``TextCache.groups(prompts, joint)``, with the same ``joint``."""
    decoded = select_masks(model, features, texts, amp=amp, keep_outputs=keep_outputs)
    decoded.probs = upsample(decoded.logits, shape, joint=joint)
    return decoded


def segment(model: BiomedParseV1, tokenizer: ClipTokenizer, image_rgb: np.ndarray, prompts: list[str],
            mode: str = "per_prompt") -> Decoded:
    """One uint8 RGB image (any size; the model sees it at 1024x1024) and prompts -> a ``Decoded`` of one slice,
    probabilities on the image's own grid; ``extras`` holds the features, texts and decoder outputs."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    device = next(model.parameters()).device
    model_image = resize_to_model(np.ascontiguousarray(image_rgb), MODEL_SIZE)
    features = encode_images(model, torch.from_numpy(model_image.copy()).permute(2, 0, 1)[None].to(device))
    texts = TextCache(model, tokenizer, device).groups(prompts, joint=mode == "joint")
    decoded = decode(model, features, texts, tuple(image_rgb.shape[:2]), joint=mode == "joint", keep_outputs=True)
    decoded.extras.update(features=features, texts=texts)
    return decoded
