"""NIfTI files (anything nibabel reads): volumes, their grids, and writing results.

Errors name the file: a file nibabel cannot read is a ``ValueError`` with the
reason, a missing one a ``FileNotFoundError``. A NIfTI file whose header states
no orientation is read as nibabel reads it, and :func:`orientation_warning` says
so.
"""

from typing import Optional, Union

import nibabel as nib
import numpy as np

from ofg_jax.volumes import as_image, as_labels, volume_shape

# Largest difference of two affines still taken as the same grid (mm).
AFFINE_TOLERANCE = 1e-3


def load(path: str, what: str = "NIfTI file") -> nib.spatialimages.SpatialImage:
    """The nibabel image of ``path`` (header read, voxels not yet)."""
    try:
        return nib.load(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} not found") from None
    except Exception as e:  # nibabel raises many exception types.
        raise ValueError(f"could not read {what} {path}: {type(e).__name__}: {e}"
                         ) from e


def header_shape(path: str, what: str = "NIfTI file") -> tuple[int, ...]:
    """The grid of a file from its header alone, singleton channel axes dropped."""
    return volume_shape(load(path, what).shape)


def volume_grid(path: str, what: str = "NIfTI file"
                ) -> tuple[tuple[int, int, int], np.ndarray]:
    """``(shape, affine)`` of a 3D volume, from its header alone (voxels not read).

    Singleton axes around the volume are dropped (``(X, Y, Z, 1)`` is 3D).

    Raises:
      FileNotFoundError: a missing file.
      ValueError: an unreadable file, or one that is not a single 3D volume (a
        4-D series of several volumes is named as such).
    """
    image = load(path, what)
    shape = volume_shape(image.shape)
    if len(shape) == 4:
        raise ValueError(f"{what} {path} has shape {tuple(image.shape)}: {shape[3]} "
                         "volumes; one 3D volume is needed (extract it first)")
    if len(shape) != 3:
        raise ValueError(f"{what} {path} has shape {tuple(image.shape)}; a 3D volume "
                         "is needed")
    return shape, np.asarray(image.affine, np.float64)


def orientation_warning(path: str, what: str = "NIfTI file") -> Optional[str]:
    """One line saying that a NIfTI file states no orientation, or None if it does.

    With qform and sform codes both 0 the header gives voxel sizes but no
    direction: nibabel (and so ofg_jax) then takes the axes as L, A, S
    (``diag(-dx, dy, dz)``, NIfTI's "method 1"), which swaps left and right if
    the scanner stored the voxels in RAS order. Other formats (``.mgz``) always
    state an orientation.
    """
    image = load(path, what)
    header = image.header
    if not isinstance(header, nib.Nifti1Header) or header["qform_code"] or header[
            "sform_code"]:
        return None
    axcodes = "".join(nib.aff2axcodes(image.affine))
    zooms = "x".join(f"{z:.4g}" for z in header.get_zooms()[:3])
    return (f"warning: {what} {path} states no orientation (qform and sform codes "
            f"0): read as {axcodes} with {zooms} mm voxels, as nibabel assumes; if "
            "that is wrong (left and right swapped), fix the header first")


def read_array(path: str, *, labels: bool = False) -> np.ndarray:
    """The voxels of a file: ``float32`` (scaling applied) or, for labels, as stored."""
    image = load(path)
    try:
        if labels:
            return np.asanyarray(image.dataobj)
        return image.get_fdata(dtype=np.float32)
    except Exception as e:
        raise ValueError(f"could not read NIfTI file {path}: {type(e).__name__}: {e}"
                         ) from e


def read_volume(path: str, *, labels: bool = False) -> np.ndarray:
    """The ``(D, H, W)`` voxels of a 3D file, checked: float32, or int32 for labels."""
    array = read_array(path, labels=labels)
    return as_labels(array, path) if labels else as_image(array, path)


def image_like(array: np.ndarray, reference: nib.spatialimages.SpatialImage,
               intent: str = "none") -> nib.Nifti1Image:
    """``array`` as a NIfTI image with the affine and header of ``reference``.

    The data type is that of ``array`` (not the reference's), without scaling or
    the reference's display range, with the NIfTI ``intent``. A reference in
    another format (``.mgz``, ...) is converted to NIfTI.
    """
    if not isinstance(reference, nib.Nifti1Image):
        reference = nib.Nifti1Image.from_image(reference)
    image = type(reference)(array, reference.affine, reference.header)
    image.set_data_dtype(array.dtype)
    image.header.set_slope_inter(None, None)
    image.header["cal_min"], image.header["cal_max"] = 0, 0
    image.header.set_intent(intent)
    return image


def write_like(path: str, array: np.ndarray,
               reference: Union[str, nib.spatialimages.SpatialImage]) -> None:
    """Writes :func:`image_like` ``(array, reference)`` to ``path``.

    ``reference`` is a file or a loaded image (e.g. a displacement field: its grid
    is the first three axes).
    """
    if isinstance(reference, str):
        reference = nib.load(reference)
    nib.save(image_like(array, reference), path)
