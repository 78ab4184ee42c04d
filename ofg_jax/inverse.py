"""The inverse of a displacement field, by fixed-point iteration.

A field ``disp`` maps ``x -> x + disp(x)`` (voxels, the convention of
``ofg_jax.warp``); its inverse ``d_inv`` satisfies
``y + d_inv(y) + disp(y + d_inv(y)) = y``, i.e. ``d_inv = -disp o (id + d_inv)``.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from ofg_jax.warp import warp

# Fixed-point iterations of the inverse of a non-diffeomorphic field.
INVERSE_ITERATIONS = 30


@functools.partial(jax.jit, static_argnames=("iterations",))
def invert_displacement(disp: jax.Array, *, initial: Optional[jax.Array] = None,
                        iterations: int = INVERSE_ITERATIONS) -> jax.Array:
    """The inverse of ``x -> x + disp(x)`` by fixed-point iteration (voxels).

    ``d_inv <- -warp(disp, d_inv)`` from ``initial`` (default ``-disp``):
    converges where the field is a contraction (``|grad disp| < 1``); zero-padded
    outside the grid.

    Args:
      disp: ``(*S, 3)`` displacement in voxels.
      initial: ``(*S, 3)`` starting guess, e.g. the exponential of the negated
        velocity of a diffeomorphic network.
      iterations: fixed-point steps.

    Returns:
      ``(*S, 3)`` ``d_inv`` with ``y + d_inv(y) + disp(y + d_inv(y)) = y``.
    """
    start = -disp if initial is None else initial
    return jax.lax.fori_loop(0, iterations, lambda _, d: -warp(disp, d), start)


@jax.jit
def inverse_residual(disp: jax.Array, disp_inv: jax.Array) -> jax.Array:
    """``d_inv(y) + disp(y + d_inv(y))`` ``(*S, 3)`` voxels: how far the composition
    of the two fields is from the identity (zero for an exact inverse)."""
    return disp_inv + warp(disp, disp_inv)


@jax.jit
def closer_inverse(disp: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """Per voxel, whichever of two inverses ``(*S, 3)`` of ``disp`` composes closer
    to the identity."""
    norm = lambda d: jnp.linalg.norm(inverse_residual(disp, d), axis=-1)
    return jnp.where((norm(b) < norm(a))[..., None], b, a)
