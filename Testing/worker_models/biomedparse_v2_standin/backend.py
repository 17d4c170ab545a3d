"""Model 'biomedparse-v2-standin': BiomedParse v2's own backend (intensity rule, display orientation,
slice packing with the authors' edge rule, batches, feature cache, existence gating, slice NMS,
mapping back) around a stand-in for ``V2Inference``, so geometry and neighbours can be checked
through a real worker without a checkpoint.

The stand-in answers with simple functions of the packed input it is given. It reads each
channel at every 4th pixel (offset 1) of the 512x512 packing, which for a 128x128 slice of
0/255 pixels is that slice's own pixel grid, and calls a pixel *bright* when its normalised
value is above 127.5 of 255. Per prompt (channels: 0 = slice i, 1 = i-1, 2 = i+1):

* ``target``: mask = bright(i) & bright(i-1) & ~bright(i+1) (asymmetric in previous/next, so a
  swapped or mis-ruled neighbour moves it), existence +3 when slice i-1 has a bright pixel, else -3;
* ``right``: mask = the first 16 display columns (patient right in the axial view), existence +4;
* ``geometry``: the mask of ``target`` or the last 16 display columns (patient left), existence as
  ``target``: row bands and a band on the right of the display only, so that mapping the 128-grid
  answer back through the authors' resize and nearest restore is exact for every pixel (a pattern
  with top-left corners would lose them to the quarter-pixel shift of that restore);
* ``previous`` / ``current`` / ``next``: the whole slice, existence +3 when that channel has a
  bright pixel, else -3 (where each neighbour came from, slice by slice);
* ``absent``: mask = bright(i), existence -3 on every slice;
* ``twin``: the mask of ``target`` with existence +2, so the authors' slice NMS drops it.

Mask logits are +-8; the decoder's sampler is drawn once per batch and nudges them by at most
0.01, so a seed changes the probabilities but never a decision.
"""
from __future__ import annotations

import torch

from biomedseg.models.biomedparse_v2.backend import BiomedParseV2Backend

#: A packed (normalised) value above this was brighter than 127.5 of 255 (the authors' mean and std).
BRIGHT = (127.5 - 114.49500274658203) / 57.630001068115234
LOGIT = 8.0


class StandInFeatures:
    """What ``V2Inference.encode`` returns, reduced to the packed channels on the 128 grid."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def select(self, indices):
        return StandInFeatures(self.x[list(indices)])

    def cpu(self):
        return StandInFeatures(self.x.cpu())

    def to(self, device):
        return StandInFeatures(self.x.to(device))


def _rule(name: str, cur, prev, nxt):
    """(mask [B, 128, 128] bool, existence logit [B]) of one prompt."""
    b = cur.shape[0]
    channel = {"previous": prev, "current": cur, "next": nxt}

    def present(flag):
        return torch.where(flag.flatten(1).any(1), 3.0, -3.0)

    if name in ("target", "twin"):
        return cur & prev & ~nxt, present(prev) - (1.0 if name == "twin" else 0.0)
    if name == "geometry":
        left = torch.zeros_like(cur)
        left[:, :, -16:] = True
        return (cur & prev & ~nxt) | left, present(prev)
    if name == "right":
        mask = torch.zeros_like(cur)
        mask[:, :, :16] = True
        return mask, torch.full((b,), 4.0)
    if name in channel:
        return torch.ones_like(cur), present(channel[name])
    if name == "absent":
        return cur, torch.full((b,), -3.0)
    raise ValueError(f"the v2 stand-in has no rule for prompt {name!r}")


class StandInInference:
    """Stand-in for ``biomedparse_v2.inference.V2Inference`` (same three calls, same shapes)."""

    net = None

    def __init__(self):
        self.encoded = 0

    def encode(self, packed: torch.Tensor) -> StandInFeatures:
        assert packed.dtype == torch.float32 and tuple(packed.shape[1:]) == (3, 512, 512), packed.shape
        self.encoded += len(packed)
        return StandInFeatures(packed[:, :, 1::4, 1::4].clone())

    def prompt_tokens(self, prompts: list[str]) -> list[str]:
        return list(prompts)

    def decode(self, features: StandInFeatures, tokens, sampler):
        cur, prev, nxt = (features.x[:, c] > BRIGHT for c in range(3))
        rules = [_rule(name, cur, prev, nxt) for name in tokens]
        logits = torch.stack([torch.where(m, LOGIT, -LOGIT) for m, _ in rules], 1)  # [B, P, 128, 128]
        existence = torch.stack([e for _, e in rules], 1).float()  # [B, P]
        b, p = logits.shape[:2]
        coarse = torch.sigmoid(logits[:, :, ::8, ::8]).reshape(b * p, 1, 256)  # one draw per batch, on 16 x 16
        blocked = sampler(coarse, 0, 1).reshape(b, p, 16, 1, 16, 1).expand(b, p, 16, 8, 16, 8)
        return logits + 0.01 * blocked.reshape(b, p, 128, 128).float(), existence


class StandInV2Backend(BiomedParseV2Backend):
    """BiomedParse v2's plan and run with ``StandInInference`` as the network."""

    def load(self, context):
        self.inference = StandInInference()
