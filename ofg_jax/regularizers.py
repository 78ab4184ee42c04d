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
    spatial = check_disp(disp.shape)
    if penalty not in ("l1", "l2"):
        raise ValueError(f"penalty must be 'l1' or 'l2', got {penalty!r}")
    total = 0.0
    for axis in range(len(spatial)):
        d = jnp.diff(disp, axis=axis)
        total = total + jnp.mean(d * d if penalty == "l2" else jnp.abs(d))
    return total / len(spatial)
