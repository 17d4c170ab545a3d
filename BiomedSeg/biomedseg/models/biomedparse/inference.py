"""Text-prompted segmentation of one 2-D image with BiomedParse v1.

Two ways to decode a list of prompts:
* ``mode="per_prompt"`` (engine default): each prompt's valid tokens are decoded on their own,
  so a prompt's mask does not depend on which other prompts were asked for.
* ``mode="joint"``: the valid tokens of all prompts are concatenated into one grounding
  sequence and decoded once, as the authors' ``interactive_infer_image`` does. Masks then
  depend on the whole list; this mode reproduces the reference outputs.
For each prompt the query whose caption is most similar to the prompt embedding is chosen;
its 1/4-resolution mask logits are resized bilinearly to the image size, then a sigmoid.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .model import BiomedParseV1
from .tokenizer import ClipTokenizer

MODES = ("per_prompt", "joint")
MODEL_SIZE = 1024


@dataclass
class Prediction:
    probs: torch.Tensor            # [P, H, W] float32 probabilities on the input image grid
    matched_id: torch.Tensor       # [P] chosen query per prompt
    sim: torch.Tensor              # [Q, P] similarity of every query to every prompt (its own group)
    sel_mask_logits: torch.Tensor  # [P, h, w] mask logits of the chosen queries (1/4 model resolution)
    extras: dict                   # intermediate tensors (features, token embeddings, decoder outputs)


def resize_to_model(image_rgb: np.ndarray) -> np.ndarray:
    """Bicubic (PIL) resize of an RGB uint8 image to 1024x1024, as the reference's torchvision Resize; no-op at 1024."""
    if image_rgb.shape[:2] == (MODEL_SIZE, MODEL_SIZE):
        return image_rgb
    from PIL import Image

    return np.asarray(Image.fromarray(image_rgb).resize((MODEL_SIZE, MODEL_SIZE), Image.BICUBIC))


@torch.no_grad()
def encode_image(model: BiomedParseV1, image_rgb: np.ndarray, device=None, dtype=torch.float32) -> dict:
    """uint8 [H, W, 3] -> image features of the 1024x1024 model input (cache these per slice)."""
    device = device or next(model.parameters()).device
    arr = resize_to_model(np.ascontiguousarray(image_rgb))
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].to(device)
    feats = model.image_features(model.normalize(x, dtype=dtype))
    feats["input_size"] = tuple(image_rgb.shape[:2])
    return feats


@torch.no_grad()
def encode_prompts(model: BiomedParseV1, tokenizer: ClipTokenizer, prompts: list[str], device=None,
                   separately: bool = False) -> dict:
    """Token ids, mask and embeddings of a prompt list. ``separately`` runs the text encoder one prompt at a
    time, so a prompt's embedding (and per-prompt mask) is bit-identical whatever else is in the list;
    the reference encodes the list as one batch (use that for joint mode)."""
    device = device or next(model.parameters()).device
    tokens = tokenizer(list(prompts))
    ids = tokens["input_ids"].to(device)
    mask = tokens["attention_mask"].to(device)
    if separately:
        parts = [model.text_features(ids[i:i + 1]) for i in range(ids.shape[0])]
        token_emb = torch.cat([p[0] for p in parts])
        class_emb = torch.cat([p[1] for p in parts])
    else:
        token_emb, class_emb = model.text_features(ids)
    return {"input_ids": ids, "attention_mask": mask, "token_emb": token_emb, "class_emb": class_emb}


@torch.no_grad()
def decode_prompts(model: BiomedParseV1, feats: dict, text: dict, mode: str = "per_prompt") -> Prediction:
    """Decode, match queries to prompts and upsample; ``feats`` from ``encode_image``, ``text`` from ``encode_prompts``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    token_emb, class_emb = text["token_emb"], text["class_emb"]
    valid = text["attention_mask"].bool()
    n = token_emb.shape[0]
    if mode == "joint":
        groups = [(list(range(n)), token_emb[valid])]
    else:
        groups = [([p], token_emb[p][valid[p]]) for p in range(n)]

    sims, matched, sel, outputs = [None] * n, [None] * n, [None] * n, []
    for members, tokens in groups:
        out = model.decode(feats, tokens[:, None])
        outputs.append(out)
        sim = model.similarity(out["pred_captions"][0], class_emb[members])
        ids = sim.max(0)[1]
        for j, p in enumerate(members):
            sims[p], matched[p] = sim[:, j], ids[j]
            sel[p] = out["pred_masks"][0, ids[j]]
    sel_logits = torch.stack(sel)
    h, w = feats["input_size"]
    probs = F.interpolate(sel_logits[None], (h, w), mode="bilinear")[0, :, :h, :w].sigmoid()
    return Prediction(probs=probs, matched_id=torch.stack(matched), sim=torch.stack(sims, dim=1),
                      sel_mask_logits=sel_logits, extras={"decoder_outputs": outputs})


def segment(model: BiomedParseV1, tokenizer: ClipTokenizer, image_rgb: np.ndarray, prompts: list[str],
            mode: str = "per_prompt") -> Prediction:
    """One uint8 RGB image (any size; the model sees it at 1024x1024) and a list of prompts -> probabilities."""
    feats = encode_image(model, image_rgb)
    text = encode_prompts(model, tokenizer, prompts, separately=(mode == "per_prompt"))
    pred = decode_prompts(model, feats, text, mode=mode)
    pred.extras.update(features=feats, text=text)
    return pred
