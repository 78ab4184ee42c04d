"""Registering scans of any geometry, with a trained network or by optimisation alone.

:func:`register_volumes` registers images of any shape, voxel size and
orientation by one of two methods (``ofg_jax.registration.arrays``): a trained
network on its grid, or coarse-to-fine optimisation with no network on the
fixed image's grid (or a grid of a given voxel size). Both images are resampled
once onto that working grid (a network's voxel size and orientation from the
training config, placed over the fixed image; or the fixed grid itself), after
an optional affine pre-alignment; the field is carried back to the fixed
image's own grid as an ITK displacement field (``ofg_jax.registration.transforms``), through
which the original moving image is sampled once. Files are registered by
``ofg_jax.registration.pairs`` (``python -m ofg_jax.register``).

Coordinates follow ``ofg_jax.registration.geometry``: NIfTI affines map voxels to RAS mm;
a transform maps a fixed point ``p`` to the moving point
``matrix @ (p + u(p))`` (``u`` the ITK displacement field in LPS mm on the
fixed grid, ``matrix`` the affine or identity).
"""

import math
import os
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from ofg_jax.registration import affine as affine_lib
from ofg_jax.registration import figures
from ofg_jax.registration import geometry
from ofg_jax.registration import transforms
from ofg_jax.registration.compile_time import compile_clock
from ofg_jax.registration.geometry import Grid
from ofg_jax.registration.arrays import dice_scores
from ofg_jax.registration.arrays import optimize_arrays
from ofg_jax.registration.arrays import register_arrays
from ofg_jax.inverse import INVERSE_ITERATIONS
from ofg_jax.inverse import closer_inverse
from ofg_jax.inverse import inverse_residual
from ofg_jax.inverse import invert_displacement
from ofg_jax.models.integrate import integrate_velocity
from ofg_jax.nifti import AFFINE_TOLERANCE
from ofg_jax.optimize import OptimizeSettings
from ofg_jax.registration.transforms import Volume
from ofg_jax.registration.transforms import apply_transform
from ofg_jax.volumes import check_mask

# A trained network (inference: orbax) is imported where one is used: optimisation
# alone does not import it.
if TYPE_CHECKING:
    from ofg_jax.data import Pair
    from ofg_jax.registration.network import Trained

# Foreground for the inverse-consistency error without a segmentation: voxels
# above this fraction of the way from the minimum to the 99th percentile.
FOREGROUND_FRACTION = 0.1

# A trained network, or the settings of optimisation alone.
Method = Union["Trained", OptimizeSettings]


def working_grid(fixed_grid: Grid, voxel_size: Optional[float]) -> Grid:
    """The grid of an optimisation: the fixed grid, or one of ``voxel_size`` mm
    voxels along the fixed grid's axes over its field of view (its voxel ``j``
    centred where the fixed grid's ``r j + (r - 1) / 2`` is, ``r`` the ratio of
    voxel sizes: a factor 2 takes the means of 2x2x2 blocks)."""
    if voxel_size is None:
        return fixed_grid
    ratio = float(voxel_size) / fixed_grid.spacing
    shape = tuple(max(1, math.ceil(n / r)) for n, r in zip(fixed_grid.shape, ratio))
    scale = np.diag(np.append(ratio, 1.0))
    scale[:3, 3] = (ratio - 1.0) / 2.0
    return Grid(shape, fixed_grid.affine @ scale)


def resample_volume(volume: Volume, grid: Grid, matrix: Optional[np.ndarray] = None
                    ) -> np.ndarray:
    """``volume`` on ``grid`` (through ``matrix``), smoothed first where the grid's
    voxels are coarser than its own (Gaussian, sigma ``(r - 1) / 2`` voxels for
    a ratio ``r`` of voxel sizes), so that a coarse grid does not alias."""
    ratio = float(np.min(grid.spacing)) / volume.grid.spacing
    sigma = np.maximum(ratio - 1.0, 0.0) / 2.0
    image = volume.array
    if np.any(sigma > 0.1):
        image = ndimage.gaussian_filter(np.asarray(image, np.float32), sigma)
    return np.asarray(geometry.resample(image, volume.affine, grid, matrix=matrix))


