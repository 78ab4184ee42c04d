"""Tests of the OFG ablation variants of the train step (``config.ofg`` keys
``every_epochs``, ``fraction``, ``ncc_weight`` and ``design="network"``) against
hand computations."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ofg_jax.configs import default
from ofg_jax.settings import config as config_lib
from ofg_jax.settings import losses
from ofg_jax import ncc
from ofg_jax import refine
from ofg_jax.settings import inner_optimizer
from ofg_jax import registration_energy
from ofg_jax import torch_adam
from ofg_jax.training import step as train_step
from ofg_jax import warp
from ofg_jax.refine import refine_with_network
from tests.references import np_grad_loss
from tests import step_fixtures

SIZE = (12, 10, 8)
# No dropout: the prediction depends on the parameters only.
DetNet = functools.partial(step_fixtures.TinyNet, dropout=0.0)


def random_batch(rng, batch, size=SIZE):
    return step_fixtures.random_batch(rng, batch, size)


def variant_config(epochs=4, **ofg):
    config = default.get_config()
    config.data.name = "synthetic"
    config.train.epochs = epochs
    config.train.learning_rate = 1e-3
    config.ofg.steps = 2
    config.ofg.update(ofg)
    # The network design's VoxelMorph with XLA's convolution: quicker to compile.
    config.model.conv_impl = "xla"
    return config


@jax.jit
def _neg_ncc(m, f, p):
    return -ncc(f, warp(m, p))


@jax.jit
def _refine2(m, f, p, lr):
    return refine(m, f, p, steps=2, learning_rate=lr)


def hand_loss(pred, batch, use, *, ncc_weight=0.0, ofg_lr=0.1, targets=None):
    """Per-pair OFG (MSE to the refined field + lambda * -NCC + 0.02 Grad) or
    unsupervised (-NCC + 1.0 Grad) loss, averaged over the batch."""
    losses = []
    for i, p in enumerate(np.asarray(pred)):
        m, f = batch["moving"][i], batch["fixed"][i]
        neg_ncc = float(_neg_ncc(m, f, p))
        grad = np_grad_loss(p)
        if use[i]:
            if targets is None:
                target = np.asarray(_refine2(m, f, p, ofg_lr))
            else:
                target = np.asarray(targets[i])
            mse = np.mean((np.float64(p) - np.float64(target)) ** 2)
            losses.append(mse + ncc_weight * neg_ncc + 0.02 * grad)
        else:
            losses.append(neg_ncc + 1.0 * grad)
    return float(np.mean(losses))


def predict(params, batch):
    x = jnp.stack([batch["moving"], batch["fixed"]], axis=-1)
    return np.asarray(DetNet().apply({"params": params}, x))


# ---------------------------------------------------------------------------
# registration_loss.


def refine_batch(batch, pred):
    """The OFG targets of a batch: 2 steps of ``refine`` from each prediction."""
    return jax.vmap(lambda m, f, d: refine(m, f, d, steps=2, learning_rate=0.1))(
        batch["moving"], batch["fixed"], jnp.asarray(pred))


def test_registration_loss_mixes_ofg_and_unsupervised_pairs_as_by_hand():
    rng = np.random.default_rng(0)
    batch = random_batch(rng, 3)
    pred = rng.normal(0, 0.5, (3,) + SIZE + (3,)).astype(np.float32)
    use = np.array([True, False, True])
    targets = refine_batch(batch, pred)
    loss, terms = losses.registration_loss(
        jnp.asarray(pred), batch["moving"], batch["fixed"], mode="ofg",
        reg_weight=0.02, targets=targets, ncc_weight=0.5, use_ofg=jnp.asarray(use))
    expected = hand_loss(pred, batch, use, ncc_weight=0.5)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(terms["ofg_fraction"]) == pytest.approx(2 / 3)


def test_registration_loss_defaults_and_all_true_mask_are_plain_ofg():
    rng = np.random.default_rng(1)
    batch = random_batch(rng, 2)
    pred = jnp.asarray(rng.normal(0, 0.5, (2,) + SIZE + (3,)).astype(np.float32))
    kwargs = dict(mode="ofg", reg_weight=0.02, targets=refine_batch(batch, pred))
    plain, terms = losses.registration_loss(pred, batch["moving"], batch["fixed"],
                                            **kwargs)
    assert set(terms) == {"similarity", "grad"}
    np.testing.assert_allclose(float(plain), hand_loss(pred, batch, [True, True]),
                               rtol=1e-5)
    masked, _ = losses.registration_loss(pred, batch["moving"], batch["fixed"],
                                         use_ofg=jnp.asarray([True, True]), **kwargs)
    np.testing.assert_allclose(float(masked), float(plain), rtol=1e-6)
    # The OFG term of each pair is ofg_loss, the primitive.
    per_pair = jax.vmap(lambda m, f, d: losses.ofg_loss(m, f, d, steps=2,
                                                        learning_rate=0.1))(
        batch["moving"], batch["fixed"], pred)
    np.testing.assert_allclose(float(plain), float(jnp.mean(per_pair)
                                                   + 0.02 * terms["grad"]), rtol=1e-6)


# ---------------------------------------------------------------------------
# The train step.


def run_steps(config, batches, steps_per_epoch):
    """Runs the train step on ``batches``; returns params before each step and metrics."""
    state = train_step.create_train_state(config, DetNet(), SIZE, steps_per_epoch)
    step_fn = train_step.make_train_step(config_lib.resolve(config), steps_per_epoch, SIZE)
    history = []
    for batch in batches:
        params = jax.tree.map(np.array, state.params)  # Copies: the step donates.
        rng_key = np.array(state.rng)
        step = int(state.step)
        state, metrics = step_fn(state, batch)
        history.append((params, rng_key, step, jax.device_get(metrics)))
    return history


def test_every_epochs_uses_ofg_only_in_every_kth_epoch():
    config = variant_config(epochs=4, every_epochs=2)
    rng = np.random.default_rng(2)
    batches = [random_batch(rng, 2) for _ in range(3)]
    history = run_steps(config, batches, steps_per_epoch=1)
    for (params, _, step, metrics), batch in zip(history, batches):
        epoch = step  # One step per epoch.
        use = [epoch % 2 == 0] * 2
        lr = round(0.1 * (1 - epoch / 4) ** 0.9, 8)
        expected = hand_loss(predict(params, batch), batch, use, ofg_lr=lr)
        np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
        assert float(metrics["ofg_fraction"]) == float(use[0])


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_fraction_draws_pairs_from_the_dropout_key(fraction):
    config = variant_config(fraction=fraction)
    rng = np.random.default_rng(3)
    batches = [random_batch(rng, 4) for _ in range(2)]
    history = run_steps(config, batches, steps_per_epoch=4)
    draws = []
    for (params, rng_key, step, metrics), batch in zip(history, batches):
        key = jax.random.fold_in(jax.random.fold_in(jnp.asarray(rng_key), step),
                                 train_step.FRACTION_STREAM)
        use = np.asarray(jax.random.bernoulli(key, fraction, (4,)))
        draws.append(use)
        expected = hand_loss(predict(params, batch), batch, use)
        np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["ofg_fraction"]), use.mean())
    if fraction == 0.5:  # A real mixture was tested, not all-or-nothing.
        assert 0 < np.mean(draws) < 1


def test_ncc_weight_adds_the_unsupervised_term_to_the_ofg_loss():
    config = variant_config(ncc_weight=0.7)
    rng = np.random.default_rng(4)
    batches = [random_batch(rng, 2)]
    (params, _, _, metrics), = run_steps(config, batches, steps_per_epoch=1)
    expected = hand_loss(predict(params, batches[0]), batches[0], [True, True],
                         ncc_weight=0.7)
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)


def test_explicit_defaults_give_the_plain_train_step():
    rng = np.random.default_rng(5)
    batches = [random_batch(rng, 2)]
    plain = default.get_config()
    ablations = [f.name for settings in (losses.Intensity, inner_optimizer.RefineSettings)
                 for f in dataclasses.fields(settings)
                 if f.name in ("every_epochs", "fraction", "ncc_weight", "design",
                               "network_width")]
    for key in ablations:  # A config without the ablation keys.
        del plain.ofg[key]
    plain.data.name, plain.train.epochs, plain.ofg.steps = "synthetic", 4, 2
    (_, _, _, m_plain), = run_steps(plain, batches, 1)
    (_, _, _, m_default), = run_steps(variant_config(), batches, 1)
    assert float(m_plain["loss"]) == float(m_default["loss"])
    assert "ofg_fraction" not in m_default


# ---------------------------------------------------------------------------
# The network-based optimiser.


def test_refine_with_network_is_adam_on_the_weights():
    rng = np.random.default_rng(6)
    size = (16, 16, 16)
    m, f = [jnp.asarray(x[0]) for x in random_batch(rng, 1, size).values()]
    disp = jnp.asarray(rng.normal(0, 0.3, size + (3,)).astype(np.float32))
    network, params0 = inner_optimizer.cascade_network(4, size, seed=0, conv_impl="xla")

    lr = 1e-2
    run = jax.jit(lambda steps: refine_with_network(m, f, disp, network, params0,
                                                    steps=steps, learning_rate=lr),
                  static_argnums=0)
    # Zero steps: the start plus the near-zero output of the fresh flow head.
    assert float(jnp.max(jnp.abs(run(0) - disp))) < 1e-3

    pair = jnp.stack([warp(m, disp), f], axis=-1)[None]
    field = jax.jit(lambda p: disp + network.apply({"params": p}, pair)[0])
    energy = lambda p: registration_energy(m, f, field(p))
    opt = torch_adam(lr, amsgrad=True)

    @jax.jit
    def by_hand(params):
        state = opt.init(params)
        for _ in range(3):
            updates, state = opt.update(jax.grad(energy)(params), state, params)
            params = optax.apply_updates(params, updates)
        return field(params)

    got = run(3)
    assert float(jnp.max(jnp.abs(got - disp))) > 1e-2  # It moved: a real check.
    np.testing.assert_allclose(got, by_hand(params0), atol=1e-4)
    assert float(registration_energy(m, f, got)) < float(registration_energy(m, f, disp))


def test_network_design_train_step_regresses_on_the_network_target():
    size = (16, 16, 16)
    config = variant_config(design="network", network_width=4, learning_rate=1e-2)
    rng = np.random.default_rng(7)
    batch = random_batch(rng, 2, size)
    state = train_step.create_train_state(config, DetNet(), size, 1)
    params = jax.tree.map(np.array, state.params)
    _, metrics = train_step.make_train_step(config_lib.resolve(config), 1, size)(state, batch)
    pred = predict(params, batch)
    network, params0 = inner_optimizer.cascade_network(4, size, seed=config.seed,
                                                 conv_impl="xla")
    targets = jax.jit(jax.vmap(lambda m, f, d: refine_with_network(
        m, f, d, network, params0, steps=2, learning_rate=1e-2)))(
            batch["moving"], batch["fixed"], jnp.asarray(pred))
    expected = hand_loss(pred, batch, [True, True], targets=targets)
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-4)


@pytest.mark.parametrize("key, value, message", [
    ("every_epochs", 0, "ofg.every_epochs=0"),
    ("fraction", 1.5, "ofg.fraction=1.5"),
    ("ncc_weight", -1.0, "ofg.ncc_weight=-1.0"),
    ("design", "cascade", "ofg.design='cascade'"),
    ("network_width", 0, "ofg.network_width=0"),
])
def test_invalid_variant_values_are_named(key, value, message):
    config = variant_config()
    config.ofg[key] = value
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config)


def test_network_design_needs_full_resolution():
    config = variant_config(design="network")
    config.ofg.downsample = 2
    with pytest.raises(ValueError, match="ofg.downsample=2"):
        config_lib.validate(config)
