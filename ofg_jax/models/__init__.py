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

from ofg_jax import _lazy

# Public name -> the submodule that defines it, imported on first use (PEP 562):
# the registration with no network imports ``models.integrate`` and
# ``models.resample`` without the networks (and flax).
_SOURCES = {
    "NAMES": "registry", "NETWORKS": "registry", "create": "registry",
    "options": "registry", "Conv3D": "layers", "RegistrationNetwork": "base",
    "TransMorph": "transmorph", "ViTVNet": "vitvnet", "VoxelMorph": "voxelmorph",
    "conv3d": "conv", "from_torch": "torch_weights", "to_torch": "torch_weights",
    "integrate_velocity": "integrate",
}

__all__ = ["NAMES", "NETWORKS", "Conv3D", "RegistrationNetwork", "TransMorph", "ViTVNet",
           "VoxelMorph", "conv3d", "create", "from_torch", "integrate_velocity", "options",
           "to_torch"]


__getattr__, __dir__ = _lazy.attach(__name__, _SOURCES, __all__)
