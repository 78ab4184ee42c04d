"""Registering scans with a trained network: arrays on its grid, volumes of any geometry.

:func:`register_arrays` registers one pair of arrays on the network's grid
(optionally refined by test-time OFG with the run's inner optimiser) and returns
the displacement, the warped images, the Jacobian determinant and the scores.
:func:`register_volumes` registers images of any shape, voxel size and
orientation: both are resampled once onto the network's grid (its voxel size
and orientation from the training config, placed over the fixed image), after
an optional affine pre-alignment; the network's field is carried back to the
fixed image's own grid as an ITK displacement field (``ofg_jax.transforms``),
through which the original moving image is sampled once. Files are registered
by ``ofg_jax.pair_files`` (``python -m ofg_jax.register``).

Coordinates follow ``ofg_jax.geometry``: NIfTI affines map voxels to RAS mm;
a transform maps a fixed point ``p`` to the moving point
``matrix @ (p + u(p))`` (``u`` the ITK displacement field in LPS mm on the
fixed grid, ``matrix`` the affine or identity).
"""

import functools
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ofg_jax import affine as affine_lib
from ofg_jax import data as data_lib
from ofg_jax import figures
from ofg_jax import geometry
from ofg_jax import nifti
from ofg_jax.data import Pair
from ofg_jax.inference import Trained
from ofg_jax.inference import predict_jit
from ofg_jax.inverse import INVERSE_ITERATIONS
from ofg_jax.inverse import closer_inverse
from ofg_jax.inverse import inverse_residual
from ofg_jax.inverse import invert_displacement
from ofg_jax.metrics import dice_per_label
from ofg_jax.metrics import jacobian_determinant
from ofg_jax.models.base import VELOCITY
from ofg_jax.models.integrate import integrate_velocity
from ofg_jax.refine import registration_energy
from ofg_jax.refiner import RefineSettings
from ofg_jax.refiner import make_refiner
from ofg_jax.transforms import Transform
from ofg_jax.transforms import Volume
from ofg_jax.transforms import apply_transform
from ofg_jax.transforms import nifti_like
from ofg_jax.warp import sample
from ofg_jax.warp import warp

# Largest difference of two affines still taken as the same grid (mm).
AFFINE_TOLERANCE = 1e-3
# Foreground for the inverse-consistency error without a segmentation: voxels
# above this fraction of the way from the minimum to the 99th percentile.
FOREGROUND_FRACTION = 0.1


@functools.partial(jax.jit, static_argnames=("similarity",))
def _field_outputs(moving, fixed, disp, reg_weight, similarity):
    return {"warped": warp(moving, disp), "jacobian": jacobian_determinant(disp),
            "energy": registration_energy(moving, fixed, disp, reg_weight=reg_weight,
                                          similarity=similarity)}


_warp_labels = jax.jit(functools.partial(warp, order=0))


@functools.lru_cache(maxsize=8)
def _jitted_refiner(settings: RefineSettings, img_size: tuple[int, ...]):
    return jax.jit(make_refiner(settings, img_size))


@functools.partial(jax.jit, static_argnums=0)
def _predict_velocity(model, variables, moving, fixed):
    """The displacement and the velocity of a diffeomorphic network, unbatched."""
    disp, state = model.apply(variables, jnp.stack([moving, fixed], -1)[None],
                              train=False, mutable=["intermediates"])
    return disp[0], state["intermediates"][VELOCITY][0][0]


