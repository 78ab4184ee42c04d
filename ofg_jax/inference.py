"""Former path of :mod:`ofg_jax.registration.network`.

Kept for ``from ofg_jax import inference``.
"""
from ofg_jax.registration.network import *  # noqa: F401,F403
