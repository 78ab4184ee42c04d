"""Diffeomorphic output: integrating a stationary velocity field."""

import jax

from ofg_jax.warp import warp

# Name of the velocity field that diffeomorphic networks sow into the
# "intermediates" collection: ``model.apply(..., mutable=["intermediates"])``.
VELOCITY = "velocity"


def integrate_velocity(velocity: jax.Array, steps: int = 7) -> jax.Array:
    """Scaling and squaring: the displacement of ``exp(v)``.

    ``v <- v / 2**steps``, then ``steps`` times ``v <- v + warp(v, v)`` (linear
    interpolation, zeros outside), as VoxelMorph's ``VecInt``.

    Args:
      velocity: ``(B, *S, N)`` stationary velocity field in voxels.
      steps: number of squarings (VoxelMorph uses 7).

    Returns:
      ``(B, *S, N)`` displacement in voxels, same dtype as ``velocity``.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    disp = velocity * (1.0 / 2 ** steps)
    compose = jax.vmap(lambda d: d + warp(d, d))
    return jax.lax.fori_loop(0, steps, lambda _, d: compose(d), disp)

