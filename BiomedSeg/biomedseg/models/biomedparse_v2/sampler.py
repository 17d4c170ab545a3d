"""The decoder's attention masks: Boltzmann sampling (the authors' inference) or masks given in advance.

BoltzFormer does not threshold the predicted masks into a cross-attention mask as Mask2Former does.
At every prediction-head call (``layer_id`` -1 before layer 0, then 0..8 after each layer) the
sigmoid map ``a`` of each query, resized to the next feature level and repeated over the heads
(row ``item * heads + h``), becomes a Boltzmann distribution over the level's positions,
``p = softmax(a / T)`` with ``T = base_temp / (2 + layer_id)``. A position stays blocked with the
probability that ``n = int(0.1 * HW)`` independent draws from ``p`` all miss it, ``(1 - p) ** n``; one
uniform draw per (row, query, position) decides. With the released threshold 1.1 every position
starts blocked, so the draws decide everything (about 91-98 % of positions stay blocked).

This is random in the authors' code (``torch.rand_like``, global generator, no seed). Here the
randomness is an object the caller passes to the decoder, so it can be

* ``BoltzmannSampler(generator)``: the authors' draws, from ``generator``; or
* ``InjectedMasks(masks)``: masks recorded elsewhere (the parity fixtures), returned in order.

Both are called as ``sampler(attn_prob, layer_id, num_heads) -> bool [items * heads, Q, HW]``
(True = blocked) with ``attn_prob`` the sigmoid map [items, Q, HW]; the decoder then unmasks
rows that are blocked everywhere, as the authors do.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: The released configuration (``boltzmann_sampling`` in ``configs/model/biomedparse_3D.yaml``).
MASK_THRESHOLD = 1.1
SAMPLE_RATIO = 0.1
BASE_TEMP = 1.0
#: Seed of the default sampler: the authors' reference run set ``torch.manual_seed(0)`` before the model call.
DEFAULT_SEED = 0


class BoltzmannSampler:
    """The authors' Boltzmann sampling of attention masks, drawing from ``generator``.

    Each call draws one float32 tensor of shape [items * heads, Q, HW] with ``torch.rand`` -- the same
    shape, dtype and order as the authors' ``torch.rand_like`` -- so a CPU generator in the state
    ``torch.manual_seed(s)`` leaves reproduces their draws for a run started after ``torch.manual_seed(s)``.

    Seed rule (what makes a result repeatable): ``BoltzmannSampler.seeded(seed)`` is a fresh CPU
    generator seeded with ``seed`` (default 0). A volume run (``inference.segment_slices``) uses one
    fresh sampler and consumes 10 draws per slice batch (head calls -1..8, the last drawn but unused),
    batch after batch. So the same slices, prompts (their order and count), ``slice_batch_size`` and
    seed give the same masks; a slice's masks depend on its batch and its place in it, as in the
    authors' code. A re-prompt that decodes cached slice batches in the same order with a fresh sampler
    of the same seed therefore gives what a first run would.

    Draws are made on the generator's device and moved to the masks' device: a CPU generator gives
    the same masks on CPU and GPU (CUDA generators draw other numbers). ``generator=None`` uses
    torch's global generator on the masks' device, exactly as the authors' code does.
    """

    def __init__(self, generator: torch.Generator | None, *, mask_threshold: float = MASK_THRESHOLD,
                 sample_ratio: float = SAMPLE_RATIO, base_temp: float = BASE_TEMP):
        self.generator = generator
        self.mask_threshold = mask_threshold
        self.sample_ratio = sample_ratio
        self.base_temp = base_temp
        self.calls = 0

    @classmethod
    def seeded(cls, seed: int = DEFAULT_SEED) -> BoltzmannSampler:
        """A sampler on a fresh CPU generator seeded with ``seed`` (see the seed rule above)."""
        return cls(torch.Generator(device="cpu").manual_seed(int(seed)))

    def _draw(self, like: torch.Tensor) -> torch.Tensor:
        if self.generator is None:
            return torch.rand_like(like)
        draws = torch.rand(like.shape, generator=self.generator, dtype=like.dtype, device=self.generator.device)
        return draws.to(like.device)

    def __call__(self, attn_prob: torch.Tensor, layer_id: int, num_heads: int) -> torch.Tensor:
        # The authors' op sequence on the head-repeated map, so every float op sees the same shapes.
        prob = attn_prob.unsqueeze(1).repeat(1, num_heads, 1, 1).flatten(0, 1)
        maskable = prob < self.mask_threshold
        temp = self.base_temp / (2 + layer_id)
        boltzmann = torch.exp(prob / temp)
        boltzmann = boltzmann * maskable.float()
        boltzmann = boltzmann / boltzmann.sum(dim=-1, keepdim=True)
        n_samples = int(prob.shape[-1] * self.sample_ratio)
        still_masked = (1 - boltzmann) ** n_samples
        blocked = self._draw(boltzmann) < still_masked
        self.calls += 1
        return torch.logical_and(maskable, blocked)


class InjectedMasks:
    """Attention masks given in advance (bool [rows, Q, HW], True = blocked), returned one per call in order.

    For parity runs: the fixtures store the authors' sampled masks, so decoding with them isolates the
    arithmetic from the randomness. Each mask must have the shape the decoder asks for; a copy is
    returned because the decoder unmasks fully blocked rows in place.
    """

    def __init__(self, masks: Sequence[torch.Tensor]):
        self.masks = list(masks)
        self.calls = 0

    def __call__(self, attn_prob: torch.Tensor, layer_id: int, num_heads: int) -> torch.Tensor:
        if self.calls >= len(self.masks):
            raise IndexError(f"InjectedMasks: call {self.calls} asked for a mask; only {len(self.masks)} were given")
        mask = torch.as_tensor(self.masks[self.calls])
        want = (attn_prob.shape[0] * num_heads, *attn_prob.shape[1:])
        if tuple(mask.shape) != want:
            raise ValueError(f"InjectedMasks: call {self.calls} (layer {layer_id}) needs {want}, "
                             f"got {tuple(mask.shape)}")
        self.calls += 1
        return mask.to(device=attn_prob.device, dtype=torch.bool, copy=True)


def unpack_mask(packed: np.ndarray, hw: int) -> torch.Tensor:
    """A fixture's bit-packed mask (``np.packbits(..., axis=-1, bitorder='little')``) -> bool [rows, Q, hw]."""
    bits = np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=-1, bitorder="little")[..., :hw]
    return torch.from_numpy(bits.astype(bool))
