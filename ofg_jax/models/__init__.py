"""Registration networks: ``create(name, img_size, **overrides)``.

Every network maps a channels-last pair ``(B, *img_size, 2)`` (moving image first,
fixed second) to a displacement ``(B, *img_size, 3)`` in voxels whose component
``k`` moves along array axis ``k`` (as ``ofg_jax.warp``). Call them as
``model.apply(variables, x, train=False)``; with ``train=True`` pass
``rngs={"dropout": key}`` (dropout, drop path) and, for ``vitvnet`` (BatchNorm),
``mutable=["batch_stats"]``.
"""

from typing import Sequence

import flax.linen as nn

from ofg_jax.models.integrate import integrate_velocity
from ofg_jax.models.layers import Conv3D, conv3d
from ofg_jax.models.transmorph import TransMorph
from ofg_jax.models.vitvnet import ViTVNet
from ofg_jax.models.voxelmorph import VoxelMorph

_MODELS = {"voxelmorph": VoxelMorph, "vitvnet": ViTVNet, "transmorph": TransMorph}
NAMES = tuple(_MODELS)


def create(name: str, img_size: Sequence[int], **overrides) -> nn.Module:
    """The network ``name`` for volumes of spatial size ``img_size``.

    Args:
      name: one of ``NAMES``.
      img_size: ``(D, H, W)``.
      **overrides: module attributes to change from the published configuration,
        e.g. ``window_size=(2, 2, 2)`` for TransMorph at 64^3,
        ``diffeomorphic=True``, ``dtype=jnp.bfloat16``.

    Raises:
      ValueError: for an unknown ``name`` or attribute, or an ``img_size`` the
        architecture cannot take (named constraint), before anything is traced.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(NAMES)}")
    cls = _MODELS[name]
    fields = set(cls.__dataclass_fields__) - {"parent", "name", "img_size"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown {name} option(s) {unknown}; valid: {', '.join(sorted(fields))}")
    model = cls(img_size=tuple(img_size), **overrides)
    model.check_size()
    return model


__all__ = ["NAMES", "Conv3D", "TransMorph", "ViTVNet", "VoxelMorph", "conv3d", "create",
           "integrate_velocity"]