def register_volumes(method: Method, moving: Volume, fixed: Volume,
                     moving_seg: Optional[Volume] = None,
                     fixed_seg: Optional[Volume] = None, *, refine_steps: int = 0,
                     affine: bool = False, inverse: bool = False,
                     fov_center: Optional[Sequence[float]] = None,
                     voxel_size: Optional[float] = None,
                     labels: Optional[Sequence[int]] = None,
                     fixed_mask: Optional[Volume] = None,
                     moving_mask: Optional[Volume] = None) -> dict[str, Any]:
    """Registers two volumes of any geometry; the outputs lie on the fixed grid.

    With a trained network the working grid is the fixed grid itself when the
    fixed image has the network's shape and the moving image the same grid
    (inputs already on the training grid, used as they are); else it has the
    training data's voxel size and orientation
    (``ofg_jax.registration.network.network_geometry``) and is centred over the fixed
    image (or ``fov_center``), cropping or padding its field of view. With
    :class:`~ofg_jax.optimize.OptimizeSettings` (optimisation alone,
    :func:`optimize_arrays`) it is the fixed grid, or :func:`working_grid` of
    ``voxel_size``. With ``affine`` the moving image is first aligned to the
    fixed one (``ofg_jax.registration.affine.register_affine`` on the two images as given).
    Each image is resampled at most once onto the working grid; each output is
    sampled once from the original moving image through the whole transform
    (:func:`~ofg_jax.registration.transforms.apply_transform`).

    Cost-function masks (optimisation alone): each mask, of any geometry, is
    resampled linearly (smoothed first onto a coarser grid, as the images are)
    and clipped to ``[0, 1]``; 0 outside its own field of view. The fixed mask
    goes onto the working grid, the moving mask as the moving image does
    (through the affine when there is one); each also goes onto its image's
    own grid for the affine stage, whose similarity it weights too. The
    optimisation's data term then counts where ``fixed_mask * moving_mask∘disp
    > 0`` (``ofg_jax.optimize.optimize_displacement``).

    Args:
      method: a trained network (``ofg_jax.registration.network.load_trained``) or the
        settings of optimisation alone.
      moving, fixed: the images, each on its own grid (for a network:
        preprocessed like its training data).
      moving_seg, fixed_seg: optional label maps on the grids of their images.
      refine_steps: a network's test-time OFG steps on its grid.
      affine: run the affine pre-alignment.
      inverse: also compute the inverse transform on the moving grid.
      fov_center: centre (RAS mm) of a network's grid; None = the fixed
        image's centre.
      voxel_size: voxel size (mm) of an optimisation's working grid; None =
        the fixed grid.
      labels: labels of the Dice; None = those of ``fixed_seg`` but 0.
      fixed_mask, moving_mask: optional masks (weights in ``[0, 1]``, binary or
        soft) of the fixed and of the moving image, each on a grid of its own;
        optimisation alone.

    Returns:
      On the fixed grid: ``warped`` float32, ``jacobian`` (of the deformable
      part; 1 outside the working grid), ``warped_seg`` int32 with
      ``moving_seg``, ``dice`` / ``labels`` / ``dice_per_label`` with both
      segmentations; ``transform`` (:class:`~ofg_jax.registration.transforms.Transform`);
      ``direct`` (True when the field was found on the fixed grid with the
      moving image as it is: then ``disp`` is the whole mapping in voxels, as
      Learn2Reg expects); ``disp`` the field in voxels of ``working_grid``;
      ``non_pos_jacobian_pct`` and ``energy`` on the working grid, and
      ``network_energy`` (network) or ``initial_energy``, ``compile_seconds``,
      ``optimize_seconds`` (optimisation); with ``inverse``: ``inverse_lps``
      ``(*S_m, 3)`` (fixed <- moving, LPS mm, on the moving grid) and
      ``inverse_error_mm`` (mean, max over the moving foreground); ``log``:
      lines saying what was done.

    Raises:
      ValueError: a segmentation off its image's grid, an option that does
        not apply to ``method``, or a mask with values outside ``[0, 1]`` or 0
        over the grid it is resampled onto.
    """
    for what, volume, image in (("moving", moving_seg, moving),
                                ("fixed", fixed_seg, fixed)):
        if volume is not None and not volume.grid.same_as(image.grid,
                                                           AFFINE_TOLERANCE):
            raise ValueError(f"the {what} segmentation's grid "
                             f"{volume.grid.describe()} differs from the {what} "
                             f"image's {image.grid.describe()}")
    optimizing = isinstance(method, OptimizeSettings)
    if optimizing and (refine_steps or fov_center is not None):
        raise ValueError("refine_steps and fov_center apply to a trained network, "
                         "not to optimisation alone")
    if not optimizing and voxel_size is not None:
        raise ValueError("voxel_size applies to optimisation alone; a network works "
                         "on its own grid")
    if not optimizing and (fixed_mask is not None or moving_mask is not None):
        raise ValueError("fixed_mask and moving_mask apply to optimisation alone; a "
                         "trained network's prediction does not use masks")
    for what, mask in (("fixed mask", fixed_mask), ("moving mask", moving_mask)):
        if mask is not None:
            check_mask(mask.array, f"the {what}")
    fixed_grid, moving_grid = fixed.grid, moving.grid
    log = [f"moving: {moving_grid.describe()}", f"fixed: {fixed_grid.describe()}"]
    if optimizing:
        grid = working_grid(fixed_grid, voxel_size)
        log.append("working grid: the fixed grid" if grid is fixed_grid else
                   f"working grid {grid.describe()} over the fixed field of view")
    elif (tuple(fixed_grid.shape) == method.full_size and fov_center is None
          and moving_grid.same_as(fixed_grid, AFFINE_TOLERANCE)):
        grid = fixed_grid
        log.append("network grid: the fixed grid (moving and fixed share it and "
                   "have the network's shape): nothing resampled")
    else:
        from ofg_jax.registration.network import network_geometry  # pylint: disable=g-import-not-at-top
        spacing, axcodes = network_geometry(method.config)
        grid, message = geometry.fit_field_of_view(
            fixed_grid, method.full_size, spacing, axcodes, center=fov_center)
        log.append(message)
    fixed_w = (np.asarray(fixed.array, np.float32) if grid is fixed_grid
               else resample_volume(fixed, grid))
    matrix = None
    if affine:
        # On the images' own grids: finer than the working grid, and the matrix
        # is world -> world whatever the grids.
        with compile_clock() as clock:
            matrix = affine_lib.register_affine(
                moving.array, fixed.array, moving_affine=moving.affine,
                fixed_affine=fixed.affine,
                fixed_mask=_mask_on(fixed_mask, fixed_grid, "fixed mask", "fixed grid"),
                moving_mask=_mask_on(moving_mask, moving_grid, "moving mask",
                                     "moving grid"))
        log.append(f"affine (fixed -> moving world): {affine_lib.describe(matrix)}; "
                   f"{clock.compute_seconds:.2f} s, and {clock.compile_seconds:.2f} s "
                   "compiling")
    direct = (grid is fixed_grid and matrix is None
              and moving_grid.same_as(fixed_grid, AFFINE_TOLERANCE))
    moving_w = (np.asarray(moving.array, np.float32) if direct
                else resample_volume(moving, grid, matrix))
    masks = {}
    if fixed_mask is not None:
        masks["fixed_mask"] = _mask_on(fixed_mask, grid, "fixed mask", "working grid")
    if moving_mask is not None:
        masks["moving_mask"] = _mask_on(moving_mask, grid, "moving mask",
                                        "working grid", matrix)
    for name, mask in masks.items():
        log.append(f"{name.replace('_', ' ')}: {100 * np.mean(mask > 0):.1f} % of the "
                   "working grid counts (weight > 0)")
    if optimizing:
        found = optimize_arrays(method, moving_w, fixed_w, **masks)
        log.append(f"optimiser: {found['compilation']} in "
                   f"{found['compile_seconds']:.2f} s")
        log.append(f"optimisation: {found['optimize_seconds']:.2f} s (the compiled "
                   "program)")
    else:
        found = register_arrays(method, moving_w, fixed_w, refine_steps=refine_steps)
    transform = transforms.field_transform(found["disp"], grid, fixed, matrix)
    result = {key: found[key] for key in found if key not in (
        "warped", "jacobian", "velocity")}
    result.update(transform=transform, direct=direct, working_grid=grid,
                  warped=apply_transform(transform, moving, order=1),
                  jacobian=transforms.jacobian_on_grid(found["jacobian"], grid,
                                                       fixed_grid))
    if moving_seg is not None:
        result["warped_seg"] = apply_transform(transform, moving_seg, order=0)
        if fixed_seg is not None:
            result.update(dice_scores(result["warped_seg"], fixed_seg.array, labels))
    if inverse:
        int_steps = method.int_steps if optimizing else method.model.int_steps
        result.update(_inverse(found, grid, moving, moving_seg, matrix, int_steps))
        log.append(f"inverse ({result['inverse_method']}): inverse-consistency error "
                   f"{result['inverse_error_mm'][0]:.3g} mm mean, "
                   f"{result['inverse_error_mm'][1]:.3g} mm max over the "
                   f"{result['inverse_region']}")
    result["log"] = log
    return result


