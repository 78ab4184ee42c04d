"""The PyTorch baseline of the benchmark against ofg_jax: network and train steps.

The inner loop (``torch_baseline.refine`` against ``ofg_jax.refine``) is covered
by ``tests/test_refine.py::test_matches_torch_inner_loop``; the primitives by
``test_warp.py``, ``test_ncc.py`` and ``test_metrics.py``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

torch = pytest.importorskip("torch")

from ofg_jax.configs import default  # noqa: E402
from experiments import torch_baseline as tb  # noqa: E402
from ofg_jax import models, schedules, torch_adam, train_step  # noqa: E402

REFERENCE_PARAMS = 274_387  # the reference VoxelMorph at 160x192x224, 2 channels


def flax_convs(model, variables, x):
    """``(kernel, bias)`` of every conv of ``model``, in the order they are called."""
    paths = []

    def record(next_fun, args, kwargs, context):
        if (context.method_name == "__call__"
                and "kernel" in context.module.variables.get("params", {})):
            paths.append(context.module.path)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(model.apply, variables, x)  # tracing calls every conv once
    convs = []
    for path in paths:
        leaf = variables["params"]
        for name in path:
            leaf = leaf[name]
        convs.append((np.asarray(leaf["kernel"]), np.asarray(leaf["bias"])))
    return convs


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


def to_torch_channels_first(x):
    """``(B, *S, C)`` -> torch ``(B, C, *S)``."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))


def test_voxelmorph_has_the_reference_parameter_count():
    model = tb.VoxelMorph()
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_PARAMS
    flow = model.flow.weight.detach().numpy()
    assert abs(flow.std() - 1e-5) < 2e-6 and not model.flow.bias.detach().any()


def test_forward_matches_flax_with_copied_weights():
    shape = (32, 48, 16)  # unequal sizes catch swapped axes
    model = models.create("voxelmorph", shape)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((2, *shape, 2)), jnp.float32)
    variables = {"params": random_params(param_shapes(model, x), seed=1)}
    want = np.asarray(jax.jit(model.apply)(variables, x))

    net = tb.VoxelMorph()
    tb.load_flax_convs(net, flax_convs(model, variables, x))
    with torch.no_grad():
        got = np.moveaxis(net(to_torch_channels_first(x)).numpy(), 1, -1)
    assert got.shape == want.shape == (2, *shape, 3)
    assert np.abs(want).max() > 0.1  # every layer contributes
    assert np.max(np.abs(got - want)) <= 1e-4 * np.abs(want).max()


def test_load_flax_convs_names_the_bad_layer():
    net = tb.VoxelMorph()
    convs = [(np.zeros((3, 3, 3, 2, 8)), np.zeros(8))] * 12
    with pytest.raises(ValueError, match="layer 1"):
        tb.load_flax_convs(net, convs)
    with pytest.raises(ValueError, match="12"):
        tb.load_flax_convs(net, convs[:3])


