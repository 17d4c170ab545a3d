"""One frame of MedSAM2 tracking: SAM2Base's per-frame logic for the T512 configuration.

``Tracker`` turns a frame's image features, its prompts and a memory bank into that frame's
output (low-res mask logits, object pointer, object score) and, on request, its memory. It
keeps no video state: which frames make the memory bank is ``video.ObjectVideo``'s business,
and ``memory_plan`` says which of them enter, in which slot.

Configuration (``sam2.1_hiera_t512.yaml`` plus the NPZ predictor's build overrides), fixed here:
- multimask output for 0 or 1 prompt points (a box counts as two, so a box gives one mask);
  with one mask the decoder falls back to its best candidate when token 0 is unstable, but the
  object pointer stays token 0's; with multimask output the best candidate gives both;
- an object score <= 0 means "no object": the masks become ``NO_OBJ_SCORE``, the pointer is
  ``no_obj_ptr`` (fixed, not soft) and the memory gets ``no_obj_embed_spatial``;
- memory of a frame: mask sigmoid x20 -10, binarised (> 0) first for conditioning frames;
- memory bank: every conditioning frame (slot 6), then up to 6 previous frames of the pass
  (slot 0 = the frame just before), then object pointers (conditioning frames in the past of
  the pass, then up to min(n_frames, 16) - 1 previous frames) with their signed distance / 15
  (or / (n_frames - 1) for short videos) as a 1-D sine encoding, each pointer split in 4 tokens;
- a mask prompt is taken as the output itself (``use_mask_input_as_output_without_sam``).

``bf16_memory``: the authors' NPZ predictor stores every frame's memory features in bfloat16 and
attends to them after an implicit cast back to float32, so the whole effect is a bf16 round
trip of those features. True reproduces that (what the authors' code does on any device);
False keeps float32, which the fixture's plain keys were made with.

No hole filling (``fill_hole_area`` 0). The authors configure 8 px, but their filler is a
compiled CUDA extension; on CPU its import fails and their code silently returns the masks
unchanged. Their published CPU numbers (and this project's fixture) therefore have no hole
filling, and filling would move the tracked logits by up to 1.6e-2 through the memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .network import HIDDEN_DIM, IMAGE_SIZE, MEM_DIM, NUM_MASKMEM, MedSAM2Net

NO_OBJ_SCORE = -1024.0  # mask logits of a frame predicted not to hold the object
MAX_OBJ_PTRS = 16
SIGMOID_SCALE, SIGMOID_BIAS = 20.0, -10.0  # mask probability -> memory-encoder input
MULTIMASK_MIN_POINTS, MULTIMASK_MAX_POINTS = 0, 1
MASK_OUT_SCALE, MASK_OUT_BIAS = 20.0, -10.0  # a mask prompt as logits (+-10)
PREV_LOGITS_CLAMP = 32.0  # earlier logits fed back with new clicks, clamped as the authors do


@dataclass
class Prompt:
    """Point prompts in model pixels: coords [1, P, 2] (x, y) of the 512x512 input, labels [1, P]
    int32 (1 include, 0 exclude, 2 / 3 box corners)."""

    coords: torch.Tensor
    labels: torch.Tensor

    @property
    def n_points(self) -> int:
        return int(self.labels.shape[1])


@dataclass
class FrameOutput:
    """What a frame leaves behind: its low-res logits, pointer, score and (once encoded) its memory."""

    pred_masks: torch.Tensor  # [1, 1, 128, 128] low-res logits
    obj_ptr: torch.Tensor  # [1, 256]
    object_score_logits: torch.Tensor  # [1, 1]
    maskmem_features: torch.Tensor | None = None  # [1, 64, 32, 32]; bfloat16 when stored as bf16
    maskmem_pos_enc: torch.Tensor | None = None  # [1, 64, 32, 32]

    @property
    def object_score(self) -> float:
        return float(self.object_score_logits.reshape(-1)[0])


@dataclass
class MemoryBank:
    """The frames a tracked frame may attend to: all conditioning frames and the outputs of the
    current pass so far, with the pass direction (``reverse``: towards lower frame indices)."""

    cond: dict[int, FrameOutput]
    recent: dict[int, FrameOutput]
    reverse: bool = False


def memory_plan(frame: int, cond_frames, recent_frames, reverse: bool, n_frames: int):
    """(spatial, pointers) of ``frame``'s memory bank, in concatenation order.

    spatial: (frame, ``maskmem_tpos_enc`` index); pointers: (frame, signed temporal distance).
    Conditioning frames come first (ascending), in slot 6; then frames 6 .. 1 steps back in the
    pass direction, slot = steps - 1. Pointers: conditioning frames not in the future of the
    pass, then 1 .. min(n_frames, 16) - 1 steps back (stopping at the video's edge).
    """
    sign = -1 if reverse else 1
    cond_frames = sorted(cond_frames)
    spatial = [(t, NUM_MASKMEM - 1) for t in cond_frames]
    for steps in range(NUM_MASKMEM - 1, 0, -1):
        t = frame - sign * steps
        if t in recent_frames:
            spatial.append((t, steps - 1))
    pointers = [(t, (frame - t) * sign) for t in cond_frames if (t >= frame if reverse else t <= frame)]
    for steps in range(1, min(n_frames, MAX_OBJ_PTRS)):
        t = frame - sign * steps
        if t < 0 or t >= n_frames:
            break
        if t in recent_frames:
            pointers.append((t, steps))
    return spatial, pointers


def sine_1d(positions: torch.Tensor, dim: int, temperature: int = 10000) -> torch.Tensor:
    """[N] positions -> [N, dim] (sines then cosines), the pointers' temporal encoding."""
    half = dim // 2
    freq = torch.arange(half, dtype=torch.float32, device=positions.device)
    freq = temperature ** (2 * (freq // 2) / half)
    angles = positions.unsqueeze(-1) / freq
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def as_handed_around(x: torch.Tensor) -> torch.Tensor:
    """``x`` [B, C, H, W] flattened to the authors' sequence-first [HW, B, C] and viewed back.

    Same values, but the strides are the ones the authors' convolutions see; on CPU the 1x1 conv
    of the memory encoder picks another kernel (and rounding) for the plain channels-last layout.
    """
    b, c, h, w = x.shape
    return x.flatten(2).permute(2, 0, 1).permute(1, 2, 0).view(b, c, h, w)


class Tracker:
    """The per-frame computations of MedSAM2 on a ``MedSAM2Net`` (eval mode, any device)."""

    def __init__(self, net: MedSAM2Net, *, bf16_memory: bool = True):
        self.net = net.eval()
        self.bf16_memory = bool(bf16_memory)
        self._maskmem_pos_enc = None  # the same for every frame: one copy

    @property
    def device(self) -> torch.device:
        return self.net.no_mem_embed.device

    # ---- image features --------------------------------------------------------------------
    @torch.inference_mode()
    def encode_image(self, image: torch.Tensor) -> dict:
        """[1, 3, 512, 512] normalised frame -> {"backbone_fpn": 128/64/32 maps after ``conv_s0``/``conv_s1``
        (32, 64, 256 channels), "vision_pos_enc": their sine encodings}. Projecting the two high-res
        levels here (once per image, as the authors' forward_image) saves it on every prompt."""
        out = self.net.image_encoder(image.to(self.device).float())
        fpn = list(out["backbone_fpn"])
        decoder = self.net.sam_mask_decoder
        fpn[0], fpn[1] = decoder.conv_s0(fpn[0]), decoder.conv_s1(fpn[1])
        return {"backbone_fpn": fpn, "vision_pos_enc": list(out["vision_pos_enc"])}

    # ---- one frame -------------------------------------------------------------------------
    @torch.inference_mode()
    def track(self, frame: int, feats: dict, *, n_frames: int, memory: MemoryBank | None = None,
              prompt: Prompt | None = None, mask: torch.Tensor | None = None,
              prev_logits: torch.Tensor | None = None, encode_memory: bool = False,
              bf16_memory: bool | None = None) -> FrameOutput:
        """The output of ``frame``. ``memory`` None: a first conditioning frame (no memory, the
        no-memory embedding is added instead). ``mask`` [1, 1, 512, 512] in {0, 1}: the output
        is that mask. ``prev_logits``: this frame's earlier low-res logits, fed back with
        ``prompt``. ``encode_memory``: also encode the frame's memory from its sigmoid mask, as a
        tracked frame does."""
        high_res = [as_handed_around(x) for x in feats["backbone_fpn"][:2]]
        image = as_handed_around(feats["backbone_fpn"][-1])
        if mask is not None:
            low, high, ptr, score = self._mask_as_output(image, high_res, mask)
        else:
            pix = self._condition(frame, feats, memory, n_frames)
            mask_input = None
            if prev_logits is not None:
                mask_input = torch.clamp(prev_logits, -PREV_LOGITS_CLAMP, PREV_LOGITS_CLAMP)
            n_points = 0 if prompt is None else prompt.n_points
            multimask = MULTIMASK_MIN_POINTS <= n_points <= MULTIMASK_MAX_POINTS
            low, high, ptr, score = self._sam_heads(pix, high_res, prompt, mask_input, multimask)
        out = FrameOutput(low, ptr, score)
        if encode_memory:
            self._store_memory(out, image, high, binarize=False, bf16_memory=bf16_memory)
        return out

    @torch.inference_mode()
    def encode_prompted_memory(self, out: FrameOutput, feats: dict, bf16_memory: bool | None = None) -> None:
        """Memory of a conditioning frame from its stored low-res logits: upsampled to 512 and
        binarised, so the memory holds exactly the mask the user saw."""
        high = F.interpolate(out.pred_masks, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        image = as_handed_around(feats["backbone_fpn"][-1])
        self._store_memory(out, image, high, binarize=True, bf16_memory=bf16_memory)

    def video_logits(self, pred_masks: torch.Tensor, video_hw: tuple[int, int]) -> torch.Tensor:
        """[1, 1, 128, 128] low-res logits -> [H, W] float32 at video resolution (bilinear, as the authors)."""
        if tuple(pred_masks.shape[-2:]) != tuple(video_hw):
            pred_masks = F.interpolate(pred_masks, size=tuple(video_hw), mode="bilinear", align_corners=False)
        return pred_masks[0, 0].float()

    # ---- internals -------------------------------------------------------------------------
    def _condition(self, frame: int, feats: dict, memory: MemoryBank | None, n_frames: int) -> torch.Tensor:
        """The frame's 32x32 features fused with its memory bank -> [1, 256, 32, 32]."""
        net = self.net
        image = feats["backbone_fpn"][-1]
        b, c, h, w = image.shape
        curr = image.flatten(2).permute(2, 0, 1)  # [HW, B, C], the layout the authors attend in
        if memory is None:
            return (curr + net.no_mem_embed).permute(1, 2, 0).view(b, c, h, w)
        if not memory.cond:
            raise ValueError("a tracked frame needs at least one conditioning frame in its memory")
        curr_pos = feats["vision_pos_enc"][-1].flatten(2).permute(2, 0, 1)
        spatial, pointers = memory_plan(frame, memory.cond, memory.recent, memory.reverse, n_frames)
        source = {**memory.recent, **memory.cond}
        tokens, token_pos = [], []
        for t, slot in spatial:
            prev = source[t]
            tokens.append(prev.maskmem_features.to(self.device).float().flatten(2).permute(2, 0, 1))
            pos = prev.maskmem_pos_enc.to(self.device).flatten(2).permute(2, 0, 1)
            token_pos.append(pos + net.maskmem_tpos_enc[slot])
        n_ptr_tokens = 0
        if pointers:
            ptrs = torch.stack([source[t].obj_ptr for t, _ in pointers], dim=0)  # [P, B, 256]
            t_max = min(n_frames, MAX_OBJ_PTRS) - 1
            dist = torch.tensor([d for _, d in pointers], device=self.device)
            ptr_pos = net.obj_ptr_tpos_proj(sine_1d(dist / t_max, HIDDEN_DIM))
            ptr_pos = ptr_pos.unsqueeze(1).expand(-1, b, MEM_DIM)
            split = HIDDEN_DIM // MEM_DIM  # each 256-d pointer becomes 4 tokens of 64
            ptrs = ptrs.reshape(-1, b, split, MEM_DIM).permute(0, 2, 1, 3).flatten(0, 1)
            tokens.append(ptrs)
            token_pos.append(ptr_pos.repeat_interleave(split, dim=0))
            n_ptr_tokens = ptrs.shape[0]
        fused = net.memory_attention(curr=[curr], curr_pos=[curr_pos], memory=torch.cat(tokens, dim=0),
                                     memory_pos=torch.cat(token_pos, dim=0), num_obj_ptr_tokens=n_ptr_tokens)
        return fused.permute(1, 2, 0).view(b, c, h, w)

    def _sam_heads(self, image, high_res, prompt: Prompt | None, mask_input, multimask: bool):
        """Prompt encoder + mask decoder -> (low-res [1,1,128,128], 512 [1,1,512,512], pointer, score)."""
        net = self.net
        b = image.shape[0]
        if prompt is None:  # no clicks: one padding point
            coords = torch.zeros(b, 1, 2, device=self.device)
            labels = -torch.ones(b, 1, dtype=torch.int32, device=self.device)
        else:
            coords, labels = prompt.coords.to(self.device), prompt.labels.to(self.device)
        encoder = net.sam_prompt_encoder
        if mask_input is not None and tuple(mask_input.shape[-2:]) != tuple(encoder.mask_input_size):
            mask_input = F.interpolate(mask_input.float(), size=encoder.mask_input_size, align_corners=False,
                                       mode="bilinear", antialias=True)
        sparse, dense = encoder(points=(coords, labels), boxes=None, masks=mask_input)
        masks, ious, tokens, score = net.sam_mask_decoder(
            image_embeddings=image, image_pe=encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=multimask, repeat_image=False,
            high_res_features=high_res)
        present = score > 0
        masks = torch.where(present[:, None, None], masks, NO_OBJ_SCORE).float()
        high = F.interpolate(masks, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        token = tokens[:, 0]
        if multimask:
            best = torch.argmax(ious, dim=-1)
            rows = torch.arange(b, device=self.device)
            masks, high = masks[rows, best].unsqueeze(1), high[rows, best].unsqueeze(1)
            if tokens.size(1) > 1:
                token = tokens[rows, best]
        ptr = self._gate_pointer(net.obj_ptr_proj(token), present.float())
        return masks, high, ptr, score

    def _gate_pointer(self, ptr: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """The pointer where the object is present, ``no_obj_ptr`` where it is not (a hard switch)."""
        return present * ptr + (1 - present) * self.net.no_obj_ptr

    def _mask_as_output(self, image, high_res, mask: torch.Tensor):
        """A mask prompt as the frame's output (+-10 logits); the decoder only makes its pointer."""
        mask = mask.to(self.device).float()
        high = mask * MASK_OUT_SCALE + MASK_OUT_BIAS
        low = F.interpolate(high, size=(high.size(-2) // 4, high.size(-1) // 4), align_corners=False,
                            mode="bilinear", antialias=True)
        _, _, ptr, _ = self._sam_heads(image, high_res, None, self.net.mask_downsample(mask), multimask=False)
        present = torch.any(mask.flatten(1) > 0.0, dim=1)[..., None].float()
        score = MASK_OUT_SCALE * present + MASK_OUT_BIAS
        return low, high, self._gate_pointer(ptr, present), score

    def _store_memory(self, out: FrameOutput, image, high_res_masks, *, binarize: bool, bf16_memory) -> None:
        """Run the memory encoder on the frame's 512 mask and keep the result in ``out``."""
        net = self.net
        prob = (high_res_masks > 0).float() if binarize else torch.sigmoid(high_res_masks)
        prob = prob * SIGMOID_SCALE + SIGMOID_BIAS
        enc = net.memory_encoder(image, prob, skip_mask_sigmoid=True)
        feats = enc["vision_features"]
        absent = 1 - (out.object_score_logits > 0).float()
        feats = feats + absent[..., None, None] * net.no_obj_embed_spatial[..., None, None].expand(*feats.shape)
        bf16 = self.bf16_memory if bf16_memory is None else bf16_memory
        out.maskmem_features = feats.to(torch.bfloat16) if bf16 else feats
        if self._maskmem_pos_enc is None or self._maskmem_pos_enc.device != feats.device:
            self._maskmem_pos_enc = enc["vision_pos_enc"][-1][0:1].clone()
        out.maskmem_pos_enc = self._maskmem_pos_enc
