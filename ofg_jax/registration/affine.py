"""Affine registration of two volumes, in JAX: a reusable primitive like warp and ncc.

:func:`register_affine` finds the 12-parameter world -> world affine ``M`` that
maps each point ``p`` of the fixed image onto the corresponding point ``M @ p``
of the moving image (the direction in which the moving image is resampled, as
ITK and ANTs define transforms). It starts from the translation that aligns the
two centres of mass and refines the matrix coarse to fine (an average-pooling
pyramid) with Adam on ``-ncc`` (or MSE) between the fixed image and the moving
image sampled through ``M`` (``ofg_jax.warp.sample``), one jitted
``fori_loop`` per pyramid level.

The matrix is parameterised about the fixed centre of mass ``c``:
``M @ p = c_moving + t + (I + L / r) (p - c)``, with ``t`` in mm and ``L``
scaled by the object's radius ``r`` (mm), so that one unit of any parameter
moves the object's surface by about 1 mm and one learning rate (mm) suits all.
"""

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import ndimage

from ofg_jax.ncc import masked_mean
from ofg_jax.ncc import ncc
from ofg_jax.options import SIMILARITIES
from ofg_jax.resolution import block_mean
from ofg_jax.volumes import check_mask
from ofg_jax.warp import sample


def pool(image: np.ndarray, affine: np.ndarray, factor: int
         ) -> tuple[np.ndarray, np.ndarray]:
    """Averages ``factor^3`` blocks of voxels: the coarse image and its affine.

    Trailing voxels that do not fill a block are dropped. The coarse voxel ``j``
    is centred on the fine voxels ``factor * j .. factor * j + factor - 1``.

    Args:
      image: ``(X, Y, Z)`` array.
      affine: ``(4, 4)`` voxel -> world of ``image``.
      factor: block width in voxels (1 = unchanged).

    Returns:
      ``(coarse image float32, coarse affine float64)``.
    """
    image = np.asarray(image, np.float32)
    if factor == 1 or any(n < factor for n in image.shape):  # No block fits.
        return image, np.asarray(affine, np.float64)
    cropped = image[tuple(slice(0, n - n % factor) for n in image.shape)]
    scale = np.diag([factor, factor, factor, 1.0]).astype(np.float64)
    scale[:3, 3] = (factor - 1) / 2.0
    return block_mean(cropped, factor), np.asarray(affine, np.float64) @ scale


def center_of_mass(image: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, float]:
    """World centre of mass (mm) of ``image - min(image)``, and its rms radius (mm).

    The radius is ``sqrt(sum_k (spacing_k * std_k)**2)`` from the marginal
    standard deviations along the array axes: a scale, not exact for sheared
    affines.
    """
    weights = np.asarray(image, np.float64)
    weights = weights - weights.min()
    total = weights.sum()
    if not total > 0:
        raise ValueError("the image is constant: it has no centre of mass")
    affine = np.asarray(affine, np.float64)
    voxel = np.asarray(ndimage.center_of_mass(weights))
    variance = []
    for axis, n in enumerate(weights.shape):
        marginal = weights.sum(axis=tuple(k for k in range(3) if k != axis))
        variance.append(np.sum(marginal * (np.arange(n) - voxel[axis]) ** 2) / total)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return affine[:3, :3] @ voxel + affine[:3, 3], float(
        np.sqrt(np.sum(spacing ** 2 * np.asarray(variance))))


def _matrix(params, c_fixed, c_moving, radius):
    """The world -> world 4x4 matrix of the 12 parameters (see the module doc)."""
    params = np.asarray(params, np.float64)
    matrix = np.eye(4)
    matrix[:3, :3] += params[:9].reshape(3, 3) / radius
    matrix[:3, 3] = c_moving + params[9:] - matrix[:3, :3] @ c_fixed
    return matrix


def _similarity_loss(fixed, warped, similarity, window, weights=None):
    if similarity == "ncc":
        return -ncc(fixed, warped, window=window, weights=weights)
    return masked_mean((fixed - warped) ** 2, weights)