def register_arrays(trained: Trained, moving: np.ndarray, fixed: np.ndarray,
                    moving_seg: Optional[np.ndarray] = None,
                    fixed_seg: Optional[np.ndarray] = None, *,
                    refine_steps: int = 0,
                    labels: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """Registers ``moving`` to ``fixed`` with the trained network.

    With ``refine_steps > 0`` the prediction is refined by test-time OFG: the
    run's inner optimiser (``ofg_jax.refiner``, settings of ``config.ofg`` with
    the learning rate of epoch 0) for that many steps.

    Args:
      trained: from ``ofg_jax.inference.load_trained``.
      moving, fixed: images on the network's grid (``trained.full_size``),
        preprocessed like the training data.
      moving_seg, fixed_seg: optional integer label maps on that grid.
      refine_steps: test-time refinement steps (0 = the network's prediction).
      labels: labels whose Dice is averaged; None = those present in
        ``fixed_seg``, 0 excluded.

    Returns:
      ``disp`` ``(*S, 3)`` float32 displacement in voxels; ``warped`` ``(*S)``
      float32; ``jacobian`` ``(*S)`` float32 determinant;
      ``non_pos_jacobian_pct`` (% of voxels with det <= 0); ``network_energy`` and
      ``energy``: the OFG energy (``-NCC + ofg.reg_weight * Grad``, or MSE) of the
      prediction and of the returned field. For a diffeomorphic network at full
      resolution without refinement, ``velocity`` ``(*S, 3)``: the field is its
      exponential. With
      ``moving_seg``: ``warped_seg`` ``(*S)`` int32 (nearest neighbour). With
      both segmentations: ``labels``, ``dice_per_label`` and their mean ``dice``.

    Raises:
      ValueError: an array not on the network's grid, no label to score, or
        refinement of a run trained with ``ofg.design`` other than "instance".
    """
    arrays = {"moving": moving, "fixed": fixed, "moving_seg": moving_seg,
              "fixed_seg": fixed_seg}
    grid = trained.full_size
    for what, array in arrays.items():
        if array is not None and tuple(np.shape(array)) != grid:
            raise ValueError(f"{what} has shape {tuple(np.shape(array))}, the "
                             f"network's grid is {grid}")
    settings = RefineSettings.from_config(trained.config.ofg).at_test_time(refine_steps)
    moving = jnp.asarray(moving, jnp.float32)
    fixed = jnp.asarray(fixed, jnp.float32)
    velocity = None
    if trained.model.diffeomorphic and not refine_steps and trained.downsample == 1:
        disp, velocity = _predict_velocity(trained.model, trained.variables, moving,
                                           fixed)
    else:
        disp = predict_jit(trained.model, trained.variables, moving, fixed,
                           trained.downsample)
    outputs = _field_outputs(moving, fixed, disp, settings.reg_weight,
                             settings.similarity)
    network_energy = outputs["energy"]
    if refine_steps:
        refiner = _jitted_refiner(settings, grid)
        disp = refiner(moving, fixed, disp, settings.learning_rate)
        outputs = _field_outputs(moving, fixed, disp, settings.reg_weight,
                                 settings.similarity)
    result = jax.device_get({"disp": disp, **outputs,
                             "network_energy": network_energy})
    if velocity is not None:
        result["velocity"] = np.asarray(velocity)
    result["energy"] = float(result["energy"])
    result["network_energy"] = float(result["network_energy"])
    result["non_pos_jacobian_pct"] = 100.0 * float(np.mean(result["jacobian"] <= 0))
    if moving_seg is None:
        return result
    warped_seg = _warp_labels(jnp.asarray(moving_seg, jnp.int32), disp)
    result["warped_seg"] = np.asarray(warped_seg)
    if fixed_seg is None:
        return result
    result.update(_dice(result["warped_seg"], fixed_seg, labels))
    return result


def _dice(warped_seg, fixed_seg, labels) -> dict[str, Any]:
    if labels is None:
        labels = [int(v) for v in np.unique(fixed_seg) if v != 0]
        if not labels:
            raise ValueError("the fixed segmentation holds no label other than 0")
    dice = np.asarray(dice_per_label(jnp.asarray(warped_seg, jnp.int32),
                                     jnp.asarray(fixed_seg, jnp.int32), labels))
    return dict(labels=tuple(int(l) for l in labels), dice_per_label=dice,
                dice=float(np.mean(dice)))


# Volumes of any geometry.

def network_geometry(config) -> tuple[tuple[float, float, float], str]:
    """The voxel size (mm) and orientation (axis codes) of the network's grid.

    ``config.data.spacing`` and ``config.data.orientation`` where the config
    states them; where they are None, read from the header of the training
    data's first image (the NIfTI datasets; the data must be on disk).

    Raises:
      ValueError: no geometry in the config and none readable from the data.
    """
    spacing, axcodes = config.data.get("spacing"), config.data.get("orientation")
    if spacing is None or axcodes is None:
        path = _header_source(config)
        image = nifti.load(path, "training image")
        header_grid = geometry.grid_of(image)
        spacing = header_grid.spacing if spacing is None else spacing
        axcodes = header_grid.axcodes if axcodes is None else axcodes
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"data.spacing must be 3 positive voxel sizes in mm, got "
                         f"{spacing}")
    geometry.orientation_matrix(axcodes)  # Checks the codes.
    return spacing, str(axcodes).upper()


