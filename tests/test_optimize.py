"""optimize_displacement: registration by coarse-to-fine optimisation alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from ofg_jax import jacobian_determinant, optimize_displacement
from ofg_jax import refine, registration_energy, warp
from tests.references import np_warp


def smooth_image(shape, seed, sigma=2.0):
    """A smooth random image in [0, 1]."""
    image = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), sigma)
    return ((image - image.min()) / np.ptp(image)).astype(np.float32)


def smooth_field(shape, amplitude, seed):
    """A smooth random field (voxels, 2D or 3D) that vanishes towards the borders."""
    rng = np.random.default_rng(seed)
    window = np.ones(shape)
    for axis, n in enumerate(shape):
        profile = np.sin(np.linspace(0, np.pi, n))
        window = window * profile.reshape([-1 if k == axis else 1
                                           for k in range(len(shape))])
    field = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 4.0)
                      for _ in shape], -1) * window[..., None]
    return (field * amplitude / np.abs(field).max()).astype(np.float32)


def np_block_mean(x, f):
    s = x.shape[:3]
    return x.reshape(s[0] // f, f, s[1] // f, f, s[2] // f, f, *x.shape[3:]).mean(
        axis=(1, 3, 5))


def np_upsample(field, f):
    """Linear upsampling between coarse voxel centres (fine voxel ``x`` at coarse
    coordinate ``(x + 0.5) / f - 0.5``, clamped at the edges), values times ``f``."""
    out = np.asarray(field, np.float64)
    for axis in range(3):
        n = out.shape[axis]
        c = np.clip((np.arange(n * f) + 0.5) / f - 0.5, 0, n - 1)
        lo = np.floor(c).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        w = (c - lo).reshape([-1 if k == axis else 1 for k in range(out.ndim)])
        out = np.take(out, lo, axis) * (1 - w) + np.take(out, hi, axis) * w
    return f * out


def test_one_level_is_refine_from_zero():
    moving, fixed = smooth_image((12, 14, 10), 0), smooth_image((12, 14, 10), 1)
    options = dict(optimizer="amsgrad", learning_rate=0.1, reg_weight=1.5, window=5)
    got = optimize_displacement(moving, fixed, levels=(1,), steps=(4,),
                                diffeomorphic=False, **options)
    want = refine(moving, fixed, jnp.zeros((12, 14, 10, 3)), steps=4, **options)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_a_coarse_level_optimises_block_means_and_upsamples():
    """Against float64 NumPy block means and linear upsampling."""
    moving, fixed = smooth_image((12, 16, 8), 2), smooth_image((12, 16, 8), 3)
    options = dict(optimizer="adam", learning_rate=0.2, reg_weight=2.0, window=3)
    got = optimize_displacement(moving, fixed, levels=(2,), steps=(3,),
                                diffeomorphic=False, **options)
    coarse = refine(np_block_mean(moving, 2), np_block_mean(fixed, 2),
                    jnp.zeros((6, 8, 4, 3)), steps=3, **options)
    assert got.shape == (12, 16, 8, 3)
    assert np.abs(coarse).max() > 0.1
    np.testing.assert_allclose(got, np_upsample(coarse, 2), atol=1e-4)


def test_recovers_most_of_a_known_smooth_deformation():
    shape = (27, 30, 25)  # Odd sizes: the coarse level pads.
    moving = smooth_image(shape, 4, sigma=1.5)
    truth = smooth_field(shape, 3.5, seed=5)
    fixed = np_warp(moving, truth).astype(np.float32)
    disp = np.asarray(jax.jit(lambda m, f: optimize_displacement(
        m, f, levels=(2, 1), steps=(40, 20), learning_rate=0.2, reg_weight=0.5))(
            moving, fixed))
    inner = (slice(3, -3),) * 3
    before = np.linalg.norm(truth[inner], axis=-1).mean()
    after = np.linalg.norm((disp - truth)[inner], axis=-1).mean()
    assert before > 1.0
    assert after < 0.35 * before, (after, before)
    assert np.abs(np.asarray(warp(moving, disp)) - fixed)[inner].mean() < 0.35 * (
        np.abs(moving - fixed)[inner].mean())


def test_diffeomorphic_mode_does_not_fold_where_the_displacement_does():
    # A large deformation, a weak smoothness term and large steps: the
    # displacement folds; the exponential of a velocity does not (2D: quick).
    shape = (40, 36)
    moving = smooth_image(shape + (1,), 4, sigma=1.5)[..., 0]
    fixed = np_warp(moving, smooth_field(shape, 4.0, seed=5)).astype(np.float32)
    options = dict(levels=(2, 1), steps=(20, 10), learning_rate=0.5, reg_weight=0.1)
    both = jax.jit(lambda m, f: [optimize_displacement(m, f, diffeomorphic=mode, **options)
                                 for mode in (False, True)])
    folding, disp = both(moving, fixed)
    assert np.mean(np.asarray(jacobian_determinant(folding)) <= 0) > 0.01
    assert np.abs(disp).max() > 2.0
    assert np.asarray(jacobian_determinant(disp)).min() > 0


def test_a_coarser_velocity_grid_recovers_the_deformation_without_folding():
    """``velocity_factor=2``: the velocity on half of each level's grid, its
    exponential upsampled during the optimisation (2D, a shape no factor divides)."""
    shape = (45, 38)
    moving = smooth_image(shape + (1,), 7, sigma=1.5)[..., 0]
    truth = smooth_field(shape, 4.0, seed=8)
    fixed = np_warp(moving, truth).astype(np.float32)
    options = dict(levels=(2, 1), steps=(60, 30), learning_rate=0.2, reg_weight=0.5,
                   diffeomorphic=True)
    fields = jax.jit(lambda m, f: [optimize_displacement(m, f, velocity_factor=q, **options)
                                   for q in (1, 2)])(moving, fixed)
    inner = (slice(4, -4),) * 2
    before = np.linalg.norm(truth[inner], axis=-1).mean()
    assert before > 1.0
    for disp in fields:
        assert np.asarray(disp).shape == shape + (2,)
        error = np.linalg.norm((np.asarray(disp) - truth)[inner], axis=-1).mean()
        assert error < 0.25 * before, (error, before)
        assert np.asarray(jacobian_determinant(disp)).min() > 0


def binomial_filter(field):
    """``[1, 2, 1] / 4`` along each spatial axis, edges repeated (jnp, for autodiff)."""
    for axis in range(field.ndim - 1):
        pad = [(1, 1) if k == axis else (0, 0) for k in range(field.ndim)]
        padded, n = jnp.pad(field, pad, mode="edge"), field.shape[axis]
        field = sum(weight * jax.lax.slice_in_dim(padded, k, k + n, axis=axis)
                    for k, weight in enumerate((0.25, 0.5, 0.25)))
    return field


@pytest.mark.parametrize("velocity_factor", [1, 2])
def test_the_velocity_takes_first_order_steps_between_exponentials(velocity_factor):
    """One level, SGD: each step is ``w -= lr * grad`` of ``-NCC(fixed,
    moving∘U(exp(v0) + v - v0)) + reg * Grad(v)``, ``v = B(w)``, by autodiff of
    the public energy, with ``v0`` the velocity when the exponential was last
    taken (every ``integrate_every`` steps; 5 steps: a remainder of 2 with 3)
    and ``U`` linear upsampling from the velocity's grid (``jax.image.resize``,
    values times the factor)."""
    from ofg_jax import optimize_velocity
    from ofg_jax.models.integrate import integrate_velocity
    from ofg_jax.regularizers import grad_loss
    shape = (14, 12, 10)
    moving, fixed = smooth_image(shape, 11), smooth_image(shape, 12)
    lr, reg, steps = 150.0, 0.3, 5

    grid = tuple(n // velocity_factor for n in shape)
    upsample = lambda v: velocity_factor * jax.image.resize(v, shape + (3,), "linear")

    def energy(w, anchor_velocity, anchor_disp):
        velocity = binomial_filter(w)
        disp = upsample(anchor_disp + velocity - anchor_velocity)
        return (registration_energy(moving, fixed, disp, reg_weight=0.0, window=3)
                + reg * grad_loss(velocity))

    def reference(integrate_every):
        w = jnp.zeros(grid + (3,))
        for step in range(steps):
            if step % integrate_every == 0:
                anchor = binomial_filter(w)
                anchor_disp = integrate_velocity(anchor[None], 4)[0]
            w = w - lr * jax.grad(energy)(w, anchor, anchor_disp)
        return np.asarray(upsample(binomial_filter(w)))

    want = {every: reference(every) for every in (1, 3)}
    scale = np.abs(want[1]).max()
    assert scale > 0.3
    assert np.abs(want[1] - want[3]).max() > 0.02 * scale  # the anchoring matters
    for every in (1, 3):
        got = optimize_velocity(moving, fixed, levels=(1,), steps=(steps,),
                                learning_rate=lr, reg_weight=reg, window=3,
                                optimizer="sgd", int_steps=4,
                                velocity_factor=velocity_factor, integrate_every=every)
        np.testing.assert_allclose(got, want[every], atol=2e-3 * scale)


def test_jit_and_vmap_agree_on_a_shape_no_factor_divides():
    """Each pair of a vmapped batch as alone (up to rounding, which Adam can amplify
    to a fraction of a step where a gradient is about 0). Eager calls: the tests
    above."""
    shape = (13, 10)
    pairs = [(smooth_image(shape + (1,), 2 * k)[..., 0],
              smooth_image(shape + (1,), 2 * k + 1)[..., 0]) for k in range(2)]
    fn = lambda m, f: optimize_displacement(m, f, levels=(4, 2, 1), steps=(3, 2, 1),
                                            window=3)
    alone = [np.asarray(jax.jit(fn)(*pair)) for pair in pairs]
    assert alone[0].shape == shape + (2,)
    assert all(np.isfinite(a).all() and np.abs(a).max() > 0.05 for a in alone)
    batched = np.asarray(jax.jit(jax.vmap(fn))(*[jnp.stack(arrays)
                                                  for arrays in zip(*pairs)]))
    for k in range(2):
        difference = np.abs(batched[k] - alone[k])
        assert difference.max() < 0.02 and difference.mean() < 1e-3 * np.abs(
            alone[k]).mean()


@pytest.mark.parametrize("options, message", [
    (dict(levels=(2, 3), steps=(1, 1)), "each a multiple of the next"),
    (dict(levels=(4, 2), steps=(1,)), "of the same length"),
    (dict(steps=(1, -1, 1)), "steps must be integers >= 0"),
    (dict(window=4), "window must be a positive odd integer"),
    (dict(similarity="mi"), "similarity must be one of"),
    (dict(optimizer="lbfgs"), "optimizer must be one of"),
    (dict(reg_weight=-1.0), "reg_weight must be a number >= 0"),
    (dict(integrate_every=0), "integrate_every must be an integer >= 1"),
])
def test_invalid_options_are_named(options, message):
    image = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(ValueError, match=message):
        optimize_displacement(image, image, **options)


@pytest.mark.parametrize("diffeomorphic", [False, True])
def test_optimize_arrays_runs_the_mode_of_its_settings(diffeomorphic):
    """``grid_registration.optimize_arrays`` (the command's path) computes what the
    library function computes for the same settings, in either mode."""
    from ofg_jax.registration.arrays import optimize_arrays
    from ofg_jax.options import OptimizeSettings
    moving, fixed = smooth_image((16, 20, 12), 9), smooth_image((16, 20, 12), 10)
    settings = OptimizeSettings(levels=(2, 1), steps=(4, 2), diffeomorphic=diffeomorphic)
    got = optimize_arrays(settings, moving, fixed)["disp"]
    want = optimize_displacement(moving, fixed, **settings.options())
    other = optimize_displacement(moving, fixed, **{**settings.options(),
                                                    "diffeomorphic": not diffeomorphic})
    assert np.abs(np.asarray(want) - np.asarray(other)).max() > 1e-3  # the modes differ
    np.testing.assert_allclose(got, want, atol=1e-5)