@functools.partial(jax.jit, static_argnames=("steps", "similarity", "window"))
def _optimise_level(params, fixed, moving, fixed_rel, moving_from_world,
                    c_moving_voxel, radius, learning_rate, fixed_mask=None,
                    moving_mask=None, *, steps, similarity, window):
    """``steps`` Adam updates of the 12 parameters on one pyramid level.

    ``fixed_rel`` ``(*S, 3)`` holds the fixed voxels' world points minus the fixed
    centre of mass (float32 keeps mm precision near the object);
    ``moving_from_world`` the linear part of moving world -> moving voxel and
    ``c_moving_voxel`` the moving centre of mass in moving voxels. The optional
    masks (on this level's fixed and moving grids) weight the similarity; the
    moving mask is sampled through the current matrix, not differentiated.
    """

    def loss(p):
        linear = jnp.eye(3) + p[:9].reshape(3, 3) / radius
        world_rel = fixed_rel @ linear.T + p[9:]  # minus the moving centre of mass
        coords = world_rel @ moving_from_world.T + c_moving_voxel
        weights = fixed_mask
        if moving_mask is not None:
            on_fixed = sample(moving_mask, jax.lax.stop_gradient(coords))
            weights = on_fixed if weights is None else weights * on_fixed
        return _similarity_loss(fixed, sample(moving, coords), similarity, window,
                                weights)

    schedule = optax.cosine_decay_schedule(learning_rate, steps, alpha=0.1)
    opt = optax.adam(schedule)

    def step(_, carry):
        p, state = carry
        updates, state = opt.update(jax.grad(loss)(p), state)
        return optax.apply_updates(p, updates), state

    params, _ = jax.lax.fori_loop(0, steps, step, (params, opt.init(params)))
    return params, loss(params)


