"""TransMorph (Chen et al. 2022): a 3D Swin Transformer encoder in a U-Net."""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ofg_jax.models.base import (RegistrationNetwork, check_divisible, check_img_size,
                                 remat_if)
from ofg_jax.models.activations import gelu, softmax
from ofg_jax.models.layers import Conv3D, torch_dense
from ofg_jax.models.resample import avg_pool3_stride2, upsample_linear2

_LN_EPS = 1e-5  # PyTorch's nn.LayerNorm default
PATCH_SIZE = 4  # fixed: the decoder's conv skips sit at 1/2 and full resolution


# ---------------------------------------------------------------------------
# Windows (static index arithmetic in NumPy).


def window_partition(x: jax.Array, window: Sequence[int]) -> jax.Array:
    """``(B, D, H, W, C) -> (B * n_windows, prod(window), C)``, windows batch-major."""
    b, d, h, w, c = x.shape
    wd, wh, ww = window
    x = x.reshape(b, d // wd, wd, h // wh, wh, w // ww, ww, c)
    return x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, wd * wh * ww, c)


def window_reverse(windows: jax.Array, window: Sequence[int],
                   size: Sequence[int]) -> jax.Array:
    """Inverse of ``window_partition`` for a volume of spatial ``size``."""
    d, h, w = size
    wd, wh, ww = window
    c = windows.shape[-1]
    x = windows.reshape(-1, d // wd, h // wh, w // ww, wd, wh, ww, c)
    return x.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(-1, d, h, w, c)


def relative_position_index(window: Sequence[int]) -> np.ndarray:
    """``(N, N)`` index into the ``prod(2 w - 1)`` relative-offset table, N = prod(w)."""
    coords = np.stack(np.meshgrid(*[np.arange(n) for n in window], indexing="ij"))
    coords = coords.reshape(3, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
    rel = rel + np.asarray(window) - 1
    strides = np.asarray([(2 * window[1] - 1) * (2 * window[2] - 1), 2 * window[2] - 1, 1])
    return (rel * strides).sum(-1)


def shifted_window_mask(size: Sequence[int], window: Sequence[int],
                        shift: Sequence[int]) -> np.ndarray:
    """``(n_windows, N, N)`` additive mask (0 or -100) of shifted-window attention.

    After the cyclic shift, a window can hold voxels from up to 8 regions that
    were not neighbours; tokens attend only within their own region.
    """
    labels = np.zeros(tuple(size), np.float32)
    count = 0
    bands = [((0, -w), (-w, -s), (-s, None)) for w, s in zip(window, shift)]
    for bd in bands[0]:
        for bh in bands[1]:
            for bw in bands[2]:
                labels[slice(*bd), slice(*bh), slice(*bw)] = count
                count += 1
    groups = np.asarray(window_partition(labels[None, ..., None], window))[..., 0]
    diff = groups[:, None, :] - groups[:, :, None]
    return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


# ---------------------------------------------------------------------------
# Swin blocks.


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample (``dropout`` rng)."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep,
                                    (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, 0).astype(x.dtype)


class WindowAttention(nn.Module):
    """Multi-head self-attention within windows, with a relative position bias."""

    dim: int
    window: Sequence[int]
    num_heads: int
    qkv_bias: bool
    attn_drop_rate: float
    proj_drop_rate: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        """``x``: ``(B * n_windows, N, dim)``; ``mask``: ``(n_windows, N, N)`` or None."""
        b_, n, c = x.shape
        heads = self.num_heads
        head_dim = c // heads
        table_size = int(np.prod([2 * w - 1 for w in self.window]))
        # PyTorch draws this table from trunc_normal_(std=.02) truncated at +-2
        # (absolute), i.e. effectively untruncated.
        table = self.param("relative_position_bias_table", nn.initializers.normal(0.02),
                           (table_size, heads), jnp.float32)
        index = relative_position_index(self.window).reshape(-1)
        bias = table[index].reshape(n, n, heads).transpose(2, 0, 1)

        qkv = torch_dense(3 * c, c, self.qkv_bias, self.dtype, name="qkv")(x)
        qkv = qkv.reshape(b_, n, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * head_dim ** -0.5, qkv[1], qkv[2]
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) + bias
        if mask is not None:
            n_windows = mask.shape[0]
            logits = logits.reshape(b_ // n_windows, n_windows, heads, n, n)
            logits = (logits + jnp.asarray(mask)[None, :, None]).reshape(b_, heads, n, n)
        weights = softmax(logits).astype(self.dtype)
        weights = nn.Dropout(self.attn_drop_rate)(weights, deterministic)
        out = jnp.einsum("bhqk,bhkd->bqhd", weights, v).reshape(b_, n, c)
        out = torch_dense(c, c, dtype=self.dtype, name="proj")(out)
        return nn.Dropout(self.proj_drop_rate)(out, deterministic)


class SwinBlock(nn.Module):
    """(Shifted-)window attention and an MLP, each pre-norm and residual."""

    dim: int
    num_heads: int
    window: Sequence[int]
    shift: Sequence[int]
    mlp_ratio: float
    qkv_bias: bool
    drop_rate: float
    attn_drop_rate: float
    drop_path_rate: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, size, deterministic: bool):
        """``x``: ``(B, D*H*W, dim)`` tokens of a ``size = (D, H, W)`` grid.

        As the reference, a grid that the window does not tile is zero-padded at
        the end of each axis after the first LayerNorm (the padding takes part in
        the attention), and cropped back after it.
        """
        b, length, c = x.shape
        # As the reference: the shift applies only if it is non-zero on every axis.
        shifted = min(self.shift) > 0
        padded = tuple(-(-n // w) * w for n, w in zip(size, self.window))
        h = nn.LayerNorm(_LN_EPS, dtype=self.dtype, name="norm1")(x).reshape(b, *size, c)
        if padded != tuple(size):
            h = jnp.pad(h, [(0, 0)] + [(0, p - n) for p, n in zip(padded, size)]
                        + [(0, 0)])
        if shifted:
            h = jnp.roll(h, [-s for s in self.shift], axis=(1, 2, 3))
        mask = shifted_window_mask(padded, self.window, self.shift) if shifted else None
        h = WindowAttention(c, tuple(self.window), self.num_heads, self.qkv_bias,
                            self.attn_drop_rate, self.drop_rate, self.dtype, name="attn")(
            window_partition(h, self.window), mask, deterministic)
        h = window_reverse(h, self.window, padded)
        if shifted:
            h = jnp.roll(h, list(self.shift), axis=(1, 2, 3))
        h = h[:, :size[0], :size[1], :size[2]]
        drop_path = DropPath(self.drop_path_rate)
        x = x + drop_path(h.reshape(b, length, c), deterministic)

        hidden = int(c * self.mlp_ratio)
        h = nn.LayerNorm(_LN_EPS, dtype=self.dtype, name="norm2")(x)
        h = gelu(torch_dense(hidden, c, dtype=self.dtype, name="fc1")(h))
        h = nn.Dropout(self.drop_rate)(h, deterministic)
        h = torch_dense(c, hidden, dtype=self.dtype, name="fc2")(h)
        h = nn.Dropout(self.drop_rate)(h, deterministic)
        return x + drop_path(h, deterministic)


class PatchMerging(nn.Module):
    """2x2x2 neighbours concatenated (8C), LayerNorm, linear to ``8C / reduce_factor``."""

    reduce_factor: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """``(B, D, H, W, C) -> (B, D/2, H/2, W/2, 8C / reduce_factor)``."""
        c = x.shape[-1]
        # The reference's order of the eight neighbours (offsets along D, H, W).
        offsets = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1),
                   (1, 1, 0), (0, 1, 1), (1, 0, 1), (1, 1, 1)]
        x = jnp.concatenate([x[:, i::2, j::2, k::2] for i, j, k in offsets], axis=-1)
        x = nn.LayerNorm(_LN_EPS, dtype=self.dtype, name="norm")(x)
        return torch_dense(8 * c // self.reduce_factor, 8 * c, use_bias=False,
                           dtype=self.dtype, name="reduction")(x)


# ---------------------------------------------------------------------------
# Convolutional decoder.


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def instance_norm_leaky_relu(x: jax.Array, negative_slope: float = 0.01,
                             eps: float = 1e-5) -> jax.Array:
    """``nn.InstanceNorm3d`` (no affine; ``eps``), then ``nn.LeakyReLU(negative_slope)``.

    ``(B, *S, C) -> (B, *S, C)``, normalised per sample and channel over space
    (biased variance, float32); ``negative_slope > 0`` (1 gives the instance norm
    alone). Only the output and the per-channel ``rstd`` are kept for the
    gradient: LeakyReLU is invertible, so the normalised input is the output
    divided by the slope where it is negative. Autodiff of the two
    keeps ``x - mean``, the normalised input and the output, three feature maps
    per layer where one does. The gradient is that of the two composed (to
    float32 rounding of the inversion).
    """
    return _instance_norm_leaky_relu_fwd(x, negative_slope, eps)[0]


def _instance_norm_leaky_relu_fwd(x, negative_slope, eps):
    axes = tuple(range(1, x.ndim - 1))
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axes, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(x32 - mean).mean(axes, keepdims=True) + eps)
    xhat = (x32 - mean) * rstd
    y = jnp.where(xhat >= 0, xhat, negative_slope * xhat).astype(x.dtype)
    return y, (y, rstd)


def _instance_norm_leaky_relu_bwd(negative_slope, eps, res, g):
    y, rstd = res
    axes = tuple(range(1, y.ndim - 1))
    y32, g32 = y.astype(jnp.float32), g.astype(jnp.float32)
    xhat = jnp.where(y32 >= 0, y32, y32 / negative_slope)
    g_hat = jnp.where(y32 >= 0, g32, negative_slope * g32)
    # xhat = (x - mean) * rstd over the spatial axes (biased variance).
    dx = rstd * (g_hat - g_hat.mean(axes, keepdims=True)
                 - xhat * (g_hat * xhat).mean(axes, keepdims=True))
    return (dx.astype(y.dtype),)


instance_norm_leaky_relu.defvjp(_instance_norm_leaky_relu_fwd, _instance_norm_leaky_relu_bwd)


class ConvNormAct(nn.Module):
    """3x3x3 conv without bias, instance norm, LeakyReLU(0.01)."""

    features: int
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        x = Conv3D(self.features, 3, 1, 1, use_bias=False, dtype=self.dtype,
                   impl=self.conv_impl, name="conv")(x)
        return instance_norm_leaky_relu(x, 0.01)


class DecoderBlock(nn.Module):
    """Trilinear x2 upsampling, skip concatenation, two ``ConvNormAct``.

    With ``remat``, two stages: the upsampling, concatenation and first
    ``ConvNormAct``; the second ``ConvNormAct``.
    """

    features: int
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    remat: bool = False

    @nn.compact
    def __call__(self, x, skip):
        def first(mdl, x, skip):
            x = (upsample_linear2(x), skip)  # concatenated by the conv
            return ConvNormAct(self.features, self.dtype, self.conv_impl, name="conv_0")(x)

        x = remat_if(self.remat, first)(self, x, skip)
        return remat_if(self.remat, ConvNormAct)(
            self.features, self.dtype, self.conv_impl, name="conv_1")(x)


# ---------------------------------------------------------------------------
# The network.


class TransMorph(RegistrationNetwork):
    """TransMorph: ``(B, *img_size, 2) -> (B, *img_size, 3)`` displacement in voxels.

    Swin encoder: a 4x4x4 patch embedding (conv + LayerNorm), four
    stages of ``depths`` (shifted-)window blocks with ``num_heads`` heads and
    relative position bias, patch merging (8C -> 2C) between stages, a LayerNorm
    on each stage's output. Decoder: five blocks (trilinear x2 upsampling, skip
    concatenation, two conv-InstanceNorm-LeakyReLU) taking the stage outputs at
    1/16, 1/8, 1/4 and two conv skips of the input (at 1/2 after 3x3x3 average
    pooling, and at full resolution), then a 3x3x3 flow head initialised
    ``N(0, 1e-5)``. The defaults (window (5, 6, 7)) have 46,771,251 parameters at
    160x192x224; window (5, 6, 5) at 160x192x160 (LPBA) has 46,745,907.

    With ``half_resolution_flow`` (the authors' OASIS TransMorph) the decoder
    stops at half resolution: four blocks, the last to ``reg_head_chan``
    channels on the pooled conv skip; there is no full-resolution conv skip, and
    the flow head's output is upsampled x2 trilinearly without scaling its
    values (46,556,115 parameters at 160x192x224).

    Attributes (besides those of ``RegistrationNetwork``):
      img_size: ``(D, H, W)``; each axis divisible by 32 (4^3 patches, then 3
        patch mergings). A stage grid (``img_size / 4 / 2**i``) that
        ``window_size`` does not tile is zero-padded to a multiple of it, as the
        reference does; small grids run faster with smaller windows, e.g.
        ``window_size=(2, 2, 2)`` at 64^3.

    The other attributes (``embed_dim``, ``depths``, ``num_heads``,
    ``window_size``, ``mlp_ratio``, ``qkv_bias``, ``drop_rate``,
    ``attn_drop_rate``, ``drop_path_rate``, ``reg_head_chan``,
    ``half_resolution_flow``) set the architecture; the defaults are the
    published (IXI) configuration.
    """

    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 4, 2)
    num_heads: Sequence[int] = (4, 4, 8, 8)
    window_size: Sequence[int] = (5, 6, 7)
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.3
    reg_head_chan: int = 16
    half_resolution_flow: bool = False

    def stage_sizes(self) -> list[tuple[int, int, int]]:
        """The token grid of each Swin stage."""
        size = check_img_size("TransMorph", self.img_size)
        return [tuple(n // (PATCH_SIZE * 2 ** i) for n in size)
                for i in range(len(self.depths))]

    def check_size(self) -> None:
        """Raises ``ValueError`` if the configuration or ``img_size`` cannot work."""
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ValueError(
                f"TransMorph needs 4 stages: depths and num_heads of length 4, got "
                f"{tuple(self.depths)} and {tuple(self.num_heads)}")
        window = tuple(self.window_size)
        if len(window) != 3 or any(w < 1 for w in window):
            raise ValueError(f"TransMorph: window_size must be 3 positive ints, got {window}")
        for i, heads in enumerate(self.num_heads):
            if (self.embed_dim * 2 ** i) % heads:
                raise ValueError(
                    f"TransMorph: stage {i} width {self.embed_dim * 2 ** i} is not "
                    f"divisible by num_heads[{i}] = {heads}")
        if self.embed_dim % 2:
            raise ValueError(f"TransMorph: embed_dim must be even, got {self.embed_dim}")
        check_divisible("TransMorph", self.img_size, PATCH_SIZE * 8,
                        f"{PATCH_SIZE}^3 patches, then 3 patch mergings")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """``x``: ``(B, D, H, W, 2)``, moving then fixed."""
        self.check_size()
        self.check_input(x)
        dtype = self.compute_dtype
        deterministic = not train
        window = tuple(self.window_size)
        shift = tuple(w // 2 for w in window)
        x = x.astype(dtype)

        h = Conv3D(self.embed_dim, PATCH_SIZE, PATCH_SIZE, 0, dtype=dtype,
                   impl=self.conv_impl, name="patch_embed")(x)
        h = nn.LayerNorm(_LN_EPS, dtype=dtype, name="patch_norm")(h)
        h = nn.Dropout(self.drop_rate)(h, deterministic)
        b = h.shape[0]
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
        stage_outputs = []
        for i, (depth, heads, size) in enumerate(
                zip(self.depths, self.num_heads, self.stage_sizes())):
            dim = self.embed_dim * 2 ** i
            tokens = h.reshape(b, -1, dim)
            for j in range(depth):
                tokens = self.stage(SwinBlock, (2, 3))(
                    dim, heads, window, (0, 0, 0) if j % 2 == 0 else shift,
                    self.mlp_ratio, self.qkv_bias, self.drop_rate, self.attn_drop_rate,
                    float(rates[sum(self.depths[:i]) + j]), dtype,
                    name=f"stage{i}_block{j}")(tokens, size, deterministic)
            h = tokens.reshape(b, *size, dim)
            stage_outputs.append(nn.LayerNorm(_LN_EPS, dtype=dtype, name=f"norm{i}")(h))
            if i < len(self.depths) - 1:
                h = PatchMerging(4, dtype, name=f"merge{i}")(h)

        conv_norm_act = self.stage(ConvNormAct)
        conv_skip_half = conv_norm_act(self.embed_dim // 2, dtype, self.conv_impl,
                                       name="c1")(avg_pool3_stride2(x))
        skips = [stage_outputs[2], stage_outputs[1], stage_outputs[0], conv_skip_half]
        widths = [self.embed_dim * 4, self.embed_dim * 2, self.embed_dim, self.embed_dim // 2]
        if self.half_resolution_flow:
            widths[-1] = self.reg_head_chan
        else:
            skips.append(conv_norm_act(self.reg_head_chan, dtype, self.conv_impl,
                                       name="c2")(x))
            widths.append(self.reg_head_chan)
        h = stage_outputs[3]
        for i, (features, skip) in enumerate(zip(widths, skips)):
            h = DecoderBlock(features, dtype, self.conv_impl, self.remat, name=f"up{i}")(
                h, skip)
        return self.flow(h, upsample=self.half_resolution_flow)
