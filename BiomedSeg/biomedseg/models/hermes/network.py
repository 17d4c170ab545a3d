"""Hermes-R: a 3D residual U-Net whose features trade information with learned task and
modality tokens (Gao et al., CVPR 2024), written here in plain PyTorch.

Attribute names follow the authors' ``state_dict`` key for key (``inc.conv2.conv1.conv``,
``prior_init_fuse_2.attn_layers.0.prior_ffn.fn.fc1`` ...) so their released checkpoint
loads with ``strict=True``; the code itself is our own. Numerics follow the authors'
inference path: pre-activation blocks (InstanceNorm eps 1e-4 -> ReLU -> conv), trilinear
upsampling with ``align_corners=True`` to the skip size, cross-attention with 32-wide
heads, GELU MLPs, and a per-task 32-d kernel dotted with the last feature map.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Constructor arguments of the released Hermes-R (config/universal/hermes_resunet_3d.yaml).
HERMES_R_CONFIG = dict(in_ch=1, base_ch=32, num_block=(2, 2, 2, 2), n_tasks=72, n_modalities=6)
#: Rows of ``task_prior``: 72 task slots plus the null token that ``-1`` selects (row 72).
N_TASK_ROWS = 73
#: Tokens that stand for one modality.
TOKENS_PER_MODALITY = 10


class ConvNormAct(nn.Module):
    """Pre-activation unit: InstanceNorm(eps 1e-4, no affine) -> ReLU -> 3x3x3 conv.

    The norm holds no parameters, so only ``conv.weight`` appears in the state dict.
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm = nn.InstanceNorm3d(in_ch, eps=1e-4, affine=False, track_running_stats=False)
        self.act = nn.ReLU()
        self.conv = nn.Conv3d(in_ch, out_ch, kernel_size=3, padding=1, bias=False)

    def forward(self, x):
        return self.conv(self.act(self.norm(x)))


class BasicBlock(nn.Module):
    """Two pre-activation convs plus a residual; the residual gets its own
    pre-activation conv when the channel count changes (keys ``shortcut.conv``)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = ConvNormAct(in_ch, out_ch)
        self.conv2 = ConvNormAct(out_ch, out_ch)
        self.shortcut = ConvNormAct(in_ch, out_ch) if in_ch != out_ch else nn.Identity()

    def forward(self, x):
        return self.conv2(self.conv1(x)) + self.shortcut(x)


class InConv(nn.Module):
    """Stem: a plain conv (no norm before it) followed by one residual block."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, kernel_size=3, padding=1, bias=False)
        self.conv2 = BasicBlock(out_ch, out_ch)

    def forward(self, x):
        return self.conv2(self.conv1(x))


class DownBlock(nn.Module):
    """2x max-pool then ``n`` residual blocks; index 0 of ``conv`` is the pool, which is
    why the first block's keys read ``conv.1``."""

    def __init__(self, in_ch: int, out_ch: int, n: int):
        super().__init__()
        blocks = [nn.MaxPool3d(2), BasicBlock(in_ch, out_ch)]
        blocks += [BasicBlock(out_ch, out_ch) for _ in range(n - 1)]
        self.conv = nn.Sequential(*blocks)

    def forward(self, x):
        return self.conv(x)


class UpBlock(nn.Module):
    """Resize the coarse map to the skip's size (trilinear, corners aligned, in float32
    as the authors do for mixed precision), concatenate [skip, upsampled], then blocks.
    Resizing to the skip size is what lets inputs of any size >= 16 work."""

    def __init__(self, in_ch: int, out_ch: int, n: int):
        super().__init__()
        blocks = [BasicBlock(in_ch + out_ch, out_ch)]
        blocks += [BasicBlock(out_ch, out_ch) for _ in range(n - 1)]
        self.conv = nn.Sequential(*blocks)

    def forward(self, x, skip):
        up = F.interpolate(x.float(), size=skip.shape[2:], mode="trilinear", align_corners=True).to(x.dtype)
        return self.conv(torch.cat([skip, up], dim=1))


class Mlp(nn.Module):
    """Linear -> exact GELU -> Linear (keys ``fc1``, ``fc2``)."""

    def __init__(self, in_dim: int, hid_dim: int | None = None, out_dim: int | None = None):
        super().__init__()
        hid_dim = hid_dim or in_dim
        self.fc1 = nn.Linear(in_dim, hid_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hid_dim, out_dim or in_dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CrossAttention(nn.Module):
    """Queries from one token set, keys/values from the other; no qkv bias, biased output."""

    def __init__(self, dim: int, heads: int, dim_head: int = 32):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.scale = dim_head ** -0.5
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def _split(self, t):
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).permute(0, 2, 1, 3).contiguous()  # (b, h, n, d)

    def forward(self, queries, context):
        # einsum on contiguous (b, h, n, d) blocks: the same kernels as the authors' code,
        # which keeps our outputs bit-identical to theirs on CPU.
        q = self._split(self.to_q(queries))
        k, v = (self._split(t) for t in self.to_kv(context).chunk(2, dim=-1))
        attn = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k) * self.scale, dim=-1)
        out = torch.einsum("bhij,bhjd->bhid", attn, v)
        b, n = queries.shape[:2]
        return self.to_out(out.permute(0, 2, 1, 3).contiguous().view(b, n, -1))


