"""The network registry: every network by name, its options and their defaults."""

import dataclasses
from typing import Any, Sequence

from ofg_jax.models.base import RegistrationNetwork
from ofg_jax.models.transmorph import TransMorph
from ofg_jax.models.vitvnet import ViTVNet
from ofg_jax.models.voxelmorph import VoxelMorph

NETWORKS = {"voxelmorph": VoxelMorph, "vitvnet": ViTVNet, "transmorph": TransMorph}
NAMES = tuple(NETWORKS)


def options(name: str) -> dict[str, Any]:
    """The options of network ``name`` (every attribute but ``img_size``), with
    their defaults: the published configuration.

    Raises:
      ValueError: for an unknown ``name``.
    """
    if name not in NETWORKS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(NAMES)}")
    # ``remat`` is a training setting (``train.remat``), not an architecture option.
    return {field.name: field.default for field in dataclasses.fields(NETWORKS[name])
            if field.name not in ("parent", "name", "img_size", "remat")}


def create(name: str, img_size: Sequence[int], **overrides) -> RegistrationNetwork:
    """The network ``name`` for volumes of spatial size ``img_size``.

    Args:
      name: one of ``NAMES``.
      img_size: ``(D, H, W)``.
      **overrides: options (:func:`options`) to change from the published
        configuration, e.g. ``window_size=(2, 2, 2)`` for TransMorph at 64^3,
        ``diffeomorphic=True``, ``dtype="bfloat16"``.

    Raises:
      ValueError: for an unknown ``name`` or option, or an ``img_size`` the
        architecture cannot take (named constraint), before anything is traced.
    """
    valid = options(name)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown {name} option(s) {unknown}; valid: {', '.join(sorted(valid))}")
    model = NETWORKS[name](img_size=tuple(img_size), **overrides)
    model.check_size()
    return model
