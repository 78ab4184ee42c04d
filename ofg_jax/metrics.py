"""Evaluation metrics: Jacobian determinant of a deformation and Dice overlap."""

from typing import Sequence

import jax
import jax.numpy as jnp

from ofg_jax._shapes import check_disp


def _central_gradient(x: jax.Array, axis: int) -> jax.Array:
    """``np.gradient`` along ``axis``: central inside, one-sided at the borders."""
    n = x.shape[axis]
    if n < 2:
        raise ValueError(
            f"need at least 2 voxels along axis {axis} for a gradient, got shape "
            f"{x.shape}")
    take = lambda start, stop: jax.lax.slice_in_dim(x, start, stop, axis=axis)
    first = take(1, 2) - take(0, 1)
    last = take(n - 1, n) - take(n - 2, n - 1)
    inner = (take(2, n) - take(0, n - 2)) / 2
    return jnp.concatenate([first, inner, last], axis=axis)


def jacobian_determinant(disp: jax.Array) -> jax.Array:
    """Determinant of the Jacobian of ``x -> x + disp(x)`` at every voxel.

    Derivatives are central differences with one-sided borders (``np.gradient``),
    as in the reference's evaluation.

    Args:
      disp: ``(*S, N)`` displacement in voxels, 2D or 3D.

    Returns:
      ``(*S)`` determinants (1 where the deformation preserves volume; <= 0 where
      it folds).
    """
    spatial = check_disp(disp.shape)
    ndim = len(spatial)
    # jac[i][j] = d(x_j + disp_j) / d axis_i
    jac = [[_central_gradient(disp[..., j], i) + (1.0 if i == j else 0.0)
            for j in range(ndim)] for i in range(ndim)]
    if ndim == 2:
        return jac[0][0] * jac[1][1] - jac[0][1] * jac[1][0]
    return (jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
            - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
            + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0]))


def non_positive_jacobian_pct(disp: jax.Array) -> jax.Array:
    """Percentage of voxels whose Jacobian determinant is <= 0 (folding).

    Args:
      disp: ``(*S, N)`` displacement in voxels.

    Returns:
      Scalar in ``[0, 100]``, over all voxels of the volume.
    """
    return 100.0 * jnp.mean(jacobian_determinant(disp) <= 0)


def dice_per_label(a: jax.Array, b: jax.Array, labels: Sequence[int], *,
                   eps: float = 1e-5) -> jax.Array:
    """Dice overlap ``2|A∩B| / (|A| + |B| + eps)`` of each label in two label maps.

    ``eps`` is the reference's guard: a label absent from both maps scores 0.

    Args:
      a, b: integer label maps of one shape.
      labels: the labels to score.
      eps: added to the denominator, in voxels.

    Returns:
      ``(len(labels),)`` Dice per label, in ``[0, 1]``.
    """
    if a.shape != b.shape:
        raise ValueError(f"label maps must have the same shape, got {a.shape} and "
                         f"{b.shape}")
    labels = jnp.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1D sequence, got {labels}")

    def one(label):
        in_a, in_b = a == label, b == label
        overlap = jnp.sum(in_a & in_b)
        return 2.0 * overlap / (jnp.sum(in_a) + jnp.sum(in_b) + eps)

    return jax.lax.map(one, labels)
