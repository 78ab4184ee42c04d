"""Checks of volumes read from disk: 3D, finite intensities, integer labels, masks.

Every reader (the datasets, the NIfTI files of ``register``) passes what it
loaded through :func:`as_image`, :func:`as_labels` or :func:`as_mask`, so a bad
file is named in one clear error wherever it is read.
"""

from typing import Sequence

import numpy as np


def volume_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` without the singleton channel axes that writers add around a volume.

    Axes of length 1 are dropped from either end while more than three remain
    (NIfTI's ``(X, Y, Z, 1)``, a pickled ``(1, 1, D, H, W)``).
    """
    shape = tuple(int(n) for n in shape)
    while len(shape) > 3 and (shape[0] == 1 or shape[-1] == 1):
        shape = shape[1:] if shape[0] == 1 else shape[:-1]
    return shape


def _as_3d(array: np.ndarray, path: str, what: str) -> np.ndarray:
    array = array.reshape(volume_shape(array.shape))
    if array.ndim != 3:
        raise ValueError(f"{what} in {path} must be a 3D volume, got shape {array.shape}")
    return array


def as_image(array, path: str, what: str = "image") -> np.ndarray:
    """Checks a loaded image is 3D and finite; returns it as ``float32``."""
    array = _as_3d(np.asarray(array), path, what)
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{what} in {path} has non-numeric dtype {array.dtype}")
    image = array.astype(np.float32, copy=False)
    if not np.all(np.isfinite(image)):
        bad = int(np.size(image) - np.count_nonzero(np.isfinite(image)))
        raise ValueError(f"{what} in {path} has {bad} non-finite (NaN or inf) voxels")
    return image


def as_labels(array, path: str, what: str = "segmentation") -> np.ndarray:
    """Checks a loaded label map is 3D with integer values; returns it as ``int32``."""
    array = _as_3d(np.asarray(array), path, what)
    if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        return array.astype(np.int32, copy=False)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{what} in {path} has non-numeric dtype {array.dtype}")
    rounded = np.rint(array)
    if not np.all(np.isfinite(array)) or np.any(rounded != array):
        raise ValueError(f"{what} in {path} holds non-integer label values")
    return rounded.astype(np.int32)


def as_mask(array, path: str, what: str = "mask") -> np.ndarray:
    """Checks a loaded cost-function mask (:func:`as_image`, then
    :func:`check_mask`); returns it as ``float32``."""
    return check_mask(as_image(array, path, what), f"{what} {path}")


def check_mask(mask, what: str, shape=None) -> np.ndarray:
    """``mask`` as float32, checked: finite, within ``[0, 1]``, somewhere > 0 (and
    of ``shape``, when given); else a ``ValueError`` naming ``what``."""
    mask = np.asarray(mask, np.float32)
    if shape is not None and mask.shape != tuple(shape):
        raise ValueError(f"{what} has shape {mask.shape}, its image {tuple(shape)}")
    if not np.all(np.isfinite(mask)):
        bad = int(mask.size - np.count_nonzero(np.isfinite(mask)))
        raise ValueError(f"{what} has {bad} non-finite (NaN or inf) voxels")
    low, high = float(mask.min()), float(mask.max())
    if low < 0 or high > 1:
        raise ValueError(f"{what} has values from {low:g} to {high:g}: a mask holds "
                         "weights in [0, 1] (0 = ignored, 1 = counted, binary or "
                         "soft)")
    if high == 0:
        raise ValueError(f"{what} is 0 everywhere: nothing would count")
    return mask
