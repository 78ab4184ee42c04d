"""The PyTorch networks of ``experiments/torch_networks.py`` and ``torch_swin.py``.

Their state_dicts have the layouts of the checkpoints that the TransMorph
authors publish (recorded in ``tests/fixtures/published_state_dicts``) and the
published parameter counts; with the weights of a Flax network
(``load_variables``, through ``ofg_jax.models.to_torch``) they compute its output
at small grids; the OASIS layout's flow is its half-resolution head upsampled.
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from experiments import torch_networks as tn  # noqa: E402
from ofg_jax import models  # noqa: E402
from ofg_jax.models.integrate import integrate_velocity  # noqa: E402
from ofg_jax.models.transmorph import relative_position_index  # noqa: E402
from ofg_jax.warp import warp  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent.parent / "fixtures" / "published_state_dicts"

PUBLISHED_PARAMETERS = {"voxelmorph1": 274_387, "voxelmorph2": 301_411,
                        "vitvnet": 31_560_079, "transmorph": 46_771_251,
                        "transmorph_oasis": 46_556_979, "transmorph_large_oasis": 107_949_923}

# Anisotropic grids and windows, batch 2: swapped axes, a wrong relative-bias
# stride or windows mixed across samples all show.
SMALL = {
    "voxelmorph": ((32, 48, 16), {}),
    # VxmDense_2's widths, integrated as a velocity field.
    "voxelmorph_diffeomorphic": ((32, 48, 16), dict(
        enc_features=(16, 32, 32, 32), final_features=(32, 16, 16), diffeomorphic=True)),
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
    # The OASIS layout: the flow head at half resolution, upsampled.
    "transmorph_oasis": ((64, 96, 64), dict(embed_dim=12, depths=(2, 2, 2, 2),
                                            num_heads=(2, 2, 2, 2), window_size=(2, 3, 2),
                                            reg_head_chan=8, half_resolution_flow=True)),
    # Window (3, 3, 3) tiles no stage grid but (4, 6, 4) -> (6, 6, 6) and the
    # others: every stage is zero-padded as the reference pads, shifted blocks
    # included.
    "transmorph_padded": ((64, 96, 64), dict(embed_dim=12, depths=(1, 2, 1, 2),
                                             num_heads=(2, 2, 2, 2),
                                             window_size=(3, 3, 3), reg_head_chan=8)),
}


def _network(name):
    return name.split("_")[0]


def _pair(seed, size, batch=2):
    return np.random.default_rng(seed).standard_normal((batch, *size, 2)).astype(np.float32)


def _channels_first(x):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


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
    model = models.create(_network(name), size, **overrides)
    x = _pair(1, size)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.asarray(x))
    variables = _random_variables(shapes, seed=2)
    net = tn.NETWORKS[_network(name)](size, **overrides)
    tn.load_variables(net, model, variables)
    return model, variables, net.eval(), x


# ---------------------------------------------------------------------------
# The published layouts.


def _read_layout(layout):
    """The recorded ``(key, shape, dtype, kind)`` entries of ``layout``, in order."""
    entries = []
    for line in (FIXTURES / f"{layout}.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype, kind = line.split()
        entries.append((key, tuple(int(n) for n in shape.strip("()").split(",") if n),
                        dtype, kind))
    return entries


def test_every_recorded_layout_is_published():
    assert sorted(tn.PUBLISHED) == sorted(p.stem for p in FIXTURES.glob("*.txt"))
    assert sorted(PUBLISHED_PARAMETERS) == sorted(tn.PUBLISHED)


@pytest.mark.parametrize("layout", list(tn.PUBLISHED))
def test_state_dict_has_the_published_layout(layout):
    """Key by key and in order: name, shape, dtype, parameter or buffer."""
    want = _read_layout(layout)
    with torch.device("meta"):  # shapes only, no memory or initialisation cost
        net = tn.published(layout)
    got = [(key, tuple(value.shape), str(value.dtype).removeprefix("torch."),
            "parameter" if isinstance(value, torch.nn.Parameter) else "buffer")
           for key, value in net.state_dict(keep_vars=True).items()]
    got_keys, want_keys = [g[0] for g in got], [w[0] for w in want]
    assert sorted(set(got_keys) - set(want_keys)) == [], "keys the checkpoints do not have"
    assert sorted(set(want_keys) - set(got_keys)) == [], "keys of the checkpoints missing"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"entry {i}"
    assert len(got) == len(want)


@pytest.mark.parametrize("layout, expected", list(PUBLISHED_PARAMETERS.items()))
def test_parameter_counts_match_the_published_networks(layout, expected):
    with torch.device("meta"):
        net = tn.published(layout)
    assert sum(p.numel() for p in net.parameters()) == expected


def test_buffers_hold_the_authors_values():
    """The spatial transformer's voxel grid and the relative position indices."""
    size = (32, 64, 32)
    net = tn.published("transmorph", size, window_size=(2, 3, 2))
    grid = net.spatial_trans.grid
    assert grid.shape == (1, 3, *size) and grid.dtype == torch.float32
    for k, n in enumerate(size):
        shape = [1, 1, 1]
        shape[k] = n
        expected = np.broadcast_to(np.arange(n, dtype=np.float32).reshape(shape), size)
        np.testing.assert_array_equal(grid[0, k].numpy(), expected)
    index = net.transformer.layers[2].blocks[1].attn.relative_position_index
    assert index.shape == (12, 12) and index.dtype == torch.int64
    np.testing.assert_array_equal(index.numpy(), relative_position_index((2, 3, 2)))


