"""ViT-V-Net (Chen et al. 2021): a ViT bottleneck in a convolutional U-Net."""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ofg_jax.models.base import RegistrationNetwork, check_divisible, remat_if
from ofg_jax.models.activations import gelu, relu
from ofg_jax.models.layers import Conv3D, torch_dense
from ofg_jax.models.resample import max_pool2, upsample_linear2

PATCH_SIZE = 8  # fixed: the decoder's five x2 upsamplings start from 1/32


class DoubleConv(nn.Module):
    """(3x3x3 conv with bias, ReLU) twice."""

    features: int
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = Conv3D(self.features, 3, 1, 1, dtype=self.dtype, impl=self.conv_impl,
                       name=f"conv_{i}")(x)
            x = relu(x)
        return x


_BN_EPS = 1e-5
_BN_MOMENTUM = 0.9


def _bn_stats(x):
    """Per-channel mean and biased variance in float32, as flax's (fast variance)."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    axes = tuple(range(x.ndim - 1))
    mean, mean2 = x.mean(axes), jax.lax.square(x).mean(axes)
    return mean, jnp.maximum(0.0, mean2 - jax.lax.square(mean))


def _bn_apply(x, mean, var, scale, bias):
    """``(x - mean) * (rsqrt(var + eps) * scale) + bias``, as flax's ``_normalize``."""
    return (x - mean) * (jax.lax.rsqrt(var + _BN_EPS) * scale) + bias


@jax.custom_vjp
def _batch_norm(x, scale, bias):
    """Training-mode BatchNorm over all axes but the last: ``(y, mean, var)``, float32."""
    mean, var = _bn_stats(x)
    return _bn_apply(x, mean, var, scale, bias), mean, var


def _batch_norm_fwd(x, scale, bias):
    mean, var = _bn_stats(x)
    return (_bn_apply(x, mean, var, scale, bias), mean, var), (x, mean, var, scale)


def _batch_norm_bwd(res, cts):
    x, mean, var, scale = res
    g, g_mean, g_var = cts
    # Not before g exists: XLA would otherwise normalise x early and keep it.
    x, g = jax.lax.optimization_barrier((x, g))
    axes = tuple(range(x.ndim - 1))
    n = np.prod(x.shape[:-1])
    rstd = jax.lax.rsqrt(var + _BN_EPS)
    centred = x - mean
    xhat = centred * rstd
    g = g.astype(xhat.dtype)
    d_bias = g.sum(axes)
    d_scale = (g * xhat).sum(axes)
    # y = scale * xhat + bias with the batch's mean and (biased) variance of x.
    dx = (scale * rstd) * (g - d_bias / n - xhat * (d_scale / n))
    # The statistics are returned for the running averages; their cotangents are zero
    # in training, but a caller may differentiate them.
    dx = dx + g_mean / n + g_var * (2.0 / n) * centred
    return dx.astype(x.dtype), d_scale, d_bias


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