def _header_source(config) -> str:
    """A training image whose header gives the grid's geometry, or a ValueError."""
    missing = ("the training config states no data.spacing / data.orientation "
               "(voxel size and axis codes of the network's grid)")
    try:
        dataset = data_lib.create(config.data, config.seed)
    except (OSError, ValueError) as e:
        raise ValueError(f"{missing}, and the training data to read them from is not "
                         f"available: {e}") from e
    if getattr(dataset, "atlas_path", None):  # LPBA40: the atlas.
        return dataset.atlas_path
    if getattr(dataset, "train_keys", None):  # Abdomen CT: the first image.
        return os.path.join(dataset.root, dataset.train_keys[0])
    raise ValueError(f"{missing}, and the {config.data.name} data has no headers to "
                     "read them from; set them in the config")


def _field_on_grid(disp, voxel_map, linear, shape):
    """A field on another grid of ``shape``: ``linear @ disp(voxel_map @ y)`` for each
    voxel ``y`` (``linear`` e.g. network voxels -> LPS mm)."""
    coords = geometry.mapped_grid(voxel_map, shape)
    return sample(disp, coords) @ linear.T


@functools.partial(jax.jit, static_argnames=("shape",))
def _resample_minus_one(values, voxel_map, shape):
    """``1 + (values - 1)`` sampled on another grid: 1 where ``values`` is absent."""
    return 1.0 + sample(values - 1.0, geometry.mapped_grid(voxel_map, shape))


@functools.partial(jax.jit, static_argnames=("shape",))
def _inverse_field(disp_inv, to_network, offset, linear_lps, shape):
    """The inverse transform on the moving grid, LPS mm (see :func:`register_volumes`)."""
    coords = geometry.mapped_grid(to_network, shape)
    flip = jnp.asarray(geometry.RAS_TO_LPS, jnp.float32)
    return (geometry.mapped_grid(offset, shape) * flip
            + sample(disp_inv, coords) @ linear_lps.T)


def foreground(image: np.ndarray) -> np.ndarray:
    """Voxels above ``FOREGROUND_FRACTION`` of the way from the minimum to the 99th
    percentile: the head or body, without its background."""
    lo, hi = float(np.min(image)), float(np.percentile(image, 99))
    return np.asarray(image) > lo + FOREGROUND_FRACTION * (hi - lo)