@pytest.mark.parametrize("mode", ["ofg", "unsupervised"])
def test_one_training_step_matches_ofg_jax(mode):
    """Same weights and pair: same loss, gradient norm and updated weights."""
    shape = (16, 32, 16)
    moving, fixed = smooth_images(shape, seed=2)
    config = default.get_config()
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
    convs = flax_convs(model, {"params": params}, pair)

    net = tb.VoxelMorph()
    tb.load_flax_convs(net, convs)
    optimizer = tb.make_optimizer(net, lr=config.train.learning_rate)
    to_t = lambda a: torch.from_numpy(a)[None, None]
    refine_kwargs = dict(steps=config.ofg.steps, lr=config.ofg.learning_rate,
                         reg_weight=config.ofg.reg_weight) if mode == "ofg" else {}
    loss = tb.train_step(net, optimizer, to_t(moving), to_t(fixed), mode=mode,
                         **refine_kwargs)
    torch_grad_norm = float(torch.sqrt(sum((p.grad ** 2).sum() for p in net.parameters())))

    step = train_step.make_train_step(config, 10, shape)
    new_state, metrics = step(state, {"moving": moving[None], "fixed": fixed[None]})
    new_convs = flax_convs(model, {"params": new_state.params}, pair)

    assert float(loss) == pytest.approx(float(metrics["loss"]), rel=2e-4)
    assert torch_grad_norm == pytest.approx(float(metrics["grad_norm"]), rel=1e-3)
    lr = config.train.learning_rate
    for layer, (kernel, bias), (old_kernel, old_bias) in zip(tb.conv_layers(net),
                                                               new_convs, convs):
        got = np.concatenate([np.moveaxis(layer.weight.detach().numpy(), (0, 1),
                                          (-1, -2)).ravel(), layer.bias.detach().numpy()])
        want = np.concatenate([kernel.ravel(), bias])
        old = np.concatenate([old_kernel.ravel(), old_bias])
        grad = np.concatenate([np.moveaxis(layer.weight.grad.numpy(), (0, 1),
                                           (-1, -2)).ravel(), layer.bias.grad.numpy()])
        # Adam's first update moves every weight by ~lr along -sign(gradient), so
        # the weights must agree wherever the gradient is clearly non-zero; a few
        # percent with |gradient| < 1% of its RMS flip with float32 rounding.
        small = np.abs(grad) < 0.03 * np.sqrt(np.mean(grad ** 2))
        moved = np.abs(want - old)
        assert np.all(moved < 1.001 * lr) and np.mean(moved[~small]) > 0.9 * lr
        differ = np.abs(got - want) > 1e-3 * lr
        assert np.mean(differ) < 0.03 and np.all(small[differ])


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
    from experiments import torch_networks as tn
    from ofg_jax import config as config_lib
    from tests.test_torch_networks import _random_variables

    size, options = TRANSFORMERS[name]
    moving, fixed = smooth_images(size, seed=4)
    config = config_lib.with_overrides(default.get_config(), {
        "model.name": name, **{f"model.{k}": v for k, v in options.items()},
        "train.mode": "ofg", "ofg.steps": 2})
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
    tn.load_flax_params(net, variables)
    optimizer = tb.make_optimizer(net, lr=config.train.learning_rate)
    to_t = lambda a: torch.from_numpy(a)[None, None]
    loss = tb.train_step(net, optimizer, to_t(moving), to_t(fixed), mode="ofg", steps=2,
                         lr=config.ofg.learning_rate, reg_weight=config.ofg.reg_weight)
    torch_grad_norm = float(torch.sqrt(sum((p.grad ** 2).sum() for p in net.parameters())))

    old_stats = jax.tree.map(np.array, state.batch_stats)  # the step donates the state
    step = train_step.make_train_step(config, 10, size)
    new_state, metrics = step(state, {"moving": moving[None], "fixed": fixed[None]})
    assert float(metrics["similarity"]) > 1e-4  # the refined field moved
    assert float(loss) == pytest.approx(float(metrics["loss"]), rel=2e-4)
    assert torch_grad_norm == pytest.approx(float(metrics["grad_norm"]), rel=1e-3)
    if name == "vitvnet":  # training mode updated the running statistics alike
        norm = net.decoder_4.conv_1.norm
        stats = new_state.batch_stats["decoder_4"]["conv_1"]["norm"]
        np.testing.assert_allclose(norm.running_mean.numpy(), stats["mean"], rtol=1e-4,
                                   atol=1e-6)
        n = np.prod(size)  # torch's running variance is the unbiased one
        old = old_stats["decoder_4"]["conv_1"]["norm"]["var"]
        np.testing.assert_allclose(
            (norm.running_var.numpy() - 0.9 * old) * (n - 1) / n,
            np.asarray(stats["var"]) - 0.9 * old, rtol=1e-4, atol=1e-6)
