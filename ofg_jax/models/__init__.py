"""Registration networks: ``create(name, img_size, **options)``.

Every network is a :class:`RegistrationNetwork`: it maps a channels-last pair
``(B, *img_size, 2)`` (moving image first, fixed second) to a displacement
``(B, *img_size, 3)`` in voxels whose component ``k`` moves along array axis ``k``
(as ``ofg_jax.warp``). Call them as ``model.apply(variables, x, train=False)``;
with ``train=True`` pass ``rngs={"dropout": key}`` (dropout, drop path) and, for
``vitvnet`` (BatchNorm), ``mutable=["batch_stats"]``.

A new network is one module with a ``RegistrationNetwork`` subclass and one line
in :data:`NETWORKS`.
"""

from ofg_jax.models.base import RegistrationNetwork
from ofg_jax.models.conv import conv3d
from ofg_jax.models.integrate import integrate_velocity
from ofg_jax.models.layers import Conv3D
from ofg_jax.models.registry import NAMES, NETWORKS, create, options
from ofg_jax.models.torch_weights import from_torch, to_torch
from ofg_jax.models.transmorph import TransMorph
from ofg_jax.models.vitvnet import ViTVNet
from ofg_jax.models.voxelmorph import VoxelMorph

__all__ = ["NAMES", "NETWORKS", "Conv3D", "RegistrationNetwork", "TransMorph", "ViTVNet",
           "VoxelMorph", "conv3d", "create", "from_torch", "integrate_velocity", "options",
           "to_torch"]
