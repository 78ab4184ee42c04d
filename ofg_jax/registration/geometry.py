"""Grids in world coordinates: resampling between them, and ITK transform files.

Conventions (those of NIfTI and nibabel, and of ITK / ANTs / 3D Slicer):

- A grid is a shape and a 4x4 affine mapping voxel indices ``(i, j, k, 1)`` to
  world points in RAS millimetres (x to the Right, y Anterior, z Superior).
  Voxel centres are the integer indices, as in :func:`ofg_jax.warp.sample`.
- A world-to-world ``matrix`` (4x4, RAS mm) maps a point of the fixed image to
  the corresponding point of the moving image: the direction in which images are
  resampled ("pulled").
- ITK, ANTs, SimpleITK and Slicer store transforms in LPS millimetres
  (``LPS = diag(-1, -1, 1) @ RAS``). An ITK displacement field is a NIfTI
  vector image ``(X, Y, Z, 1, 3)`` (intent ``vector``) on the fixed image's grid
  whose value ``u(p)`` (LPS mm) sends the fixed point ``p`` to ``p + u(p)`` in
  the moving image. An affine is an ITK transform file (``.mat``, MATLAB v4,
  variables ``AffineTransform_double_3_3`` and ``fixed``).
- A transform from this module, applied to a point ``p`` of the fixed image, is
  ``matrix @ (p + u(p))``: the displacement first, then the affine, as ANTs
  composes ``-t field.nii.gz -t affine.mat`` and SimpleITK
  ``CompositeTransform([affine, field])``.
"""

import dataclasses
import functools
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import scipy.io

from ofg_jax import nifti
from ofg_jax.warp import sample

# Component signs that turn RAS vectors into LPS ones and back.
RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])
# ITK's NIfTI intent for a displacement field (NIFTI_INTENT_VECTOR).
VECTOR_INTENT = "vector"
ITK_AFFINE_NAME = "AffineTransform_double_3_3"
# Entries of a voxel-to-voxel matrix this close to an integer are snapped to it,
# so that two grids that are the same up to rounding map voxels exactly.
SNAP = 1e-9


@dataclasses.dataclass(frozen=True)
class Grid:
    """A 3D grid: ``shape`` in voxels and its voxel-to-world ``affine`` (RAS mm).

    Attributes:
      shape: ``(X, Y, Z)`` voxels.
      affine: ``(4, 4)`` float64 voxel index -> RAS mm.
    """
    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along each array axis, mm."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def axcodes(self) -> str:
        """The nearest anatomical direction of each array axis, e.g. ``"RAS"``."""
        return "".join(nib.aff2axcodes(self.affine))

    @property
    def center(self) -> np.ndarray:
        """The world point (RAS mm) at the centre of the grid."""
        return apply_affine(self.affine, (np.asarray(self.shape) - 1) / 2.0)

    def describe(self) -> str:
        """``"160x192x224 at 1x1x1 mm, LIA"``; oblique axes: their nearest codes."""
        spacing = "x".join(f"{s:.4g}" for s in self.spacing)
        oblique = "" if is_axis_aligned(self.affine) else ", oblique"
        return (f"{'x'.join(map(str, self.shape))} at {spacing} mm, "
                f"{self.axcodes}{oblique}")

    def same_as(self, other: "Grid", atol: float = 1e-3) -> bool:
        """Same shape and affine entries equal to ``atol`` (mm)."""
        return (tuple(self.shape) == tuple(other.shape)
                and np.allclose(self.affine, other.affine, rtol=0, atol=atol))


def grid_of(image: nib.spatialimages.SpatialImage) -> Grid:
    """The grid of a nibabel image (its first three axes)."""
    return Grid(tuple(int(n) for n in image.shape[:3]),
                np.asarray(image.affine, np.float64))


def apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``affine`` (4x4) applied to ``points`` ``(..., 3)``; float64."""
    return nib.affines.apply_affine(np.asarray(affine, np.float64), points)


def is_axis_aligned(affine: np.ndarray, atol: float = 1e-6) -> bool:
    """Whether every array axis runs along one world axis (no oblique rotation)."""
    linear = np.abs(np.asarray(affine)[:3, :3])
    return bool(np.all(np.sum(linear > atol * linear.max(), axis=0) == 1))


def orientation_matrix(axcodes: str) -> np.ndarray:
    """``(3, 3)`` RAS unit direction of each array axis (columns) for axis codes.

    ``"RAS"``: axis 0 runs to the Right, 1 Anterior, 2 Superior; ``"LIA"`` (the
    FreeSurfer / VoxelMorph layout): axis 0 to the Left, 1 Inferior, 2 Anterior.

    Raises:
      ValueError: codes that are not one of L/R, P/A, I/S for each of 3 axes.
    """
    codes = tuple(str(axcodes).upper())
    try:
        ornt = nib.orientations.axcodes2ornt(codes)
    except Exception as e:
        raise ValueError(f"orientation {axcodes!r} is not three axis codes such as "
                         f"'RAS' or 'LIA': {e}") from None
    if len(codes) != 3 or np.isnan(ornt).any():
        raise ValueError(f"orientation {axcodes!r} must name one of L/R, P/A, I/S for "
                         "each of the 3 axes, such as 'RAS' or 'LIA'")
    directions = np.zeros((3, 3))
    for axis, (world, sign) in enumerate(ornt):
        directions[int(world), axis] = sign
    return directions


def centred_grid(shape: Sequence[int], spacing: Sequence[float], axcodes: str,
                 center: Sequence[float]) -> Grid:
    """An axis-aligned grid of ``shape`` voxels of ``spacing`` mm along ``axcodes``,
    whose central point is the world point ``center`` (RAS mm)."""
    linear = orientation_matrix(axcodes) @ np.diag(np.asarray(spacing, np.float64))
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = np.asarray(center, np.float64) - linear @ (
        (np.asarray(shape, np.float64) - 1) / 2.0)
    return Grid(tuple(int(n) for n in shape), affine)


def extent_along(grid: Grid, directions: np.ndarray) -> np.ndarray:
    """Extent (mm) of ``grid``'s field of view (voxel borders included) projected on
    each unit direction (columns of ``directions``)."""
    corners = np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in grid.shape],
                                   indexing="ij")).reshape(3, -1).T
    projected = apply_affine(grid.affine, corners) @ directions
    return projected.max(axis=0) - projected.min(axis=0)


def fit_field_of_view(fixed: Grid, shape: Sequence[int], spacing: Sequence[float],
                      axcodes: str, *, center: Optional[Sequence[float]] = None
                      ) -> tuple[Grid, str]:
    """The network's grid placed over the fixed image, and a sentence saying how.

    The grid has the network's shape, voxel size and orientation (never rescaled);
    it is centred on the fixed image's field of view, or on ``center`` (RAS mm).
    Along each axis where the fixed field of view is longer the grid crops it;
    where it is shorter the grid pads it (the padding samples as 0).

    Returns:
      ``(grid, message)``; the message gives both fields of view in mm and the
      crop or pad along each axis.
    """
    given = center is not None
    center = fixed.center if center is None else np.asarray(center, np.float64)
    grid = centred_grid(shape, spacing, axcodes, center)
    directions = orientation_matrix(axcodes)
    fixed_extent = extent_along(fixed, directions)
    grid_extent = np.asarray(shape) * np.asarray(spacing, np.float64)
    changes = []
    for code, f, g in zip(axcodes.upper(), fixed_extent, grid_extent):
        if f > g + 0.5:
            changes.append(f"{code}: cropped by {f - g:.1f} mm")
        elif f < g - 0.5:
            changes.append(f"{code}: padded by {g - f:.1f} mm")
        else:
            changes.append(f"{code}: fits")
    fmt = lambda v: " x ".join(f"{x:.1f}" for x in v)
    message = (f"network grid {grid.describe()} ({fmt(grid_extent)} mm) centred at "
               f"({', '.join(f'{c:.1f}' for c in center)}) mm RAS"
               f"{' (as given)' if given else ' (the fixed image centre)'}; "
               f"fixed field of view {fmt(fixed_extent)} mm along the same axes; "
               + ", ".join(changes))
    return grid, message


def voxel_map(to_affine: np.ndarray, from_affine: np.ndarray,
              matrix: Optional[np.ndarray] = None) -> np.ndarray:
    """``(4, 4)`` voxels of one grid -> voxels of another: ``inv(to) @ matrix @ from``.

    Entries within 1e-9 of an integer are snapped to it (the same grid maps each
    voxel exactly onto itself). ``matrix`` (world -> world) defaults to identity.
    """
    m = np.linalg.inv(np.asarray(to_affine, np.float64))
    if matrix is not None:
        m = m @ np.asarray(matrix, np.float64)
    m = m @ np.asarray(from_affine, np.float64)
    rounded = np.round(m)
    return np.where(np.abs(m - rounded) < SNAP, rounded, m)


def _voxel_grid(shape):
    axes = [jnp.arange(n, dtype=jnp.float32) for n in shape]
    return jnp.stack(jnp.meshgrid(*axes, indexing="ij"), -1)


def mapped_grid(matrix: jax.Array, shape: Sequence[int]) -> jax.Array:
    """``matrix`` (4x4) applied to every voxel index of a grid of ``shape``.

    Returns ``(*shape, 3)`` float32, e.g. the voxel coordinates in another grid
    of each voxel (``matrix`` from :func:`voxel_map`). Traceable under ``jit``
    with a static ``shape``.
    """
    return _voxel_grid(shape) @ matrix[:3, :3].T + matrix[:3, 3]


@functools.partial(jax.jit, static_argnames=("shape", "order"))
def _resample(image, matrix, shape, order):
    return sample(image, mapped_grid(matrix, shape), order=order)


def resample(image: np.ndarray, image_affine: np.ndarray, grid: Grid, *,
             matrix: Optional[np.ndarray] = None, order: int = 1) -> jax.Array:
    """``image`` (on its own grid) sampled at the voxel centres of ``grid``.

    The grid point ``p`` (world, RAS mm) takes the image's value at
    ``matrix @ p`` (identity by default); linear (``order=1``) or nearest
    (``order=0``) interpolation, 0 outside the image (:func:`ofg_jax.warp.sample`).

    Args:
      image: ``(*S)`` or ``(*S, C)`` array on the grid of ``image_affine``.
      image_affine: ``(4, 4)`` voxel -> RAS mm of ``image``.
      grid: the grid to sample on.
      matrix: ``(4, 4)`` world -> world map (grid world -> image world).
      order: 1 (linear) or 0 (nearest).

    Returns:
      ``(*grid.shape)`` (or with ``C``) array, dtype of ``image``.
    """
    m = voxel_map(image_affine, grid.affine, matrix)
    return _resample(jnp.asarray(image), jnp.asarray(m, jnp.float32),
                     tuple(grid.shape), order)


@functools.partial(jax.jit, static_argnames=("order",))
def _sample_through(image, field_lps, linear, offset, order):
    shape = field_lps.shape[:3]
    displacement = field_lps * RAS_TO_LPS.astype(np.float32)  # LPS -> RAS mm
    coords = mapped_grid(offset, shape) + displacement @ linear.T
    return sample(image, coords, order=order)


def sample_through(image: np.ndarray, image_affine: np.ndarray,
                   field_lps: np.ndarray, field_affine: np.ndarray, *,
                   matrix: Optional[np.ndarray] = None, order: int = 1) -> jax.Array:
    """``image`` resampled onto the field's grid through ``matrix @ (p + u(p))``.

    The transform of an ITK displacement field (``field_lps``, on the grid of
    ``field_affine``) followed by the world -> world ``matrix``, the order in
    which ANTs applies ``-t field -t affine``. Register and apply both call this
    function with the field as written to disk, so they give identical voxels.

    Args:
      image: ``(*S)`` or ``(*S, C)`` on the grid of ``image_affine``.
      image_affine: ``(4, 4)`` voxel -> RAS mm of ``image``.
      field_lps: ``(X, Y, Z, 3)`` float32 displacement, LPS mm.
      field_affine: ``(4, 4)`` voxel -> RAS mm of the field's grid.
      matrix: ``(4, 4)`` world -> world (RAS mm) applied after the field.
      order: 1 (linear) or 0 (nearest).

    Returns:
      ``(X, Y, Z)`` (or with ``C``) array, dtype of ``image``.
    """
    offset = voxel_map(image_affine, field_affine, matrix)
    linear = voxel_map(image_affine, np.eye(4), matrix)[:3, :3]
    return _sample_through(jnp.asarray(image), jnp.asarray(field_lps, jnp.float32),
                           jnp.asarray(linear, jnp.float32),
                           jnp.asarray(offset, jnp.float32), order)


# ITK transform files.

def lps_matrix(matrix: np.ndarray) -> np.ndarray:
    """A world -> world 4x4 matrix converted between RAS and LPS (its own inverse)."""
    flip = np.diag(np.append(RAS_TO_LPS, 1.0))
    return flip @ np.asarray(matrix, np.float64) @ flip


def displacement_image(field_lps: np.ndarray,
                       reference: nib.spatialimages.SpatialImage) -> nib.Nifti1Image:
    """An ITK displacement field image on ``reference``'s grid (affine and header).

    Args:
      field_lps: ``(X, Y, Z, 3)`` displacement in LPS mm, reference's shape.
      reference: the grid's image (a NIfTI header is copied; other formats
        are converted to NIfTI).

    Returns:
      A float32 ``(X, Y, Z, 1, 3)`` NIfTI image with intent ``vector``.
    """
    field = np.asarray(field_lps, np.float32)
    if field.shape != tuple(reference.shape[:3]) + (3,):
        raise ValueError(f"field of shape {field.shape} does not match the reference "
                         f"grid {tuple(reference.shape[:3])} + (3,)")
    return nifti.image_like(field[:, :, :, None, :], reference, intent=VECTOR_INTENT)


def write_itk_displacement(path: str, field_lps: np.ndarray,
                           reference: nib.spatialimages.SpatialImage) -> None:
    """Writes :func:`displacement_image` to ``path`` (``.nii`` or ``.nii.gz``)."""
    nib.save(displacement_image(field_lps, reference), path)


def read_itk_displacement(path: str) -> tuple[np.ndarray, nib.Nifti1Image]:
    """An ITK displacement field: ``(field_lps (X, Y, Z, 3) float32, image)``.

    Raises:
      FileNotFoundError: a missing file.
      ValueError: an unreadable file, or one that is not ``(X, Y, Z, 1, 3)``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"displacement field {path} not found")
    image = nifti.load(path, "displacement field")
    shape = tuple(image.shape)
    if len(shape) != 5 or shape[3] != 1 or shape[4] != 3:
        raise ValueError(f"displacement field {path} has shape {shape}; an ITK "
                         "displacement field is (X, Y, Z, 1, 3)")
    field = np.asarray(image.dataobj, np.float32)[:, :, :, 0, :]
    return field, image


