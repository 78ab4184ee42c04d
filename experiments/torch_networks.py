"""PyTorch baselines of ViT-V-Net and TransMorph with the semantics of ``ofg_jax.models``.

Eager, channels-first re-implementations of the two transformer registration
networks of :mod:`ofg_jax.models.vitvnet` and :mod:`ofg_jax.models.transmorph`:
the same layers, the same parameter counts (ViT-V-Net 31,560,079 and
TransMorph 46,771,251 at 160x192x224 with the defaults) and, with the weights
copied by :func:`load_flax_params`, the same outputs. They serve as the speed
baselines of the benchmarks and as the independent references of the parity
tests (``tests/test_torch_networks.py``).

Shapes: input ``(B, 2, D, H, W)`` (moving, then fixed), output ``(B, 3, D, H, W)``,
a displacement in voxels whose channel ``k`` moves along spatial axis ``k`` (as
``ofg_jax.warp``). ``model.train()`` turns dropout and drop path on,
``model.eval()`` off (Flax's ``train=True`` / ``train=False``).

Layout notes (Flax -> PyTorch, handled by :func:`load_flax_params`): conv
kernels ``(kd, kh, kw, cin, cout) -> (cout, cin, kd, kh, kw)``; dense kernels
``(in, out) -> (out, in)``; LayerNorm and BatchNorm ``scale -> weight``;
``batch_stats`` ``mean / var -> running_mean / running_var``. The Flax-only
attributes ``dtype`` and ``conv_impl`` have no counterpart here (use
``module.to(dtype)`` or autocast).

One difference in training mode only: ``nn.BatchNorm3d`` (ViT-V-Net's decoder)
updates its running variance with the unbiased batch variance, Flax's
``BatchNorm`` with the biased one (a factor ``n / (n - 1)``, ``n`` the voxels per
channel in the batch). The normalised outputs are the same in both modes.
"""

import math
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TransMorph", "ViTVNet", "integrate_velocity", "load_flax_params"]


# ---------------------------------------------------------------------------
# Shared pieces.


def _check_img_size(name: str, img_size: Sequence[int], factor: int) -> tuple:
    size = tuple(img_size)
    if len(size) != 3 or any(int(n) != n or n < 1 for n in size):
        raise ValueError(f"{name}: img_size must be 3 positive ints (D, H, W), got {img_size!r}")
    size = tuple(int(n) for n in size)
    if any(n % factor for n in size):
        raise ValueError(f"{name} needs every axis of img_size divisible by {factor}; got {size}")
    return size


def _check_input(name: str, x: torch.Tensor, img_size: tuple) -> None:
    if x.dim() != 5 or x.shape[1] != 2 or tuple(x.shape[2:]) != img_size:
        raise ValueError(
            f"{name} built for img_size {img_size} expects input (B, 2, {img_size[0]}, "
            f"{img_size[1]}, {img_size[2]}); got shape {tuple(x.shape)}")


def _conv3(cin: int, cout: int, bias: bool = True) -> nn.Conv3d:
    """3x3x3 convolution with 'same' zero padding."""
    return nn.Conv3d(cin, cout, 3, padding=1, bias=bias)


def _flow_head(cin: int) -> nn.Conv3d:
    """3x3x3 conv to 3 channels, weights ``N(0, 1e-5)``, bias 0."""
    conv = _conv3(cin, 3)
    nn.init.normal_(conv.weight, 0.0, 1e-5)
    nn.init.zeros_(conv.bias)
    return conv


def _upsample2(x: torch.Tensor) -> torch.Tensor:
    """Trilinear x2, half-pixel centres: ``(B, C, *S) -> (B, C, *2S)``."""
    return F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)


