"""torch_adam against torch.optim.Adam; poly_lr against the reference formula."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ofg_jax import poly_lr, torch_adam


def trajectory_jax(opt, x0, steps):
    loss = lambda p: jnp.sum(jnp.sin(3 * p["w"]) * p["w"] ** 2) + jnp.sum(p["b"] ** 4)
    params = jax.tree.map(jnp.asarray, x0)
    state = opt.init(params)
    for _ in range(steps):
        updates, state = opt.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    return params


def trajectory_torch(x0, steps, **kwargs):
    torch = pytest.importorskip("torch")
    w = torch.tensor(x0["w"], requires_grad=True)
    b = torch.tensor(x0["b"], requires_grad=True)
    opt = torch.optim.Adam([w, b], **kwargs)
    for _ in range(steps):
        opt.zero_grad()
        (torch.sum(torch.sin(3 * w) * w ** 2) + torch.sum(b ** 4)).backward()
        opt.step()
    return {"w": w.detach().numpy(), "b": b.detach().numpy()}


@pytest.mark.parametrize("amsgrad", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.02])
def test_matches_torch_adam(amsgrad, weight_decay):
    rng = np.random.default_rng(0)
    x0 = {"w": rng.normal(size=(7, 5)).astype(np.float32),
          "b": rng.normal(size=(3,)).astype(np.float32)}
    got = trajectory_jax(torch_adam(0.05, amsgrad=amsgrad, weight_decay=weight_decay),
                         x0, 30)
    want = trajectory_torch(x0, 30, lr=0.05, betas=(0.9, 0.999), eps=1e-8,
                            amsgrad=amsgrad, weight_decay=weight_decay)
    moved = np.mean(np.abs(want["w"] - x0["w"]))
    assert moved > 0.1
    for k in x0:
        np.testing.assert_allclose(got[k], want[k], atol=1e-4)


def test_schedule_learning_rate_is_used():
    x0 = {"w": np.ones((2,), np.float32), "b": np.ones((1,), np.float32)}
    frozen = trajectory_jax(torch_adam(optax.constant_schedule(0.0)), x0, 3)
    np.testing.assert_array_equal(frozen["w"], x0["w"])


@pytest.mark.parametrize("epoch, max_epoch", [(0, 500), (1, 500), (250, 500), (499, 500),
                                              (3, 7)])
def test_poly_lr(epoch, max_epoch):
    want = round(1e-4 * np.power(1 - epoch / max_epoch, 0.9), 8)
    assert poly_lr(1e-4, epoch, max_epoch) == want
    np.testing.assert_allclose(jax.jit(poly_lr, static_argnums=(0, 2))(
        1e-4, jnp.float32(epoch), max_epoch), want, rtol=1e-5, atol=1e-9)
