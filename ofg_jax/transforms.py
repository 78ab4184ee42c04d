"""A saved registration: its files, and carrying it over to other images.

``ofg_jax.register`` writes a registration into a folder: ``transform.nii.gz``
(an ITK displacement field on the fixed grid, LPS mm) and, after an affine
pre-alignment, ``affine.mat`` (an ITK affine); with ``--inverse``,
``inverse.nii.gz`` on the moving grid. :func:`load_transform` reads them back and
:func:`apply_transform` resamples any image through them
(``python -m ofg_jax.apply``).

Coordinates follow ``ofg_jax.geometry``: NIfTI affines map voxels to RAS mm; a
transform maps a fixed point ``p`` to the moving point ``matrix @ (p + u(p))``.
"""

import dataclasses
import os
from typing import Optional

import nibabel as nib
import numpy as np

from ofg_jax import geometry
from ofg_jax import nifti
from ofg_jax.geometry import Grid

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
