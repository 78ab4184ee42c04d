"""PyTorch versions of the registration networks, with the TransMorph authors' names.

Eager, channels-first versions of :mod:`ofg_jax.models` (VoxelMorph, ViT-V-Net,
TransMorph) whose ``state_dict()`` has exactly the keys, shapes, dtypes and
parameter/buffer kinds of the checkpoints that the TransMorph authors publish
(``junyuchen245/TransMorph_Transformer_for_Medical_Image_Registration``; the
layouts of :data:`PUBLISHED`), and whose outputs equal those of the Flax
networks with the same weights (:func:`load_variables`, which goes through
``ofg_jax.models.to_torch``). They are the independent references of the
importer of those checkpoints and of the parity tests
(``tests/test_torch_networks.py``), and the PyTorch speed baselines of the
benchmarks (``experiments.torch_baseline.network``).

Shapes: input ``(B, 2, D, H, W)`` (moving, then fixed). ``forward`` returns
``(warped, flow)`` as the authors' networks do: ``flow`` ``(B, 3, D, H, W)`` is a
displacement in voxels whose channel ``k`` moves along spatial axis ``k`` (the
Flax network's output, channels-first), ``warped`` ``(B, 1, D, H, W)`` is the
moving image (channel 0 of the input) warped by it with the network's
:class:`SpatialTransformer`. ``model.train()`` turns dropout and drop path on,
``model.eval()`` off (Flax's ``train=True`` / ``train=False``).

One difference in training mode only: ``nn.BatchNorm3d`` (ViT-V-Net's decoder)
updates its running variance with the unbiased batch variance, Flax's
``BatchNorm`` with the biased one (a factor ``n / (n - 1)``, ``n`` the voxels per
channel in the batch). The normalised outputs are the same in both modes.
"""

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from experiments.torch_swin import SwinEncoder

__all__ = ["NETWORKS", "PUBLISHED", "PUBLISHED_IMG_SIZE", "SpatialTransformer", "TransMorph",
           "ViTVNet", "VoxelMorph", "integrate_velocity", "load_variables", "published",
           "randomise"]


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


def _conv3(cin: int, cout: int, bias: bool = True, stride: int = 1) -> nn.Conv3d:
    """3x3x3 convolution with zero padding 1."""
    return nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=bias)


def _flow_head(cin: int) -> nn.Conv3d:
    """3x3x3 conv to 3 channels, weights ``N(0, 1e-5)``, bias 0."""
    conv = _conv3(cin, 3)
    nn.init.normal_(conv.weight, 0.0, 1e-5)
    nn.init.zeros_(conv.bias)
    return conv


def _upsample2(x: torch.Tensor) -> torch.Tensor:
    """Trilinear x2, half-pixel centres: ``(B, C, *S) -> (B, C, *2S)``."""
    return F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)


