"""Changing resolution by an integer factor: block means down, linear interpolation
up, with displacements rescaled to the voxels of their grid.

A coarse voxel ``j`` covers the fine voxels ``f j .. f j + f - 1``: its centre is
at fine coordinate ``f j + (f - 1) / 2``. Upsampling interpolates linearly
between coarse centres (half-pixel centres, edges clamped, as
``jax.image.resize``), so block means and upsampling are consistent.
"""

import jax

from ofg_jax.models.resample import upsample_linear2


def block_mean(x: jax.Array, factor: int, spatial_dims: int = 3) -> jax.Array:
    """The means of ``factor**N`` blocks of the ``spatial_dims`` leading axes.

    Args:
      x: ``(*S)`` or ``(*S, C)`` array, every spatial size divisible by ``factor``.
      factor: positive integer.
      spatial_dims: N, the number of leading spatial axes.

    Returns:
      ``(*S / factor[, C])``.
    """
    spatial = x.shape[:spatial_dims]
    if any(n % factor for n in spatial):
        raise ValueError(f"downsampling by {factor} needs every spatial size divisible "
                         f"by it, got {spatial}")
    blocks = []
    for n in spatial:
        blocks += [n // factor, factor]
    blocked = x.reshape(*blocks, *x.shape[spatial_dims:])
    return blocked.mean(axis=tuple(range(1, 2 * spatial_dims, 2)))


def upsample_displacement(disp: jax.Array, factor: int) -> jax.Array:
    """A coarse ``(*S, N)`` displacement in coarse voxels as ``(*f S, N)`` in fine voxels.

    Linear interpolation between the coarse voxel centres (``jax.image.resize``),
    values multiplied by ``factor``. Factor 2 takes the separable two-tap form
    (``models.resample.upsample_linear2``: the same values to float32 rounding,
    several times faster, forward and backward).
    """
    if factor == 2:
        return 2.0 * upsample_linear2(disp[None])[0]
    spatial = disp.shape[:-1]
    fine = tuple(n * factor for n in spatial) + disp.shape[-1:]
    return factor * jax.image.resize(disp, fine, "linear")
