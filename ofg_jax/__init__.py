"""ofg_jax: On-the-Fly Guidance training for deformable image registration in JAX.

The primitives of ``__all__`` are imported from their submodules on first use
(PEP 562), so that importing a command line (``ofg_jax.register``) does not
import JAX before its flags and files are checked. ``ofg_jax.warp``,
``ofg_jax.ncc`` and ``ofg_jax.refine`` are the functions, not the submodules of
the same names.
"""

import sys
import types

from ofg_jax import _lazy

# Public name -> the submodule that defines it.
_SOURCES = {
    "dice_per_label": "metrics", "grad_loss": "regularizers",
    "invert_displacement": "inverse", "jacobian_determinant": "metrics",
    "ncc": "ncc", "ncc_to": "ncc", "non_positive_jacobian_pct": "metrics",
    "ofg_loss": "settings.losses", "optimize_displacement": "optimize",
    "optimize_velocity": "optimize", "poly_lr": "schedules", "refine": "refine",
    "register_affine": "registration.affine", "registration_energy": "refine", "sample": "warp",
    "scale_by_torch_adam": "adam", "torch_adam": "adam", "warp": "warp",
}

__all__ = [
    "dice_per_label", "grad_loss", "invert_displacement", "jacobian_determinant", "ncc",
    "ncc_to", "non_positive_jacobian_pct", "ofg_loss", "optimize_displacement",
    "optimize_velocity", "poly_lr", "refine",
    "register_affine", "registration_energy", "sample", "scale_by_torch_adam",
    "torch_adam", "warp",
]
__version__ = "0.1.0"


__getattr__, __dir__ = _lazy.attach(__name__, _SOURCES, __all__)


class _Package(types.ModuleType):
    """The package's module type: a submodule that shares its name with a public
    function (``warp``, ``ncc``, ``refine``) does not replace that function.

    Python binds each submodule to its package once it is imported; the package's
    former eager imports then rebound the function, and this does the same.
    """

    def __setattr__(self, name: str, value) -> None:
        if (isinstance(value, types.ModuleType) and _SOURCES.get(name) == name
                and value.__name__ == f"{__name__}.{name}"):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
