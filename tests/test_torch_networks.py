"""The PyTorch ViT-V-Net and TransMorph of ``experiments/torch_networks.py``.

Parameter counts at the published size, and forward parity with the Flax
networks of ``ofg_jax.models`` at small grids with copied weights.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from experiments import torch_networks as tn  # noqa: E402
from ofg_jax import models  # noqa: E402
from ofg_jax.models.integrate import integrate_velocity  # noqa: E402

# Anisotropic grids and windows, batch 2: swapped axes, a wrong relative-bias
# stride or windows mixed across samples all show.
SMALL = {
    # Token grid (2, 3, 1): six tokens. Two layers.
    "vitvnet": ((64, 96, 32), dict(encoder_channels=(8, 8, 8), hidden_size=24,
                                   num_layers=2, num_heads=2, mlp_dim=48,
                                   conv_first_channel=16,
                                   decoder_channels=(16, 16, 8, 8, 8))),
    # Stage grids (16, 24, 16), (8, 12, 8), (4, 6, 4), (2, 3, 2) with window
    # (2, 3, 2): every stage has a shifted block (shift (1, 1, 1)) on a grid of
    # several windows except the last, which is one window.
    "transmorph": ((64, 96, 64), dict(embed_dim=12, depths=(2, 2, 2, 2),
                                      num_heads=(2, 2, 2, 2), window_size=(2, 3, 2),
                                      reg_head_chan=8)),
    # Window (3, 3, 3) tiles no stage grid but (4, 6, 4) -> (6, 6, 6) and the
    # others: every stage is zero-padded as the reference pads, shifted blocks
    # included.
    "transmorph_padded": ((64, 96, 64), dict(embed_dim=12, depths=(1, 2, 1, 2),
                                             num_heads=(2, 2, 2, 2),
                                             window_size=(3, 3, 3), reg_head_chan=8)),
}
TORCH_CLASSES = {"vitvnet": tn.ViTVNet, "transmorph": tn.TransMorph,
                 "transmorph_padded": tn.TransMorph}


def _pair(seed, size, batch=2):
    return np.random.default_rng(seed).standard_normal((batch, *size, 2)).astype(np.float32)


def _random_variables(shapes, seed):
    """Fresh variables of the structure ``shapes``, every leaf made to matter.

    Kernels ~ N(0, 1/fan_in) keep activations O(1) (and the flow head, ~0 at
    init, gives O(1) outputs); biases ~ N(0, 0.1); norm scales U(0.5, 1.5);
    position embeddings and relative position bias tables large enough to change
    the attention; BatchNorm statistics far from (0, 1), so that eval mode must
    use them.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        shape = leaf.shape
        if name == "kernel":
            value = rng.normal(0, np.prod(shape[:-1]) ** -0.5, shape)
        elif name == "scale":
            value = rng.uniform(0.5, 1.5, shape)
        elif name == "var":
            value = rng.uniform(0.3, 3.0, shape)
        elif name == "mean":
            value = rng.normal(0, 0.5, shape)
        elif name in ("position_embeddings", "relative_position_bias_table"):
            value = rng.normal(0, 1.0, shape)
        else:
            value = rng.normal(0, 0.1, shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache(maxsize=None)
def _flax_case(name):
    """``(flax model, variables, torch model with them, input)`` of a small config."""
    size, overrides = SMALL[name]
    model = models.create(name.split("_")[0], size, **overrides)
    x = _pair(1, size)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.asarray(x))
    variables = _random_variables(shapes, seed=2)
    net = TORCH_CLASSES[name](size, **overrides)
    tn.load_flax_params(net, variables)
    return model, variables, net.eval(), x


@pytest.mark.parametrize("name, expected", [("vitvnet", 31_560_079),
                                            ("transmorph", 46_771_251)])
def test_parameter_counts_match_reference(name, expected):
    with torch.device("meta"):  # shapes only, no memory or initialisation cost
        net = TORCH_CLASSES[name]((160, 192, 224))
    assert sum(p.numel() for p in net.parameters()) == expected


# Intermediate outputs compared as well (top-level Flax module name -> torch layout
# to channels-last): ViT-V-Net's output depends only weakly on its transformer
# (~0.5 % at the small size, the skips dominate), so the token path is checked
# where it ends.
INTERMEDIATES = {
    "vitvnet": {"encoder_norm": lambda t: t, "conv_more": lambda t: t.movedim(1, -1)},
    "transmorph": {f"norm{i}": lambda t: t for i in range(4)},
    "transmorph_padded": {f"norm{i}": lambda t: t for i in range(4)},
}


