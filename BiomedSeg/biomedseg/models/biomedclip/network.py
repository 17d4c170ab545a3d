"""BiomedCLIP (``microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``) in plain PyTorch.

Image-text embeddings for zero-shot recognition (which modality or organ is this slice?), prompt
checks and ranking. No open_clip, timm or torchvision at run time; transformers only for the
``BertModel`` of the text tower, imported when the network is built.

API (what a backend uses)::

    from biomedseg.models.biomedclip.network import BiomedCLIPNet, load_checkpoint
    from biomedseg.models.biomedclip.preprocess import prepare_batch, prepare_image, preprocess_pil
    from biomedseg.models.biomedclip.tokenizer import tokenize

    net = load_checkpoint("open_clip_pytorch_model.bin")   # eval, float32, CPU; .to(device) after
    with torch.no_grad():                                  # the encoders do not switch grad off
        img = net.encode_image(prepare_batch([slice_u8]), normalize=True)          # [B, 512]
        txt = net.encode_text(tokenize(["CT of the liver"], "vocab.txt"), normalize=True)  # [N, 512]
        per_image = net.logit_scale.exp() * img @ txt.T     # = net.logits_from_features(...)[0]

* ``BiomedCLIPNet()``: ``visual`` (ViT-B/16, vision.py) + ``text`` (BiomedBERT, text.py) +
  ``logit_scale`` (0-d; the temperature is its exp, no clamp, no bias). ``state_dict()`` has the
  351 entries of the authors' ``CustomTextCLIP``, same names, shapes and order.
* ``encode_image(pixels [B,3,224,224], normalize=False) -> [B,512]``; pixels from preprocess.py.
* ``encode_text(ids [B,L] int64, normalize=False) -> [B,512]``; mask = ids != 0, so pads must be 0.
* ``logits(pixels, ids)`` and ``logits_from_features(image_features, text_features)`` ->
  ``(logits_per_image [B,N], logits_per_text [N,B])``; features are L2-normalised first.
* ``load_checkpoint(path)`` / ``read_state_dict(path)`` / ``check_state_dict(state)``: strict
  loading; a wrong file is a ``CheckpointMismatchError`` naming the missing, unexpected and
  mis-shaped keys.

Renames applied to a checkpoint before the strict load (each is one open_clip applies too):
a ``{"state_dict": ...}`` wrapper is unwrapped; a ``module.`` prefix on every key (a DDP training
save) is dropped; ``text.transformer.embeddings.position_ids`` is dropped (transformers < 4.31 saved
it as a persistent buffer; it must equal 0..511); a 1-element ``logit_scale`` is reshaped to 0-d.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from biomedseg.errors import InputError
from biomedseg.runtime.checkpoints import CheckpointMismatchError  # noqa: F401 -- raised here, caught by callers
from biomedseg.runtime.checkpoints import check_state_dict as check_state_dict_of
from biomedseg.runtime.checkpoints import read_state_dict_file

from .text import MAX_POSITIONS, TextTower
from .vision import ImageTower

N_KEYS = 351
VOCAB_SIZE = 30522
POSITION_IDS_KEY = "text.transformer.embeddings.position_ids"


class BiomedCLIPNet(nn.Module):
    """open_clip's ``CustomTextCLIP`` for BiomedCLIP: two towers into one 512-d space."""

    def __init__(self):
        super().__init__()
        # open_clip's init value, log(1/0.07); the real value comes from the checkpoint
        self.logit_scale = nn.Parameter(torch.tensor(2.659260036932778))
        self.visual = ImageTower()
        self.text = TextTower()

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        weight = self.visual.trunk.patch_embed.proj.weight
        features = self.visual(pixels.to(device=weight.device, dtype=weight.dtype))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        check_ids(ids)
        features = self.text(ids.to(device=self.logit_scale.device, dtype=torch.long))
        return F.normalize(features, dim=-1) if normalize else features

    def logits_from_features(self, image_features, text_features):
        """(per image [B,N], per text [N,B]) = exp(logit_scale) x cosine similarity."""
        image_features = F.normalize(image_features, dim=-1)
        text_features = F.normalize(text_features, dim=-1)
        per_image = self.logit_scale.exp() * image_features @ text_features.T
        return per_image, per_image.T

    def logits(self, pixels, ids):
        return self.logits_from_features(self.encode_image(pixels), self.encode_text(ids))

    def forward(self, pixels, ids):
        """As open_clip's forward: (image features, text features) normalised, and exp(logit_scale)."""
        return self.encode_image(pixels, True), self.encode_text(ids, True), self.logit_scale.exp()


def check_ids(ids) -> None:
    """Refuse token ids the text tower cannot take (wrong rank or type, too long, outside the vocabulary)."""
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise InputError(f"BiomedCLIP text ids must be an integer tensor [N, L], got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}.")
    if ids.shape[1] > MAX_POSITIONS or ids.shape[1] == 0:
        raise InputError(f"BiomedCLIP takes 1 to {MAX_POSITIONS} tokens per text, got {ids.shape[1]}.")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= VOCAB_SIZE):
        raise InputError(f"BiomedCLIP token ids must lie in 0..{VOCAB_SIZE - 1}; got "
                         f"{int(ids.min())}..{int(ids.max())} (is the vocabulary BiomedBERT's?).")


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """{name: shape} of every tensor ``BiomedCLIPNet`` loads (builds a network: about 2 s)."""
    return {k: tuple(v.shape) for k, v in BiomedCLIPNet().state_dict().items()}


def check_state_dict(state: dict, expected: dict[str, tuple[int, ...]]) -> None:
    """Raise ``CheckpointMismatchError`` unless names and shapes equal ``expected`` exactly."""
    check_state_dict_of(state, expected, model='BiomedCLIP (ViT-B/16 + BiomedBERT, 512-d)',
                        hint='Use open_clip_pytorch_model.bin of microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224.')


def apply_renames(state: dict) -> dict:
    """The documented renames (module docstring), applied to a copy; nothing else is changed."""
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    position_ids = state.pop(POSITION_IDS_KEY, None)
    if position_ids is not None and not torch.equal(position_ids.reshape(-1).long(),
                                                    torch.arange(position_ids.numel())):
        raise CheckpointMismatchError(f"'{POSITION_IDS_KEY}' in the file is not 0..n-1, so the file's text tower "
                                      "does not read positions as BERT does.")
    scale = state.get("logit_scale")
    if isinstance(scale, torch.Tensor) and scale.ndim != 0 and scale.numel() == 1:
        state["logit_scale"] = scale.reshape(())
    return state


def read_state_dict(path: str | os.PathLike) -> dict:
    """The renamed state dict of ``path`` (a bare state dict or one under ``"state_dict"``)."""
    state = read_state_dict_file(path, model='BiomedCLIP', wrapper='state_dict')
    return apply_renames(state)


def load_checkpoint(path: str | os.PathLike) -> BiomedCLIPNet:
    """``BiomedCLIPNet`` in eval mode with the weights of ``path``, loaded strictly (float32, CPU)."""
    state = read_state_dict(path)
    net = BiomedCLIPNet()
    check_state_dict(state, {k: tuple(v.shape) for k, v in net.state_dict().items()})
    net.load_state_dict(state, strict=True)
    return net.eval()
