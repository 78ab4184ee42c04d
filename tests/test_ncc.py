"""ofg_jax.ncc against float64 NumPy, a dense-conv PyTorch NCC, and properties."""

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

from ofg_jax import ncc, ncc_to
from ofg_jax.ncc import box_sum, local_ncc_map
from tests.references import np_ncc, np_window_sums


def images(shape, seed):
    rng = np.random.default_rng(seed)
    a = rng.random(shape).astype(np.float32)
    b = (0.6 * a + 0.4 * rng.random(shape)).astype(np.float32)
    return a, b


@pytest.mark.parametrize("shape", [(23, 17), (12, 14, 16)])
@pytest.mark.parametrize("window", [3, 9])
def test_matches_numpy(shape, window):
    a, b = images(shape, seed=window)
    np.testing.assert_allclose(ncc(a, b, window=window), np_ncc(a, b, window), rtol=1e-5)


@pytest.mark.parametrize("shape", [(10, 11, 12), (5, 20, 3)])
def test_box_sum_matches_numpy(shape):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    got = box_sum(jnp.asarray(x)[..., None], 9)[..., 0]
    np.testing.assert_allclose(got, np_window_sums(x, 9), atol=1e-4)


@pytest.mark.parametrize("shape", [(9, 13), (6, 7, 10)])
def test_box_sum_gradient_is_a_box_sum(shape):
    # A box sum with zero padding is symmetric: its vector-Jacobian product is
    # the box sum of the cotangent.
    rng = np.random.default_rng(1)
    x, g = (jnp.asarray(rng.normal(size=(*shape, 2)), jnp.float32) for _ in range(2))
    _, vjp = jax.vjp(lambda v: box_sum(v, 5), x)
    for c in range(2):
        np.testing.assert_allclose(vjp(g)[0][..., c], np_window_sums(
            np.asarray(g[..., c]), 5), atol=1e-4)


@pytest.mark.parametrize("shape", [(30, 26), (14, 16, 18)])
def test_matches_torch_dense_conv_ncc(shape):
    torch = pytest.importorskip("torch")
    from experiments.torch_baseline import ncc_loss
    a, b = images(shape, seed=3)
    ta, tb = (torch.from_numpy(x)[None, None].requires_grad_(True) for x in (a, b))
    loss = ncc_loss(ta, tb)
    loss.backward()
    np.testing.assert_allclose(-ncc(a, b), loss.item(), rtol=1e-5)
    # Gradients too: the inner optimiser follows them.
    ga, gb = jax.grad(lambda a, b: -ncc(a, b), argnums=(0, 1))(a, b)
    np.testing.assert_allclose(ga, ta.grad[0, 0].numpy(), rtol=1e-3, atol=1e-8)
    np.testing.assert_allclose(gb, tb.grad[0, 0].numpy(), rtol=1e-3, atol=1e-8)


def test_symmetric_and_bounded_and_jittable():
    a, b = images((12, 13, 14), seed=4)
    f = jax.jit(ncc)
    assert abs(float(f(a, b)) - float(f(b, a))) < 1e-6
    cc = local_ncc_map(a, b)
    assert float(cc.min()) >= 0.0 and float(cc.max()) <= 1.0 + 1e-5
    batched = jax.vmap(ncc)(np.stack([a, b]), np.stack([b, b]))
    np.testing.assert_allclose(batched[0], f(a, b), rtol=1e-5)


def test_ncc_to_equals_ncc_with_gradients():
    a, b = images((10, 12, 14), seed=5)
    to_a = ncc_to(a)
    np.testing.assert_allclose(to_a(b), ncc(a, b), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(to_a)(b), jax.grad(lambda x: ncc(a, x))(b),
                               rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="same shape"):
        to_a(b[:-1])


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(shape=st.sampled_from([(12, 10), (9, 11, 8)]),
                  seed=st.integers(0, 2**16), scale=st.floats(0.5, 4.0))
def test_self_similarity_is_one_where_variance_is_nonzero(shape, seed, scale):
    a = (np.random.default_rng(seed).random(shape) * scale).astype(np.float32)
    cc = np.asarray(local_ncc_map(a, a))
    # Random images have non-zero variance in every window.
    np.testing.assert_allclose(cc, 1.0, atol=1e-3)
    np.testing.assert_allclose(ncc(a, a), 1.0, atol=1e-3)


@pytest.mark.parametrize("a_shape, b_shape, match", [
    ((8, 9, 10), (8, 9, 11), "same shape"),
    ((4, 4, 4, 4), (4, 4, 4, 4), "2D or 3D"),
    ((8,), (8,), "2D or 3D"),
])
def test_bad_shapes(a_shape, b_shape, match):
    with pytest.raises(ValueError, match=match) as err:
        jax.jit(ncc)(jnp.ones(a_shape), jnp.ones(b_shape))
    assert str(a_shape) in str(err.value)


@pytest.mark.parametrize("window", [0, 4, -3])
def test_bad_window(window):
    with pytest.raises(ValueError, match="window"):
        ncc(jnp.ones((5, 5)), jnp.ones((5, 5)), window=window)
