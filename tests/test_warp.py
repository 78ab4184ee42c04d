"""ofg_jax.warp against float64 NumPy, PyTorch grid_sample, and its properties."""

import itertools

import hypothesis
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

from ofg_jax import warp
from tests.references import np_warp

SHAPES = [(11, 13), (7, 9, 10)]


def random_case(shape, channels, scale, seed):
    rng = np.random.default_rng(seed)
    image = rng.random(shape + channels).astype(np.float32)
    disp = (rng.normal(size=shape + (len(shape),)) * scale).astype(np.float32)
    return image, disp


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels", [(), (2,)])
def test_linear_matches_numpy(shape, channels):
    # Displacements of a few voxels push many samples across the borders.
    image, disp = random_case(shape, channels, 3.0, seed=len(shape) + len(channels))
    got = np.asarray(warp(image, disp))
    np.testing.assert_allclose(got, np_warp(image, disp, 1), atol=2e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_nearest_matches_numpy(shape):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, size=shape).astype(np.int32)
    # Stay away from .5 ties, where float32 rounding of grid + disp is ambiguous.
    disp = (rng.integers(-3, 4, size=shape + (len(shape),))
            + rng.uniform(-0.4, 0.4, size=shape + (len(shape),))).astype(np.float32)
    got = np.asarray(warp(labels, disp, order=0))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np_warp(labels, disp, 0))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_matches_torch_grid_sample(shape, mode):
    torch = pytest.importorskip("torch")
    from experiments.torch_baseline import spatial_transform
    image, disp = random_case(shape, (3,), 2.5, seed=7)
    if mode == "nearest":
        disp = np.round(disp) + np.random.default_rng(3).uniform(
            -0.4, 0.4, disp.shape).astype(np.float32)
    expected = spatial_transform(
        torch.from_numpy(np.moveaxis(image, -1, 0))[None],
        torch.from_numpy(np.moveaxis(disp, -1, 0))[None], mode=mode)
    expected = np.moveaxis(expected[0].numpy(), 0, -1)
    got = np.asarray(warp(image, disp, order=1 if mode == "bilinear" else 0))
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_match_autodiff_of_plain_interpolation(shape):
    """The hand-written derivative equals autodiff of the textbook formula."""
    image, disp = random_case(shape, (), 2.0, seed=5)

    def plain(image, disp):
        spatial = disp.shape[:-1]
        coords = jnp.stack(jnp.meshgrid(*[jnp.arange(n) for n in spatial],
                                        indexing="ij"), -1) + disp
        base = jnp.floor(coords)
        frac = coords - base
        base = base.astype(jnp.int32)
        out = 0.0
        for corner in itertools.product((0, 1), repeat=len(spatial)):
            i = base + jnp.asarray(corner)
            ok = jnp.all((i >= 0) & (i < jnp.asarray(spatial)), -1)
            w = jnp.prod(jnp.where(jnp.asarray(corner) == 1, frac, 1 - frac), -1)
            idx = tuple(jnp.clip(i[..., k], 0, n - 1) for k, n in enumerate(spatial))
            out = out + jnp.where(ok, w * image[idx], 0.0)
        return out

    weights = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    loss = lambda f: lambda i, d: jnp.sum(weights * jnp.sin(f(i, d)))
    got = jax.grad(loss(warp), argnums=(0, 1))(image, disp)
    want = jax.grad(loss(plain), argnums=(0, 1))(image, disp)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5)
    # Forward mode agrees with reverse mode.
    tangent = np.random.default_rng(1).normal(size=disp.shape).astype(np.float32)
    _, jvp = jax.jvp(lambda d: loss(warp)(image, d), (disp,), (tangent,))
    np.testing.assert_allclose(jvp, np.sum(got[1] * tangent), rtol=1e-4)


def test_gradient_matches_finite_differences():
    image, disp = random_case((6, 7, 8), (), 1.5, seed=9)
    image, disp = image.astype(np.float64), disp.astype(np.float64)
    with jax.enable_x64(True):
        f = lambda d: jnp.sum(jnp.cos(warp(image, d)))
        g = np.asarray(jax.grad(f)(disp))
        rng = np.random.default_rng(2)
        for _ in range(5):
            idx = tuple(rng.integers(0, n) for n in disp.shape)
            step = np.zeros_like(disp)
            step[idx] = 1e-6
            fd = (f(disp + step) - f(disp - step)) / 2e-6
            np.testing.assert_allclose(g[idx], fd, rtol=1e-4, atol=1e-7)


def test_jit_vmap_and_batching():
    image, disp = random_case((8, 9, 10), (), 2.0, seed=4)
    batch_i = np.stack([image, image[::-1]])
    batch_d = np.stack([disp, -disp])
    got = jax.jit(jax.vmap(warp))(batch_i, batch_d)
    for b in range(2):
        np.testing.assert_allclose(got[b], warp(batch_i[b], batch_d[b]), atol=1e-6)


@pytest.mark.parametrize("image_shape, disp_shape, match", [
    ((8, 9, 10), (8, 9, 11, 3), "does not match"),
    ((8, 9, 10), (8, 9, 10, 2), "components"),
    ((8, 9), (8, 9, 3), "components"),
    ((4, 4, 4, 4), (4, 4, 4, 4, 4), "2 or 3 spatial dims"),
    ((8,), (8, 1), "2 or 3 spatial dims"),
])
def test_bad_shapes_raise_before_tracing(image_shape, disp_shape, match):
    with pytest.raises(ValueError, match=match) as err:
        jax.jit(warp)(jnp.zeros(image_shape), jnp.zeros(disp_shape))
    assert str(disp_shape) in str(err.value) or str(image_shape) in str(err.value)


def test_bad_order():
    with pytest.raises(ValueError, match="order"):
        warp(jnp.zeros((4, 4)), jnp.zeros((4, 4, 2)), order=3)


spatial_shapes = st.sampled_from([(5, 6), (9, 4), (4, 5, 6), (6, 3, 5)])


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(shape=spatial_shapes, data=st.data())
def test_zero_displacement_is_identity(shape, data):
    image = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(
        -100, 100, width=32, allow_subnormal=False)))
    np.testing.assert_array_equal(warp(image, np.zeros(shape + (len(shape),),
                                                        np.float32)), image)


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(shape=spatial_shapes, data=st.data())
def test_integer_translation_is_a_shift(shape, data):
    shift = data.draw(st.tuples(*[st.integers(-2, 2) for _ in shape]))
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    disp = np.broadcast_to(np.asarray(shift, np.float32), shape + (len(shape),))
    for order in (0, 1):
        out = np.asarray(warp(image, disp, order=order))
        # Interior: out[x] = image[x + shift] wherever x + shift is inside.
        dst = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, shape))
        src = tuple(slice(max(0, s), max(0, s) + (d.stop - d.start))
                    for s, d in zip(shift, dst))
        np.testing.assert_allclose(out[dst], image[src], atol=1e-6)
