"""A registration's transform: built from a field, saved, carried over to other images.

A registration finds a displacement on a working grid (a network's grid, or
the grid of an optimisation); :func:`field_transform` turns it into the
transform of the fixed grid (an ITK displacement field, LPS mm, and the
affine), :func:`inverse_field` into the inverse's field on the moving grid.
``ofg_jax.register`` writes a registration into a folder: ``transform.nii.gz``
(an ITK displacement field on the fixed grid, LPS mm) and, after an affine
pre-alignment, ``affine.mat`` (an ITK affine); with ``--inverse``,
``inverse.nii.gz`` on the moving grid. :func:`load_transform` reads them back and
:func:`apply_transform` resamples any image through them
(``python -m ofg_jax.apply``).

Coordinates follow ``ofg_jax.registration.geometry``: NIfTI affines map voxels to RAS mm; a
transform maps a fixed point ``p`` to the moving point ``matrix @ (p + u(p))``.
"""

import dataclasses
import functools
import os
from typing import Optional

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np

from ofg_jax.registration import geometry
from ofg_jax import nifti
from ofg_jax.registration.geometry import Grid
from ofg_jax.warp import sample

# The files of a registration, in its output folder.
OUTPUT_FILES = {"warped": "warped.nii.gz", "warped_seg": "warped_seg.nii.gz",
                "disp": "disp.nii.gz", "jacobian": "jacobian.nii.gz",
                "transform": "transform.nii.gz"}
AFFINE_FILE = "affine.mat"
INVERSE_FILE = "inverse.nii.gz"


@dataclasses.dataclass(frozen=True)
class Volume:
    """A 3D image or label map on its own grid.

    Attributes:
      array: ``(X, Y, Z)`` voxels (float32 images, int32 label maps).
      affine: ``(4, 4)`` voxel -> RAS mm (a NIfTI affine).
    """
    array: np.ndarray
    affine: np.ndarray

    @property
    def grid(self) -> Grid:
        return Grid(tuple(np.shape(self.array)), np.asarray(self.affine, np.float64))


def read_volume(path: str, what: str, *, labels: bool = False) -> Volume:
    """A file's voxels (checked: finite float32, or integer labels) and affine."""
    _, affine = nifti.volume_grid(path, what)
    return Volume(nifti.read_volume(path, labels=labels), affine)


@dataclasses.dataclass(frozen=True)
class Transform:
    """A saved registration: the moving point of each fixed point ``p`` is
    ``matrix @ (p + u(p))``.

    Attributes:
      field_lps: ``(X, Y, Z, 3)`` float32 ITK displacement field ``u``, LPS mm,
        on the fixed grid.
      field_image: its NIfTI image (the fixed grid's affine and header).
      matrix: ``(4, 4)`` world -> world affine (RAS mm), or None (identity).
    """
    field_lps: np.ndarray
    field_image: nib.Nifti1Image
    matrix: Optional[np.ndarray] = None


def apply_transform(transform: Transform, image: Volume, *, order: int = 1
                    ) -> np.ndarray:
    """``image`` (in its own geometry) resampled onto the transform's fixed grid.

    Linear (``order=1``) or nearest (``order=0``) interpolation; 0 outside the
    image. The registration's own outputs are computed by this function too, so
    applying a saved registration to the moving image reproduces them exactly.
    """
    return np.asarray(geometry.sample_through(
        image.array, image.affine, transform.field_lps, transform.field_image.affine,
        matrix=transform.matrix, order=order))


def load_transform(directory: str, *, inverse: bool = False) -> Transform:
    """The transform saved by ``register`` in ``directory``.

    Forward: ``transform.nii.gz`` and, if present, ``affine.mat`` (moving <-
    fixed, onto the fixed grid). ``inverse``: ``inverse.nii.gz`` (fixed <-
    moving, onto the moving grid; written by ``register --inverse``).

    Raises:
      FileNotFoundError: a missing folder or transform file (named).
      ValueError: an unreadable transform file.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"registration folder {directory} not found")
    name = INVERSE_FILE if inverse else OUTPUT_FILES["transform"]
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        hint = " (run register with --inverse)" if inverse else ""
        raise FileNotFoundError(f"{path} not found: {directory} is not the output "
                                f"folder of ofg_jax.register{hint}")
    field, image = geometry.read_itk_displacement(path)
    matrix_path = os.path.join(directory, AFFINE_FILE)
    matrix = None
    if not inverse and os.path.isfile(matrix_path):
        matrix = geometry.read_itk_affine(matrix_path)
    return Transform(field, image, matrix)


def nifti_like(volume: Volume) -> nib.Nifti1Image:
    """A header-only stand-in for a volume's image (when it has no file)."""
    return nib.Nifti1Image(np.broadcast_to(np.uint8(0), np.shape(volume.array)),
                           volume.affine)


# From the working grid of a registration to the grids of its images.

@functools.partial(jax.jit, static_argnames=("shape",))
def _field_on_grid(disp, voxel_map, linear, shape):
    """A field on another grid of ``shape``: ``linear @ disp(voxel_map @ y)`` for each
    voxel ``y`` (``linear`` e.g. working voxels -> LPS mm)."""
    return sample(disp, geometry.mapped_grid(voxel_map, shape)) @ linear.T


