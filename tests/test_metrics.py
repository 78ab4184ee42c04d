"""grad_loss, jacobian_determinant and dice against NumPy and PyTorch."""

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

from ofg_jax import dice_per_label, grad_loss, jacobian_determinant, non_positive_jacobian_pct
from ofg_jax.metrics import hd95, sdlogj
from tests.references import np_dice, np_grad_loss, np_jacobian_determinant, np_sdlogj

SHAPES = [(9, 11), (6, 7, 8)]


def field(shape, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape + (len(shape),)) * scale).astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("penalty", ["l1", "l2"])
def test_grad_loss_matches_numpy_and_torch(shape, penalty):
    disp = field(shape, seed=1)
    want = np_grad_loss(disp, penalty)
    np.testing.assert_allclose(grad_loss(disp, penalty=penalty), want, rtol=1e-5)

    torch = pytest.importorskip("torch")
    from experiments.torch_baseline import grad_loss as torch_grad_loss
    t = torch.from_numpy(np.moveaxis(disp, -1, 0))[None]
    np.testing.assert_allclose(grad_loss(disp, penalty=penalty),
                               torch_grad_loss(t, penalty).item(), rtol=1e-5)


def test_grad_loss_of_constant_field_is_zero_and_bad_penalty():
    assert float(grad_loss(jnp.full((5, 6, 7, 3), 2.5))) == 0.0
    with pytest.raises(ValueError, match="penalty"):
        grad_loss(jnp.zeros((5, 6, 7, 3)), penalty="l3")


@pytest.mark.parametrize("shape", SHAPES)
def test_jacobian_matches_numpy_gradient(shape):
    disp = field(shape, scale=0.7, seed=2)
    want = np_jacobian_determinant(disp)
    assert (want <= 0).any() and (want > 0).any()  # a folding field: both signs
    np.testing.assert_allclose(jacobian_determinant(disp), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(non_positive_jacobian_pct(disp),
                               100 * np.mean(want <= 0), rtol=1e-6)


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(shape=st.sampled_from([(4, 5), (3, 4, 5), (2, 2, 2)]),
                  offset=st.floats(-5, 5))
def test_jacobian_of_zero_and_constant_field_is_one(shape, offset):
    disp = np.full(shape + (len(shape),), offset, np.float32)
    np.testing.assert_allclose(jacobian_determinant(disp), 1.0, atol=1e-5)
    assert float(non_positive_jacobian_pct(disp)) == 0.0


def test_jacobian_of_uniform_scaling():
    # x -> 1.5 x has determinant 1.5**3 everywhere, borders included.
    shape = (5, 6, 7)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    np.testing.assert_allclose(jacobian_determinant((0.5 * grid).astype(np.float32)),
                               1.5 ** 3, rtol=1e-6)


def test_dice_matches_numpy():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, size=(10, 11, 12))
    b = np.where(rng.random(a.shape) < 0.7, a, rng.integers(0, 6, size=a.shape))
    labels = [1, 2, 3, 5, 9]  # 9 is absent from both: the reference scores 0
    want = np_dice(a, b, labels)
    np.testing.assert_allclose(dice_per_label(a, b, labels), want, rtol=1e-6)
    np.testing.assert_allclose(dice_per_label(a, a, labels[:4]), 1.0, rtol=1e-6)
    assert float(dice_per_label(a, b, [9])[0]) == 0.0
    np.testing.assert_allclose(jax.jit(dice_per_label, static_argnums=2)(a, b, (1, 2)),
                               want[:2], rtol=1e-6)


def test_dice_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        dice_per_label(jnp.zeros((4, 4)), jnp.zeros((4, 5)), [1])
    with pytest.raises(ValueError, match="labels"):
        dice_per_label(jnp.zeros((4, 4)), jnp.zeros((4, 4)), [])


def test_sdlogj_is_learn2regs_definition():
    rng = np.random.default_rng(3)
    shape = (12, 10, 14)
    from scipy import ndimage
    disp = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 1.5) * 4
                     for _ in range(3)], -1).astype(np.float32)
    want = np_sdlogj(disp)
    assert want > 0.05  # A field with real variation: a real check.
    np.testing.assert_allclose(sdlogj(disp), want, rtol=1e-4)
    np.testing.assert_allclose(jax.jit(sdlogj)(disp), want, rtol=1e-4)
    # The identity: log(1 + 3) everywhere inside the crop.
    assert float(sdlogj(np.zeros(shape + (3,), np.float32))) == pytest.approx(0, abs=1e-5)
    with pytest.raises(ValueError, match="larger than 4"):
        sdlogj(np.zeros((4, 10, 10, 3), np.float32))


def test_hd95_is_the_mean_of_surface_distance_over_labels_in_both_maps():
    surface = pytest.importorskip("surface_distance")
    rng = np.random.default_rng(4)
    from scipy import ndimage
    shape = (20, 18, 16)
    smooth = ndimage.gaussian_filter(rng.normal(size=shape), 2)
    fixed = np.digitize(smooth, np.quantile(smooth, [0.3, 0.6, 0.8]))
    warped = np.digitize(np.roll(smooth, 2, axis=0) + 0.1 * rng.normal(size=shape),
                         np.quantile(smooth, [0.3, 0.6, 0.8]))
    warped[warped == 3] = 2  # Label 3 only in the fixed map: skipped.
    want = np.mean([surface.compute_robust_hausdorff(surface.compute_surface_distances(
        fixed == l, warped == l, (1.0, 1.0, 1.0)), 95) for l in (1, 2)])
    assert want > 0.5
    assert hd95(fixed, warped, [1, 2, 3, 7]) == pytest.approx(want, rel=1e-4)
    assert np.isnan(hd95(fixed, warped, [7]))


def test_hd95_of_a_translated_cube_is_the_translation():
    cube = np.zeros((24, 24, 24), np.int32)
    cube[6:16, 6:16, 6:16] = 1
    for shift in (1, 3):
        assert hd95(cube, np.roll(cube, shift, axis=1), [1]) == pytest.approx(shift)
        assert hd95(cube, np.roll(cube, shift, axis=1), [1],
                    spacing=(1.0, 2.0, 1.0)) == pytest.approx(2 * shift)