def _warp(image: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
    """``image`` ``(B, C, *S)`` sampled trilinearly at ``x + disp(x)``, zeros outside.

    ``disp``: ``(B, 3, *S)`` in voxels, channel ``k`` along spatial axis ``k``.
    """
    spatial = disp.shape[2:]
    axes = [torch.arange(n, dtype=disp.dtype, device=disp.device) for n in spatial]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    locs = grid[None] + disp
    # grid_sample (align_corners=True) wants coordinates in [-1, 1], last axis (x, y, z).
    norm = torch.stack([2.0 * locs[:, k] / max(n - 1, 1) - 1.0
                        for k, n in enumerate(spatial)], dim=-1).flip(-1)
    return F.grid_sample(image, norm, mode="bilinear", padding_mode="zeros",
                         align_corners=True)


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring: the displacement ``(B, 3, *S)`` of ``exp(velocity)``.

    ``v <- v / 2**steps``, then ``steps`` times ``v <- v + warp(v, v)`` (linear
    interpolation, zeros outside), as ``ofg_jax.models.integrate_velocity``.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    disp = velocity / 2 ** steps
    for _ in range(steps):
        disp = disp + _warp(disp, disp)
    return disp


def _finalize(flow: torch.Tensor, diffeomorphic: bool, int_steps: int) -> torch.Tensor:
    return integrate_velocity(flow, int_steps) if diffeomorphic else flow


# ---------------------------------------------------------------------------
# ViT-V-Net.

VIT_PATCH_SIZE = 8


class _DoubleConv(nn.Module):
    """(3x3x3 conv with bias, ReLU) twice: ``(B, cin, *S) -> (B, cout, *S)``."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv_0 = _conv3(cin, cout)
        self.conv_1 = _conv3(cout, cout)

    def forward(self, x):
        return F.relu(self.conv_1(F.relu(self.conv_0(x))))


class _ConvBNReLU(nn.Module):
    """3x3x3 conv without bias, BatchNorm (eps 1e-5, momentum 0.1), ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = _conv3(cin, cout, bias=False)
        self.norm = nn.BatchNorm3d(cout, eps=1e-5, momentum=0.1)

    def forward(self, x):
        return F.relu(self.norm(self.conv(x)))


class _ViTDecoderBlock(nn.Module):
    """Trilinear x2 upsampling, concatenation ``[x, skip]``, two ``_ConvBNReLU``."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.conv_0 = _ConvBNReLU(cin + cskip, cout)
        self.conv_1 = _ConvBNReLU(cout, cout)

    def forward(self, x, skip):
        x = torch.cat([_upsample2(x), skip], dim=1)
        return self.conv_1(self.conv_0(x))


class _ViTBlock(nn.Module):
    """Pre-norm transformer block: ``(B, N, hidden) -> (B, N, hidden)``.

    LayerNorm (eps 1e-6), multi-head attention (logits / sqrt(head_dim), dropout
    on the weights and on the output projection, both ``attention_dropout_rate``),
    residual; LayerNorm, ``fc1``, exact (erf) GELU, dropout, ``fc2``, dropout,
    residual.
    """

    def __init__(self, hidden: int, heads: int, mlp_dim: int, dropout_rate: float,
                 attention_dropout_rate: float):
        super().__init__()
        self.heads = heads
        self.attention_norm = nn.LayerNorm(hidden, eps=1e-6)
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.attn_dropout = nn.Dropout(attention_dropout_rate)
        self.proj_dropout = nn.Dropout(attention_dropout_rate)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-6)
        self.fc1 = nn.Linear(hidden, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, hidden)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)
        self.mlp_dropout_1 = nn.Dropout(dropout_rate)
        self.mlp_dropout_2 = nn.Dropout(dropout_rate)

    def forward(self, x):
        b, n, c = x.shape
        head_dim = c // self.heads
        h = self.attention_norm(x)
        split = lambda t: t.reshape(b, n, self.heads, head_dim).transpose(1, 2)
        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        logits = q @ k.transpose(-1, -2) / math.sqrt(head_dim)      # (B, heads, N, N)
        weights = self.attn_dropout(torch.softmax(logits, dim=-1))
        h = (weights @ v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj_dropout(self.out(h))

        h = self.ffn_norm(x)
        h = self.mlp_dropout_1(F.gelu(self.fc1(h)))
        return x + self.mlp_dropout_2(self.fc2(h))


class ViTVNet(nn.Module):
    """ViT-V-Net: ``(B, 2, *img_size) -> (B, 3, *img_size)`` displacement in voxels.

    As ``ofg_jax.models.ViTVNet``: a CNN encoder (``encoder_channels`` ``(c0, c1,
    c2)``: a double conv at full resolution, then max-pool + double conv twice)
    feeds a ViT on 8x8x8 patches of its 1/4-resolution features (a strided conv,
    learned position embeddings, dropout, ``num_layers`` pre-norm blocks, a final
    LayerNorm). ``conv_more`` (conv-BatchNorm-ReLU to ``conv_first_channel``) and
    five decoder blocks (trilinear x2 upsampling, concatenation ``[x, skip]``, two
    conv-BatchNorm-ReLU to ``decoder_channels[i]``) with skips ``(c2 at 1/16, c2
    at 1/8, c2 at 1/4, c1 at 1/2, c0 at 1)`` lead to a 3x3x3 flow head initialised
    ``N(0, 1e-5)``. 31,560,079 parameters at 160x192x224 with the defaults.

    Submodule names equal the Flax parameter paths (``inc.conv_0``,
    ``layer_3.query``, ``decoder_1.conv_0.norm``, ...), which
    :func:`load_flax_params` relies on.

    Args:
      img_size: ``(D, H, W)``, each divisible by 32.
      encoder_channels, hidden_size, num_layers, num_heads, mlp_dim, dropout_rate,
      attention_dropout_rate, conv_first_channel, decoder_channels: the
        architecture; defaults are the published configuration.
      diffeomorphic: integrate the output as a stationary velocity field
        (``int_steps`` squarings).
    """

    def __init__(self, img_size: Sequence[int],
                 encoder_channels: Sequence[int] = (16, 32, 32), hidden_size: int = 252,
                 num_layers: int = 12, num_heads: int = 12, mlp_dim: int = 3072,
                 dropout_rate: float = 0.1, attention_dropout_rate: float = 0.0,
                 conv_first_channel: int = 512,
                 decoder_channels: Sequence[int] = (96, 48, 32, 32, 16),
                 diffeomorphic: bool = False, int_steps: int = 7):
        super().__init__()
        if len(encoder_channels) != 3:
            raise ValueError(
                f"ViTVNet needs 3 encoder_channels, got {tuple(encoder_channels)}")
        if len(decoder_channels) != 5:
            raise ValueError(
                f"ViTVNet needs 5 decoder_channels, got {tuple(decoder_channels)}")
        if hidden_size % num_heads:
            raise ValueError(f"ViTVNet: hidden_size {hidden_size} is not divisible by "
                             f"num_heads {num_heads}")
        self.img_size = _check_img_size("ViTVNet", img_size, 4 * VIT_PATCH_SIZE)
        self.hidden_size = hidden_size
        self.diffeomorphic, self.int_steps = diffeomorphic, int_steps
        c0, c1, c2 = encoder_channels

        self.inc = _DoubleConv(2, c0)
        self.down1 = _DoubleConv(c0, c1)
        self.down2 = _DoubleConv(c1, c2)
        self.patch_embeddings = nn.Conv3d(c2, hidden_size, VIT_PATCH_SIZE,
                                          stride=VIT_PATCH_SIZE)
        self.grid = tuple(n // (4 * VIT_PATCH_SIZE) for n in self.img_size)
        self.position_embeddings = nn.Parameter(
            torch.zeros(1, math.prod(self.grid), hidden_size))
        self.embed_dropout = nn.Dropout(dropout_rate)
        for i in range(num_layers):
            self.add_module(f"layer_{i}", _ViTBlock(hidden_size, num_heads, mlp_dim,
                                                    dropout_rate, attention_dropout_rate))
        self.num_layers = num_layers
        self.encoder_norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.conv_more = _ConvBNReLU(hidden_size, conv_first_channel)
        prev = conv_first_channel
        for i, (features, skip) in enumerate(zip(decoder_channels, (c2, c2, c2, c1, c0))):
            self.add_module(f"decoder_{i}", _ViTDecoderBlock(prev, skip, features))
            prev = features
        self.flow = _flow_head(prev)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, 2, D, H, W)`` (moving, fixed) -> ``(B, 3, D, H, W)``."""
        _check_input("ViTVNet", x, self.img_size)
        x1 = self.inc(x)
        x2 = self.down1(F.max_pool3d(x1, 2))
        feats = self.down2(F.max_pool3d(x2, 2))
        f8 = F.max_pool3d(feats, 2)
        skips = [F.max_pool3d(f8, 2), f8, feats, x2, x1]

        tokens = self.patch_embeddings(feats)                   # (B, hidden, *grid)
        b = tokens.shape[0]
        h = tokens.flatten(2).transpose(1, 2)                   # (B, N, hidden), C order
        h = self.embed_dropout(h + self.position_embeddings)
        for i in range(self.num_layers):
            h = getattr(self, f"layer_{i}")(h)
        h = self.encoder_norm(h)
        h = h.transpose(1, 2).reshape(b, self.hidden_size, *self.grid)

        h = self.conv_more(h)
        for i, skip in enumerate(skips):
            h = getattr(self, f"decoder_{i}")(h, skip)
        return _finalize(self.flow(h), self.diffeomorphic, self.int_steps)


# ---------------------------------------------------------------------------
# TransMorph.

SWIN_PATCH_SIZE = 4
_SWIN_LN_EPS = 1e-5


def _window_partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """``(B, D, H, W, C) -> (B * n_windows, prod(window), C)``, windows batch-major."""
    b, d, h, w, c = x.shape
    wd, wh, ww = window
    x = x.reshape(b, d // wd, wd, h // wh, wh, w // ww, ww, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, wd * wh * ww, c)


def _window_reverse(windows: torch.Tensor, window: Sequence[int],
                    size: Sequence[int]) -> torch.Tensor:
    """``(B * n_windows, prod(window), C) -> (B, D, H, W, C)``."""
    d, h, w = size
    wd, wh, ww = window
    c = windows.shape[-1]
    x = windows.reshape(-1, d // wd, h // wh, w // ww, wd, wh, ww, c)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(-1, d, h, w, c)


def _relative_position_index(window: Sequence[int]) -> torch.Tensor:
    """``(N, N)`` row of the ``prod(2 w - 1)`` bias table for each query/key pair.

    The offset ``q - k + (w - 1)`` per axis, raveled in C order over the table
    shape ``(2 wd - 1, 2 wh - 1, 2 ww - 1)``.
    """
    axes = [np.arange(n) for n in window]
    coords = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)   # (3, N)
    offsets = coords[:, :, None] - coords[:, None, :] + np.asarray(window)[:, None, None] - 1
    index = np.ravel_multi_index(tuple(offsets), tuple(2 * n - 1 for n in window))
    return torch.from_numpy(index.astype(np.int64))


def _shifted_window_mask(size: Sequence[int], window: Sequence[int],
                         shift: Sequence[int]) -> torch.Tensor:
    """``(n_windows, N, N)`` additive mask, 0 within a region, -100 across regions.

    After rolling the grid by ``-shift``, positions ``q >= n - shift`` along an
    axis came from across the border; along each axis the grid splits into the
    bands ``[0, n - w)``, ``[n - w, n - s)``, ``[n - s, n)``; a token attends only
    to tokens of the same band on every axis.
    """
    labels = np.zeros(tuple(size), np.int64)
    for axis, (n, w, s) in enumerate(zip(size, window, shift)):
        band = np.zeros(n, np.int64)
        band[n - w:] = 1
        band[n - s:] = 2
        shape = [1, 1, 1]
        shape[axis] = n
        labels = labels * 3 + band.reshape(shape)
    groups = _window_partition(torch.from_numpy(labels)[None, ..., None], window)[..., 0]
    same = groups[:, :, None] == groups[:, None, :]
    return torch.where(same, 0.0, -100.0).to(torch.float32)


class _DropPath(nn.Module):
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


class _WindowAttention(nn.Module):
    """Window attention with relative position bias: ``(B * nW, N, C) -> same``.

    ``qkv`` (bias only with ``qkv_bias``), ``q * head_dim ** -0.5``, logits plus
    the bias ``table[index]`` (``(heads, N, N)``) plus the shifted-window mask
    (window ``i % nW`` of the batch-major windows), softmax, dropout, heads
    concatenated head-major, ``proj``, dropout.
    """

    def __init__(self, dim: int, window: Sequence[int], heads: int, qkv_bias: bool,
                 attn_drop_rate: float, proj_drop_rate: float):
        super().__init__()
        self.heads = heads
        table_size = math.prod(2 * w - 1 for w in window)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table_size, heads))
        # PyTorch's trunc_normal_(std=.02) cuts at +-2 (absolute): effectively N(0, .02).
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index",
                             _relative_position_index(window).reshape(-1), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop_rate)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop_rate)

    def forward(self, x, mask: Optional[torch.Tensor]):
        b_, n, c = x.shape
        heads = self.heads
        qkv = self.qkv(x).reshape(b_, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (c // heads) ** -0.5, qkv[1], qkv[2]    # (B_, heads, N, hd)
        bias = self.relative_position_bias_table[self.relative_position_index]
        logits = q @ k.transpose(-1, -2) + bias.reshape(n, n, heads).permute(2, 0, 1)
        if mask is not None:
            n_windows = mask.shape[0]
            logits = logits.reshape(b_ // n_windows, n_windows, heads, n, n)
            logits = (logits + mask[None, :, None]).reshape(b_, heads, n, n)
        weights = self.attn_drop(torch.softmax(logits, dim=-1))
        out = (weights @ v).transpose(1, 2).reshape(b_, n, c)
        return self.proj_drop(self.proj(out))


class _SwinBlock(nn.Module):
    """(Shifted-)window attention and a GELU MLP, pre-norm, residual, drop path.

    Tokens ``(B, D*H*W, C)`` of a ``size = (D, H, W)`` grid. A grid the window
    does not tile is zero-padded at the end of each axis after ``norm1`` and
    cropped after the attention (the reference's ``F.pad``). The shift applies
    only when it is non-zero on every axis: the padded grid is rolled by
    ``-shift`` before the window partition and by ``+shift`` after, with the
    region mask of the padded grid.
    """

    def __init__(self, dim: int, heads: int, size: Sequence[int], window: Sequence[int],
                 shift: Sequence[int], mlp_ratio: float, qkv_bias: bool, drop_rate: float,
                 attn_drop_rate: float, drop_path_rate: float,
                 mask: Optional[torch.Tensor]):
        super().__init__()
        self.size, self.window = tuple(size), tuple(window)
        self.padded = tuple(-(-n // w) * w for n, w in zip(size, window))
        self.shift = tuple(shift) if min(shift) > 0 else None
        self.norm1 = nn.LayerNorm(dim, eps=_SWIN_LN_EPS)
        self.attn = _WindowAttention(dim, window, heads, qkv_bias, attn_drop_rate,
                                     drop_rate)
        self.drop_path = _DropPath(drop_path_rate)
        self.norm2 = nn.LayerNorm(dim, eps=_SWIN_LN_EPS)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.mlp_drop_1 = nn.Dropout(drop_rate)
        self.mlp_drop_2 = nn.Dropout(drop_rate)
        if self.shift is not None:
            self.register_buffer("attn_mask", mask, persistent=False)
        else:
            self.attn_mask = None

    def forward(self, x):
        b, length, c = x.shape
        h = self.norm1(x).reshape(b, *self.size, c)
        (d, hh, w), (pd, ph, pw) = self.size, self.padded
        h = F.pad(h, (0, 0, 0, pw - w, 0, ph - hh, 0, pd - d))
        if self.shift is not None:
            h = torch.roll(h, [-s for s in self.shift], dims=(1, 2, 3))
        h = self.attn(_window_partition(h, self.window), self.attn_mask)
        h = _window_reverse(h, self.window, self.padded)
        if self.shift is not None:
            h = torch.roll(h, list(self.shift), dims=(1, 2, 3))
        h = h[:, :d, :hh, :w].reshape(b, length, c)
        x = x + self.drop_path(h)

        h = self.mlp_drop_1(F.gelu(self.fc1(self.norm2(x))))
        return x + self.drop_path(self.mlp_drop_2(self.fc2(h)))


class _PatchMerging(nn.Module):
    """``(B, D, H, W, C) -> (B, D/2, H/2, W/2, 2C)``: the 8 neighbours, LN, linear.

    Neighbour offsets (along D, H, W) in the order of the reference:
    000, 100, 010, 001, 110, 011, 101, 111.
    """

    OFFSETS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1),
               (1, 1, 0), (0, 1, 1), (1, 0, 1), (1, 1, 1))

    def __init__(self, dim: int, reduce_factor: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(8 * dim, eps=_SWIN_LN_EPS)
        self.reduction = nn.Linear(8 * dim, 8 * dim // reduce_factor, bias=False)

    def forward(self, x):
        x = torch.cat([x[:, i::2, j::2, k::2] for i, j, k in self.OFFSETS], dim=-1)
        return self.reduction(self.norm(x))


class _ConvNormAct(nn.Module):
    """3x3x3 conv without bias, InstanceNorm (no affine, eps 1e-5), LeakyReLU(0.01)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = _conv3(cin, cout, bias=False)

    def forward(self, x):
        return F.leaky_relu(F.instance_norm(self.conv(x), eps=1e-5), 0.01)


class _SwinDecoderBlock(nn.Module):
    """Trilinear x2 upsampling, concatenation ``[x, skip]``, two ``_ConvNormAct``."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.conv_0 = _ConvNormAct(cin + cskip, cout)
        self.conv_1 = _ConvNormAct(cout, cout)

    def forward(self, x, skip):
        return self.conv_1(self.conv_0(torch.cat([_upsample2(x), skip], dim=1)))


class TransMorph(nn.Module):
    """TransMorph: ``(B, 2, *img_size) -> (B, 3, *img_size)`` displacement in voxels.

    As ``ofg_jax.models.TransMorph``. Swin encoder: 4x4x4 patch embedding (strided
    conv, LayerNorm, dropout), four stages of ``depths[i]`` blocks of width
    ``embed_dim * 2**i`` (odd blocks shifted by ``window_size // 2``), drop path
    rates ``linspace(0, drop_path_rate, sum(depths))``, a LayerNorm on each
    stage's output, patch merging (8C -> 2C) of the un-normalised tokens between
    stages. Decoder: five blocks (trilinear x2, concatenation ``[x, skip]``, two
    conv-InstanceNorm-LeakyReLU) from the last stage through the stage outputs 2,
    1, 0, a conv skip ``c1`` (``embed_dim // 2``) of the 3x3x3/2 average-pooled
    input and a conv skip ``c2`` (``reg_head_chan``) of the input; widths
    ``(4E, 2E, E, E/2, reg_head_chan)``; a 3x3x3 flow head ``N(0, 1e-5)``.
    46,771,251 parameters at 160x192x224 with the defaults.

    Submodule names equal the Flax parameter paths (``patch_embed``,
    ``stage2_block3.attn.qkv``, ``merge1.reduction``, ``up0.conv_1.conv``, ...),
    which :func:`load_flax_params` relies on.

    Args:
      img_size: ``(D, H, W)``; divisible by 32 and every stage grid
        (``img_size / 4 / 2**i``) divisible by ``window_size``.
      embed_dim, depths, num_heads, window_size, mlp_ratio, qkv_bias, drop_rate,
      attn_drop_rate, drop_path_rate, reg_head_chan: the architecture; defaults
        are the published configuration.
      diffeomorphic, int_steps: as ``ViTVNet``.
    """

    def __init__(self, img_size: Sequence[int], embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 4, 2), num_heads: Sequence[int] = (4, 4, 8, 8),
                 window_size: Sequence[int] = (5, 6, 7), mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.3, reg_head_chan: int = 16,
                 diffeomorphic: bool = False, int_steps: int = 7):
        super().__init__()
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(
                f"TransMorph needs 4 stages: depths and num_heads of length 4, got "
                f"{tuple(depths)} and {tuple(num_heads)}")
        window = tuple(int(w) for w in window_size)
        if len(window) != 3 or any(w < 1 for w in window):
            raise ValueError(f"TransMorph: window_size must be 3 positive ints, got {window}")
        for i, heads in enumerate(num_heads):
            if (embed_dim * 2 ** i) % heads:
                raise ValueError(f"TransMorph: stage {i} width {embed_dim * 2 ** i} is not "
                                 f"divisible by num_heads[{i}] = {heads}")
        if embed_dim % 2:
            raise ValueError(f"TransMorph: embed_dim must be even, got {embed_dim}")
        self.img_size = _check_img_size("TransMorph", img_size, SWIN_PATCH_SIZE * 8)
        self.stage_sizes = [tuple(n // (SWIN_PATCH_SIZE * 2 ** i) for n in self.img_size)
                            for i in range(4)]
        self.embed_dim, self.depths = embed_dim, tuple(depths)
        self.diffeomorphic, self.int_steps = diffeomorphic, int_steps
        shift = tuple(w // 2 for w in window)

        self.patch_embed = nn.Conv3d(2, embed_dim, SWIN_PATCH_SIZE, stride=SWIN_PATCH_SIZE)
        self.patch_norm = nn.LayerNorm(embed_dim, eps=_SWIN_LN_EPS)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = np.linspace(0.0, drop_path_rate, sum(depths))
        for i, (depth, heads, size) in enumerate(zip(depths, num_heads, self.stage_sizes)):
            dim = embed_dim * 2 ** i
            # One mask per stage (of its padded grid), shared by its shifted blocks.
            padded = tuple(-(-n // w) * w for n, w in zip(size, window))
            mask = _shifted_window_mask(padded, window, shift) if min(shift) > 0 else None
            for j in range(depth):
                self.add_module(f"stage{i}_block{j}", _SwinBlock(
                    dim, heads, size, window, (0, 0, 0) if j % 2 == 0 else shift,
                    mlp_ratio, qkv_bias, drop_rate, attn_drop_rate,
                    float(rates[sum(depths[:i]) + j]), mask))
            self.add_module(f"norm{i}", nn.LayerNorm(dim, eps=_SWIN_LN_EPS))
            if i < 3:
                self.add_module(f"merge{i}", _PatchMerging(dim))

        e = embed_dim
        self.c1 = _ConvNormAct(2, e // 2)
        self.c2 = _ConvNormAct(2, reg_head_chan)
        widths = (4 * e, 2 * e, e, e // 2, reg_head_chan)
        skips = (4 * e, 2 * e, e, e // 2, reg_head_chan)
        prev = 8 * e
        for i, (features, skip) in enumerate(zip(widths, skips)):
            self.add_module(f"up{i}", _SwinDecoderBlock(prev, skip, features))
            prev = features
        self.flow = _flow_head(prev)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, 2, D, H, W)`` (moving, fixed) -> ``(B, 3, D, H, W)``."""
        _check_input("TransMorph", x, self.img_size)
        b = x.shape[0]
        h = self.patch_embed(x).permute(0, 2, 3, 4, 1)          # (B, D/4, H/4, W/4, E)
        h = self.pos_drop(self.patch_norm(h))
        stage_outputs = []
        for i, (depth, size) in enumerate(zip(self.depths, self.stage_sizes)):
            dim = self.embed_dim * 2 ** i
            tokens = h.reshape(b, -1, dim)
            for j in range(depth):
                tokens = getattr(self, f"stage{i}_block{j}")(tokens)
            h = tokens.reshape(b, *size, dim)
            out = getattr(self, f"norm{i}")(h)
            stage_outputs.append(out.permute(0, 4, 1, 2, 3))   # channels-first
            if i < 3:
                h = getattr(self, f"merge{i}")(h)

        conv_skip_half = self.c1(F.avg_pool3d(x, 3, stride=2, padding=1))
        conv_skip_full = self.c2(x)
        skips = [stage_outputs[2], stage_outputs[1], stage_outputs[0], conv_skip_half,
                 conv_skip_full]
        h = stage_outputs[3]
        for i, skip in enumerate(skips):
            h = getattr(self, f"up{i}")(h, skip)
        return _finalize(self.flow(h), self.diffeomorphic, self.int_steps)


# ---------------------------------------------------------------------------
# Weights from Flax.


def _flax_to_torch(kind: str, name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """The torch attribute and array for the Flax leaf ``name`` of a ``kind`` layer."""
    if kind == "conv":
        if name == "kernel":
            return "weight", value.transpose(4, 3, 0, 1, 2) if value.ndim == 5 else value
        return "bias", value
    if kind == "linear":
        if name == "kernel":
            return "weight", value.T if value.ndim == 2 else value
        return "bias", value
    # LayerNorm / BatchNorm parameters and BatchNorm statistics.
    return {"scale": "weight", "bias": "bias", "mean": "running_mean",
            "var": "running_var"}.get(name, name), value


def _kind(module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.Conv3d):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.LayerNorm, nn.BatchNorm3d)):
        return "norm"
    return None


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, prefix + (str(key),)))
        else:
            out[prefix + (str(key),)] = value
    return out


def load_flax_params(model: nn.Module, variables: Mapping) -> None:
    """Copies a Flax ``variables`` dict into ``model`` (a ``ViTVNet`` or ``TransMorph``).

    ``variables["params"]`` must hold every parameter of ``model`` (torch names
    are the Flax paths; kernels are transposed to PyTorch layouts) and nothing
    else; ``variables["batch_stats"]`` (ViT-V-Net) fills the BatchNorm running
    statistics. Works for any module whose layer names equal the Flax paths.

    Raises:
      ValueError: a shape mismatch (naming the parameter and both shapes), or a
        Flax leaf without a torch counterpart, or a torch parameter or BatchNorm
        statistic that ``variables`` does not provide.
    """
    flat = {}   # path -> (collection, array); BatchNorm statistics sit beside its params
    for collection in ("params", "batch_stats"):
        for path, value in _flatten(variables.get(collection, {})).items():
            if path in flat:
                raise ValueError(f"{'.'.join(path)} is in both params and batch_stats")
            flat[path] = (collection, np.asarray(value))
    targets = {}   # flax path -> (torch tensor, layer kind, torch name)
    for module_name, module in model.named_modules():
        prefix = tuple(module_name.split(".")) if module_name else ()
        kind = _kind(module)
        for name, tensor in module.named_parameters(recurse=False):
            path = prefix + ({"weight": "scale"}.get(name, name) if kind == "norm"
                             else {"weight": "kernel"}.get(name, name) if kind else name,)
            targets[path] = (tensor, kind, name)
        if isinstance(module, nn.BatchNorm3d):
            for flax_name, buffer in (("mean", module.running_mean),
                                      ("var", module.running_var)):
                targets[prefix + (flax_name,)] = (buffer, kind, flax_name)
    missing = sorted(".".join(p) for p in targets if p not in flat)
    extra = sorted(f"{flat[p][0]}/{'.'.join(p)}" for p in flat if p not in targets)
    if missing or extra:
        raise ValueError(
            f"Flax variables do not fit {type(model).__name__}: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}; without torch counterpart "
            f"{extra[:8]}{' ...' if len(extra) > 8 else ''}")
    converted = []
    for path, (tensor, kind, _) in targets.items():
        value = flat[path][1]
        array = _flax_to_torch(kind, path[-1], value)[1] if kind else value
        if tuple(array.shape) != tuple(tensor.shape):
            raise ValueError(
                f"{'.'.join(path)}: Flax shape {tuple(value.shape)} (as torch "
                f"{tuple(array.shape)}) does not fit torch shape {tuple(tensor.shape)}")
        converted.append((tensor, array))
    with torch.no_grad():
        for tensor, array in converted:
            tensor.copy_(torch.from_numpy(np.array(array)).to(tensor.dtype))