def _assert_close(got, want, what):
    assert got.shape == want.shape, what
    scale = np.abs(want).max()
    assert scale > 0.1, f"{what}: output scale {scale:.3g} is ~0"
    err = np.abs(got - want).max()
    assert err <= 1e-4 * scale, f"{what}: max abs diff {err:.3g}, scale {scale:.3g}"


@pytest.mark.parametrize("name", ["vitvnet", "transmorph", "transmorph_padded"])
def test_eval_forward_matches_flax(name):
    model, variables, net, x = _flax_case(name)
    layouts = INTERMEDIATES[name]

    @jax.jit
    def forward(variables, x):
        out, state = model.apply(
            variables, x, train=False, mutable=["intermediates"],
            capture_intermediates=lambda mdl, method: (
                method == "__call__" and mdl.name in layouts))
        inter = state["intermediates"]
        return out, {key: inter[key]["__call__"][0] for key in layouts}

    want, want_inter = forward(variables, jnp.asarray(x))
    got_inter = {}
    hooks = [getattr(net, key).register_forward_hook(
        lambda module, args, out, key=key: got_inter.__setitem__(key, out))
        for key in layouts]
    try:
        with torch.no_grad():
            got = net(torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))))
    finally:
        for hook in hooks:
            hook.remove()
    assert want.shape == (2, *SMALL[name][0], 3)
    _assert_close(np.moveaxis(got.numpy(), 1, -1), np.asarray(want), f"{name} output")
    for key, layout in layouts.items():
        _assert_close(layout(got_inter[key]).numpy(), np.asarray(want_inter[key]), key)
    if name == "vitvnet":  # eval mode normalises with the loaded running statistics
        norm = net.decoder_0.conv_0.norm
        assert not norm.training
        np.testing.assert_array_equal(
            norm.running_var.numpy(),
            np.asarray(variables["batch_stats"]["decoder_0"]["conv_0"]["norm"]["var"]))
    elif name == "transmorph":  # shifted blocks with a region mask, several windows
        block = net.stage0_block1
        assert block.shift == (1, 1, 1) and block.attn_mask.shape[0] == 8 * 8 * 8
        assert (block.attn_mask == -100).any()
    else:  # the padded grid (18, 24, 18) of stage 0, shifted on stage 1
        assert net.stage0_block0.padded == (18, 24, 18)
        assert net.stage1_block1.shift == (1, 1, 1)
        assert net.stage1_block1.padded == (9, 12, 9)


def test_load_flax_params_rejects_mismatches():
    _, variables, _, _ = _flax_case("vitvnet")
    size, overrides = SMALL["vitvnet"]
    wider = tn.ViTVNet(size, **dict(overrides, mlp_dim=64))
    with pytest.raises(ValueError, match=r"layer_0\.fc1\.kernel.*\(24, 48\)"):
        tn.load_flax_params(wider, variables)
    net = tn.ViTVNet(size, **overrides)
    params = dict(variables["params"])
    del params["flow"]
    with pytest.raises(ValueError, match=r"missing \['flow\.bias', 'flow\.kernel'\]"):
        tn.load_flax_params(net, {"params": params,
                                  "batch_stats": variables["batch_stats"]})
    with pytest.raises(ValueError, match="missing.*running|missing.*mean"):
        tn.load_flax_params(net, {"params": variables["params"]})  # no batch_stats


@pytest.mark.parametrize("name", ["vitvnet", "transmorph"])
def test_dropout_and_drop_path_only_in_train_mode(name):
    size, overrides = SMALL[name]
    torch.manual_seed(0)
    net = TORCH_CLASSES[name](size, **overrides)  # dropout 0.1 / drop path 0.3
    torch.nn.init.normal_(net.flow.weight, 0.0, 0.1)
    x = torch.from_numpy(np.moveaxis(_pair(3, size, batch=1), -1, 1).copy())
    with torch.no_grad():
        net.eval()
        a, b = net(x), net(x)
        net.train()
        c, d = net(x), net(x)
    assert torch.equal(a, b)
    assert not torch.equal(c, d)


def test_integrate_velocity_matches_ofg_jax():
    rng = np.random.default_rng(4)
    velocity = rng.standard_normal((1, 3, 12, 10, 14)).astype(np.float32)
    velocity = torch.nn.functional.avg_pool3d(torch.from_numpy(velocity), 5, 1, 2) * 20
    got = tn.integrate_velocity(velocity, 7).numpy()
    want = np.asarray(jax.jit(integrate_velocity)(jnp.asarray(np.moveaxis(
        velocity.numpy(), 1, -1))))
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(np.moveaxis(got, 1, -1), want, atol=1e-4)