def write_itk_affine(path: str, matrix: np.ndarray) -> None:
    """Writes a world -> world matrix (RAS mm) as an ITK affine transform file.

    The format of ANTs' ``GenericAffine.mat`` (MATLAB v4, LPS, centre 0):
    ``AffineTransform_double_3_3`` holds the 9 matrix entries (row-major) and the
    translation, ``fixed`` the centre of rotation.
    """
    lps = lps_matrix(matrix)
    parameters = np.concatenate([lps[:3, :3].ravel(), lps[:3, 3]])[:, None]
    scipy.io.savemat(path, {ITK_AFFINE_NAME: parameters, "fixed": np.zeros((3, 1))},
                     format="4")


def read_itk_affine(path: str) -> np.ndarray:
    """The world -> world matrix (RAS mm, 4x4) of an ITK affine ``.mat`` file.

    Reads the files of :func:`write_itk_affine` and of ANTs
    (``AffineTransform_float_3_3`` or ``_double_``, any centre).

    Raises:
      FileNotFoundError: a missing file.
      ValueError: an unreadable file or one without an affine transform.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"affine transform {path} not found")
    try:
        content = scipy.io.loadmat(path)
    except Exception as e:
        raise ValueError(f"could not read affine transform {path}: "
                         f"{type(e).__name__}: {e}") from e
    names = [k for k in content if k.startswith(("AffineTransform_",
                                                  "MatrixOffsetTransformBase_"))]
    if not names or np.size(content[names[0]]) != 12:
        raise ValueError(f"{path} holds no 3D ITK affine transform (variables "
                         f"{sorted(k for k in content if not k.startswith('__'))})")
    parameters = np.asarray(content[names[0]], np.float64).ravel()
    center = np.asarray(content.get("fixed", np.zeros(3)), np.float64).ravel()
    linear, translation = parameters[:9].reshape(3, 3), parameters[9:]
    lps = np.eye(4)
    lps[:3, :3] = linear
    lps[:3, 3] = translation + center - linear @ center
    return lps_matrix(lps)
