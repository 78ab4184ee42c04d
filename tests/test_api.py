"""The public primitives as a JAX user meets them: the same numbers eagerly, under
``jit`` and under ``vmap``, in 2D and 3D; options are keyword-only."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ofg_jax

# name -> function of (moving, fixed, disp, labels) that calls the primitive.
PRIMITIVES = {
    "warp": lambda m, f, d, s: ofg_jax.warp(m, d),
    "warp_nearest": lambda m, f, d, s: ofg_jax.warp(s, d, order=0),
    "ncc": lambda m, f, d, s: ofg_jax.ncc(m, f, window=5),
    "ncc_to": lambda m, f, d, s: ofg_jax.ncc_to(f, window=5)(m),
    "grad_loss": lambda m, f, d, s: ofg_jax.grad_loss(d, penalty="l1"),
    "jacobian_determinant": lambda m, f, d, s: ofg_jax.jacobian_determinant(d),
    "non_positive_jacobian_pct": lambda m, f, d, s: ofg_jax.non_positive_jacobian_pct(d),
    "dice_per_label": lambda m, f, d, s: ofg_jax.dice_per_label(s, s[::-1], (1, 2)),
    "registration_energy": lambda m, f, d, s: ofg_jax.registration_energy(
        m, f, d, reg_weight=0.5, window=5),
    "refine": lambda m, f, d, s: ofg_jax.refine(m, f, d, steps=2, window=5),
    "ofg_loss": lambda m, f, d, s: ofg_jax.ofg_loss(m, f, d, steps=2, window=5),
}


def inputs(shape, seed):
    """Moving and fixed images, a displacement of about a voxel, a label map."""
    rng = np.random.default_rng(seed)
    moving, fixed = (jnp.asarray(rng.random(shape), jnp.float32) for _ in range(2))
    disp = jnp.asarray(rng.normal(0, 1.0, shape + (len(shape),)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, shape), jnp.int32)
    return moving, fixed, disp, labels


@pytest.mark.parametrize("shape", [(9, 11), (7, 8, 6)], ids=["2d", "3d"])
@pytest.mark.parametrize("name", sorted(PRIMITIVES))
def test_eager_jit_and_vmap_agree(name, shape):
    fn = PRIMITIVES[name]
    args = inputs(shape, seed=len(shape))
    eager = fn(*args)
    assert np.all(np.isfinite(np.asarray(eager, np.float64)))
    np.testing.assert_allclose(jax.jit(fn)(*args), eager, rtol=1e-5, atol=1e-6)
    other = inputs(shape, seed=len(shape) + 10)
    batched = jax.vmap(fn)(*[jnp.stack(pair) for pair in zip(args, other)])
    np.testing.assert_allclose(batched[0], eager, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batched[1], fn(*other), rtol=1e-5, atol=1e-6)


def test_options_are_keyword_only():
    for name in ofg_jax.__all__:
        fn = getattr(ofg_jax, name)
        for parameter in inspect.signature(fn).parameters.values():
            if parameter.default is not inspect.Parameter.empty:
                assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, (
                    f"{name}({parameter.name}=...) must be keyword-only")


def test_registration_functions_take_moving_fixed_disp_in_that_order():
    for fn in (ofg_jax.refine, ofg_jax.registration_energy, ofg_jax.ofg_loss):
        positional = [p.name for p in inspect.signature(fn).parameters.values()
                      if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        assert positional[:2] == ["moving", "fixed"] and "disp" in positional[2], (
            fn.__name__, positional)
