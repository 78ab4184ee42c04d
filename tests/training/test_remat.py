"""``train.remat``: the same losses, gradients and parameters, less memory.

Every network at a tiny grid, through the real train step (``make_train_step``),
once with its stages rematerialised and once without. The optimiser is swapped
for one that keeps the gradients as its state, so that they are compared
directly rather than through an Adam update.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ofg_jax.configs import default
from ofg_jax.settings import config as config_lib
from ofg_jax import models
from ofg_jax.training import step as train_step
from tests.step_fixtures import random_batch

# Tiny versions of the networks (every stage kind present; dropout and drop path on).
TINY = {
    "voxelmorph": ((16, 16, 32), dict(enc_features=(4, 8, 8, 8), dec_features=(8, 8, 8, 8),
                                      final_features=(8, 4, 4))),
    "vitvnet": ((64, 32, 32), dict(encoder_channels=(4, 4, 4), hidden_size=8, num_layers=2,
                                   num_heads=2, mlp_dim=16, conv_first_channel=8,
                                   decoder_channels=(8, 8, 4, 4, 4))),
    "transmorph": ((64, 64, 64), dict(embed_dim=8, depths=(2, 1, 1, 1),
                                      num_heads=(2, 2, 2, 2), window_size=(2, 2, 2),
                                      reg_head_chan=4)),
}


def _keep_gradients() -> optax.GradientTransformation:
    """An "optimiser" whose state after an update is the gradient; no update."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def _step(name, remat):
    """``(loss, gradients, batch_stats, temp bytes)`` of one OFG step."""
    size, overrides = TINY[name]
    config = config_lib.with_overrides(default.get_config(), {
        "model.name": name, **{f"model.{k}": v for k, v in overrides.items()},
        "train.mode": "ofg", "ofg.steps": 2, "train.remat": remat})
    config.data.name = "synthetic"
    model = config_lib.build_model(config, size)
    state = train_step.create_train_state(config, model, size, steps_per_epoch=10)
    tx = _keep_gradients()
    state = state.replace(tx=tx, opt_state=tx.init(state.params))
    batch = random_batch(np.random.default_rng(0), 1, size)
    step = train_step.make_train_step(config_lib.resolve(config), 10, size)
    compiled = step.lower(state, batch).compile()
    params = jax.tree.map(np.array, state.params)
    new_state, metrics = compiled(state, batch)
    return (params, float(metrics["loss"]), new_state.opt_state, new_state.batch_stats,
            compiled.memory_analysis().temp_size_in_bytes)


@pytest.mark.parametrize("name", list(TINY))
def test_remat_gives_the_same_loss_and_gradients(name):
    params, loss, grads, stats, temp = _step(name, remat=False)
    params_r, loss_r, grads_r, stats_r, temp_r = _step(name, remat=True)
    # Same parameter tree (names, shapes and initial values).
    assert jax.tree.structure(params_r) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params_r), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert loss > 0 and abs(loss_r - loss) <= 1e-6 * loss
    # Gradients to 1e-5 of their norm: XLA may round a rematerialised stage
    # differently (TransMorph's differ by 2.0e-6 of their norm on an AMD EPYC,
    # float32 rounding; VoxelMorph's come out bit for bit).
    g, g_r = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
              for t in (grads, grads_r))
    assert np.linalg.norm(g) > 0
    assert np.linalg.norm(g_r - g) <= 1e-5 * np.linalg.norm(g)
    for a, b in zip(jax.tree.leaves(stats_r), jax.tree.leaves(stats)):  # ViT-V-Net's BN
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # And it keeps less for the backward pass.
    assert temp_r < temp, (temp_r, temp)


def test_remat_is_a_training_setting_not_a_model_option():
    for name in models.NAMES:
        assert "remat" not in models.options(name)
    config = config_lib.with_overrides(default.get_config(), {"model.name": "vitvnet"})
    assert config.train.remat is False and "remat" not in config.model