def register_affine(moving: np.ndarray, fixed: np.ndarray, *,
                    moving_affine: Optional[np.ndarray] = None,
                    fixed_affine: Optional[np.ndarray] = None,
                    similarity: str = "ncc", levels: Sequence[float] = (8.0, 4.0),
                    steps: Sequence[int] = (100, 40), learning_rate: float = 2.0,
                    window: int = 7, initial: Optional[np.ndarray] = None,
                    fixed_mask: Optional[np.ndarray] = None,
                    moving_mask: Optional[np.ndarray] = None) -> np.ndarray:
    """A 12-parameter affine registration: the world -> world matrix fixed -> moving.

    Cost-function masks weight the similarity (as ANTs' ``-x``): it becomes the
    weighted mean ``sum(w * c) / sum(w)`` of the per-voxel local NCC (or squared
    error) over ``w = fixed_mask * moving_mask∘M``, the moving mask sampled
    through the current matrix (linear, 0 outside; not differentiated), the
    masks average-pooled with the images at each level. The starting
    translation (the centres of mass) uses the whole images.

    Args:
      moving, fixed: ``(X, Y, Z)`` images, each on its own grid.
      moving_affine, fixed_affine: ``(4, 4)`` voxel -> world (mm) of each image
        (NIfTI affines: RAS mm); identity = voxel coordinates.
      similarity: ``"ncc"`` (local NCC, any contrasts) or ``"mse"`` (same
        intensities).
      levels: voxel size (mm) of each pyramid level, coarse to fine: each image
        is average-pooled by the integer factor nearest to it (at least 1, so
        a level finer than the images uses them as they are).
      steps: Adam updates per level.
      learning_rate: Adam step at the first level, in mm of surface motion;
        each later level scales it by its voxel size relative to the first;
        cosine decay to a tenth within each level.
      window: NCC window (voxels of each level).
      initial: ``(4, 4)`` starting matrix; None = the translation that aligns the
        centres of mass.
      fixed_mask: None, or ``(X, Y, Z)`` weights in ``[0, 1]`` on the fixed grid
        (binary or soft; the similarity counts where > 0).
      moving_mask: None, or weights in ``[0, 1]`` on the moving grid.

    Returns:
      ``(4, 4)`` float64 matrix ``M``: the fixed image's world point ``p``
      corresponds to the moving image's world point ``M @ p``. Resample the
      moving image onto the fixed grid through ``M``
      (``ofg_jax.registration.geometry.resample(moving, moving_affine, fixed_grid,
      matrix=M)``).

    Raises:
      ValueError: not 3D images, a constant image, an unknown similarity,
        ``levels`` and ``steps`` of different lengths, or a mask off its image's
        shape, with values outside ``[0, 1]`` or all 0.
    """
    moving = np.asarray(moving, np.float32)
    fixed = np.asarray(fixed, np.float32)
    for name, image in (("moving", moving), ("fixed", fixed)):
        if image.ndim != 3:
            raise ValueError(f"{name} must be a 3D volume, got shape {image.shape}")
        if not np.all(np.isfinite(image)):
            raise ValueError(f"{name} has non-finite (NaN or inf) voxels")
    masks = {}
    for name, mask, image in (("fixed_mask", fixed_mask, fixed),
                              ("moving_mask", moving_mask, moving)):
        if mask is not None:
            masks[name] = check_mask(mask, name, image.shape)
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if len(levels) != len(steps) or not levels:
        raise ValueError(f"levels {tuple(levels)} and steps {tuple(steps)} must be "
                         "non-empty and of the same length")
    moving_affine = np.eye(4) if moving_affine is None else np.asarray(moving_affine,
                                                                      np.float64)
    fixed_affine = np.eye(4) if fixed_affine is None else np.asarray(fixed_affine,
                                                                    np.float64)
    c_fixed, radius = center_of_mass(fixed, fixed_affine)
    c_moving, _ = center_of_mass(moving, moving_affine)
    radius = max(radius, 1e-3)
    params = np.zeros(12)
    if initial is not None:  # Express the initial matrix in the parameters.
        initial = np.asarray(initial, np.float64)
        params[:9] = ((initial[:3, :3] - np.eye(3)) * radius).ravel()
        params[9:] = initial[:3, :3] @ c_fixed + initial[:3, 3] - c_moving
    params = jnp.asarray(params, jnp.float32)

    fixed_spacing = np.linalg.norm(fixed_affine[:3, :3], axis=0).min()
    moving_spacing = np.linalg.norm(moving_affine[:3, :3], axis=0).min()
    for level_mm, count in zip(levels, steps):
        fixed_factor = max(1, int(round(level_mm / fixed_spacing)))
        moving_factor = max(1, int(round(level_mm / moving_spacing)))
        fixed_l, fixed_affine_l = pool(fixed, fixed_affine, fixed_factor)
        moving_l, moving_affine_l = pool(moving, moving_affine, moving_factor)
        axes = [np.arange(n, dtype=np.float64) for n in fixed_l.shape]
        voxels = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
        fixed_rel = voxels @ fixed_affine_l[:3, :3].T + (fixed_affine_l[:3, 3] - c_fixed)
        to_voxel = np.linalg.inv(moving_affine_l)
        c_moving_voxel = to_voxel[:3, :3] @ c_moving + to_voxel[:3, 3]
        rate = learning_rate * level_mm / levels[0]
        masks_l = [None if name not in masks else jnp.asarray(pool(
            masks[name], affine_l, factor)[0]) for name, affine_l, factor in (
                ("fixed_mask", fixed_affine, fixed_factor),
                ("moving_mask", moving_affine, moving_factor))]
        params, _ = _optimise_level(
            params, jnp.asarray(fixed_l), jnp.asarray(moving_l),
            jnp.asarray(fixed_rel, jnp.float32),
            jnp.asarray(to_voxel[:3, :3], jnp.float32),
            jnp.asarray(c_moving_voxel, jnp.float32), jnp.float32(radius),
            jnp.float32(rate), *masks_l, steps=int(count), similarity=similarity,
            window=int(window))
    return _matrix(params, c_fixed, c_moving, radius)


def describe(matrix: np.ndarray) -> str:
    """A one-line summary of a world -> world matrix: rotation angle (deg), scales
    (singular values) and translation of the origin (mm)."""
    linear = np.asarray(matrix, np.float64)[:3, :3]
    u, s, vt = np.linalg.svd(linear)
    rotation = u @ vt
    cos = np.clip((np.trace(rotation) - 1) / 2, -1.0, 1.0)
    return (f"rotation {np.degrees(np.arccos(cos)):.2f} deg, scales "
            f"{', '.join(f'{v:.3f}' for v in s)}, translation "
            f"({', '.join(f'{v:.2f}' for v in np.asarray(matrix)[:3, 3])}) mm")