# ---------------------------------------------------------------------------
# Parity with the Flax networks.

# Intermediate outputs compared as well: Flax top-level module name -> (torch
# module, torch layout to channels-last). ViT-V-Net's output depends only weakly
# on its transformer (~0.5 % at the small size, the skips dominate), so the token
# path is checked where it ends.
INTERMEDIATES = {
    "voxelmorph": {},
    "vitvnet": {"encoder_norm": ("transformer.encoder.encoder_norm", lambda t: t),
                "conv_more": ("decoder.conv_more", lambda t: t.movedim(1, -1))},
    "transmorph": {f"norm{i}": (f"transformer.norm{i}", lambda t: t) for i in range(4)},
}


def _assert_close(got, want, what):
    assert got.shape == want.shape, what
    scale = np.abs(want).max()
    assert scale > 0.1, f"{what}: output scale {scale:.3g} is ~0"
    err = np.abs(got - want).max()
    assert err <= 1e-4 * scale, f"{what}: max abs diff {err:.3g}, scale {scale:.3g}"


@pytest.mark.parametrize("name", list(SMALL))
def test_eval_forward_matches_flax(name):
    """The flow, intermediates, and the moving image warped as by ``ofg_jax.warp``
    (the OASIS layout: as the authors' ``align_corners=False`` sampling)."""
    model, variables, net, x = _flax_case(name)
    layouts = INTERMEDIATES[_network(name)]

    @jax.jit
    def forward(variables, x):
        out, state = model.apply(
            variables, x, train=False, mutable=["intermediates"],
            capture_intermediates=lambda mdl, method: (
                method == "__call__" and mdl.name in layouts))
        inter = state.get("intermediates", {})
        warped = jax.vmap(warp)(x[..., :1], out)
        return out, warped, {key: inter[key]["__call__"][0] for key in layouts}

    want, want_warped, want_inter = forward(variables, jnp.asarray(x))
    got_inter = {}
    hooks = [net.get_submodule(path).register_forward_hook(
        lambda module, args, out, key=key: got_inter.__setitem__(key, out))
        for key, (path, _) in layouts.items()]
    try:
        with torch.no_grad():
            warped, flow = net(_channels_first(x))
    finally:
        for hook in hooks:
            hook.remove()
    assert want.shape == (2, *SMALL[name][0], 3)
    _assert_close(np.moveaxis(flow.numpy(), 1, -1), np.asarray(want), f"{name} flow")
    assert warped.shape == (2, 1, *SMALL[name][0])
    if SMALL[name][1].get("half_resolution_flow"):
        want_warped = np.moveaxis(_grid_sample_as_the_authors(
            _channels_first(x)[:, :1], _channels_first(np.asarray(want)), False).numpy(), 1, -1)
    _assert_close(np.moveaxis(warped.numpy(), 1, -1), np.asarray(want_warped),
                  f"{name} warped")
    for key, (_, layout) in layouts.items():
        _assert_close(layout(got_inter[key]).numpy(), np.asarray(want_inter[key]), key)
    if name == "vitvnet":  # eval mode normalises with the loaded running statistics
        norm = net.decoder.blocks[0].conv1[1]
        assert not norm.training
        np.testing.assert_array_equal(
            norm.running_var.numpy(),
            np.asarray(variables["batch_stats"]["decoder_0"]["conv_0"]["norm"]["var"]))
    elif name == "transmorph":  # shifted blocks with a region mask, several windows
        stage = net.transformer.layers[0]
        assert stage.blocks[1].shift == (1, 1, 1) and stage.attn_mask.shape[0] == 8 * 8 * 8
        assert (stage.attn_mask == -100).any()
    elif name == "transmorph_padded":  # the padded grid (18, 24, 18) of stage 0
        layers = net.transformer.layers
        assert layers[0].blocks[0].padded == (18, 24, 18)
        assert layers[1].blocks[1].shift == (1, 1, 1)
        assert layers[1].blocks[1].padded == (9, 12, 9)