def _f32(array) -> jax.Array:
    return jnp.asarray(array, jnp.float32)


def field_transform(disp: np.ndarray, working_grid: Grid, fixed: Volume,
                    matrix: Optional[np.ndarray] = None) -> Transform:
    """The transform of a displacement found on a working grid, on the fixed grid.

    Args:
      disp: ``(*S, 3)`` displacement in voxels of ``working_grid`` (the fixed
        image resampled onto it takes the moving one's value at ``x + disp(x)``).
      working_grid: the grid of ``disp``.
      fixed: the fixed image (its grid carries the transform).
      matrix: ``(4, 4)`` world -> world affine applied after the field, or None.

    Returns:
      The :class:`Transform`; its field is 0 outside the working grid.
    """
    linear_lps = np.diag(geometry.RAS_TO_LPS) @ working_grid.affine[:3, :3]
    to_working = geometry.voxel_map(working_grid.affine, fixed.affine)
    field_lps = np.asarray(_field_on_grid(jnp.asarray(disp), _f32(to_working),
                                          _f32(linear_lps), tuple(fixed.grid.shape)))
    return Transform(field_lps, geometry.displacement_image(field_lps, nifti_like(fixed)),
                     matrix)


@functools.partial(jax.jit, static_argnames=("shape",))
def _resample_minus_one(values, voxel_map, shape):
    """``1 + (values - 1)`` sampled on another grid: 1 where ``values`` is absent."""
    return 1.0 + sample(values - 1.0, geometry.mapped_grid(voxel_map, shape))


def jacobian_on_grid(jacobian: np.ndarray, working_grid: Grid, grid: Grid
                     ) -> np.ndarray:
    """A Jacobian determinant ``(*S)`` of the working grid on another grid (linear;
    1 outside the working grid); itself when the two grids are one."""
    to_working = geometry.voxel_map(working_grid.affine, grid.affine)
    if np.array_equal(to_working, np.eye(4)) and tuple(grid.shape) == tuple(
            working_grid.shape):
        return np.asarray(jacobian)
    return np.asarray(_resample_minus_one(jnp.asarray(jacobian), _f32(to_working),
                                          tuple(grid.shape)))


@functools.partial(jax.jit, static_argnames=("shape",))
def _inverse_field(disp_inv, to_working, offset, linear_lps, shape):
    """The inverse transform on the moving grid, LPS mm (see :func:`inverse_field`)."""
    coords = geometry.mapped_grid(to_working, shape)
    flip = jnp.asarray(geometry.RAS_TO_LPS, jnp.float32)
    return (geometry.mapped_grid(offset, shape) * flip
            + sample(disp_inv, coords) @ linear_lps.T)


def inverse_field(disp_inv: np.ndarray, working_grid: Grid, moving_grid: Grid,
                  matrix: Optional[np.ndarray] = None) -> np.ndarray:
    """The fixed <- moving transform as one ITK field on the moving grid.

    Args:
      disp_inv: ``(*S, 3)`` inverse of the working grid's displacement, voxels.
      working_grid: its grid.
      moving_grid: the grid of the field.
      matrix: the forward transform's world -> world affine, or None.

    Returns:
      ``(*S_m, 3)`` float32 field, LPS mm: the moving point ``q`` maps to the
      fixed point ``q + field(q)``.
    """
    inverse_matrix = np.eye(4) if matrix is None else np.linalg.inv(matrix)
    shape = tuple(moving_grid.shape)
    to_working = geometry.voxel_map(working_grid.affine, moving_grid.affine,
                                    inverse_matrix)
    # p - q = (inv(M) - I) @ A_m q + A_w d_inv(y): the first term as a voxel map.
    offset = (inverse_matrix - np.eye(4)) @ moving_grid.affine
    offset[3] = (0.0, 0.0, 0.0, 1.0)
    linear_lps = np.diag(geometry.RAS_TO_LPS) @ working_grid.affine[:3, :3]
    return np.asarray(_inverse_field(jnp.asarray(disp_inv), _f32(to_working),
                                     _f32(offset), _f32(linear_lps), shape))


def residual_on_grid(residual: np.ndarray, working_grid: Grid, moving_grid: Grid,
                     matrix: Optional[np.ndarray] = None) -> np.ndarray:
    """``|M A_w residual|`` (moving mm) at the moving voxels: the inverse-consistency
    error of a field, from ``ofg_jax.inverse.inverse_residual`` on the working grid."""
    inverse_matrix = np.eye(4) if matrix is None else np.linalg.inv(matrix)
    to_working = geometry.voxel_map(working_grid.affine, moving_grid.affine,
                                    inverse_matrix)
    forward_linear = (np.eye(3) if matrix is None else matrix[:3, :3]
                      ) @ working_grid.affine[:3, :3]
    return np.linalg.norm(np.asarray(_field_on_grid(
        jnp.asarray(residual), _f32(to_working), _f32(forward_linear),
        tuple(moving_grid.shape))), axis=-1)
