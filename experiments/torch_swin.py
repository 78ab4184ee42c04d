"""The 3D Swin Transformer encoder of the PyTorch TransMorph (``experiments.torch_networks``).

Eager, with the module names of the TransMorph authors' ``SwinTransformer``
(``patch_embed.{proj,norm}``, ``layers.i.blocks.j.{norm1,attn,norm2,mlp}``,
``layers.i.downsample.{reduction,norm}``, ``norm0..3``), so that its
``state_dict`` has their checkpoints' keys, and the semantics of the Swin parts of
``ofg_jax.models.transmorph``. Tokens are channels-last: a stage works on
``(B, D, H, W, C)`` grids and ``(B, D*H*W, C)`` token sequences.
"""

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PATCH_SIZE = 4
LN_EPS = 1e-5   # nn.LayerNorm's default, as the authors'


def window_partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """``(B, D, H, W, C) -> (B * n_windows, prod(window), C)``, windows batch-major."""
    b, d, h, w, c = x.shape
    wd, wh, ww = window
    x = x.reshape(b, d // wd, wd, h // wh, wh, w // ww, ww, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, wd * wh * ww, c)


def window_reverse(windows: torch.Tensor, window: Sequence[int],
                   size: Sequence[int]) -> torch.Tensor:
    """``(B * n_windows, prod(window), C) -> (B, D, H, W, C)``, ``size = (D, H, W)``."""
    d, h, w = size
    wd, wh, ww = window
    c = windows.shape[-1]
    x = windows.reshape(-1, d // wd, h // wh, w // ww, wd, wh, ww, c)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(-1, d, h, w, c)


def relative_position_index(window: Sequence[int]) -> np.ndarray:
    """``(N, N)`` int64, N = prod(window): the bias-table row of each query/key pair.

    The offset ``q - k + (w - 1)`` per axis, raveled in C order over the table
    shape ``(2 wd - 1, 2 wh - 1, 2 ww - 1)``.
    """
    axes = [np.arange(n) for n in window]
    coords = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)   # (3, N)
    offsets = coords[:, :, None] - coords[:, None, :] + np.asarray(window)[:, None, None] - 1
    index = np.ravel_multi_index(tuple(offsets), tuple(2 * n - 1 for n in window))
    return index.astype(np.int64)


def shifted_window_mask(size: Sequence[int], window: Sequence[int],
                        shift: Sequence[int]) -> np.ndarray:
    """``(n_windows, N, N)`` float32 additive mask of a padded grid ``size``.

    0 within a region, -100 across regions. After rolling the grid by ``-shift``,
    along each axis the grid splits into the bands ``[0, n - w)``, ``[n - w,
    n - s)``, ``[n - s, n)``; a token attends only to tokens of the same band on
    every axis.
    """
    labels = np.zeros(tuple(size), np.int64)
    for axis, (n, w, s) in enumerate(zip(size, window, shift)):
        band = np.zeros(n, np.int64)
        band[n - w:] = 1
        band[n - s:] = 2
        shape = [1, 1, 1]
        shape[axis] = n
        labels = labels * 3 + band.reshape(shape)
    groups = window_partition(torch.from_numpy(labels)[None, ..., None], window)[..., 0]
    same = (groups[:, :, None] == groups[:, None, :]).numpy()
    return np.where(same, 0.0, -100.0).astype(np.float32)


class DropPath(nn.Module):
    """Stochastic depth: zeroes a whole residual branch per sample, in training."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x):
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) < keep
        return torch.where(mask, x / keep, torch.zeros((), dtype=x.dtype, device=x.device))


class WindowAttention(nn.Module):
    """Window attention with relative position bias: ``(B * nW, N, C) -> same``.

    ``qkv`` (bias only with ``qkv_bias``), ``q * head_dim ** -0.5``, logits plus
    the bias ``relative_position_bias_table[relative_position_index]``
    (``(heads, N, N)``) plus the shifted-window mask (window ``i % nW`` of the
    batch-major windows), softmax, dropout, heads concatenated head-major,
    ``proj``, dropout. ``relative_position_index`` is a persistent ``(N, N)``
    int64 buffer, as in the authors' checkpoints.
    """

    def __init__(self, dim: int, window: Sequence[int], heads: int, qkv_bias: bool,
                 attn_drop_rate: float, proj_drop_rate: float):
        super().__init__()
        self.heads = heads
        table_size = math.prod(2 * w - 1 for w in window)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table_size, heads))
        # trunc_normal_(std=.02) cuts at +-2 (absolute): effectively N(0, .02).
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # torch.tensor, not from_numpy: on the device of the ambient torch.device(...).
        self.register_buffer("relative_position_index",
                             torch.tensor(relative_position_index(window)))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop_rate)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop_rate)

    def forward(self, x, mask: Optional[torch.Tensor]):
        b_, n, c = x.shape
        heads = self.heads
        qkv = self.qkv(x).reshape(b_, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (c // heads) ** -0.5, qkv[1], qkv[2]    # (B_, heads, N, hd)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        logits = q @ k.transpose(-1, -2) + bias.reshape(n, n, heads).permute(2, 0, 1)
        if mask is not None:
            n_windows = mask.shape[0]
            logits = logits.reshape(b_ // n_windows, n_windows, heads, n, n)
            logits = (logits + mask[None, :, None]).reshape(b_, heads, n, n)
        weights = self.attn_drop(torch.softmax(logits, dim=-1))
        out = (weights @ v).transpose(1, 2).reshape(b_, n, c)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """``fc1``, exact (erf) GELU, dropout, ``fc2``, dropout: ``(..., C) -> (..., C)``."""

    def __init__(self, dim: int, hidden: int, drop_rate: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop_rate)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class SwinBlock(nn.Module):
    """(Shifted-)window attention and an MLP, pre-norm, residual, drop path.

    Tokens ``(B, D*H*W, C)`` of the grid ``size = (D, H, W)``. A grid the window
    does not tile is zero-padded at the end of each axis after ``norm1`` and
    cropped after the attention (the padding takes part in the attention). The
    shift applies only when it is non-zero on every axis (``self.shift`` is then
    set): the padded grid is rolled by ``-shift`` before the window partition and
    by ``+shift`` after, with the region mask of the padded grid.
    """

    def __init__(self, dim: int, heads: int, size: Sequence[int], window: Sequence[int],
                 shift: Sequence[int], mlp_ratio: float, qkv_bias: bool, drop_rate: float,
                 attn_drop_rate: float, drop_path_rate: float):
        super().__init__()
        self.size, self.window = tuple(size), tuple(window)
        self.padded = tuple(-(-n // w) * w for n, w in zip(size, window))
        self.shift = tuple(shift) if min(shift) > 0 else None
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = WindowAttention(dim, window, heads, qkv_bias, attn_drop_rate, drop_rate)
        self.drop_path = DropPath(drop_path_rate)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop_rate)

    def forward(self, x, mask: Optional[torch.Tensor]):
        """``x``: ``(B, D*H*W, C)``; ``mask``: the stage's shifted-window mask."""
        b, length, c = x.shape
        h = self.norm1(x).reshape(b, *self.size, c)
        (d, hh, w), (pd, ph, pw) = self.size, self.padded
        h = F.pad(h, (0, 0, 0, pw - w, 0, ph - hh, 0, pd - d))
        if self.shift is not None:
            h = torch.roll(h, [-s for s in self.shift], dims=(1, 2, 3))
        h = self.attn(window_partition(h, self.window),
                      mask if self.shift is not None else None)
        h = window_reverse(h, self.window, self.padded)
        if self.shift is not None:
            h = torch.roll(h, list(self.shift), dims=(1, 2, 3))
        h = h[:, :d, :hh, :w].reshape(b, length, c)
        x = x + self.drop_path(h)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """``(B, D, H, W, C) -> (B, D/2, H/2, W/2, 8C / reduce_factor)``: the 8 neighbours
    concatenated, LayerNorm, linear without bias.

    Neighbour offsets (along D, H, W) in the authors' order:
    000, 100, 010, 001, 110, 011, 101, 111.
    """

    OFFSETS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1),
               (1, 1, 0), (0, 1, 1), (1, 0, 1), (1, 1, 1))

    def __init__(self, dim: int, reduce_factor: int = 4):
        super().__init__()
        # Registered in the authors' order (reduction, then norm): the state_dict's.
        self.reduction = nn.Linear(8 * dim, 8 * dim // reduce_factor, bias=False)
        self.norm = nn.LayerNorm(8 * dim, eps=LN_EPS)

    def forward(self, x):
        x = torch.cat([x[:, i::2, j::2, k::2] for i, j, k in self.OFFSETS], dim=-1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """One stage: ``blocks`` (odd ones shifted), then ``downsample`` (or None).

    ``(B, D, H, W, C) -> (out (B, D, H, W, C), next (B, D/2, H/2, W/2, 2C) or None)``;
    ``next`` is the patch merging of the un-normalised ``out``. The shifted
    blocks share the mask of the stage's padded grid, a non-persistent buffer
    ``attn_mask`` (None without shifted blocks).
    """

    def __init__(self, dim: int, depth: int, heads: int, size: Sequence[int],
                 window: Sequence[int], mlp_ratio: float, qkv_bias: bool, drop_rate: float,
                 attn_drop_rate: float, drop_path_rates: Sequence[float], downsample: bool):
        super().__init__()
        shift = tuple(w // 2 for w in window)
        self.blocks = nn.ModuleList(
            SwinBlock(dim, heads, size, window, (0, 0, 0) if j % 2 == 0 else shift,
                      mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, float(drop_path_rates[j]))
            for j in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None
        shifted = depth > 1 and min(shift) > 0
        padded = self.blocks[0].padded
        self.register_buffer(
            "attn_mask", torch.tensor(shifted_window_mask(padded, window, shift))
            if shifted else None, persistent=False)

    def forward(self, x):
        b, *size, c = x.shape
        tokens = x.reshape(b, -1, c)
        for block in self.blocks:
            tokens = block(tokens, self.attn_mask)
        out = tokens.reshape(b, *size, c)
        return out, (self.downsample(out) if self.downsample is not None else None)


class PatchEmbed(nn.Module):
    """``proj`` (4x4x4 conv, stride 4), then ``norm`` (LayerNorm over channels).

    ``(B, 2, D, H, W) -> (B, D/4, H/4, W/4, embed_dim)``, channels-last.
    """

    def __init__(self, in_channels: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, embed_dim, PATCH_SIZE, stride=PATCH_SIZE)
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)

    def forward(self, x):
        return self.norm(self.proj(x).permute(0, 2, 3, 4, 1))


class SwinEncoder(nn.Module):
    """The authors' ``SwinTransformer``: ``(B, 2, *img_size) -> 4 stage outputs``.

    Patch embedding, dropout, four stages of widths ``embed_dim * 2**i`` on the
    grids ``img_size / 4 / 2**i`` with drop path rates ``linspace(0,
    drop_path_rate, sum(depths))``, and a LayerNorm ``norm{i}`` on each stage's
    output. Returns the normalised stage outputs channels-first, ``(B, C_i,
    *grid_i)``.
    """

    def __init__(self, img_size: Sequence[int], embed_dim: int, depths: Sequence[int],
                 num_heads: Sequence[int], window: Sequence[int], mlp_ratio: float,
                 qkv_bias: bool, drop_rate: float, attn_drop_rate: float,
                 drop_path_rate: float, in_channels: int = 2):
        super().__init__()
        self.patch_embed = PatchEmbed(in_channels, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = np.linspace(0.0, drop_path_rate, sum(depths))
        self.stage_sizes = [tuple(n // (PATCH_SIZE * 2 ** i) for n in img_size)
                            for i in range(len(depths))]
        self.layers = nn.ModuleList(
            SwinStage(embed_dim * 2 ** i, depth, heads, size, window, mlp_ratio, qkv_bias,
                      drop_rate, attn_drop_rate, rates[sum(depths[:i]):sum(depths[:i + 1])],
                      downsample=i < len(depths) - 1)
            for i, (depth, heads, size) in enumerate(zip(depths, num_heads, self.stage_sizes)))
        for i in range(len(depths)):
            self.add_module(f"norm{i}", nn.LayerNorm(embed_dim * 2 ** i, eps=LN_EPS))

    def forward(self, x: torch.Tensor) -> list:
        h = self.pos_drop(self.patch_embed(x))
        outputs = []
        for i, stage in enumerate(self.layers):
            out, h = stage(h)
            outputs.append(getattr(self, f"norm{i}")(out).permute(0, 4, 1, 2, 3))
        return outputs
