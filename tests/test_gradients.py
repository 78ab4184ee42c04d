"""The gradients that refine's inner loop writes out, against autodiff and float64
finite differences of the NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ofg_jax import grad_loss, ncc_to, registration_energy, warp
from ofg_jax.ncc import ncc_gradient_to
from ofg_jax.refine import _inner_energy_fn
from ofg_jax.regularizers import grad_loss_gradient
from ofg_jax.warp import warp_and_slopes
from tests.references import np_grad_loss, np_ncc, np_warp

SHAPES = [(9, 11), (6, 7, 8)]


def case(shape, seed):
    rng = np.random.default_rng(seed)
    moving, fixed = (rng.random(shape).astype(np.float32) for _ in range(2))
    disp = (rng.normal(size=shape + (len(shape),)) * 2).astype(np.float32)
    return moving, fixed, disp


def finite_differences(f, x, points, step=1e-5):
    """Central differences of the float64 function ``f`` at ``points`` of ``x``."""
    x = np.asarray(x, np.float64)
    out = []
    for index in points:
        e = np.zeros_like(x)
        e[index] = step
        out.append((f(x + e) - f(x - e)) / (2 * step))
    return np.array(out)


def some_points(shape, count, seed):
    rng = np.random.default_rng(seed)
    return [tuple(int(rng.integers(n)) for n in shape) for _ in range(count)]


@pytest.mark.parametrize("shape", SHAPES)
def test_warp_and_slopes_match_warp_and_its_derivatives(shape):
    moving, _, disp = case(shape, seed=1)
    warped, slopes = warp_and_slopes(jnp.asarray(moving), jnp.asarray(disp))
    np.testing.assert_allclose(warped, warp(moving, disp), atol=1e-6)
    for k, slope in enumerate(slopes):
        tangent = np.zeros_like(disp)
        tangent[..., k] = 1.0  # a field that moves every voxel along axis k
        _, jvp = jax.jvp(lambda d: warp(moving, d), (disp,), (tangent,))
        np.testing.assert_allclose(slope, jvp, atol=1e-5)
        # Against float64 NumPy: the slope at a voxel is d warped[x] / d disp[x, k].
        for x in some_points(shape, 4, seed=k):
            fd = finite_differences(lambda d, x=x: np_warp(moving, d)[x], disp,
                                    [x + (k,)])[0]
            np.testing.assert_allclose(slope[x], fd, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("window", [3, 5])
def test_ncc_gradient_matches_autodiff_and_float64(shape, window):
    _, fixed, _ = case(shape, seed=2)
    b = (0.5 * fixed + 0.5 * np.random.default_rng(3).random(shape)).astype(np.float32)
    got = np.asarray(ncc_gradient_to(jnp.asarray(fixed), window=window)(jnp.asarray(b)))
    want = jax.grad(ncc_to(jnp.asarray(fixed), window=window))(jnp.asarray(b))
    assert np.max(np.abs(want)) > 0  # a real gradient to compare
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.max(np.abs(want)))
    points = some_points(shape, 5, seed=4)
    fd = finite_differences(lambda x: np_ncc(fixed, x, window), b, points, step=1e-4)
    np.testing.assert_allclose(got[tuple(np.array(points).T)], fd, rtol=2e-3,
                               atol=1e-3 * np.max(np.abs(fd)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("penalty", ["l2", "l1"])
def test_grad_loss_gradient_matches_autodiff_and_float64(shape, penalty):
    _, _, disp = case(shape, seed=5)
    got = np.asarray(grad_loss_gradient(jnp.asarray(disp), penalty=penalty))
    want = jax.grad(lambda d: grad_loss(d, penalty=penalty))(jnp.asarray(disp))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.max(np.abs(want)))
    points = some_points(disp.shape, 5, seed=6)
    fd = finite_differences(lambda d: np_grad_loss(d, penalty), disp, points, step=1e-4)
    np.testing.assert_allclose(got[tuple(np.array(points).T)], fd, rtol=1e-3, atol=1e-7)
    with pytest.raises(ValueError, match="penalty"):
        grad_loss_gradient(jnp.asarray(disp), penalty="l3")


@pytest.mark.parametrize("similarity, penalty", [("ncc", "l2"), ("mse", "l1")])
def test_inner_energy_equals_registration_energy_with_its_gradient(similarity, penalty):
    moving, fixed, disp = case((7, 8, 9), seed=7)
    kwargs = dict(reg_weight=0.7, similarity=similarity, window=5, penalty=penalty)
    inner = _inner_energy_fn(moving, fixed, kwargs["reg_weight"], similarity, 5, penalty)
    plain = lambda d: registration_energy(moving, fixed, d, **kwargs)
    np.testing.assert_allclose(inner(disp), plain(disp), rtol=1e-6)
    want = jax.grad(plain)(disp)
    np.testing.assert_allclose(jax.grad(inner)(disp), want, rtol=1e-4,
                               atol=1e-6 * np.max(np.abs(want)))


# Cost-function masks: the data term is the weighted mean sum(w c) / sum(w), with
# w = fixed_mask * moving_mask∘disp, the warped moving mask held constant.

def masks(shape, seed):
    """A soft fixed mask with a hole of zeros, and a binary moving mask."""
    rng = np.random.default_rng(seed)
    fixed_mask = (rng.random(shape) * (rng.random(shape) > 0.3)).astype(np.float32)
    moving_mask = (rng.random(shape) > 0.4).astype(np.float32)
    return fixed_mask, moving_mask


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("window", [3, 5])
def test_weighted_ncc_gradient_matches_autodiff_and_float64(shape, window):
    _, fixed, _ = case(shape, seed=2)
    weights, _ = masks(shape, seed=8)
    b = (0.5 * fixed + 0.5 * np.random.default_rng(3).random(shape)).astype(np.float32)
    got = np.asarray(ncc_gradient_to(jnp.asarray(fixed), window=window)(
        jnp.asarray(b), jnp.asarray(weights)))
    want = jax.grad(lambda x: ncc_to(jnp.asarray(fixed), window=window)(
        x, jnp.asarray(weights)))(jnp.asarray(b))
    assert np.max(np.abs(want)) > 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.max(np.abs(want)))
    points = some_points(shape, 5, seed=4)
    fd = finite_differences(lambda x: np_ncc(fixed, x, window, weights=weights), b,
                            points, step=1e-4)
    np.testing.assert_allclose(got[tuple(np.array(points).T)], fd, rtol=2e-3,
                               atol=1e-3 * np.max(np.abs(fd)))
    # The weights change the gradient (a masked voxel's window still counts
    # through its neighbours, so it need not vanish there).
    plain = np.asarray(ncc_gradient_to(jnp.asarray(fixed), window=window)(jnp.asarray(b)))
    assert np.max(np.abs(got - plain)) > 0.1 * np.max(np.abs(plain))


@pytest.mark.parametrize("similarity, which", [
    ("ncc", "fixed"), ("ncc", "moving"), ("ncc", "both"), ("mse", "both")])
def test_masked_inner_energy_equals_the_masked_energy_with_its_gradient(similarity,
                                                                        which):
    moving, fixed, disp = case((7, 8, 9), seed=7)
    fixed_mask, moving_mask = masks((7, 8, 9), seed=9)
    fixed_mask = fixed_mask if which in ("fixed", "both") else None
    moving_mask = moving_mask if which in ("moving", "both") else None
    kwargs = dict(reg_weight=0.7, similarity=similarity, window=5, penalty="l2",
                  fixed_mask=fixed_mask, moving_mask=moving_mask)
    inner = _inner_energy_fn(moving, fixed, 0.7, similarity, 5, "l2", fixed_mask,
                             moving_mask)
    plain = lambda d: registration_energy(moving, fixed, d, **kwargs)
    np.testing.assert_allclose(inner(disp), plain(disp), rtol=1e-6)
    want = jax.grad(plain)(disp)
    got = jax.grad(inner)(disp)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.max(np.abs(want)))

    # Against float64 NumPy: the energy, and its central differences with the
    # weights held at those of ``disp`` (the warped moving mask is not
    # differentiated).
    weights = np.ones((7, 8, 9)) if fixed_mask is None else fixed_mask.astype(np.float64)
    if moving_mask is not None:
        weights = weights * np_warp(moving_mask, disp)

    def np_energy(d, w=weights):
        warped = np_warp(moving, d)
        data = (-np_ncc(fixed, warped, 5, weights=w) if similarity == "ncc" else
                np.sum(w * (fixed - warped) ** 2) / np.sum(w))
        return data + 0.7 * np_grad_loss(d)

    np.testing.assert_allclose(plain(disp), np_energy(disp), rtol=1e-5)
    points = some_points(disp.shape, 6, seed=10)
    fd = finite_differences(np_energy, disp, points, step=1e-4)
    np.testing.assert_allclose(np.asarray(got)[tuple(np.array(points).T)], fd,
                               rtol=2e-3, atol=2e-3 * np.max(np.abs(fd)))
