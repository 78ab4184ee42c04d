"""Static checks of the grid sizes a network can take."""

from typing import Sequence

import jax


def check_img_size(name: str, img_size: Sequence[int]) -> tuple[int, int, int]:
    """``img_size`` as 3 positive ints, or a ``ValueError``."""
    size = tuple(img_size)
    if len(size) != 3 or any(int(n) != n or n < 1 for n in size):
        raise ValueError(f"{name}: img_size must be 3 positive ints (D, H, W), got {img_size!r}")
    return tuple(int(n) for n in size)


def check_divisible(name: str, img_size: Sequence[int], factor: int, why: str) -> None:
    """Raises ``ValueError`` unless every axis of ``img_size`` is divisible by ``factor``."""
    size = check_img_size(name, img_size)
    if any(n % factor for n in size):
        raise ValueError(
            f"{name} needs every axis of img_size divisible by {factor} ({why}); got "
            f"{size}")


def check_input(name: str, x: jax.Array, img_size: Sequence[int]) -> None:
    """Raises ``ValueError`` unless ``x`` is ``(B, *img_size, C)``."""
    size = tuple(img_size)
    if x.ndim != 5 or tuple(x.shape[1:4]) != size:
        raise ValueError(
            f"{name} built for img_size {size} expects input (B, {size[0]}, {size[1]}, "
            f"{size[2]}, C); got shape {x.shape}")