class DualPreNorm(nn.Module):
    """LayerNorm each side (default eps 1e-5) before cross-attention."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, queries, context):
        return self.fn(self.norm1(queries), self.norm2(context))


class PreNorm(nn.Module):
    """LayerNorm with eps 1e-4 (the authors' choice here) before a feed-forward net."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-4)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.norm(x))


class PriorAttentionBlock(nn.Module):
    """One two-way exchange: tokens read the feature map, then the feature map reads the
    updated tokens; each step is residual and followed by a residual 4x MLP."""

    def __init__(self, dim: int):
        super().__init__()
        heads = dim // 32
        self.prior_aggregate_block = DualPreNorm(dim, CrossAttention(dim, heads))
        self.prior_ffn = PreNorm(dim, Mlp(dim, 4 * dim, dim))
        self.feat_aggregate_block = DualPreNorm(dim, CrossAttention(dim, heads))
        self.feat_ffn = PreNorm(dim, Mlp(dim, 4 * dim, dim))

    def forward(self, feats, priors):
        priors = self.prior_aggregate_block(priors, feats) + priors
        priors = self.prior_ffn(priors) + priors
        feats = self.feat_aggregate_block(feats, priors) + feats
        feats = self.feat_ffn(feats) + feats
        return feats, priors


class PriorInitFusionLayer(nn.Module):
    """Pick each sample's task tokens (``task_prior[tgt_idx]``; -1 -> null row 72) and its
    10 modality tokens (``modality_prior[mod_idx]``; -1 -> row 5, "unknown"), run them
    through ``n_blocks`` exchanges with the flattened feature map, and return both.

    Returned tokens are (B, T + 10, C): the T task tokens first, then the modality tokens.
    """

    def __init__(self, dim: int, n_blocks: int, n_tasks: int = 72, n_modalities: int = 6):
        super().__init__()
        self.task_prior = nn.Parameter(torch.zeros(n_tasks + 1, dim))
        self.modality_prior = nn.Parameter(torch.zeros(n_modalities, TOKENS_PER_MODALITY, dim))
        nn.init.xavier_uniform_(self.task_prior)
        nn.init.xavier_uniform_(self.modality_prior)
        self.attn_layers = nn.ModuleList(PriorAttentionBlock(dim) for _ in range(n_blocks))

    def forward(self, x, tgt_idx, mod_idx):
        b, c, d, h, w = x.shape
        priors = torch.cat([self.task_prior[tgt_idx], self.modality_prior[mod_idx[:, 0]]], dim=1)
        # Tokens are made contiguous (B, N, C): a transposed view would send the linear
        # layers down another GEMM path and cost bitwise agreement with the reference.
        feats = x.view(b, c, -1).permute(0, 2, 1).contiguous()
        for layer in self.attn_layers:
            feats, priors = layer(feats, priors)
        return feats.permute(0, 2, 1).contiguous().view(b, c, d, h, w), priors


class HierarchyPriorClassifier(nn.Module):
    """Concatenate a task's tokens from all five scales, map them to a 32-d kernel, and
    dot that kernel with every voxel of the last feature map: one logit map per task."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.classifier_pred = nn.Sequential(Mlp(in_dim, out_dim=out_dim), Mlp(out_dim, out_dim=out_dim))

    def forward(self, feats, task_tokens: list):
        kernels = self.classifier_pred(self.norm(torch.cat(task_tokens, dim=2)))  # (B, T, C)
        b, c = feats.shape[:2]
        voxels = feats.view(b, c, -1).permute(0, 2, 1).contiguous()  # (B, N, C)
        logits = torch.bmm(voxels, kernels.to(voxels.dtype).permute(0, 2, 1))  # (B, N, T)
        return logits.permute(0, 2, 1).contiguous().view(b, kernels.shape[1], *feats.shape[2:])


class ModalityClassifier(nn.Module):
    """Average the modality tokens over the 10 slots and classify the modality (6 logits)."""

    def __init__(self, in_dim: int, n_out: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.classifier = Mlp(in_dim, out_dim=n_out)

    def forward(self, mod_tokens: list):
        return self.classifier(self.norm(torch.cat(mod_tokens, dim=2)).mean(dim=1))


class HermesResUNet(nn.Module):
    """Hermes-R. ``forward(x, tgt_idx, mod_idx) -> (logits, mod_logits)``.

    - ``x``: float (B, 1, D, H, W), any D, H, W >= 16.
    - ``tgt_idx``: int64 (B, T) global task ids; ``-1`` is the null token. The authors
      always append one ``-1`` after the real tasks; every token attends to the features,
      so each output channel depends on the whole row.
    - ``mod_idx``: int64 (B, 1): 0 CT, 1 PET, 2 T1, 3 T2, 4 cine MR, -1 unknown.
    - returns raw logits (B, T, D, H, W) (apply a sigmoid per channel) and (B, 6).
    """

    def __init__(self, in_ch: int = 1, base_ch: int = 32, num_block=(2, 2, 2, 2),
                 n_tasks: int = 72, n_modalities: int = 6):
        super().__init__()
        c1, c2, c3, c4, c5 = base_ch, 2 * base_ch, 4 * base_ch, 8 * base_ch, 10 * base_ch
        self.n_task_rows = n_tasks + 1
        self.n_modalities = n_modalities
        self.inc = InConv(in_ch, c1)
        self.down1 = DownBlock(c1, c2, num_block[0])
        self.down2 = DownBlock(c2, c3, num_block[1])
        self.prior_init_fuse_2 = PriorInitFusionLayer(c3, 2, n_tasks, n_modalities)
        self.down3 = DownBlock(c3, c4, num_block[2])
        self.prior_init_fuse_3 = PriorInitFusionLayer(c4, 2, n_tasks, n_modalities)
        self.down4 = DownBlock(c4, c5, num_block[3])
        self.prior_init_fuse_4 = PriorInitFusionLayer(c5, 4, n_tasks, n_modalities)
        self.up1 = UpBlock(c5, c4, num_block[2])
        self.prior_fuse_5 = PriorInitFusionLayer(c4, 2, n_tasks, n_modalities)
        self.up2 = UpBlock(c4, c3, num_block[1])
        self.prior_fuse_6 = PriorInitFusionLayer(c3, 2, n_tasks, n_modalities)
        self.up3 = UpBlock(c3, c2, num_block[0])
        self.up4 = UpBlock(c2, c1, 2)
        token_dim = 2 * c3 + 2 * c4 + c5  # 1088 for base 32
        self.out = HierarchyPriorClassifier(token_dim, c1)
        self.mod_out = ModalityClassifier(token_dim, n_modalities)
        for m in (self.out.classifier_pred, self.mod_out.classifier):
            for lin in m.modules():
                if isinstance(lin, nn.Linear):
                    nn.init.xavier_uniform_(lin.weight)
                    nn.init.zeros_(lin.bias)

    def check_indices(self, x, tgt_idx, mod_idx) -> None:
        """Refuse shapes and ids the authors' indexing would misread or crash on."""
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"x must be (B, 1, D, H, W), got {tuple(x.shape)}")
        if min(x.shape[2:]) < 16:
            raise ValueError(f"every spatial size must be >= 16, got {tuple(x.shape[2:])}")
        if tgt_idx.ndim != 2 or tgt_idx.shape[0] != x.shape[0] or tgt_idx.shape[1] < 1:
            raise ValueError(f"tgt_idx must be (B, T) with B={x.shape[0]}, got {tuple(tgt_idx.shape)}")
        if mod_idx.ndim != 2 or mod_idx.shape != (x.shape[0], 1):
            raise ValueError(f"mod_idx must be (B, 1), got {tuple(mod_idx.shape)}")
        if tgt_idx.dtype != torch.long or mod_idx.dtype != torch.long:
            raise ValueError("tgt_idx and mod_idx must be int64")
        if int(tgt_idx.min()) < -1 or int(tgt_idx.max()) >= self.n_task_rows:
            raise ValueError(f"task ids must be -1 (null) or 0..{self.n_task_rows - 1}")
        if int(mod_idx.min()) < -1 or int(mod_idx.max()) >= self.n_modalities:
            raise ValueError(f"modality ids must be -1 (unknown) or 0..{self.n_modalities - 1}")

    def forward(self, x, tgt_idx, mod_idx):
        self.check_indices(x, tgt_idx, mod_idx)
        n_tasks = tgt_idx.shape[1]
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3, t2 = self.prior_init_fuse_2(self.down2(x2), tgt_idx, mod_idx)
        x4, t3 = self.prior_init_fuse_3(self.down3(x3), tgt_idx, mod_idx)
        x5, t4 = self.prior_init_fuse_4(self.down4(x4), tgt_idx, mod_idx)
        out, t5 = self.prior_fuse_5(self.up1(x5, x4), tgt_idx, mod_idx)
        out, t6 = self.prior_fuse_6(self.up2(out, x3), tgt_idx, mod_idx)
        out = self.up4(self.up3(out, x2), x1)
        tokens = (t2, t3, t4, t5, t6)
        logits = self.out(out, [t[:, :n_tasks] for t in tokens])
        mod_logits = self.mod_out([t[:, n_tasks:] for t in tokens])
        return logits, mod_logits


def build_hermes_r() -> HermesResUNet:
    """The released Hermes-R configuration (60,884,998 parameters)."""
    return HermesResUNet(**HERMES_R_CONFIG)
