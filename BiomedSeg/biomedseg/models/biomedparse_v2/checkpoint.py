"""Reading ``biomedparse_v2.ckpt`` into ``BiomedParseV2`` strictly, and building the model.

The released file is a PyTorch Lightning checkpoint: the weights are ``checkpoint['state_dict']``
under the prefix ``model.``, next to two loss-function tensors (class weights of the training
losses). The authors' ``load_pretrained`` strips the prefix, drops those two and loads with
``strict=False``, so a wrong or damaged file would load silently with random layers. Here every
other entry must match the model's names and shapes one to one, or ``CheckpointMismatchError``
names what is missing, unexpected or mis-shaped. One tolerance, the authors' behaviour: the
buffers ``pixel_mean``/``pixel_std`` (constants, not weights) take their constructor values if a
file lacks them. Files are read with ``weights_only=True`` (nothing in them runs) and memory-mapped
when the format allows, so the optimiser state a checkpoint may carry is never read into memory.
A ``.safetensors`` export of the same state dict is read too, as the authors' loader does.
"""
from __future__ import annotations

import logging
import os
import zipfile

import torch

from biomedseg.errors import InputError
from biomedseg.runtime.checkpoints import CheckpointMismatchError  # noqa: F401 -- raised here, caught by callers
from biomedseg.runtime.checkpoints import check_state_dict
from .network import BiomedParseV2
from .preprocess import pixel_buffers

log = logging.getLogger(__name__)

PREFIX = "model."
#: Entries of the released checkpoint that belong to the training losses, dropped by the authors' loader.
DROPPED_KEYS = ("loss_function.loss_fn.dice_loss.class_weight", "loss_function.cls_loss_fn.pos_weight")
#: Persistent buffers a file may lack; the constructor's values are used then (as with strict=False).
OPTIONAL_KEYS = ("pixel_mean", "pixel_std")
MODEL = "BiomedParse v2"
HINT = "Use biomedparse_v2.ckpt from microsoft/BiomedParse (about 4.5 GB); a partial download must be fetched again."


def expected_shapes() -> dict:
    """{name: shape} of every tensor of ``BiomedParseV2`` (built on the meta device, no memory)."""
    with torch.device("meta"):
        model = BiomedParseV2()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _read(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"]
    return obj


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The raw {name: tensor} of a v2 checkpoint (``state_dict`` of a Lightning file, or a bare state dict)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{MODEL} checkpoint '{path}' does not exist.")
    try:
        state = _read(path)
    except Exception as exc:  # noqa: BLE001 - truncated download, LFS pointer, not a torch file, pickled code
        raise CheckpointMismatchError(f"Could not read {MODEL} weights from '{path}' ({type(exc).__name__}: {exc}).",
                                      hint=HINT) from exc
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        found = ", ".join(sorted(map(str, state))[:12]) if isinstance(state, dict) else type(state).__name__
        raise CheckpointMismatchError(f"'{path}' holds no {MODEL} state dict (found: {found}).", hint=HINT)
    return state


def prepare_state_dict(state: dict) -> dict:
    """Strip ``model.``, drop ``DROPPED_KEYS``, fill absent ``OPTIONAL_KEYS``; then names and shapes must
    equal the model's exactly (``CheckpointMismatchError`` otherwise)."""
    state = {k.removeprefix(PREFIX): v for k, v in state.items()}
    dropped = [k for k in DROPPED_KEYS if state.pop(k, None) is not None]
    if dropped:
        log.info("%s: ignoring the training-loss entries %s", MODEL, ", ".join(dropped))
    filled = [k for k in OPTIONAL_KEYS if k not in state]
    if filled:
        log.info("%s: %s not in the file; using the constructor values", MODEL, ", ".join(filled))
        defaults = pixel_buffers()
        state.update({k: defaults[k] for k in filled})
    check_state_dict(state, expected_shapes(), model=MODEL, hint=HINT)
    return state


def load_state_dict_from_checkpoint(path: str | os.PathLike) -> dict:
    """Read ``path`` and return the state dict ``BiomedParseV2`` loads strictly (see ``prepare_state_dict``)."""
    return prepare_state_dict(read_checkpoint(path))


def build_biomedparse_v2(state_dict: dict | None = None, checkpoint: str | os.PathLike | None = None,
                         device="cpu", dtype=torch.float32) -> BiomedParseV2:
    """Build in eval mode without random initialisation: parameters are created on the meta device and
    taken from ``state_dict`` (names without ``model.``) or ``checkpoint`` (read and checked here)."""
    if state_dict is None:
        if checkpoint is None:
            raise ValueError("give state_dict or checkpoint")
        state_dict = load_state_dict_from_checkpoint(checkpoint)
    else:
        state_dict = prepare_state_dict(state_dict)
    with torch.device("meta"):
        model = BiomedParseV2()
    state_dict = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    # Parameters keep requires_grad=True, as in the authors' model: ATen's matmul folds 3-D inputs differently
    # when a weight requires grad, which changes float rounding. Inference runs under torch.no_grad().
    return model.eval()
