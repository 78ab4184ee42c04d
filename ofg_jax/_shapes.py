"""Shape checks shared by the public functions.

They run on static shapes, so a bad call raises a ``ValueError`` in Python before
anything is traced or compiled.
"""

from typing import Sequence

import numpy as np


def check_disp(disp_shape: Sequence[int], name: str = "disp") -> tuple[int, ...]:
    """Returns the spatial shape of a displacement field ``(*S, N)``, N = len(S)."""
    disp_shape = tuple(disp_shape)
    if len(disp_shape) not in (3, 4):
        raise ValueError(
            f"{name} must have shape (*S, N) with 2 or 3 spatial dims, got shape "
            f"{disp_shape}")
    spatial = disp_shape[:-1]
    if disp_shape[-1] != len(spatial):
        raise ValueError(
            f"{name} of shape {disp_shape} has {disp_shape[-1]} components on its last "
            f"axis, but {len(spatial)} spatial dims {spatial}")
    return spatial


def check_image(image_shape: Sequence[int], spatial: Sequence[int],
                name: str = "image") -> bool:
    """Checks ``image_shape`` is ``spatial`` or ``(*spatial, C)``; returns has-channels."""
    image_shape, spatial = tuple(image_shape), tuple(spatial)
    if image_shape == spatial:
        return False
    if image_shape[:-1] == spatial:
        return True
    raise ValueError(
        f"{name} of shape {image_shape} does not match the displacement's spatial "
        f"shape {spatial}: expected {spatial} or {spatial + ('C',)}")


def check_same_spatial(a_shape: Sequence[int], b_shape: Sequence[int],
                       names: str = "a, b") -> tuple[int, ...]:
    """Checks two 2D/3D arrays have one shape; returns it."""
    a_shape, b_shape = tuple(a_shape), tuple(b_shape)
    if a_shape != b_shape:
        raise ValueError(f"{names} must have the same shape, got {a_shape} and {b_shape}")
    if len(a_shape) not in (2, 3):
        raise ValueError(
            f"{names} must be 2D or 3D images of shape (*S), got shape {a_shape}")
    return a_shape


def check_optional_shapes(shape: Sequence[int], **arrays) -> None:
    """Checks that each of ``arrays`` that is not None (weights, masks) has the
    images' ``shape``."""
    for name, array in arrays.items():
        if array is not None and tuple(np.shape(array)) != tuple(shape):
            raise ValueError(f"{name} of shape {tuple(np.shape(array))} does not match "
                             f"images of shape {tuple(shape)}")
