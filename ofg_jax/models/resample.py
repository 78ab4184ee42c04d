"""Resampling by 2 and pooling of channels-last feature maps ``(B, *S, C)``.

Each matches the PyTorch operation named in its docstring, written separably so
that XLA emits cheap elementwise code.
"""

import jax
import jax.numpy as jnp


def _spatial_axes(x: jax.Array) -> range:
    return range(1, x.ndim - 1)


def upsample_nearest2(x: jax.Array) -> jax.Array:
    """``nn.Upsample(scale_factor=2, mode="nearest")``: ``(B, *S, C) -> (B, *2S, C)``."""
    for axis in _spatial_axes(x):
        x = jnp.repeat(x, 2, axis=axis)
    return x


def _linear2_along(x: jax.Array, axis: int) -> jax.Array:
    """x2 linear upsampling along one axis, half-pixel centres, edge-clamped."""
    n = x.shape[axis]
    take = lambda start, stop: jax.lax.slice_in_dim(x, start, stop, axis=axis)
    prev = jnp.concatenate([take(0, 1), take(0, n - 1)], axis=axis)   # x[i - 1], clamped
    nxt = jnp.concatenate([take(1, n), take(n - 1, n)], axis=axis)    # x[i + 1], clamped
    even = 0.75 * x + 0.25 * prev    # output 2i   samples input i - 1/4
    odd = 0.75 * x + 0.25 * nxt      # output 2i+1 samples input i + 1/4
    out = jnp.stack([even, odd], axis=axis + 1)
    return out.reshape(*x.shape[:axis], 2 * n, *x.shape[axis + 1:])


def upsample_linear2(x: jax.Array) -> jax.Array:
    """``nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)``.

    ``(B, *S, C) -> (B, *2S, C)``; also bilinear for 2D maps.
    """
    for axis in _spatial_axes(x):
        x = _linear2_along(x, axis)
    return x


def max_pool2(x: jax.Array) -> jax.Array:
    """``nn.MaxPool3d(2)``: ``(B, *S, C) -> (B, *S // 2, C)`` (odd remainders dropped)."""
    b, c = x.shape[0], x.shape[-1]
    spatial = [n // 2 for n in x.shape[1:-1]]
    x = x[(slice(None), *[slice(0, 2 * n) for n in spatial])]
    blocks = [v for n in spatial for v in (n, 2)]
    x = x.reshape(b, *blocks, c)
    return x.max(axis=tuple(range(2, 2 * len(spatial) + 1, 2)))


def avg_pool3_stride2(x: jax.Array) -> jax.Array:
    """``nn.AvgPool3d(3, stride=2, padding=1)`` (zero padding counted in the mean).

    ``(B, *S, C) -> (B, *ceil(S / 2), C)``.
    """
    ndim = x.ndim - 2
    for axis in _spatial_axes(x):
        n = x.shape[axis]
        pad = [(0, 0)] * x.ndim
        pad[axis] = (1, 1 + n % 2)
        xp = jnp.pad(x, pad)
        m = (n + 1) // 2
        take = lambda start: jax.lax.slice_in_dim(xp, start, start + 2 * m, 2, axis)
        x = take(0) + take(1) + take(2)
    return x / 3 ** ndim
