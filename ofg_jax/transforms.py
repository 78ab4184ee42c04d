"""Former path of :mod:`ofg_jax.registration.transforms`.

Kept for ``from ofg_jax import transforms``.
"""
from ofg_jax.registration.transforms import *  # noqa: F401,F403
