"""refine and ofg_loss: parity with the reference's PyTorch loop, gradients, options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from ofg_jax import grad_loss, ofg_loss, refine, registration_energy

SHAPE = (18, 20, 22)


def smooth_pair(shape=SHAPE, seed=0):
    """Smooth random images and a smooth random starting field (voxels)."""
    rng = np.random.default_rng(seed)
    smooth = lambda x, s: ndimage.gaussian_filter(x, s)
    moving = smooth(rng.random(shape), 1.5)
    fixed = smooth(rng.random(shape), 1.5)
    moving = (moving - moving.min()) / np.ptp(moving)
    fixed = (fixed - fixed.min()) / np.ptp(fixed)
    disp = np.stack([smooth(rng.normal(size=shape), 3) * 5 for _ in shape], -1)
    return moving.astype(np.float32), fixed.astype(np.float32), disp.astype(np.float32)


@pytest.mark.parametrize("similarity, optimizer", [("ncc", "amsgrad"), ("mse", "amsgrad"),
                                                   ("ncc", "adam")])
def test_matches_torch_inner_loop(similarity, optimizer):
    torch = pytest.importorskip("torch")
    from experiments import torch_baseline
    moving, fixed, disp = smooth_pair()
    lr = 0.1
    got = np.asarray(refine(moving, fixed, disp, steps=10, learning_rate=lr,
                            similarity=similarity, optimizer=optimizer))
    to_t = lambda x: torch.from_numpy(np.ascontiguousarray(x))[None, None]
    want = torch_baseline.refine(
        to_t(moving), to_t(fixed), torch.from_numpy(np.moveaxis(disp, -1, 0))[None],
        steps=10, lr=lr, similarity=similarity, amsgrad=optimizer == "amsgrad")
    want = np.moveaxis(want[0].numpy(), 0, -1)
    moved = np.mean(np.abs(want - disp))
    assert moved > 0.1  # ~lr per step with Adam: a real move
    assert np.mean(np.abs(got - want)) < 1e-3 * moved


def test_amsgrad_differs_from_optax_amsgrad():
    """Why refine carries its own Adam: optax.amsgrad lands somewhere else."""
    import optax
    from ofg_jax.refine import registration_energy as energy
    moving, fixed, disp = smooth_pair(seed=1)
    ours = refine(moving, fixed, disp, steps=10)
    opt = optax.amsgrad(0.1)
    params, state = jnp.asarray(disp), opt.init(jnp.asarray(disp))
    for _ in range(10):
        g = jax.grad(lambda d: energy(moving, fixed, d))(params)
        updates, state = opt.update(g, state)
        params = optax.apply_updates(params, updates)
    moved = np.mean(np.abs(ours - disp))
    assert np.mean(np.abs(params - ours)) > 0.05 * moved


def test_refine_lowers_energy_and_ignores_input_gradient():
    moving, fixed, disp = smooth_pair(seed=2)
    energy = lambda d: float(registration_energy(moving, fixed, d))
    out = jax.jit(lambda d: refine(moving, fixed, d, steps=10))(disp)
    assert energy(out) < energy(disp) - 1e-3
    # refine starts from stop_gradient(disp): no gradient flows back through it.
    g = jax.grad(lambda d: jnp.sum(refine(moving, fixed, d, steps=2)))(disp)
    assert float(jnp.max(jnp.abs(g))) == 0.0


@pytest.mark.parametrize("options", [dict(optimizer="sgd", learning_rate=50.0),
                                     dict(downsample=2), dict(similarity="mse"),
                                     dict(reg_weight=0.0, penalty="l1")])
def test_options_lower_energy(options):
    moving, fixed, disp = smooth_pair(seed=3)
    kw = {k: v for k, v in options.items() if k in ("similarity", "penalty")}
    energy = lambda d: float(registration_energy(
        moving, fixed, d, reg_weight=options.get("reg_weight", 1.0), **kw))
    out = refine(moving, fixed, disp, steps=10, **options)
    assert out.shape == disp.shape
    assert energy(out) < energy(disp)


def test_downsampled_optimiser_moves_a_smooth_half_resolution_field():
    moving, fixed, disp = smooth_pair(seed=4)
    zero = np.zeros_like(disp)
    out = np.asarray(refine(moving, fixed, zero, steps=5, downsample=2))
    # Linear upsampling of a half-resolution field: neighbours within a 2-block
    # are strongly tied, unlike the per-voxel optimiser.
    per_voxel = np.asarray(refine(moving, fixed, zero, steps=5))
    rough = lambda f: float(grad_loss(f)) / float(np.mean(f ** 2))
    assert rough(out) < rough(per_voxel)


def test_traced_learning_rate_and_vmap():
    moving, fixed, disp = smooth_pair(seed=5)
    batched = jax.jit(jax.vmap(lambda m, f, d, lr: refine(m, f, d, steps=3,
                                                           learning_rate=lr)))
    out = batched(np.stack([moving, fixed]), np.stack([fixed, moving]),
                  np.stack([disp, disp]), jnp.asarray([0.1, 0.0]))
    # Adam normalises tiny gradients, so summation-order noise shows in a few voxels.
    single = refine(moving, fixed, disp, steps=3)
    assert float(jnp.mean(jnp.abs(out[0] - single))) < 1e-5
    np.testing.assert_allclose(out[0], single, atol=1e-3)
    np.testing.assert_allclose(out[1], disp, atol=1e-6)  # lr 0: unchanged


def test_2d():
    rng = np.random.default_rng(6)
    moving, fixed = (ndimage.gaussian_filter(rng.random((24, 26)), 1.5)
                     .astype(np.float32) for _ in range(2))
    disp = np.zeros((24, 26, 2), np.float32)
    out = refine(moving, fixed, disp, steps=5)
    assert out.shape == disp.shape and float(jnp.mean(jnp.abs(out))) > 0


def test_ofg_loss_gradient_is_mse_to_constant_target():
    moving, fixed, disp = smooth_pair(seed=7)
    pred = disp * 0.5
    target = refine(moving, fixed, pred, steps=4)
    got = jax.grad(lambda p: ofg_loss(moving, fixed, p, steps=4))(pred)
    want = jax.grad(lambda p: jnp.mean((p - target) ** 2))(pred)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(got, 2 * (pred - target) / pred.size, rtol=1e-4,
                               atol=1e-9)
    np.testing.assert_allclose(ofg_loss(moving, fixed, pred, steps=4),
                               np.mean((pred - np.asarray(target)) ** 2), rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(similarity="ssd"), "similarity"), (dict(optimizer="lbfgs"), "optimizer"),
    (dict(downsample=3), "divisible"), (dict(downsample=0), "downsample"),
])
def test_bad_options(kwargs, match):
    moving, fixed, disp = smooth_pair(seed=8)
    with pytest.raises(ValueError, match=match):
        refine(moving, fixed, disp, **kwargs)


def test_bad_shapes():
    moving, fixed, disp = smooth_pair(seed=8)
    with pytest.raises(ValueError, match=r"\(18, 20, 22\)"):
        refine(moving, fixed[:-1], disp)
    with pytest.raises(ValueError, match="does not match"):
        refine(moving, fixed, disp[:, :-1])
    with pytest.raises(ValueError, match="components"):
        refine(moving, fixed, disp[..., :2])


def test_any_optax_transformation_is_an_inner_optimiser():
    import optax
    moving, fixed, disp = smooth_pair(seed=9)
    named = refine(moving, fixed, disp, steps=3, optimizer="sgd", learning_rate=50.0)
    own = refine(moving, fixed, disp, steps=3, optimizer=optax.sgd(50.0))
    assert float(jnp.max(jnp.abs(named - disp))) > 1e-2  # It moved: a real check.
    np.testing.assert_allclose(own, named, atol=1e-6)
    with pytest.raises(ValueError, match="learning_rate"):
        refine(moving, fixed, disp, optimizer=optax.sgd(1.0), learning_rate=0.1)
