"""Reading ``biomedparse_v1.pt`` into the re-implementation's exact parameter names, and building the model.

The released file is a flat state dict of the authors' ``GeneralizedSEEM`` (no prefix; some
exports add ``model.``). It also stores tensors this engine never uses; they are removed by
name from the explicit lists below and reported, never dropped silently:
* the BiomedBERT built next to the CLIP text encoder (``...lang_encoder.biomed_encoder.*``),
* ``dilation_kernel`` (training), and the spatial/visual prompt tensors of the decoder.
Everything else must match the model's names and shapes one to one, or a
``CheckpointMismatchError`` lists what is missing, unexpected or mis-shaped.
This module depends on ``model`` (for the names and shapes to expect), never the reverse.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from biomedseg.runtime.checkpoints import CheckpointMismatchError  # noqa: F401 -- raised here, caught by callers
from biomedseg.runtime.checkpoints import check_state_dict as check_state_dict_of
from .model import BiomedParseV1

log = logging.getLogger(__name__)

#: Prefixes of checkpoint entries with no counterpart in this engine (unused BERT).
UNUSED_PREFIXES = ("sem_seg_head.predictor.lang_encoder.biomed_encoder.",)
#: Exact names of checkpoint entries used only for training or spatial/visual prompts.
UNUSED_KEYS = (
    "dilation_kernel",
    "sem_seg_head.predictor.pn_indicator.weight",
    "sem_seg_head.predictor.mask_sptial_embed.0",
    "sem_seg_head.predictor.mask_sptial_embed.1",
    "sem_seg_head.predictor.mask_sptial_embed.2",
    "sem_seg_head.predictor.spatial_embed.weight",
    "sem_seg_head.predictor.spatial_featured.weight",
)
PREFIXES_TO_STRIP = ("model.", "module.")


def is_unused_key(name: str) -> bool:
    return name in UNUSED_KEYS or name.startswith(UNUSED_PREFIXES)


@dataclass
class Partition:
    kept: dict
    dropped: list = field(default_factory=list)


def strip_prefix(state: dict) -> dict:
    """Remove a wrapper prefix ('model.' or 'module.') when every key carries it."""
    for prefix in PREFIXES_TO_STRIP:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return state


def partition_checkpoint(state: dict) -> Partition:
    """Split a checkpoint into the tensors the engine uses and the listed unused ones."""
    kept, dropped = {}, []
    for k, v in state.items():
        if is_unused_key(k):
            dropped.append(k)
        else:
            kept[k] = v
    return Partition(kept, dropped)


def check_against(state: dict, expected: dict) -> None:
    """Raise ``CheckpointMismatchError`` unless names and shapes equal ``expected`` exactly."""
    check_state_dict_of(state, expected, model='BiomedParse v1',
                        hint='Use the original biomedparse_v1.pt from microsoft/BiomedParse.')


def expected_shapes() -> dict:
    """{name: shape} of every tensor of ``BiomedParseV1`` (built on the meta device, no memory)."""
    with torch.device("meta"):
        model = BiomedParseV1()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_state_dict_from_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load ``path`` (``torch.load(weights_only=True)``) and return the state dict ``BiomedParseV1`` loads strictly.

    Unused entries (``UNUSED_PREFIXES``/``UNUSED_KEYS``) are removed and logged; anything else
    that does not match raises ``CheckpointMismatchError``.
    """
    try:
        state = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable or unsafe pickle
        raise CheckpointMismatchError(f"Could not read BiomedParse v1 weights from {path}: {exc}") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    elif isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatchError(f"{path} is not a state dict of tensors.")
    part = partition_checkpoint(strip_prefix(state))
    if part.dropped:
        n_bert = sum(k.startswith(UNUSED_PREFIXES) for k in part.dropped)
        log.info("BiomedParse v1: ignoring %d unused checkpoint entries (%d of the unused BiomedBERT; %s)",
                 len(part.dropped), n_bert, ", ".join(k for k in part.dropped if k in UNUSED_KEYS))
    check_against(part.kept, expected_shapes())
    return part.kept


def build_biomedparse_v1(state_dict: dict | None = None, checkpoint: str | os.PathLike | None = None,
                         device="cpu", dtype=torch.float32) -> BiomedParseV1:
    """Build in eval mode without random initialisation: parameters are created on the meta device
    and taken from ``state_dict`` (or ``checkpoint``, read with ``load_state_dict_from_checkpoint``)."""
    if state_dict is None:
        if checkpoint is None:
            raise ValueError("give state_dict or checkpoint")
        state_dict = load_state_dict_from_checkpoint(checkpoint)
    with torch.device("meta"):
        model = BiomedParseV1()
    check_against(state_dict, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    state_dict = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    # Parameters keep requires_grad=True, as in the reference: ATen's matmul folds 3-D inputs differently
    # when a weight requires grad, which changes float rounding. Run inference under torch.no_grad().
    return model.eval()
