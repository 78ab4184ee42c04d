"""Smoothness penalties on displacement fields."""

import jax
import jax.numpy as jnp

from ofg_jax._shapes import check_disp


def grad_loss(disp: jax.Array, *, penalty: str = "l2") -> jax.Array:
    """VoxelMorph's ``Grad`` regulariser of a displacement field.

    Forward differences along each spatial axis, squared (``"l2"``) or absolute
    (``"l1"``); the mean of each, summed over the axes and divided by their number.

    Args:
      disp: ``(*S, N)`` displacement in voxels, 2D or 3D.
      penalty: ``"l2"`` (OFG's default) or ``"l1"``.

    Returns:
      Scalar penalty, in voxels squared (l2) or voxels (l1) per voxel step.
    """
    spatial = _check(disp, penalty)
    total = 0.0
    for axis in range(len(spatial)):
        total = total + _mean_penalty(jnp.diff(disp, axis=axis), penalty)
    return total / len(spatial)


def _check(disp, penalty):
    """The spatial shape of ``disp``, after checking it and ``penalty``."""
    spatial = check_disp(disp.shape)
    if penalty not in ("l1", "l2"):
        raise ValueError(f"penalty must be 'l1' or 'l2', got {penalty!r}")
    return spatial


def _penalty(diff, penalty):
    return diff * diff if penalty == "l2" else jnp.abs(diff)


def _mean_penalty(diff, penalty):
    return jnp.mean(_penalty(diff, penalty))


def grad_loss_gradient(disp: jax.Array, *, penalty: str = "l2") -> jax.Array:
    """``jax.grad(grad_loss)(disp)``, written out as one pass over ``disp``.

    At each voxel, the derivatives of the penalty of its differences to the
    previous and the next voxel along each axis, from one zero-padded copy of
    ``disp`` per axis: a stencil that XLA fuses into one loop, where autodiff
    builds the sum from one padded array per axis and side.

    Args:
      disp: ``(*S, N)`` displacement in voxels, 2D or 3D.
      penalty: ``"l2"`` or ``"l1"``.

    Returns:
      ``(*S, N)`` gradient of :func:`grad_loss` in ``disp``.
    """
    spatial = _check(disp, penalty)
    # The derivative of the elementwise penalty, as autodiff takes it.
    slope = jax.grad(lambda d: _penalty(d, penalty))
    total = 0.0
    for axis, n in enumerate(spatial):
        # The neighbours before and after, from one zero-padded copy (the zeros
        # at the two ends, where a difference does not exist, are masked out).
        pad = [(0, 0)] * disp.ndim
        pad[axis] = (1, 1)
        padded = jnp.pad(disp, pad)
        before = jax.lax.slice_in_dim(padded, 0, n, axis=axis)
        after = jax.lax.slice_in_dim(padded, 2, n + 2, axis=axis)
        index = jax.lax.broadcasted_iota(jnp.int32, disp.shape, axis)
        from_before = jnp.where(index > 0, jnp.vectorize(slope)(disp - before), 0)
        from_after = jnp.where(index < n - 1, jnp.vectorize(slope)(after - disp), 0)
        count = disp.size // n * (n - 1)
        total = total + (from_before - from_after) / (count * len(spatial))
    return total
