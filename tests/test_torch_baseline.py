"""The PyTorch baseline of the benchmark against ofg_jax: network and train steps.

The inner loop (``torch_baseline.refine`` against ``ofg_jax.refine``) is covered
by ``tests/test_refine.py::test_matches_torch_inner_loop``; the primitives by
``test_warp.py``, ``test_ncc.py`` and ``test_metrics.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

torch = pytest.importorskip("torch")

from ofg_jax.configs import default  # noqa: E402
from experiments import torch_baseline as tb  # noqa: E402
from experiments import torch_networks as tn  # noqa: E402
from ofg_jax import models, schedules, torch_adam  # noqa: E402
from ofg_jax.settings import config as config_lib  # noqa: E402
from ofg_jax.training import step as train_step  # noqa: E402


def param_shapes(model, x):
    """The ``params`` tree of ``model`` as shapes, without running the initialisers."""
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]


def random_params(params, seed):
    """Fresh params of the same structure, scaled so that every layer matters.

    Kernels ~ N(0, 1/fan_in) keep activations O(1) through the U-Net (the
    reference's flow head would give ~1e-5 voxel outputs); biases ~ N(0, 0.1)
    so that a lost or misplaced bias shows.
    """
    rng = np.random.default_rng(seed)

    def draw(leaf):
        fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 100
        return jnp.asarray(rng.normal(0, fan_in ** -0.5, leaf.shape), leaf.dtype)

    return jax.tree.map(draw, params)


def smooth_images(shape, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        x = ndimage.gaussian_filter(rng.random(shape), 1.5)
        out.append(((x - x.min()) / np.ptp(x)).astype(np.float32))
    return out


def test_network_builds_the_pytorch_networks():
    """``network`` gives the ``torch_networks`` class with the Flax options; the
    JAX-only ones are ignored. (Forward parity: ``tests/models/test_torch_networks.py``.)"""
    net = tb.network("voxelmorph", (32, 32, 32))
    assert type(net) is tn.VoxelMorph
    assert sum(p.numel() for p in net.parameters()) == 274_387  # VxmDense_1
    flow = net.flow.weight.detach().numpy()
    assert abs(flow.std() - 1e-5) < 2e-6 and not net.flow.bias.detach().any()
    net = tb.network("voxelmorph", (32, 32, 32), enc_features=(16, 32, 32, 32),
                     final_features=(32, 16, 16), dtype="bfloat16", conv_impl="xla",
                     remat=True)
    assert sum(p.numel() for p in net.parameters()) == 301_411  # VxmDense_2
    net = tb.network("transmorph", (64, 64, 64), window_size=(2, 2, 2), embed_dim=12,
                     num_heads=(2, 2, 2, 2), half_resolution_flow=True)
    assert type(net) is tn.TransMorph and net.half_resolution_flow
    with pytest.raises(ValueError, match="no PyTorch baseline of 'nope'"):
        tb.network("nope", (32, 32, 32))


@pytest.mark.parametrize("mode", ["ofg", "unsupervised"])
def test_one_training_step_matches_ofg_jax(mode):
    """Same weights and pair: same loss, gradient norm and updated weights."""
    shape = (16, 32, 16)
    moving, fixed = smooth_images(shape, seed=2)
    config = default.get_config()
    config.data.name = "synthetic"
    config.train.mode = mode
    model = models.create("voxelmorph", shape)
    pair = jnp.stack([moving, fixed], -1)[None]
    params = random_params(param_shapes(model, pair), seed=3)
    # What train_step.create_train_state builds, minus its (slow to compile) random init.
    tx = torch_adam(schedules.make_lr_schedule(config.train.learning_rate,
                                               config.train.epochs, 10))
    state = train_step.TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                         rng=jax.random.PRNGKey(0))
    state = state.replace(step=jnp.zeros([], jnp.int32))

    net = tb.network("voxelmorph", shape)
    tn.load_variables(net, model, {"params": params})
    old = {key: p.detach().numpy().copy() for key, p in net.named_parameters()}
    optimizer = tb.make_optimizer(net, lr=config.train.learning_rate)
    to_t = lambda a: torch.from_numpy(a)[None, None]
    refine_kwargs = dict(steps=config.ofg.steps, lr=config.ofg.learning_rate,
                         reg_weight=config.ofg.reg_weight) if mode == "ofg" else {}
    loss = tb.train_step(net, optimizer, to_t(moving), to_t(fixed), mode=mode,
                         **refine_kwargs)
    torch_grad_norm = float(torch.sqrt(sum((p.grad ** 2).sum() for p in net.parameters())))

    step = train_step.make_train_step(config_lib.resolve(config), 10, shape)
    new_state, metrics = step(state, {"moving": moving[None], "fixed": fixed[None]})
    new = models.to_torch(model, {"params": new_state.params})

    assert float(loss) == pytest.approx(float(metrics["loss"]), rel=2e-4)
    assert torch_grad_norm == pytest.approx(float(metrics["grad_norm"]), rel=1e-3)
    lr = config.train.learning_rate
    layers = {}  # conv -> its (weight, bias) parameters, in the authors' names
    for key, param in net.named_parameters():
        layers.setdefault(key.rsplit(".", 1)[0], []).append((key, param))
    assert len(layers) == 12
    for name, entries in layers.items():
        got = np.concatenate([p.detach().numpy().ravel() for _, p in entries])
        want = np.concatenate([np.asarray(new[key]).ravel() for key, _ in entries])
        before = np.concatenate([old[key].ravel() for key, _ in entries])
        grad = np.concatenate([p.grad.numpy().ravel() for _, p in entries])
        # Adam's first update moves every weight by ~lr along -sign(gradient), so
        # the weights must agree wherever the gradient is clearly non-zero; a few
        # percent with |gradient| < 1% of its RMS flip with float32 rounding.
        small = np.abs(grad) < 0.03 * np.sqrt(np.mean(grad ** 2))
        moved = np.abs(want - before)
        assert np.all(moved < 1.001 * lr) and np.mean(moved[~small]) > 0.9 * lr, name
        differ = np.abs(got - want) > 1e-3 * lr
        assert np.mean(differ) < 0.03 and np.all(small[differ]), name


# Tiny transformers with dropout and drop path off, so that both frameworks
# compute the same function in training mode.
TRANSFORMERS = {
    "vitvnet": ((64, 32, 32), dict(encoder_channels=(4, 4, 4), hidden_size=8, num_layers=1,
                                   num_heads=2, mlp_dim=16, conv_first_channel=8,
                                   decoder_channels=(8, 8, 4, 4, 4), dropout_rate=0.0)),
    "transmorph": ((32, 32, 64), dict(embed_dim=8, depths=(1, 1, 1, 1),
                                      num_heads=(2, 2, 2, 2), window_size=(1, 1, 2),
                                      reg_head_chan=4, drop_path_rate=0.0)),
}


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_transformer_ofg_training_step_matches_ofg_jax(name):
    """ViT-V-Net and TransMorph: one OFG step from the same weights, same loss and
    gradient norm (ViT-V-Net's BatchNorm normalising with the batch statistics)."""
    from tests.models.test_torch_networks import _random_variables

    size, options = TRANSFORMERS[name]
    moving, fixed = smooth_images(size, seed=4)
    config = config_lib.with_overrides(default.get_config(), {
        "model.name": name, **{f"model.{k}": v for k, v in options.items()},
        "train.mode": "ofg", "ofg.steps": 2})
    config.data.name = "synthetic"
    model = config_lib.build_model(config, size)
    pair = jnp.stack([moving, fixed], -1)[None]
    variables = _random_variables(jax.eval_shape(model.init, jax.random.PRNGKey(0), pair),
                                  seed=5)
    tx = torch_adam(schedules.make_lr_schedule(config.train.learning_rate,
                                               config.train.epochs, 10))
    state = train_step.TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=tx, rng=jax.random.PRNGKey(0),
        batch_stats=variables.get("batch_stats", {}))
    state = state.replace(step=jnp.zeros([], jnp.int32))

    net = tb.network(name, size, **options)
    tn.load_variables(net, model, variables)
    optimizer = tb.make_optimizer(net, lr=config.train.learning_rate)
    to_t = lambda a: torch.from_numpy(a)[None, None]
    loss = tb.train_step(net, optimizer, to_t(moving), to_t(fixed), mode="ofg", steps=2,
                         lr=config.ofg.learning_rate, reg_weight=config.ofg.reg_weight)
    torch_grad_norm = float(torch.sqrt(sum((p.grad ** 2).sum() for p in net.parameters())))

    old_stats = jax.tree.map(np.array, state.batch_stats)  # the step donates the state
    step = train_step.make_train_step(config_lib.resolve(config), 10, size)
    new_state, metrics = step(state, {"moving": moving[None], "fixed": fixed[None]})
    assert float(metrics["similarity"]) > 1e-4  # the refined field moved
    assert float(loss) == pytest.approx(float(metrics["loss"]), rel=2e-4)
    assert torch_grad_norm == pytest.approx(float(metrics["grad_norm"]), rel=1e-3)
    if name == "vitvnet":  # training mode updated the running statistics alike
        norm = net.decoder.blocks[4].conv2[1]  # decoder_4.conv_1.norm in Flax
        stats = new_state.batch_stats["decoder_4"]["conv_1"]["norm"]
        np.testing.assert_allclose(norm.running_mean.numpy(), stats["mean"], rtol=1e-4,
                                   atol=1e-6)
        n = np.prod(size)  # torch's running variance is the unbiased one
        old = old_stats["decoder_4"]["conv_1"]["norm"]["var"]
        np.testing.assert_allclose(
            (norm.running_var.numpy() - 0.9 * old) * (n - 1) / n,
            np.asarray(stats["var"]) - 0.9 * old, rtol=1e-4, atol=1e-6)