class SpatialTransformer(nn.Module):
    """``src`` ``(B, C, *S)`` sampled trilinearly at ``grid + flow``, zeros outside.

    ``grid``: the persistent float32 buffer ``(1, 3, *size)`` of voxel indices
    (``grid[0, k]`` = index along axis ``k``), as in the authors' checkpoints.
    Locations are normalised as the authors' ``2 * (loc / (n - 1) - 0.5)``;
    ``align_corners=True`` (their IXI networks) makes that the exact voxel
    position; ``False`` (their OASIS TransMorph) samples at
    ``loc * n / (n - 1) - 0.5`` instead.
    """

    def __init__(self, size: Sequence[int], align_corners: bool = True):
        super().__init__()
        self.align_corners = align_corners
        axes = [torch.arange(n, dtype=torch.float32) for n in size]
        self.register_buffer("grid", torch.stack(torch.meshgrid(*axes, indexing="ij"))[None])

    def forward(self, src: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """``src`` ``(B, C, *S)``, ``flow`` ``(B, 3, *S)`` in voxels -> ``(B, C, *S)``."""
        locs = self.grid + flow
        norm = torch.stack([2.0 * (locs[:, k] / (n - 1) - 0.5)
                            for k, n in enumerate(flow.shape[2:])], dim=-1)
        # grid_sample's last axis is (x, y, z): the spatial axes reversed.
        return F.grid_sample(src, norm.flip(-1), mode="bilinear", padding_mode="zeros",
                             align_corners=self.align_corners)


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
    """The flow head's output as a displacement (integrated if ``diffeomorphic``)."""
    return integrate_velocity(flow, int_steps) if diffeomorphic else flow


# ---------------------------------------------------------------------------
# VoxelMorph.


class _VxmConv(nn.Module):
    """``main`` (3x3x3 conv with bias, stride 1 or 2), then LeakyReLU(0.2)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.main = _conv3(cin, cout, stride=stride)

    def forward(self, x):
        return F.leaky_relu(self.main(x), 0.2)


class _VxmUNet(nn.Module):
    """The authors' ``Unet``: ``(B, 2, *S) -> (B, final_features[-1], *S)``.

    ``downarm``: stride-2 convs. ``uparm``: at each level a conv, nearest x2
    upsampling and concatenation ``[x, skip]`` of the encoder feature of the new
    resolution (the input at full resolution). ``extras``: convs at full
    resolution.
    """

    def __init__(self, enc: Sequence[int], dec: Sequence[int], final: Sequence[int],
                 in_channels: int = 2):
        super().__init__()
        self.downarm, self.uparm, self.extras = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        prev = in_channels
        for features in enc:
            self.downarm.append(_VxmConv(prev, features, stride=2))
            prev = features
        skips = [*enc[-2::-1], in_channels]   # concatenated after uparm[0], uparm[1], ...
        for features, skip in zip(dec, skips):
            self.uparm.append(_VxmConv(prev, features))
            prev = features + skip
        for features in final:
            self.extras.append(_VxmConv(prev, features))
            prev = features

    def forward(self, x):
        levels = [x]
        for layer in self.downarm:
            levels.append(layer(levels[-1]))
        h = levels.pop()
        for layer in self.uparm:
            h = F.interpolate(layer(h), scale_factor=2, mode="nearest")
            h = torch.cat([h, levels.pop()], dim=1)
        for layer in self.extras:
            h = layer(h)
        return h


class VoxelMorph(nn.Module):
    """VoxelMorph (the authors' ``VxmDense``): ``(B, 2, *S) -> (warped, flow)``.

    As ``ofg_jax.models.VoxelMorph``: ``unet_model`` (:class:`_VxmUNet`,
    LeakyReLU(0.2) after every conv), the 3x3x3 flow head ``flow`` initialised
    ``N(0, 1e-5)`` with zero bias, and ``transformer``
    (:class:`SpatialTransformer`, ``align_corners=True``). The defaults are
    VxmDense_1 (274,387 parameters); VxmDense_2 has ``enc_features=(16, 32, 32,
    32)``, ``final_features=(32, 16, 16)`` (301,411).

    Args:
      img_size: ``(D, H, W)``, each divisible by ``2 ** len(enc_features)``.
      enc_features, dec_features, final_features: channels per conv;
        ``len(dec_features) == len(enc_features)``, ``final_features`` not empty.
      diffeomorphic: integrate the flow head's output as a stationary velocity
        field (``int_steps`` squarings) before warping; the authors' networks
        have no integration.
    """

    def __init__(self, img_size: Sequence[int],
                 enc_features: Sequence[int] = (8, 32, 32, 32),
                 dec_features: Sequence[int] = (32, 32, 32, 32),
                 final_features: Sequence[int] = (32, 8, 8),
                 diffeomorphic: bool = False, int_steps: int = 7):
        super().__init__()
        if len(dec_features) != len(enc_features) or not final_features:
            raise ValueError(
                f"VoxelMorph needs as many dec_features as enc_features and at least one "
                f"final_features, got {tuple(enc_features)}, {tuple(dec_features)}, "
                f"{tuple(final_features)}")
        self.img_size = _check_img_size("VoxelMorph", img_size, 2 ** len(enc_features))
        self.diffeomorphic, self.int_steps = diffeomorphic, int_steps
        self.unet_model = _VxmUNet(tuple(enc_features), tuple(dec_features),
                                   tuple(final_features))
        self.flow = _flow_head(final_features[-1])
        self.transformer = SpatialTransformer(self.img_size)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, 2, D, H, W)`` -> the flow ``(B, 3, D, H, W)`` alone."""
        _check_input("VoxelMorph", x, self.img_size)
        return _finalize(self.flow(self.unet_model(x)), self.diffeomorphic, self.int_steps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: ``(B, 2, D, H, W)`` -> ``(warped (B, 1, D, H, W), flow (B, 3, D, H, W))``."""
        flow = self.predict(x)
        return self.transformer(x[:, :1], flow), flow


# ---------------------------------------------------------------------------
# ViT-V-Net.

VIT_PATCH_SIZE = 8


class _DoubleConv(nn.Module):
    """``double_conv``: (3x3x3 conv with bias, ReLU) twice (indices 0 and 2 are convs)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.double_conv = nn.Sequential(_conv3(cin, cout), nn.ReLU(),
                                         _conv3(cout, cout), nn.ReLU())

    def forward(self, x):
        return self.double_conv(x)


class _Down(nn.Module):
    """``maxpool_conv``: 2x2x2 max pooling (index 0), then a ``_DoubleConv`` (index 1)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool3d(2), _DoubleConv(cin, cout))

    def forward(self, x):
        return self.maxpool_conv(x)


class _CNNEncoder(nn.Module):
    """``inc``, ``down1``, ``down2``: ``(B, 2, *S) -> (feats (B, c2, *S/4), skips)``.

    ``skips``: the features at 1/16 and 1/8 (``feats`` max-pooled once and twice),
    ``feats``, and those at 1/2 and 1, coarsest first.
    """

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        c0, c1, c2 = channels
        self.inc = _DoubleConv(2, c0)
        self.down1 = _Down(c0, c1)
        self.down2 = _Down(c1, c2)

    def forward(self, x):
        x1 = self.inc(x)
        x2 = self.down1(x1)
        feats = self.down2(x2)
        f8 = F.max_pool3d(feats, 2)
        return feats, [F.max_pool3d(f8, 2), f8, feats, x2, x1]


class _Embeddings(nn.Module):
    """``hybrid_model`` (the CNN encoder), then the tokens of its 1/4 features.

    ``patch_embeddings``: 8x8x8 conv, stride 8, flattened in C order to ``(B, N,
    hidden)``; plus ``position_embeddings`` ``(1, N, hidden)`` (zeros at init),
    dropout. Returns ``(tokens, skips)``.
    """

    def __init__(self, n_tokens: int, encoder_channels: Sequence[int], hidden: int,
                 dropout_rate: float):
        super().__init__()
        self.hybrid_model = _CNNEncoder(encoder_channels)
        self.patch_embeddings = nn.Conv3d(encoder_channels[-1], hidden, VIT_PATCH_SIZE,
                                          stride=VIT_PATCH_SIZE)
        self.position_embeddings = nn.Parameter(torch.zeros(1, n_tokens, hidden))
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x):
        feats, skips = self.hybrid_model(x)
        tokens = self.patch_embeddings(feats).flatten(2).transpose(1, 2)
        return self.dropout(tokens + self.position_embeddings), skips


class _Attention(nn.Module):
    """Multi-head self-attention ``(B, N, hidden) -> same``: ``query``, ``key``,
    ``value``, logits / sqrt(head_dim), softmax, dropout, ``out``, dropout (both
    dropouts ``attention_dropout_rate``)."""

    def __init__(self, hidden: int, heads: int, attention_dropout_rate: float):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.attn_dropout = nn.Dropout(attention_dropout_rate)
        self.proj_dropout = nn.Dropout(attention_dropout_rate)

    def forward(self, x):
        b, n, c = x.shape
        head_dim = c // self.heads
        split = lambda t: t.reshape(b, n, self.heads, head_dim).transpose(1, 2)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        logits = q @ k.transpose(-1, -2) / math.sqrt(head_dim)      # (B, heads, N, N)
        weights = self.attn_dropout(torch.softmax(logits, dim=-1))
        h = (weights @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_dropout(self.out(h))


class _ViTMlp(nn.Module):
    """``fc1`` (Xavier-uniform, bias ``N(0, 1e-6)``), exact GELU, dropout, ``fc2``,
    dropout."""

    def __init__(self, hidden: int, mlp_dim: int, dropout_rate: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, hidden)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x):
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))


class _ViTBlock(nn.Module):
    """Pre-norm block ``(B, N, hidden) -> same``: ``x + attn(attention_norm(x))``,
    then ``x + ffn(ffn_norm(x))``; LayerNorms with eps 1e-6."""

    def __init__(self, hidden: int, heads: int, mlp_dim: int, dropout_rate: float,
                 attention_dropout_rate: float):
        super().__init__()
        # The authors' registration order (the state_dict's): norms, ffn, attn.
        self.attention_norm = nn.LayerNorm(hidden, eps=1e-6)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-6)
        self.ffn = _ViTMlp(hidden, mlp_dim, dropout_rate)
        self.attn = _Attention(hidden, heads, attention_dropout_rate)

    def forward(self, x):
        x = x + self.attn(self.attention_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class _ViTEncoder(nn.Module):
    """``layer`` (the blocks), then ``encoder_norm`` (LayerNorm, eps 1e-6)."""

    def __init__(self, num_layers: int, hidden: int, heads: int, mlp_dim: int,
                 dropout_rate: float, attention_dropout_rate: float):
        super().__init__()
        self.layer = nn.ModuleList(
            _ViTBlock(hidden, heads, mlp_dim, dropout_rate, attention_dropout_rate)
            for _ in range(num_layers))
        self.encoder_norm = nn.LayerNorm(hidden, eps=1e-6)

    def forward(self, h):
        for block in self.layer:
            h = block(h)
        return self.encoder_norm(h)


class _ViTTransformer(nn.Module):
    """``embeddings`` then ``encoder``: ``(B, 2, *S) -> (tokens (B, N, hidden), skips)``."""

    def __init__(self, n_tokens: int, encoder_channels: Sequence[int], hidden: int,
                 num_layers: int, heads: int, mlp_dim: int, dropout_rate: float,
                 attention_dropout_rate: float):
        super().__init__()
        self.embeddings = _Embeddings(n_tokens, encoder_channels, hidden, dropout_rate)
        self.encoder = _ViTEncoder(num_layers, hidden, heads, mlp_dim, dropout_rate,
                                   attention_dropout_rate)

    def forward(self, x):
        tokens, skips = self.embeddings(x)
        return self.encoder(tokens), skips


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    """3x3x3 conv without bias (0), BatchNorm3d (1; eps 1e-5, momentum 0.1), ReLU."""
    return nn.Sequential(_conv3(cin, cout, bias=False), nn.BatchNorm3d(cout), nn.ReLU())


class _ViTDecoderBlock(nn.Module):
    """Trilinear x2 upsampling, concatenation ``[x, skip]``, ``conv1``, ``conv2``."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.conv1 = _conv_bn_relu(cin + cskip, cout)
        self.conv2 = _conv_bn_relu(cout, cout)

    def forward(self, x, skip):
        return self.conv2(self.conv1(torch.cat([_upsample2(x), skip], dim=1)))


class _ViTDecoder(nn.Module):
    """The authors' ``DecoderCup``: tokens on the 1/32 grid back to full resolution.

    ``(B, N, hidden)`` as ``(B, hidden, *grid)``, ``conv_more`` (conv-BN-ReLU),
    then ``blocks`` with the skips coarsest first.
    """

    def __init__(self, grid: Sequence[int], hidden: int, conv_first_channel: int,
                 decoder_channels: Sequence[int], skip_channels: Sequence[int]):
        super().__init__()
        self.grid = tuple(grid)
        self.conv_more = _conv_bn_relu(hidden, conv_first_channel)
        ins = [conv_first_channel, *decoder_channels[:-1]]
        self.blocks = nn.ModuleList(_ViTDecoderBlock(cin, skip, cout) for cin, skip, cout
                                    in zip(ins, skip_channels, decoder_channels))

    def forward(self, tokens, skips):
        b, _, hidden = tokens.shape
        h = self.conv_more(tokens.transpose(1, 2).reshape(b, hidden, *self.grid))
        for block, skip in zip(self.blocks, skips):
            h = block(h, skip)
        return h


class ViTVNet(nn.Module):
    """ViT-V-Net: ``(B, 2, *img_size) -> (warped, flow)``, as ``ofg_jax.models.ViTVNet``.

    ``transformer``: a CNN encoder (``encoder_channels`` ``(c0, c1, c2)``: a double
    conv at full resolution, then max-pool + double conv twice) feeds a ViT on
    8x8x8 patches of its 1/4-resolution features (a strided conv, learned position
    embeddings, dropout, ``num_layers`` pre-norm blocks, a final LayerNorm).
    ``decoder``: ``conv_more`` (conv-BatchNorm-ReLU to ``conv_first_channel``) and
    five blocks (trilinear x2 upsampling, concatenation ``[x, skip]``, two
    conv-BatchNorm-ReLU to ``decoder_channels[i]``) with skips ``(c2 at 1/16, c2 at
    1/8, c2 at 1/4, c1 at 1/2, c0 at 1)``. ``reg_head``: the 3x3x3 flow head
    (``N(0, 1e-5)``). ``spatial_trans``: ``align_corners=True``. 31,560,079
    parameters at 160x192x224 with the defaults (the published configuration).

    Args:
      img_size: ``(D, H, W)``, each divisible by 32.
      encoder_channels, hidden_size, num_layers, num_heads, mlp_dim, dropout_rate,
      attention_dropout_rate, conv_first_channel, decoder_channels: the
        architecture.
      diffeomorphic, int_steps: as :class:`VoxelMorph`.
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
        self.diffeomorphic, self.int_steps = diffeomorphic, int_steps
        c0, c1, c2 = encoder_channels
        grid = tuple(n // (4 * VIT_PATCH_SIZE) for n in self.img_size)
        self.transformer = _ViTTransformer(
            math.prod(grid), encoder_channels, hidden_size, num_layers, num_heads, mlp_dim,
            dropout_rate, attention_dropout_rate)
        self.decoder = _ViTDecoder(grid, hidden_size, conv_first_channel, decoder_channels,
                                   (c2, c2, c2, c1, c0))
        self.reg_head = nn.Sequential(_flow_head(decoder_channels[-1]))
        self.spatial_trans = SpatialTransformer(self.img_size)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, 2, D, H, W)`` -> the flow ``(B, 3, D, H, W)`` alone."""
        _check_input("ViTVNet", x, self.img_size)
        tokens, skips = self.transformer(x)
        return _finalize(self.reg_head(self.decoder(tokens, skips)), self.diffeomorphic,
                         self.int_steps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: ``(B, 2, D, H, W)`` -> ``(warped (B, 1, D, H, W), flow (B, 3, D, H, W))``."""
        flow = self.predict(x)
        return self.spatial_trans(x[:, :1], flow), flow


# ---------------------------------------------------------------------------
# TransMorph.


def _conv_in_lrelu(cin: int, cout: int) -> nn.Sequential:
    """3x3x3 conv without bias (0), InstanceNorm3d (1; no affine, no running
    statistics, eps 1e-5), LeakyReLU(0.01) (2)."""
    return nn.Sequential(_conv3(cin, cout, bias=False), nn.InstanceNorm3d(cout),
                         nn.LeakyReLU(0.01))


class _SwinDecoderBlock(nn.Module):
    """Trilinear x2 upsampling, concatenation ``[x, skip]``, ``conv1``, ``conv2``."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.conv1 = _conv_in_lrelu(cin + cskip, cout)
        self.conv2 = _conv_in_lrelu(cout, cout)

    def forward(self, x, skip):
        return self.conv2(self.conv1(torch.cat([_upsample2(x), skip], dim=1)))


class TransMorph(nn.Module):
    """TransMorph: ``(B, 2, *img_size) -> (warped, flow)``, as ``ofg_jax.models.TransMorph``.

    ``transformer`` (:class:`experiments.torch_swin.SwinEncoder`): 4x4x4 patch
    embedding (strided conv, LayerNorm, dropout), four stages of ``depths[i]``
    blocks of width ``E * 2**i`` (``E = embed_dim``; odd blocks shifted by
    ``window_size // 2``), patch merging (8C -> 2C) between stages, a LayerNorm
    ``norm{i}`` on each stage's output. Conv skips: ``c1`` (``E // 2``) of the
    input average-pooled 3x3x3/2 (zero padding counted), ``c2``
    (``reg_head_chan``) of the input; conv-InstanceNorm-LeakyReLU(0.01) each.
    Decoder blocks ``up0``..``up4`` (trilinear x2, concatenation ``[x, skip]``, two
    conv-InstanceNorm-LeakyReLU) from the last stage through the stage outputs 2,
    1, 0, ``c1`` and ``c2``, widths ``(4E, 2E, E, E/2, reg_head_chan)``;
    ``reg_head``: the 3x3x3 flow head ``N(0, 1e-5)``; ``spatial_trans``
    (``align_corners=True``). 46,771,251 parameters at 160x192x224 with the
    defaults (the authors' IXI TransMorph).

    ``half_resolution_flow=True`` is the authors' OASIS layout: no ``up4``;
    ``up3`` goes to ``reg_head_chan`` channels (its skip is still ``c1``); the
    flow head runs at half resolution and its output is upsampled x2 (trilinear,
    ``align_corners=False``) without scaling its values; ``spatial_trans``
    samples with ``align_corners=False``; ``c2`` keeps its parameters (they are in
    the checkpoints) but is not used. 46,556,979 parameters at 160x192x224;
    TransMorph-Large is ``embed_dim=128, depths=(2, 2, 12, 2), num_heads=(4, 4, 8,
    16)`` with it (107,949,923).

    Args:
      img_size: ``(D, H, W)``; divisible by 32; a stage grid (``img_size / 4 /
        2**i``) that ``window_size`` does not tile is zero-padded to a multiple of it.
      embed_dim, depths, num_heads, window_size, mlp_ratio, qkv_bias, drop_rate,
      attn_drop_rate, drop_path_rate, reg_head_chan: the architecture; defaults
        are the published IXI configuration.
      diffeomorphic, int_steps: as :class:`VoxelMorph` (with
        ``half_resolution_flow``, the upsampled field is integrated).
      half_resolution_flow: the OASIS layout above.
    """

    def __init__(self, img_size: Sequence[int], embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 4, 2), num_heads: Sequence[int] = (4, 4, 8, 8),
                 window_size: Sequence[int] = (5, 6, 7), mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.3, reg_head_chan: int = 16,
                 diffeomorphic: bool = False, int_steps: int = 7,
                 half_resolution_flow: bool = False):
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
        self.img_size = _check_img_size("TransMorph", img_size, 32)
        self.diffeomorphic, self.int_steps = diffeomorphic, int_steps
        self.half_resolution_flow = half_resolution_flow
        e = embed_dim
        self.transformer = SwinEncoder(self.img_size, e, tuple(depths), tuple(num_heads),
                                       window, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate,
                                       drop_path_rate)
        self.up0 = _SwinDecoderBlock(8 * e, 4 * e, 4 * e)
        self.up1 = _SwinDecoderBlock(4 * e, 2 * e, 2 * e)
        self.up2 = _SwinDecoderBlock(2 * e, e, e)
        if half_resolution_flow:
            self.up3 = _SwinDecoderBlock(e, e // 2, reg_head_chan)
        else:
            self.up3 = _SwinDecoderBlock(e, e // 2, e // 2)
            self.up4 = _SwinDecoderBlock(e // 2, reg_head_chan, reg_head_chan)
        self.c1 = _conv_in_lrelu(2, e // 2)
        self.c2 = _conv_in_lrelu(2, reg_head_chan)
        self.reg_head = nn.Sequential(_flow_head(reg_head_chan))
        self.spatial_trans = SpatialTransformer(self.img_size,
                                                align_corners=not half_resolution_flow)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, 2, D, H, W)`` -> the flow ``(B, 3, D, H, W)`` alone."""
        _check_input("TransMorph", x, self.img_size)
        conv_skip_half = self.c1(F.avg_pool3d(x, 3, stride=2, padding=1))
        stages = self.transformer(x)
        h = self.up0(stages[3], stages[2])
        h = self.up1(h, stages[1])
        h = self.up2(h, stages[0])
        h = self.up3(h, conv_skip_half)
        if self.half_resolution_flow:
            flow = _upsample2(self.reg_head(h))
        else:
            flow = self.reg_head(self.up4(h, self.c2(x)))
        return _finalize(flow, self.diffeomorphic, self.int_steps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: ``(B, 2, D, H, W)`` -> ``(warped (B, 1, D, H, W), flow (B, 3, D, H, W))``."""
        flow = self.predict(x)
        return self.spatial_trans(x[:, :1], flow), flow


# ---------------------------------------------------------------------------
# The published layouts, and weights from Flax.

NETWORKS = {"voxelmorph": VoxelMorph, "vitvnet": ViTVNet, "transmorph": TransMorph}

# The checkpoints that the TransMorph authors publish: layout -> (network, options).
PUBLISHED = {
    "voxelmorph1": ("voxelmorph", {}),
    "voxelmorph2": ("voxelmorph", {"enc_features": (16, 32, 32, 32),
                                   "final_features": (32, 16, 16)}),
    "vitvnet": ("vitvnet", {}),
    "transmorph": ("transmorph", {}),
    "transmorph_oasis": ("transmorph", {"half_resolution_flow": True}),
    "transmorph_large_oasis": ("transmorph", {
        "embed_dim": 128, "depths": (2, 2, 12, 2), "num_heads": (4, 4, 8, 16),
        "half_resolution_flow": True}),
}
PUBLISHED_IMG_SIZE = (160, 192, 224)


def published(layout: str, img_size: Sequence[int] = PUBLISHED_IMG_SIZE,
              **options: Any) -> nn.Module:
    """The network of the published ``layout`` (a key of :data:`PUBLISHED`);
    ``options`` override its configuration (e.g. ``window_size`` at small grids)."""
    if layout not in PUBLISHED:
        raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(PUBLISHED)}")
    name, defaults = PUBLISHED[layout]
    return NETWORKS[name](tuple(img_size), **{**defaults, **options})


def load_variables(net: nn.Module, model: Any, variables: Mapping) -> None:
    """Copies the Flax ``variables`` of ``model`` into ``net`` (strict).

    ``model``: the Flax network (``ofg_jax.models.create(name, img_size,
    **options)``) of the same architecture as ``net``; ``variables``: its
    ``{"params": ..., "batch_stats": ...}``. ``ofg_jax.models.to_torch`` gives the
    authors' state_dict; every key must exist in ``net`` with the same shape and
    ``net`` must have no other (``load_state_dict(strict=True)`` raises
    ``RuntimeError`` naming them otherwise).
    """
    from ofg_jax.models import to_torch

    state = to_torch(model, variables)
    net.load_state_dict({key: torch.from_numpy(np.array(value))
                         for key, value in state.items()}, strict=True)


def randomise(net: nn.Module, seed: int) -> nn.Module:
    """``net`` in eval mode with every parameter and BatchNorm statistic drawn
    afresh (so that a wrong mapping of weights cannot pass a comparison).

    Weights ~ N(0, 1/fan_in) (activations stay O(1), and the flow head, ~0 as
    built, gives O(1) displacements); biases ~ N(0, 0.1); norm weights
    U(0.5, 1.5); position embeddings and relative position bias tables N(0, 1);
    running means N(0, 0.5), variances U(0.3, 3).
    """
    generator = torch.Generator().manual_seed(seed)
    draw = lambda t, scale: torch.randn(t.shape, generator=generator) * scale
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(("position_embeddings", "relative_position_bias_table")):
                p.copy_(draw(p, 1.0))
            elif p.dim() > 1:
                p.copy_(draw(p, p[0].numel() ** -0.5))
            elif name.endswith("weight"):  # LayerNorm, BatchNorm
                p.copy_(torch.rand(p.shape, generator=generator) + 0.5)
            else:
                p.copy_(draw(p, 0.1))
        for name, b in net.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(draw(b, 0.5))
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=generator) * 2.7 + 0.3)
    return net.eval()
