"""Resampling by 2 and pooling of channels-last feature maps ``(B, *S, C)``.

Each matches the PyTorch operation named in its docstring, written separably so
that XLA emits cheap elementwise code.
"""

import functools

import jax
import jax.numpy as jnp


def _spatial_axes(x: jax.Array) -> range:
    return range(1, x.ndim - 1)


def upsample_nearest2(x: jax.Array) -> jax.Array:
    """``nn.Upsample(scale_factor=2, mode="nearest")``: ``(B, *S, C) -> (B, *2S, C)``."""
    for axis in _spatial_axes(x):
        x = jnp.repeat(x, 2, axis=axis)
    return x


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _linear2_along(x: jax.Array, axis: int) -> jax.Array:
    """x2 linear upsampling along one axis, half-pixel centres, edge-clamped.

    Its gradient is written out as one pass over the output's gradient:
    autodiff of the concatenations and the stack below materialises several
    arrays of the output's size (at full resolution, feature maps of several
    hundred MB each).
    """
    n = x.shape[axis]
    take = lambda start, stop: jax.lax.slice_in_dim(x, start, stop, axis=axis)
    prev = jnp.concatenate([take(0, 1), take(0, n - 1)], axis=axis)   # x[i - 1], clamped
    nxt = jnp.concatenate([take(1, n), take(n - 1, n)], axis=axis)    # x[i + 1], clamped
    even = 0.75 * x + 0.25 * prev    # output 2i   samples input i - 1/4
    odd = 0.75 * x + 0.25 * nxt      # output 2i+1 samples input i + 1/4
    out = jnp.stack([even, odd], axis=axis + 1)
    return out.reshape(*x.shape[:axis], 2 * n, *x.shape[axis + 1:])


def _linear2_along_fwd(x, axis):
    return _linear2_along(x, axis), None


def _linear2_along_bwd(axis, _, g):
    n = g.shape[axis] // 2
    g = g.reshape(*g.shape[:axis], n, 2, *g.shape[axis + 1:])
    g_even = jax.lax.index_in_dim(g, 0, axis + 1, keepdims=False)
    g_odd = jax.lax.index_in_dim(g, 1, axis + 1, keepdims=False)
    if n == 1:  # prev and nxt are x itself
        return (g_even + g_odd,)
    take = lambda a, start, stop: jax.lax.slice_in_dim(a, start, stop, axis=axis)
    g_prev, g_next = 0.25 * g_even, 0.25 * g_odd
    zero = jnp.zeros_like(take(g_prev, 0, 1))
    # prev = [x[0], x[0], ..., x[n-2]] and nxt = [x[1], ..., x[n-1], x[n-1]].
    from_prev = jnp.concatenate(
        [take(g_prev, 0, 1) + take(g_prev, 1, 2), take(g_prev, 2, n), zero], axis=axis)
    from_next = jnp.concatenate(
        [zero, take(g_next, 0, n - 2), take(g_next, n - 2, n - 1) + take(g_next, n - 1, n)],
        axis=axis)
    return (0.75 * (g_even + g_odd) + from_prev + from_next,)


_linear2_along.defvjp(_linear2_along_fwd, _linear2_along_bwd)


def upsample_linear2(x: jax.Array) -> jax.Array:
    """``nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)``.

    ``(B, *S, C) -> (B, *2S, C)``; also bilinear for 2D maps.
    """
    for axis in _spatial_axes(x):
        x = _linear2_along(x, axis)
    return x


def _blocks(x):
    """``x`` cropped to even sizes as ``(B, n1, 2, n2, 2, ..., C)``, and the 2-axes."""
    b, c = x.shape[0], x.shape[-1]
    spatial = [n // 2 for n in x.shape[1:-1]]
    x = x[(slice(None), *[slice(0, 2 * n) for n in spatial])]
    blocks = [v for n in spatial for v in (n, 2)]
    return x.reshape(b, *blocks, c), tuple(range(2, 2 * len(spatial) + 1, 2))


@jax.custom_vjp
def max_pool2(x: jax.Array) -> jax.Array:
    """``nn.MaxPool3d(2)``: ``(B, *S, C) -> (B, *S // 2, C)`` (odd remainders dropped).

    The gradient is JAX's for ``max`` (split evenly between tied maxima), but
    only the input is kept for it (the networks keep it anyway, as a skip),
    not a full-size mask of where the maxima are.
    """
    blocks, axes = _blocks(x)
    return blocks.max(axis=axes)


def _max_pool2_fwd(x):
    return max_pool2(x), x


def _max_pool2_bwd(x, g):
    # Not before g exists: XLA would otherwise compare x with the maxima at the
    # start of the backward pass and keep the full-size result.
    x, g = jax.lax.optimization_barrier((x, g))
    blocks, axes = _blocks(x)
    y = jnp.expand_dims(blocks.max(axis=axes), axes)
    # As jax's reduce_max derivative: g / (number of maxima) at each maximum.
    # (The comparison is written twice, so that it fuses into both uses rather
    # than being kept as a full-size mask.)
    counts = jnp.sum(blocks == y, axis=axes, dtype=g.dtype)
    grad = jnp.expand_dims(g / counts, axes) * (blocks == y).astype(g.dtype)
    grad = grad.reshape(x.shape[0], *[2 * (n // 2) for n in x.shape[1:-1]], x.shape[-1])
    return (jnp.pad(grad, [(0, 0)] + [(0, n % 2) for n in x.shape[1:-1]] + [(0, 0)]),)


max_pool2.defvjp(_max_pool2_fwd, _max_pool2_bwd)


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
        x = sum(jax.lax.slice_in_dim(xp, start, start + 2 * m, 2, axis)
                for start in range(3))
    return x / 3 ** ndim