def _mask_on(mask: Optional[Volume], grid: Grid, what: str, where: str,
             matrix: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """``mask`` on ``grid`` (through ``matrix``): as it is on its own grid, else
    resampled (:func:`resample_volume`, linear, 0 outside) and clipped to ``[0, 1]``.

    Raises:
      ValueError: the mask is 0 everywhere on ``grid``.
    """
    if mask is None:
        return None
    if matrix is None and mask.grid.same_as(grid, AFFINE_TOLERANCE):
        array = np.asarray(mask.array, np.float32)
    else:
        array = np.clip(resample_volume(mask, grid, matrix), 0.0, 1.0).astype(np.float32)
    if not np.any(array > 0):
        raise ValueError(f"the {what} is 0 everywhere on the {where}: it does not "
                         "overlap that field of view")
    return array


def foreground(image: np.ndarray) -> np.ndarray:
    """Voxels above ``FOREGROUND_FRACTION`` of the way from the minimum to the 99th
    percentile: the head or body, without its background."""
    lo, hi = float(np.min(image)), float(np.percentile(image, 99))
    return np.asarray(image) > lo + FOREGROUND_FRACTION * (hi - lo)


def _inverse(found, grid, moving, moving_seg, matrix, int_steps) -> dict[str, Any]:
    """The inverse transform on the moving grid, and its inverse-consistency error."""
    disp = jnp.asarray(found["disp"])
    if "velocity" in found:
        exact = integrate_velocity(-jnp.asarray(found["velocity"])[None], int_steps)[0]
        # exp(-v) inverts exp(v) up to the integration's discretisation; fixed-point
        # steps from it remove that where they converge.
        disp_inv = closer_inverse(disp, exact,
                                   invert_displacement(disp, initial=exact))
        method = (f"exact: the negated velocity integrated, then up to "
                  f"{INVERSE_ITERATIONS} fixed-point steps")
    else:
        disp_inv = invert_displacement(disp)
        method = f"fixed-point iteration, {INVERSE_ITERATIONS} steps"
    residual_mm = transforms.residual_on_grid(inverse_residual(disp, disp_inv), grid,
                                              moving.grid, matrix)
    if moving_seg is not None:
        region, where = "moving segmentation's labels", np.asarray(moving_seg.array) > 0
    else:
        region, where = "moving image's foreground", foreground(moving.array)
    if not where.any():
        where = np.ones(residual_mm.shape, bool)
        region = "moving grid"
    values = residual_mm[where]
    return {"inverse_lps": transforms.inverse_field(disp_inv, grid, moving.grid, matrix),
            "inverse_method": method,
            "inverse_error_mm": (float(values.mean()), float(values.max())),
            "inverse_region": region}


def write_run_figures(out_dir: str, trained: "Trained", pair: "Pair",
                      labels: Sequence[int], metrics_csv: str, title: str = ""
                      ) -> list[str]:
    """The figures of a training run; returns the paths written.

    ``curves.png`` from ``metrics_csv``, then the figures of
    ``figures.write_pair_figures`` for ``pair`` registered by ``trained``, Dice
    over ``labels``.
    """
    os.makedirs(out_dir, exist_ok=True)
    curves = figures.plot_training_curves(os.path.join(out_dir, "curves.png"),
                                          metrics_csv, title=title)
    result = register_arrays(trained, pair.moving, pair.fixed, pair.moving_seg,
                             pair.fixed_seg, labels=labels)
    return [curves] + figures.write_pair_figures(
        out_dir, pair.fixed, pair.moving, result, fixed_seg=pair.fixed_seg,
        title=f"{pair.name}, step {trained.step}")
