"""SAM2 memory attention (RoPE) and memory encoder, under the authors' names.

``MemoryAttention`` conditions the current frame's 32x32 image tokens on the memory bank: the
spatial memories of earlier frames (1024 tokens of 64 features each, per frame) followed by the
object-pointer tokens (each 256-d pointer split into 4 tokens of 64). Attention uses axial rotary
position encoding on the 32x32 grid; in cross-attention the grid's table is tiled over every
spatial memory (``rope_k_repeat``) and the trailing pointer tokens, which have no grid position,
are left unrotated (``num_k_exclude_rope``). Tensors are sequence-first ([L, B, C]), as the
authors' network passes them.

``MemoryEncoder`` fuses a frame's features with its (scaled) mask into the 64-d memory.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .image_encoder import PositionEmbeddingSine
from .sam_heads import Attention, LayerNorm2d


# ---- rotary position encoding --------------------------------------------------------------
def axial_rope_table(dim: int, end_x: int, end_y: int, theta: float = 10000.0) -> torch.Tensor:
    """[end_x * end_y, dim // 2] complex unit rotations of a row-major grid.

    The first dim // 4 feature pairs turn with the column (x), the last dim // 4 with the row (y);
    pair m of each half turns by position * theta ** (-4m / dim).
    """
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 4)[: dim // 4].float() / dim))
    t = torch.arange(end_x * end_y, dtype=torch.float32)
    t_x = t % end_x
    t_y = torch.div(t, end_x, rounding_mode="floor")
    ang_x = torch.outer(t_x, freqs)
    ang_y = torch.outer(t_y, freqs)
    return torch.cat([torch.polar(torch.ones_like(ang_x), ang_x), torch.polar(torch.ones_like(ang_y), ang_y)], dim=-1)


def _rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent feature pairs of [B, heads, N, C] by the [N, C // 2] complex table."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * table).flatten(3).type_as(x)


def apply_rope(q: torch.Tensor, k: torch.Tensor, table: torch.Tensor, repeat_k: bool = False):
    """(q, k) rotated by their grid positions; with ``repeat_k`` the keys are whole grids laid end to
    end (one per memory frame), each rotated like the query grid."""
    q_out = _rotate(q, table)
    if k.shape[-2] == 0:
        return q_out, k
    if k.shape[-2] != q.shape[-2]:
        if not repeat_k or k.shape[-2] % q.shape[-2]:
            raise ValueError(f"{k.shape[-2]} keys are not whole copies of the {q.shape[-2]}-token query grid")
        table = table.repeat(k.shape[-2] // q.shape[-2], 1)
    return q_out, _rotate(k, table)


class RoPEAttention(Attention):
    """Attention with axial RoPE on q and k (after projection, per head).

    The table is a plain attribute (not in the state dict), rebuilt when the query grid changes size.
    """

    def __init__(self, *args, rope_theta: float = 10000.0, rope_k_repeat: bool = False,
                 feat_sizes: tuple[int, int] = (32, 32), **kwargs):
        super().__init__(*args, **kwargs)
        self.rope_theta = rope_theta
        self.rope_k_repeat = rope_k_repeat
        self.freqs_cis = self._table(feat_sizes[0], feat_sizes[1])

    def _table(self, end_x: int, end_y: int) -> torch.Tensor:
        return axial_rope_table(self.internal_dim // self.num_heads, end_x, end_y, self.rope_theta)

    def _freqs_for(self, n_query: int, device) -> torch.Tensor:
        if self.freqs_cis.shape[0] != n_query:
            side = math.isqrt(n_query)
            if side * side != n_query:
                raise ValueError(f"RoPE needs a square query grid, got {n_query} tokens")
            self.freqs_cis = self._table(side, side)
        self.freqs_cis = self.freqs_cis.to(device)
        return self.freqs_cis

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_k_exclude_rope: int = 0) -> torch.Tensor:
        """[B, Nq, C] queries, [B, Nk, kv_in_dim] keys/values; the last ``num_k_exclude_rope`` keys keep no position."""
        q, k, v = self._project(q, k, v)
        if q.shape[-2] != k.shape[-2] and not self.rope_k_repeat:
            raise ValueError("keys and queries differ in length; cross-attention needs rope_k_repeat")
        table = self._freqs_for(q.shape[-2], q.device)
        n_rope = k.shape[-2] - num_k_exclude_rope
        q, k_rot = apply_rope(q, k[:, :, :n_rope], table, repeat_k=self.rope_k_repeat)
        k = torch.cat([k_rot, k[:, :, n_rope:]], dim=-2)
        return self._attend(q, k, v)


# ---- memory attention ----------------------------------------------------------------------
class MemoryAttentionLayer(nn.Module):
    """Pre-norm: RoPE self-attention, RoPE cross-attention to the memory, ReLU FFN (residual each)."""

    def __init__(self, d_model: int = 256, dim_feedforward: int = 2048, dropout: float = 0.1, kv_in_dim: int = 64,
                 rope_theta: float = 10000.0, feat_sizes: tuple[int, int] = (32, 32), activation: str = "relu",
                 pos_enc_at_attn: bool = False, pos_enc_at_cross_attn_keys: bool = True,
                 pos_enc_at_cross_attn_queries: bool = False):
        super().__init__()
        self.d_model = d_model
        self.dim_feedforward = dim_feedforward
        self.self_attn = RoPEAttention(d_model, 1, dropout=dropout, rope_theta=rope_theta, feat_sizes=feat_sizes)
        self.cross_attn_image = RoPEAttention(d_model, 1, dropout=dropout, kv_in_dim=kv_in_dim, rope_theta=rope_theta,
                                              feat_sizes=feat_sizes, rope_k_repeat=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = {"relu": F.relu, "gelu": F.gelu}[activation]
        self.pos_enc_at_attn = pos_enc_at_attn
        self.pos_enc_at_cross_attn_keys = pos_enc_at_cross_attn_keys
        self.pos_enc_at_cross_attn_queries = pos_enc_at_cross_attn_queries

    def forward(self, tgt, memory, pos=None, query_pos=None, num_k_exclude_rope: int = 0) -> torch.Tensor:
        """Batch-first [B, HW, C] tokens, [B, M, kv_in_dim] memory and its encoding ``pos``."""
        x = self.norm1(tgt)
        qk = x + query_pos if self.pos_enc_at_attn else x
        tgt = tgt + self.dropout1(self.self_attn(qk, qk, v=x))

        x = self.norm2(tgt)
        x = self.cross_attn_image(
            q=x + query_pos if self.pos_enc_at_cross_attn_queries else x,
            k=memory + pos if self.pos_enc_at_cross_attn_keys else memory,
            v=memory, num_k_exclude_rope=num_k_exclude_rope)
        tgt = tgt + self.dropout2(x)

        x = self.linear2(self.dropout(self.activation(self.linear1(self.norm3(tgt)))))
        return tgt + self.dropout3(x)


class MemoryAttention(nn.Module):
    """``num_layers`` memory-attention layers and a final LayerNorm; sequence-first in and out."""

    def __init__(self, d_model: int = 256, pos_enc_at_input: bool = True, num_layers: int = 4,
                 dim_feedforward: int = 2048, dropout: float = 0.1, kv_in_dim: int = 64, rope_theta: float = 10000.0,
                 feat_sizes: tuple[int, int] = (32, 32), batch_first: bool = True):
        super().__init__()
        self.d_model = d_model
        self.layers = nn.ModuleList(
            MemoryAttentionLayer(d_model, dim_feedforward, dropout, kv_in_dim, rope_theta, feat_sizes)
            for _ in range(num_layers))
        self.num_layers = num_layers
        self.norm = nn.LayerNorm(d_model)
        self.pos_enc_at_input = pos_enc_at_input
        self.batch_first = batch_first

    def forward(self, curr, memory: torch.Tensor, curr_pos=None, memory_pos: torch.Tensor | None = None,
                num_obj_ptr_tokens: int = 0) -> torch.Tensor:
        """curr [HW, B, C] (or a one-element list), memory [M, B, 64] whose last ``num_obj_ptr_tokens``
        are object-pointer tokens (not rotated) -> [HW, B, C]."""
        if isinstance(curr, (list, tuple)):
            if len(curr) != 1 or not isinstance(curr_pos, (list, tuple)) or len(curr_pos) != 1:
                raise ValueError("curr and curr_pos must be one-element lists (the 32x32 level only)")
            curr, curr_pos = curr[0], curr_pos[0]
        if curr.shape[1] != memory.shape[1]:
            raise ValueError(f"batch sizes differ: current {curr.shape[1]}, memory {memory.shape[1]}")
        out = curr
        if self.pos_enc_at_input and curr_pos is not None:
            out = out + 0.1 * curr_pos
        if self.batch_first:
            out, memory = out.transpose(0, 1), memory.transpose(0, 1)
            curr_pos = curr_pos.transpose(0, 1) if curr_pos is not None else None
            memory_pos = memory_pos.transpose(0, 1) if memory_pos is not None else None
        for layer in self.layers:
            out = layer(tgt=out, memory=memory, pos=memory_pos, query_pos=curr_pos,
                        num_k_exclude_rope=num_obj_ptr_tokens)
        out = self.norm(out)
        return out.transpose(0, 1) if self.batch_first else out


# ---- memory encoder ------------------------------------------------------------------------
class MaskDownSampler(nn.Module):
    """Mask -> ``embed_dim`` channels at 1/``total_stride``: (conv, LayerNorm2d, GELU) per stride step,
    channels times stride**2 each step, then a 1x1 conv (keys ``encoder.0`` ... ``encoder.12``)."""

    def __init__(self, embed_dim: int = 256, kernel_size: int = 3, stride: int = 2, padding: int = 1,
                 total_stride: int = 16, activation: type[nn.Module] = nn.GELU):
        super().__init__()
        steps = round(math.log(total_stride, stride))
        if stride ** steps != total_stride:
            raise ValueError(f"total_stride {total_stride} is not a power of stride {stride}")
        self.encoder = nn.Sequential()
        chans = 1
        for _ in range(steps):
            out = chans * stride ** 2
            self.encoder.append(nn.Conv2d(chans, out, kernel_size=kernel_size, stride=stride, padding=padding))
            self.encoder.append(LayerNorm2d(out))
            self.encoder.append(activation())
            chans = out
        self.encoder.append(nn.Conv2d(chans, embed_dim, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class CXBlock(nn.Module):
    """ConvNeXt block: depth-wise conv, LayerNorm2d, MLP on channels-last, layer scale, residual."""

    def __init__(self, dim: int = 256, kernel_size: int = 7, padding: int = 3, layer_scale_init_value: float = 1e-6,
                 use_dwconv: bool = True):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=kernel_size, padding=padding, groups=dim if use_dwconv else 1)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim)) if layer_scale_init_value > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x)).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = self.gamma * y
        return x + y.permute(0, 3, 1, 2)


class Fuser(nn.Module):
    """A stack of CXBlocks (no input projection in this configuration)."""

    def __init__(self, dim: int = 256, num_layers: int = 2, kernel_size: int = 7, padding: int = 3,
                 layer_scale_init_value: float = 1e-6):
        super().__init__()
        self.proj = nn.Identity()
        self.layers = nn.ModuleList(CXBlock(dim, kernel_size, padding, layer_scale_init_value) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        for layer in self.layers:
            x = layer(x)
        return x


class MemoryEncoder(nn.Module):
    """Frame features [B, 256, 32, 32] + mask [B, 1, 512, 512] -> 64-d memory and its sine encoding."""

    def __init__(self, out_dim: int = 64, in_dim: int = 256, mask_kernel_size: int = 3, mask_stride: int = 2,
                 mask_padding: int = 1, mask_total_stride: int = 16, fuser_layers: int = 2):
        super().__init__()
        self.mask_downsampler = MaskDownSampler(in_dim, mask_kernel_size, mask_stride, mask_padding, mask_total_stride)
        self.pix_feat_proj = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.fuser = Fuser(in_dim, fuser_layers)
        self.position_encoding = PositionEmbeddingSine(out_dim, normalize=True, scale=None, temperature=10000)
        self.out_proj = nn.Conv2d(in_dim, out_dim, kernel_size=1) if out_dim != in_dim else nn.Identity()

    def forward(self, pix_feat: torch.Tensor, masks: torch.Tensor, skip_mask_sigmoid: bool = False) -> dict:
        """``skip_mask_sigmoid``: the masks are already probabilities (the network passes its scaled,
        biased sigmoid or binarised mask); otherwise they are logits and get a sigmoid here."""
        if not skip_mask_sigmoid:
            masks = torch.sigmoid(masks)
        masks = self.mask_downsampler(masks)
        x = self.pix_feat_proj(pix_feat.to(masks.device)) + masks
        x = self.out_proj(self.fuser(x))
        pos = self.position_encoding(x).to(x.dtype)
        return {"vision_features": x, "vision_pos_enc": [pos]}