def test_load_variables_names_what_does_not_fit():
    model, variables, _, _ = _flax_case("vitvnet")
    size, overrides = SMALL["vitvnet"]
    wider = tn.ViTVNet(size, **dict(overrides, mlp_dim=64))
    with pytest.raises(RuntimeError, match=r"size mismatch for transformer\.encoder\.layer\.0"
                                           r"\.ffn\.fc1\.weight.*\[48, 24\].*\[64, 24\]"):
        tn.load_variables(wider, model, variables)
    deeper = tn.ViTVNet(size, **dict(overrides, num_layers=3))
    with pytest.raises(RuntimeError, match=r"Missing key.*transformer\.encoder\.layer\.2\."):
        tn.load_variables(deeper, model, variables)
    model, variables, _, _ = _flax_case("transmorph")
    size, overrides = SMALL["transmorph"]
    oasis = tn.TransMorph(size, half_resolution_flow=True, **overrides)
    with pytest.raises(RuntimeError, match=r"Unexpected key.*up4\.conv1\.0\.weight"):
        tn.load_variables(oasis, model, variables)


# ---------------------------------------------------------------------------
# The OASIS layout, training mode, integration.


def _grid_sample_as_the_authors(image, flow, align_corners):
    """The authors' spatial transformer, written out: ``2 * (loc / (n - 1) - 0.5)``."""
    size = flow.shape[2:]
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in size],
                          indexing="ij")
    coords = [(axes[k] + flow[:, k]) / (n - 1) * 2 - 1 for k, n in enumerate(size)]
    return F.grid_sample(image, torch.stack(coords[::-1], dim=-1), mode="bilinear",
                         padding_mode="zeros", align_corners=align_corners)


TINY_TRANSMORPH = ((32, 64, 32), dict(embed_dim=12, depths=(1, 2, 1, 1),
                                      num_heads=(2, 2, 2, 2), window_size=(2, 2, 2),
                                      reg_head_chan=8))


@pytest.mark.parametrize("half", [True, False])
def test_oasis_flow_is_the_half_resolution_head_upsampled_without_scaling(half):
    """OASIS (``half``): flow = trilinear x2 of the head's half-resolution output,
    values unscaled; warped with ``align_corners=False``; ``c2`` unused. IXI:
    the head at full resolution, ``align_corners=True``, ``c2`` used."""
    size, options = TINY_TRANSMORPH
    torch.manual_seed(0)
    net = tn.TransMorph(size, half_resolution_flow=half, **options).eval()
    assert hasattr(net, "up4") != half
    torch.nn.init.normal_(net.reg_head[0].weight, 0.0, 0.3)
    x = _channels_first(_pair(5, size, batch=1))
    heads = []  # (a hook that returns something replaces the output)
    hook = net.reg_head.register_forward_hook(lambda module, args, out: heads.append(out))
    with torch.no_grad():
        warped, flow = net(x)
    hook.remove()
    assert flow.abs().max() > 0.5
    if half:
        assert heads[0].shape == (1, 3, *(n // 2 for n in size))
        upsampled = F.interpolate(heads[0], scale_factor=2, mode="trilinear",
                                  align_corners=False)
        assert torch.equal(flow, upsampled)
    else:
        assert torch.equal(flow, heads[0])
    torch.testing.assert_close(warped, _grid_sample_as_the_authors(x[:, :1], flow, not half))
    # The other sampling convention gives a clearly different image.
    other = _grid_sample_as_the_authors(x[:, :1], flow, half)
    assert (warped - other).abs().max() > 0.1

    with torch.no_grad():
        torch.nn.init.normal_(net.c2[0].weight)
        warped_c2, flow_c2 = net(x)
        torch.nn.init.normal_(net.c1[0].weight)
        _, flow_c1 = net(x)
    assert torch.equal(flow_c2, flow) == half and torch.equal(warped_c2, warped) == half
    assert not torch.equal(flow_c1, flow_c2)


@pytest.mark.parametrize("name", ["vitvnet", "transmorph"])
def test_dropout_and_drop_path_only_in_train_mode(name):
    size, overrides = SMALL[name]
    torch.manual_seed(0)
    net = tn.NETWORKS[name](size, **overrides)  # dropout 0.1 / drop path 0.3
    torch.nn.init.normal_(net.reg_head[0].weight, 0.0, 0.1)
    x = _channels_first(_pair(3, size, batch=1))
    with torch.no_grad():
        net.eval()
        a, b = net(x)[1], net(x)[1]
        net.train()
        c, d = net(x)[1], net(x)[1]
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
