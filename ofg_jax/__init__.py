"""ofg_jax: On-the-Fly Guidance training for deformable image registration in JAX."""

from ofg_jax.affine import register_affine
from ofg_jax.inverse import invert_displacement
from ofg_jax.losses import ofg_loss
from ofg_jax.metrics import dice_per_label, jacobian_determinant, non_positive_jacobian_pct
from ofg_jax.ncc import ncc, ncc_to
from ofg_jax.optim import scale_by_torch_adam, torch_adam
from ofg_jax.optimize import optimize_displacement, optimize_velocity
from ofg_jax.refine import refine, registration_energy
from ofg_jax.regularizers import grad_loss
from ofg_jax.schedules import poly_lr
from ofg_jax.warp import sample, warp

__all__ = [
    "dice_per_label", "grad_loss", "invert_displacement", "jacobian_determinant", "ncc",
    "ncc_to", "non_positive_jacobian_pct", "ofg_loss", "optimize_displacement",
    "optimize_velocity", "poly_lr", "refine",
    "register_affine", "registration_energy", "sample", "scale_by_torch_adam",
    "torch_adam", "warp",
]
__version__ = "0.1.0"
