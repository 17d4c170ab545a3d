"""MedSAM2's network (SAM2.1 Hiera-T at 512x512) as one module under the checkpoint's names.

``MedSAM2Net`` only holds the parts: its ``state_dict()`` has exactly the 471 entries, in the
same order, of the authors' ``SAM2VideoPredictorNPZ`` built from ``sam2.1_hiera_t512.yaml``
(no prefix). How they are called frame by frame is ``tracker``'s job, so the weights can be
checked and loaded without any of the video logic.

``load_checkpoint`` reads the authors' file (``{"model": state_dict}``, as their
``_load_checkpoint`` expects) with ``weights_only=True`` and loads it strictly: a wrong or
truncated file is a ``CheckpointMismatchError`` (an ``InputError``) that names the missing,
unexpected and mis-shaped tensors, never a silently half-initialised model.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from biomedseg.runtime.checkpoints import CheckpointMismatchError  # noqa: F401 -- raised here, caught by callers
from biomedseg.runtime.checkpoints import check_state_dict as check_state_dict_of
from biomedseg.runtime.checkpoints import read_state_dict_file

from .image_encoder import ImageEncoder
from .memory import MemoryAttention, MemoryEncoder
from .sam_heads import MLP, MaskDecoder, PromptEncoder

HIDDEN_DIM = 256  # image-embedding and prompt width
MEM_DIM = 64  # memory width (the memory encoder's out_proj)
NUM_MASKMEM = 7  # the conditioning frame slot plus 6 previous frames
IMAGE_SIZE = 512
BACKBONE_STRIDE = 16


class MedSAM2Net(nn.Module):
    """The modules and free tensors of SAM2Base for the T512 configuration, in the authors' order.

    Top-level tensors: ``maskmem_tpos_enc`` (temporal encoding of the 7 memory slots),
    ``no_mem_embed`` / ``no_mem_pos_enc`` (what an unconditioned frame gets), ``no_obj_ptr``
    (the pointer of a frame without the object) and ``no_obj_embed_spatial`` (added to the
    memory of such a frame). They start at zero: real values come from the checkpoint.
    """

    def __init__(self):
        super().__init__()
        embed = IMAGE_SIZE // BACKBONE_STRIDE
        # Registration order fixes the state-dict order: image encoder, mask_downsample, memory
        # attention and encoder, then the SAM heads and the pointer projections (as SAM2Base).
        self.image_encoder = ImageEncoder()
        # 512 -> 128: a mask prompt brought to the decoder's mask-input size to make a pointer
        self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)
        self.memory_attention = MemoryAttention()
        self.memory_encoder = MemoryEncoder()
        self.maskmem_tpos_enc = nn.Parameter(torch.zeros(NUM_MASKMEM, 1, 1, MEM_DIM))
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, HIDDEN_DIM))
        self.no_mem_pos_enc = nn.Parameter(torch.zeros(1, 1, HIDDEN_DIM))
        self.no_obj_ptr = nn.Parameter(torch.zeros(1, HIDDEN_DIM))
        self.no_obj_embed_spatial = nn.Parameter(torch.zeros(1, MEM_DIM))
        self.sam_prompt_encoder = PromptEncoder(embed_dim=HIDDEN_DIM, image_embedding_size=(embed, embed),
                                                input_image_size=(IMAGE_SIZE, IMAGE_SIZE), mask_in_chans=16)
        self.sam_mask_decoder = MaskDecoder(transformer_dim=HIDDEN_DIM)
        self.obj_ptr_proj = MLP(HIDDEN_DIM, HIDDEN_DIM, HIDDEN_DIM, 3)
        self.obj_ptr_tpos_proj = nn.Linear(HIDDEN_DIM, MEM_DIM)

    def forward(self, *args, **kwargs):
        raise NotImplementedError("MedSAM2Net holds the weights; run it through tracker.Tracker / video.ObjectVideo.")


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """{name: shape} of every tensor ``MedSAM2Net`` loads."""
    return {k: tuple(v.shape) for k, v in MedSAM2Net().state_dict().items()}


def check_state_dict(state: dict, expected: dict[str, tuple[int, ...]]) -> None:
    """Raise ``CheckpointMismatchError`` unless names and shapes equal ``expected`` exactly."""
    check_state_dict_of(state, expected, model='MedSAM2 (SAM2.1 Hiera-T, 512x512)',
                        hint='Use MedSAM2_latest.pt (or another MedSAM2 release of this size) from the authors.')


def read_state_dict(path: str | os.PathLike) -> dict:
    """The state dict under ``"model"`` of the authors' file (a bare state dict is accepted too)."""
    state = read_state_dict_file(path, model='MedSAM2', wrapper='model')
    return state


def load_checkpoint(path: str | os.PathLike) -> MedSAM2Net:
    """``MedSAM2Net`` in eval mode with the weights of ``path``, loaded strictly (float32, CPU)."""
    state = read_state_dict(path)
    net = MedSAM2Net()
    check_state_dict(state, {k: tuple(v.shape) for k, v in net.state_dict().items()})
    net.load_state_dict(state, strict=True)
    return net.eval()
