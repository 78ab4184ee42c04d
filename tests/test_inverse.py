"""invert_displacement against the exact inverse of an affine field (float64 NumPy)."""

import jax.numpy as jnp
import numpy as np
import pytest

from ofg_jax.inverse import closer_inverse
from ofg_jax.inverse import inverse_residual
from ofg_jax.inverse import invert_displacement

SHAPE = (20, 18, 22)
MARGIN = 6  # Voxels of the border where zero padding makes the inverse inexact.


def affine_field(rng):
    """``disp(x) = A (x - c) + b`` with a random small ``A``, and its exact inverse."""
    a = rng.uniform(-0.08, 0.08, (3, 3))
    b = rng.uniform(-1.5, 1.5, 3)
    c = (np.asarray(SHAPE) - 1) / 2
    x = np.stack(np.meshgrid(*map(np.arange, SHAPE), indexing="ij"), -1).astype(np.float64)
    disp = (x - c) @ a.T + b
    # y = x + A (x - c) + b  =>  x = c + (I + A)^-1 (y - c - b).
    exact = c + (x - c - b) @ np.linalg.inv(np.eye(3) + a).T - x
    return disp, exact


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inverts_an_affine_field_in_the_interior(seed):
    disp, exact = affine_field(np.random.default_rng(seed))
    found = np.asarray(invert_displacement(jnp.asarray(disp, jnp.float32)))
    inner = (slice(MARGIN, -MARGIN),) * 3
    error = np.abs(found - exact)[inner].max()
    assert error < 1e-3, error
    assert np.abs(-disp - exact)[inner].max() > 0.1  # The first guess was not it.
    residual = np.asarray(inverse_residual(jnp.asarray(disp, jnp.float32),
                                           jnp.asarray(found)))
    assert np.abs(residual[inner]).max() < 1e-3


def test_closer_inverse_picks_per_voxel():
    disp, exact = affine_field(np.random.default_rng(3))
    disp = jnp.asarray(disp, jnp.float32)
    good = jnp.asarray(exact, jnp.float32)
    bad = good + 0.5
    mask = np.zeros(SHAPE, bool)
    mask[::2] = True
    mixed = jnp.where(mask[..., None], good, bad)
    chosen = np.asarray(closer_inverse(disp, mixed, jnp.where(mask[..., None], bad, good)))
    inner = (slice(MARGIN, -MARGIN),) * 3
    np.testing.assert_allclose(chosen[inner], exact[inner], atol=1e-4)