def register_volumes(trained: Trained, moving: Volume, fixed: Volume,
                     moving_seg: Optional[Volume] = None,
                     fixed_seg: Optional[Volume] = None, *, refine_steps: int = 0,
                     affine: bool = False, inverse: bool = False,
                     fov_center: Optional[Sequence[float]] = None,
                     labels: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """Registers two volumes of any geometry; the outputs lie on the fixed grid.

    The network's grid is the fixed grid itself when the fixed image has the
    network's shape and the moving image the same grid (inputs already on the
    training grid, used as they are); else it has the training data's voxel size
    and orientation (:func:`network_geometry`) and is centred over the fixed
    image (or ``fov_center``), cropping or padding its field of view. With
    ``affine`` the moving image is first aligned to the fixed one
    (``ofg_jax.affine.register_affine`` on the two images as given). Each image
    is resampled once onto the network's grid; each output is sampled once from
    the original moving image through the whole transform
    (:func:`apply_transform`).

    Args:
      trained: from ``ofg_jax.inference.load_trained``.
      moving, fixed: the images, each on its own grid, preprocessed like the
        training data (intensities).
      moving_seg, fixed_seg: optional label maps on the grids of their images.
      refine_steps: test-time OFG steps on the network's grid.
      affine: run the affine pre-alignment.
      inverse: also compute the inverse transform on the moving grid.
      fov_center: centre (RAS mm) of the network's grid; None = the fixed
        image's centre.
      labels: labels of the Dice; None = those of ``fixed_seg`` but 0.

    Returns:
      On the fixed grid: ``warped`` float32, ``jacobian`` (of the deformable
      part; 1 outside the network's grid), ``warped_seg`` int32 with
      ``moving_seg``, ``dice`` / ``labels`` / ``dice_per_label`` with both
      segmentations; ``transform`` (:class:`Transform`); ``direct`` (True when
      the network ran on the fixed grid itself: then ``disp`` is the whole
      mapping in voxels, as Learn2Reg expects); ``disp`` the network's field in
      voxels of ``network_grid``; ``non_pos_jacobian_pct``, ``energy``,
      ``network_energy`` on the network's grid; with ``inverse``:
      ``inverse_lps`` ``(*S_m, 3)`` (fixed <- moving, LPS mm, on the moving
      grid) and ``inverse_error_mm`` (mean, max over the moving foreground);
      ``log``: lines saying what was done.
    """
    for what, volume, image in (("moving", moving_seg, moving),
                                ("fixed", fixed_seg, fixed)):
        if volume is not None and not volume.grid.same_as(image.grid,
                                                           AFFINE_TOLERANCE):
            raise ValueError(f"the {what} segmentation's grid "
                             f"{volume.grid.describe()} differs from the {what} "
                             f"image's {image.grid.describe()}")
    fixed_grid, moving_grid = fixed.grid, moving.grid
    log = [f"moving: {moving_grid.describe()}", f"fixed: {fixed_grid.describe()}"]
    shape = trained.full_size
    on_network_grid = (tuple(fixed_grid.shape) == shape
                       and moving_grid.same_as(fixed_grid, AFFINE_TOLERANCE)
                       and fov_center is None)
    if on_network_grid:
        network_grid = fixed_grid
        fixed_net = np.asarray(fixed.array, np.float32)
        log.append("network grid: the fixed grid (moving and fixed share it and "
                   "have the network's shape): nothing resampled")
    else:
        spacing, axcodes = network_geometry(trained.config)
        network_grid, message = geometry.fit_field_of_view(
            fixed_grid, shape, spacing, axcodes, center=fov_center)
        log.append(message)
        fixed_net = np.asarray(geometry.resample(fixed.array, fixed.affine,
                                                 network_grid))
    matrix = None
    if affine:
        # On the images' own grids: finer than the network's, and the matrix is
        # world -> world whatever the grids.
        matrix = affine_lib.register_affine(moving.array, fixed.array,
                                            moving_affine=moving.affine,
                                            fixed_affine=fixed.affine)
        log.append(f"affine (fixed -> moving world): {affine_lib.describe(matrix)}")
    direct = on_network_grid and matrix is None
    moving_net = (np.asarray(moving.array, np.float32) if direct else
                  np.asarray(geometry.resample(moving.array, moving.affine,
                                               network_grid, matrix=matrix)))
    net = register_arrays(trained, moving_net, fixed_net, refine_steps=refine_steps)
    disp = jnp.asarray(net["disp"])

    # The network's field on the fixed grid, as an ITK field (LPS mm).
    linear_lps = np.diag(geometry.RAS_TO_LPS) @ network_grid.affine[:3, :3]
    to_network = geometry.voxel_map(network_grid.affine, fixed_grid.affine)
    field_lps = np.asarray(_field_on_grid(
        disp, jnp.asarray(to_network, jnp.float32),
        jnp.asarray(linear_lps, jnp.float32), tuple(fixed_grid.shape)))
    field_image = geometry.displacement_image(field_lps, nifti_like(fixed))
    transform = Transform(field_lps, field_image, matrix)
    result = {"transform": transform, "direct": direct, "network_grid": network_grid,
              "disp": net["disp"], "energy": net["energy"],
              "network_energy": net["network_energy"],
              "non_pos_jacobian_pct": net["non_pos_jacobian_pct"],
              "warped": apply_transform(transform, moving, order=1)}
    if (np.array_equal(to_network, np.eye(4))
            and tuple(fixed_grid.shape) == tuple(network_grid.shape)):
        result["jacobian"] = net["jacobian"]  # The network ran on the fixed grid.
    else:
        result["jacobian"] = np.asarray(_resample_minus_one(
            jnp.asarray(net["jacobian"]), jnp.asarray(to_network, jnp.float32),
            tuple(fixed_grid.shape)))
    if moving_seg is not None:
        result["warped_seg"] = apply_transform(transform, moving_seg, order=0)
        if fixed_seg is not None:
            result.update(_dice(result["warped_seg"], fixed_seg.array, labels))
    if inverse:
        result.update(_inverse(net, disp, network_grid, moving, moving_seg, matrix,
                               trained))
        log.append(f"inverse ({result['inverse_method']}): inverse-consistency error "
                   f"{result['inverse_error_mm'][0]:.3g} mm mean, "
                   f"{result['inverse_error_mm'][1]:.3g} mm max over the "
                   f"{result['inverse_region']}")
    result["log"] = log
    return result


def _inverse(net, disp, network_grid, moving, moving_seg, matrix, trained
             ) -> dict[str, Any]:
    """The inverse transform on the moving grid, and its inverse-consistency error."""
    if "velocity" in net:
        exact = integrate_velocity(-jnp.asarray(net["velocity"])[None],
                                   trained.model.int_steps)[0]
        # exp(-v) inverts exp(v) up to the integration's discretisation; fixed-point
        # steps from it remove that where they converge.
        disp_inv = closer_inverse(disp, exact,
                                   invert_displacement(disp, initial=exact))
        method = (f"exact: the negated velocity integrated, then up to "
                  f"{INVERSE_ITERATIONS} fixed-point steps")
    else:
        disp_inv = invert_displacement(disp)
        method = f"fixed-point iteration, {INVERSE_ITERATIONS} steps"
    inverse_matrix = np.eye(4) if matrix is None else np.linalg.inv(matrix)
    moving_grid = moving.grid
    shape = tuple(moving_grid.shape)
    to_network = geometry.voxel_map(network_grid.affine, moving_grid.affine,
                                    inverse_matrix)
    # p - q = (inv(M) - I) @ A_m q + A_n d_inv(y): the first term as a voxel map.
    offset = (inverse_matrix - np.eye(4)) @ moving_grid.affine
    offset[3] = (0.0, 0.0, 0.0, 1.0)
    linear_lps = np.diag(geometry.RAS_TO_LPS) @ network_grid.affine[:3, :3]
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    inverse_lps = np.asarray(_inverse_field(disp_inv, f32(to_network), f32(offset),
                                            f32(linear_lps), shape))
    # |M A_n (d_inv + d o (id + d_inv))| in moving mm, sampled at the moving voxels.
    residual = inverse_residual(disp, disp_inv)
    forward_linear = (np.eye(3) if matrix is None else matrix[:3, :3]
                      ) @ network_grid.affine[:3, :3]
    residual_mm = np.linalg.norm(np.asarray(_field_on_grid(
        residual, f32(to_network), f32(forward_linear), shape)), axis=-1)
    if moving_seg is not None:
        region, where = "moving segmentation's labels", np.asarray(moving_seg.array) > 0
    else:
        region, where = "moving image's foreground", foreground(moving.array)
    if not where.any():
        where = np.ones(shape, bool)
        region = "moving grid"
    values = residual_mm[where]
    return {"inverse_lps": inverse_lps, "inverse_method": method,
            "inverse_error_mm": (float(values.mean()), float(values.max())),
            "inverse_region": region}


def write_run_figures(out_dir: str, trained: Trained, pair: Pair,
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