class BatchNorm(nn.Module):
    """``nn.BatchNorm(momentum=0.9, epsilon=1e-5)`` over every axis but the channels.

    PyTorch's ``BatchNorm3d`` defaults, with flax's variables (``params``:
    ``scale``, ``bias``; ``batch_stats``: ``mean``, ``var``, the biased batch
    variance) and values. In training, only its input is kept for the gradient
    (autodiff of ``nn.BatchNorm`` keeps ``x - mean`` and ``x`` besides, two
    feature maps per layer).
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        if train:
            y, mean, var = _batch_norm(x, scale, bias)
            if not self.is_initializing():
                ra_mean.value = _BN_MOMENTUM * ra_mean.value + (1 - _BN_MOMENTUM) * mean
                ra_var.value = _BN_MOMENTUM * ra_var.value + (1 - _BN_MOMENTUM) * var
        else:
            y = _bn_apply(x, ra_mean.value, ra_var.value, scale, bias)
        return y.astype(self.dtype or x.dtype)


class ConvBNReLU(nn.Module):
    """3x3x3 conv without bias, BatchNorm (PyTorch defaults), ReLU."""

    features: int
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool):
        x = Conv3D(self.features, 3, 1, 1, use_bias=False, dtype=self.dtype,
                   impl=self.conv_impl, name="conv")(x)
        x = BatchNorm(self.dtype, name="norm")(x, train)
        return relu(x)


class DecoderBlock(nn.Module):
    """Trilinear x2 upsampling, skip concatenation, two ``ConvBNReLU``.

    With ``remat``, two stages: the upsampling, concatenation and first
    ``ConvBNReLU``; the second ``ConvBNReLU``.
    """

    features: int
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    remat: bool = False

    @nn.compact
    def __call__(self, x, skip, train: bool):
        def first(mdl, x, *skip):
            x = upsample_linear2(x)
            if skip:  # the concatenation [x, skip], made by the conv
                x = (x, skip[0])
            return ConvBNReLU(self.features, self.dtype, self.conv_impl, name="conv_0")(
                x, train)

        x = remat_if(self.remat, first)(self, x, *([] if skip is None else [skip]))
        return remat_if(self.remat, ConvBNReLU, (2,))(
            self.features, self.dtype, self.conv_impl, name="conv_1")(x, train)


class ViTBlock(nn.Module):
    """Pre-norm transformer block: multi-head self-attention, then a GELU MLP."""

    hidden_size: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float
    attention_dropout_rate: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        """``(B, N, hidden) -> (B, N, hidden)``."""
        hidden, heads = self.hidden_size, self.num_heads
        head_dim = hidden // heads
        b, n, _ = x.shape
        deterministic = not train

        h = nn.LayerNorm(1e-6, dtype=self.dtype, name="attention_norm")(x)
        q, k, v = (torch_dense(hidden, hidden, dtype=self.dtype, name=name)(h)
                   .reshape(b, n, heads, head_dim) for name in ("query", "key", "value"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(self.dtype)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        weights = nn.Dropout(self.attention_dropout_rate)(weights, deterministic)
        h = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, hidden)
        h = torch_dense(hidden, hidden, dtype=self.dtype, name="out")(h)
        x = x + nn.Dropout(self.attention_dropout_rate)(h, deterministic)

        h = nn.LayerNorm(1e-6, dtype=self.dtype, name="ffn_norm")(x)
        dense = lambda features, name: nn.Dense(
            features, dtype=self.dtype, param_dtype=jnp.float32,
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(1e-6), name=name)
        h = gelu(dense(self.mlp_dim, "fc1")(h))
        h = nn.Dropout(self.dropout_rate)(h, deterministic)
        h = nn.Dropout(self.dropout_rate)(dense(hidden, "fc2")(h), deterministic)
        return x + h


class ViTVNet(RegistrationNetwork):
    """ViT-V-Net: ``(B, *img_size, 2) -> (B, *img_size, 3)`` displacement in voxels.

    A CNN encoder (``encoder_channels``: a double conv at full resolution, then
    max-pool + double conv twice) feeds a ViT on 8x8x8 patches of its
    1/4-resolution features (learned position embeddings, ``num_layers``
    pre-norm blocks). A conv (``conv_first_channel``) and five decoder blocks
    (trilinear x2 upsampling, skip concatenation, two conv-BatchNorm-ReLU) lead
    back to full resolution; skips are the encoder features at 1/16, 1/8 (both
    max-pooled from 1/4), 1/4, 1/2 and 1. A 3x3x3 flow head initialised
    ``N(0, 1e-5)``. The defaults have 31,560,079 parameters at 160x192x224.

    Variables: ``params`` and ``batch_stats`` (the decoder's BatchNorm). With
    ``train=True`` pass ``mutable=["batch_stats"]`` and ``rngs={"dropout": key}``.

    Attributes (besides those of ``RegistrationNetwork``):
      img_size: ``(D, H, W)``, each divisible by 32 (two 2x downsamplings, then
        8^3 patches: the five decoder blocks bring the 1/32 token grid back to
        full resolution).

    The other attributes (``encoder_channels``, ``hidden_size``, ``num_layers``,
    ``num_heads``, ``mlp_dim``, ``dropout_rate``, ``attention_dropout_rate``,
    ``conv_first_channel``, ``decoder_channels``) set the architecture; the
    defaults are the published configuration, and the skip widths follow from
    ``encoder_channels``: ``(c2, c2, c2, c1, c0)``.
    """

    encoder_channels: Sequence[int] = (16, 32, 32)
    hidden_size: int = 252
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    conv_first_channel: int = 512
    decoder_channels: Sequence[int] = (96, 48, 32, 32, 16)

    def check_size(self) -> None:
        """Raises ``ValueError`` if the configuration or ``img_size`` cannot work."""
        if len(self.encoder_channels) != 3:
            raise ValueError(
                f"ViTVNet needs 3 encoder_channels, got {tuple(self.encoder_channels)}")
        if len(self.decoder_channels) != 5:
            raise ValueError(
                f"ViTVNet needs 5 decoder_channels, got {tuple(self.decoder_channels)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"ViTVNet: hidden_size {self.hidden_size} is not divisible by num_heads "
                f"{self.num_heads}")
        check_divisible("ViTVNet", self.img_size, 4 * PATCH_SIZE,
                        f"two 2x downsamplings, then {PATCH_SIZE}^3 patches")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """``x``: ``(B, D, H, W, 2)``, moving then fixed."""
        self.check_size()
        self.check_input(x)
        dtype = self.compute_dtype
        impl = self.conv_impl
        c0, c1, c2 = self.encoder_channels

        double_conv = self.stage(DoubleConv)
        x1 = double_conv(c0, dtype, impl, name="inc")(x.astype(dtype))
        x2 = double_conv(c1, dtype, impl, name="down1")(max_pool2(x1))
        feats = double_conv(c2, dtype, impl, name="down2")(max_pool2(x2))
        f8 = max_pool2(feats)
        skips = [max_pool2(f8), f8, feats, x2, x1]

        tokens = Conv3D(self.hidden_size, PATCH_SIZE, PATCH_SIZE, 0, dtype=dtype, impl=impl,
                        name="patch_embeddings")(feats)
        b, *grid, _ = tokens.shape
        tokens = tokens.reshape(b, -1, self.hidden_size)
        pos = self.param("position_embeddings", nn.initializers.zeros,
                         (1, tokens.shape[1], self.hidden_size), jnp.float32)
        h = nn.Dropout(self.dropout_rate)(tokens + pos.astype(dtype), not train)
        for i in range(self.num_layers):
            h = self.stage(ViTBlock, (2,))(
                self.hidden_size, self.num_heads, self.mlp_dim, self.dropout_rate,
                self.attention_dropout_rate, dtype, name=f"layer_{i}")(h, train)
        h = nn.LayerNorm(1e-6, dtype=dtype, name="encoder_norm")(h)

        h = h.reshape(b, *grid, self.hidden_size)
        h = ConvBNReLU(self.conv_first_channel, dtype, impl, name="conv_more")(h, train)
        for i, (features, skip) in enumerate(zip(self.decoder_channels, skips)):
            h = DecoderBlock(features, dtype, impl, self.remat, name=f"decoder_{i}")(
                h, skip, train)
        return self.flow(h)
