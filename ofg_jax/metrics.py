"""Evaluation metrics: Jacobian determinant, folding, Dice, and Learn2Reg's
SDlogJ and HD95, each with the definition its docstring names."""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

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


def _zero_padded_central_gradient(x: jax.Array, axis: int) -> jax.Array:
    """``0.5 * (x[i + 1] - x[i - 1])`` with zeros outside: correlation with
    ``[-0.5, 0, 0.5]`` (``scipy.ndimage.correlate(mode="constant")``)."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (1, 1)
    padded = jnp.pad(x, pad)
    n = x.shape[axis]
    take = lambda start: jax.lax.slice_in_dim(padded, start, start + n, axis=axis)
    return 0.5 * (take(2) - take(0))


def sdlogj(disp: jax.Array) -> jax.Array:
    """SDlogJ as the Learn2Reg evaluation computes it.

    The Jacobian of ``x -> x + disp(x)`` from zero-padded central differences
    (correlation with ``[-0.5, 0, 0.5]``), cropped by 2 voxels on every side;
    then ``std(log(clip(det + 3, 1e-9, 1e9)))``. The ``+ 3`` is in the
    challenge's code (and TransMorph's OASIS evaluation): it is kept so that the
    numbers compare with published ones. Lower is smoother.

    Args:
      disp: ``(*S, 3)`` displacement in voxels, every axis longer than 4.

    Returns:
      Scalar standard deviation (unitless).
    """
    spatial = check_disp(disp.shape)
    if len(spatial) != 3 or min(spatial) <= 4:
        raise ValueError(f"sdlogj needs a 3D field larger than 4 voxels per axis, got "
                         f"shape {disp.shape}")
    jac = [[_zero_padded_central_gradient(disp[..., j], i) + (1.0 if i == j else 0.0)
            for j in range(3)] for i in range(3)]
    det = (jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
           - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
           + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0]))
    det = det[2:-2, 2:-2, 2:-2]
    return jnp.std(jnp.log(jnp.clip(det + 3.0, 1e-9, 1e9)))


def hd95(fixed_seg: np.ndarray, warped_seg: np.ndarray, labels: Sequence[int], *,
         spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """Learn2Reg's HD95: the mean over ``labels`` of the 95th-percentile robust
    Hausdorff distance between the label surfaces.

    Computed, as the challenge's evaluation does, with DeepMind's
    ``surface-distance`` (``compute_robust_hausdorff(compute_surface_distances(
    fixed == l, warped == l, spacing), 95)``): surface elements weighted by
    their area, distances in the units of ``spacing`` (voxels by default).
    NumPy on the host, not jittable.

    Args:
      fixed_seg, warped_seg: ``(*S)`` integer label maps of one shape.
      labels: the labels to score, e.g. those present in the fixed and the
        moving segmentation; labels missing from either map are skipped.
      spacing: voxel size per axis.

    Returns:
      The mean distance, or NaN when no label is in both maps.
    """
    from surface_distance import metrics as surface  # pylint: disable=g-import-not-at-top
    fixed_seg, warped_seg = np.asarray(fixed_seg), np.asarray(warped_seg)
    if fixed_seg.shape != warped_seg.shape:
        raise ValueError(f"label maps must have the same shape, got {fixed_seg.shape} "
                         f"and {warped_seg.shape}")
    distances = []
    for label in labels:
        a, b = fixed_seg == label, warped_seg == label
        if a.any() and b.any():
            distances.append(surface.compute_robust_hausdorff(
                surface.compute_surface_distances(a, b, tuple(spacing)), 95))
    return float(np.mean(distances)) if distances else float("nan")
