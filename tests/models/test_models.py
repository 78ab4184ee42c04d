"""The registration networks: sizes, outputs, gradients, options, PyTorch parity."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from jax.ad_checkpoint import print_saved_residuals

from ofg_jax import models
from ofg_jax.models.integrate import integrate_velocity
from ofg_jax.models.activations import softmax
from ofg_jax.models.resample import (avg_pool3_stride2, max_pool2, upsample_linear2,
                                     upsample_nearest2)
from ofg_jax.models.transmorph import (WindowAttention, instance_norm_leaky_relu,
                                       relative_position_index, shifted_window_mask,
                                       window_partition, window_reverse)

SMALL = (32, 32, 32)
# XLA:CPU compiles threefry slowly (~1 s per initialiser); the tests use the
# "rbg" generator, whose streams are as good for initialising and dropout.
KEY = jax.random.key(0, impl="rbg")
# Reduced widths and depths keep compile and run times small; the structure
# (every block type, skip and norm) is the published one. Sizes give every
# attention more than one token: ViT-V-Net's token grid is 1/32 of the volume,
# TransMorph's last stage 1/32 with 2x2x2 windows.
SMALL_SIZES = {"voxelmorph": SMALL, "vitvnet": (64, 32, 32), "transmorph": (64, 64, 64)}
SMALL_OVERRIDES = {
    "voxelmorph": {},
    "vitvnet": dict(encoder_channels=(8, 8, 8), hidden_size=24, num_layers=1,
                    num_heads=2, mlp_dim=32, conv_first_channel=16,
                    decoder_channels=(16, 16, 8, 8, 8)),
    # The shifted-window block sits in stage 0: at 64^3 the last stage's grid is
    # one 2x2x2 window, where shifting leaves every token alone in its region.
    "transmorph": dict(embed_dim=12, depths=(2, 1, 1, 1), num_heads=(1, 1, 2, 2),
                       window_size=(2, 2, 2), reg_head_chan=8),
}


def _count(model, size):
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, *size, 2), jnp.float32))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("name, size, overrides, expected", [
    ("voxelmorph", (160, 192, 224), {}, 274_387),
    ("vitvnet", (160, 192, 224), {}, 31_560_079),
    ("transmorph", (160, 192, 224), {}, 46_771_251),
    ("transmorph", (160, 192, 160), dict(window_size=(5, 6, 5)), 46_745_907),
])
def test_parameter_counts_match_reference(name, size, overrides, expected):
    assert _count(models.create(name, size, **overrides), size) == expected


def test_create_rejects_unknown_name_and_option():
    with pytest.raises(ValueError, match="voxelmorph, vitvnet, transmorph"):
        models.create("unet", SMALL)
    with pytest.raises(ValueError, match="window"):
        models.create("voxelmorph", SMALL, window_size=(2, 2, 2))
    assert models.NAMES == ("voxelmorph", "vitvnet", "transmorph")


@pytest.mark.parametrize("name, size, overrides, message", [
    ("voxelmorph", (40, 32, 32), {}, "divisible by 16"),
    ("vitvnet", (48, 32, 32), {}, "divisible by 32"),
    ("transmorph", (48, 64, 64), {}, "divisible by 32"),
    ("transmorph", (64, 64), {}, "3 positive ints"),
])
def test_impossible_sizes_raise_before_tracing(name, size, overrides, message):
    with pytest.raises(ValueError, match=message):
        models.create(name, size, **overrides)


def test_input_of_wrong_size_raises():
    model = models.create("voxelmorph", SMALL)
    with pytest.raises(ValueError, match="expects input"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0),
                       jax.ShapeDtypeStruct((1, 16, 32, 32, 2), jnp.float32))


def _pair(seed, size=SMALL, batch=1):
    """A smooth random image pair ``(B, *size, 2)``."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((batch, *size, 2))
    smooth = scipy.ndimage.gaussian_filter(noise, (0, 2, 2, 2, 0))
    return jnp.asarray(smooth / smooth.std(), jnp.float32)


@functools.lru_cache(maxsize=None)
def _small(name):
    """``(model, variables, size)`` of the small configuration, initialised once."""
    size = SMALL_SIZES[name]
    model = models.create(name, size, **SMALL_OVERRIDES[name])
    return model, jax.jit(model.init)(KEY, _pair(0, size)), size


@functools.lru_cache(maxsize=None)
def _small_apply(name):
    """The jitted ``train=False`` forward ``(variables, x) -> flow``, compiled once."""
    model = _small(name)[0]
    return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


@pytest.fixture(params=models.NAMES)
def small_model(request):
    return (request.param, *_small(request.param))


def test_output_shape_dtype_and_near_zero_at_init(small_model):
    name, _, variables, size = small_model
    x = _pair(1, size, batch=2)
    apply = _small_apply(name)
    flow = apply(variables, x)
    assert flow.shape == (2, *size, 3) and flow.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(flow)))
    # Flow head N(0, 1e-5), bias 0: an untrained network moves voxels by << 1 voxel.
    head = variables["params"]["flow"]
    assert not np.any(np.asarray(head["bias"]))
    assert 0.5e-5 < float(jnp.std(head["kernel"])) < 2e-5
    assert 0 < float(jnp.abs(flow).max()) < 1e-2
    np.testing.assert_array_equal(np.asarray(apply(variables, x)), np.asarray(flow))


def test_gradients_reach_every_parameter(small_model):
    name, model, variables, size = small_model
    x = _pair(2, size)
    weights = jnp.asarray(np.random.default_rng(3).standard_normal((1, *size, 3)),
                          jnp.float32)
    rest = {k: v for k, v in variables.items() if k != "params"}

    def loss(params):
        return jnp.sum(model.apply({"params": params, **rest}, x) * weights)

    grads = jax.jit(jax.grad(loss))(variables["params"])
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    assert len(flat) == len(jax.tree.leaves(variables["params"]))
    dead = [jax.tree_util.keystr(path) for path, g in flat
            if not float(jnp.abs(g).max()) > 0 or not bool(jnp.all(jnp.isfinite(g)))]
    assert not dead, f"{name}: zero or non-finite gradient for {dead}"


@pytest.mark.parametrize("name", ["vitvnet", "transmorph"])
def test_train_mode_uses_dropout_rng_and_batch_stats(name):
    model, variables, size = _small(name)
    x = _pair(4, size)
    mutable = ["batch_stats"] if "batch_stats" in variables else []
    run = jax.jit(lambda key: model.apply(variables, x, train=True,
                                          rngs={"dropout": key}, mutable=mutable))
    (a, updates), (b, _) = run(jax.random.fold_in(KEY, 1)), run(jax.random.fold_in(KEY, 2))
    assert a.shape == (1, *size, 3) and bool(jnp.all(jnp.isfinite(a)))
    # Dropout (ViT-V-Net) or drop path (TransMorph) draws from the "dropout" rng.
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    if mutable:  # BatchNorm's running statistics move in training mode
        old, new = jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(updates)
        assert len(old) == len(new) and not all(np.allclose(o, n) for o, n in zip(old, new))


def _with_large_head(params, scale):
    """``params`` with the flow head scaled up from its ~0 initialisation."""
    return dict(params, flow={"kernel": params["flow"]["kernel"] * scale,
                              "bias": params["flow"]["bias"]})


def test_bfloat16_compute_keeps_float32_params_and_output():
    _, variables, _ = _small("voxelmorph")
    model16 = models.create("voxelmorph", SMALL, dtype=jnp.bfloat16)
    x = _pair(5, batch=2)
    shapes = jax.eval_shape(model16.init, KEY, x)
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(jnp.shape, variables)
    # A larger head than at init, so that the comparison sees the whole network.
    params = _with_large_head(variables["params"], 1e4)
    flow16 = jax.jit(model16.apply)({"params": params}, x)
    flow32 = _small_apply("voxelmorph")({"params": params}, x)
    assert flow16.dtype == jnp.float32
    scale = float(jnp.abs(flow32).max())
    assert float(jnp.abs(flow16 - flow32).max()) < 0.05 * scale


def test_diffeomorphic_output_integrates_the_plain_output():
    _, variables, _ = _small("voxelmorph")
    diffeo = models.create("voxelmorph", SMALL, diffeomorphic=True)
    x = _pair(6, batch=2)
    params = _with_large_head(variables["params"], 1e5)
    velocity = _small_apply("voxelmorph")({"params": params}, x)
    disp = jax.jit(diffeo.apply)({"params": params}, x)
    assert bool(jnp.all(jnp.isfinite(disp)))
    assert float(jnp.abs(velocity).max()) > 0.5  # a real deformation, not ~0
    np.testing.assert_allclose(np.asarray(disp),
                               np.asarray(jax.jit(integrate_velocity)(velocity)), atol=1e-5)


def _smooth_field(seed, size, amplitude):
    rng = np.random.default_rng(seed)
    field = scipy.ndimage.gaussian_filter(rng.standard_normal((*size, 3)), (3, 3, 3, 0))
    return amplitude * field / np.abs(field).max()


def _numpy_scaling_and_squaring(velocity, steps):
    """Float64 reference with SciPy's zero-padded linear interpolation."""
    disp = velocity / 2 ** steps
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in velocity.shape[:3]],
                                indexing="ij"), axis=0)
    for _ in range(steps):
        coords = grid + np.moveaxis(disp, -1, 0)
        warped = np.stack([scipy.ndimage.map_coordinates(disp[..., k], coords, order=1,
                                                         mode="grid-constant", cval=0.0)
                           for k in range(3)], axis=-1)
        disp = disp + warped
    return disp


def test_integrate_velocity_matches_numpy_reference():
    velocity = _smooth_field(7, (12, 14, 10), amplitude=3.0)
    got = jax.jit(integrate_velocity)(jnp.asarray(velocity[None], jnp.float32))[0]
    want = _numpy_scaling_and_squaring(velocity, 7)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def test_integrated_fields_of_v_and_minus_v_are_inverse():
    from ofg_jax import warp
    velocity = jnp.asarray(_smooth_field(8, (24, 24, 24), amplitude=2.0)[None], jnp.float32)

    @jax.jit
    def round_trip(velocity):
        forward, backward = integrate_velocity(jnp.concatenate([velocity, -velocity]))
        # x -> x + f(x) -> x + f(x) + b(x + f(x)) should come back to x.
        return forward, forward + warp(backward, forward)

    forward, residual = round_trip(velocity)
    interior = (slice(6, -6),) * 3
    assert float(jnp.abs(forward).max()) > 1.0
    assert float(jnp.abs(residual[interior]).max()) < 0.05


@pytest.mark.parametrize("size", [(4, 6, 8), (5, 3, 7)])
def test_resampling_matches_pytorch(size):
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    x = np.random.default_rng(10).standard_normal((2, *size, 3)).astype(np.float32)
    tx = torch.from_numpy(x).permute(0, 4, 1, 2, 3)
    back = lambda t: t.permute(0, 2, 3, 4, 1).numpy()

    def instance_norm(v):  # a LeakyReLU of slope 1 is the identity
        return instance_norm_leaky_relu(v, 1.0)

    cases = [
        (upsample_linear2, functional.interpolate(tx, scale_factor=2, mode="trilinear",
                                                  align_corners=False)),
        (upsample_nearest2, functional.interpolate(tx, scale_factor=2, mode="nearest")),
        (max_pool2, functional.max_pool3d(tx, 2)),
        (avg_pool3_stride2, functional.avg_pool3d(tx, 3, 2, 1)),
        (instance_norm, functional.instance_norm(tx, eps=1e-5)),
    ]
    for fn, want in cases:
        np.testing.assert_allclose(np.asarray(fn(jnp.asarray(x))), back(want),
                                   rtol=1e-5, atol=1e-5, err_msg=fn.__name__)


def test_instance_norm_leaky_relu_matches_pytorch_value_and_gradient():
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    rng = np.random.default_rng(11)
    x = (3.0 * rng.standard_normal((2, 5, 4, 6, 3)) + 1.5).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    y, vjp = jax.vjp(lambda x: instance_norm_leaky_relu(x, 0.01), jnp.asarray(x))
    (dx,) = vjp(jnp.asarray(g))
    tx = torch.tensor(x, dtype=torch.float64).permute(0, 4, 1, 2, 3).requires_grad_()
    ty = functional.leaky_relu(functional.instance_norm(tx, eps=1e-5), 0.01)
    ty.backward(torch.tensor(g, dtype=torch.float64).permute(0, 4, 1, 2, 3))
    back = lambda t: t.detach().permute(0, 2, 3, 4, 1).numpy()
    np.testing.assert_allclose(np.asarray(y), back(ty), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), back(tx.grad), rtol=1e-4, atol=1e-5)


def _saved_of_shape(capsys, fn, *args, shape):
    print_saved_residuals(fn, *args)
    prefix = f"f32[{','.join(map(str, shape))}]"
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith(prefix)]


def test_instance_norm_leaky_relu_keeps_one_feature_map(capsys):
    x = jnp.asarray(np.random.default_rng(12).standard_normal((1, 4, 5, 6, 3)), jnp.float32)
    saved = _saved_of_shape(capsys, instance_norm_leaky_relu, x, shape=x.shape)
    assert len(saved) == 1, saved


def test_attention_keeps_one_weight_matrix(capsys):
    """The weights, kept by the product with the values anyway; not the exponentials."""
    rng = np.random.default_rng(12)
    logits = jnp.asarray(rng.standard_normal((6, 4, 10, 10)), jnp.float32)
    values = jnp.asarray(rng.standard_normal((6, 4, 10, 8)), jnp.float32)
    attend = lambda logits, values: jnp.einsum("bhqk,bhkd->bqhd", softmax(logits), values)
    saved = _saved_of_shape(capsys, attend, logits, values, shape=logits.shape)
    assert len(saved) == 1, saved


def test_softmax_matches_jax_value_and_gradient():
    rng = np.random.default_rng(13)
    logits = jnp.asarray(5.0 * rng.standard_normal((3, 2, 7, 7)), jnp.float32)
    g = jnp.asarray(rng.standard_normal(logits.shape), jnp.float32)
    y, vjp = jax.vjp(softmax, logits)
    want, want_vjp = jax.vjp(lambda v: jax.nn.softmax(v, axis=-1), logits)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
    np.testing.assert_allclose(np.asarray(vjp(g)[0]), np.asarray(want_vjp(g)[0]),
                               rtol=1e-5, atol=1e-6)


def test_window_partition_round_trip_and_relative_index():
    x = jnp.arange(2 * 4 * 6 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 6, 4, 3)
    windows = window_partition(x, (2, 3, 2))
    assert windows.shape == (2 * 2 * 2 * 2, 12, 3)
    np.testing.assert_array_equal(np.asarray(window_reverse(windows, (2, 3, 2), (4, 6, 4))),
                                  np.asarray(x))
    # The first window holds the voxels [0:2, 0:3, 0:2] of sample 0 in C order.
    np.testing.assert_array_equal(np.asarray(windows[0]),
                                  np.asarray(x[0, :2, :3, :2].reshape(12, 3)))
    window = (2, 3, 4)
    index = relative_position_index(window)
    coords = np.stack(np.unravel_index(np.arange(24), window), axis=-1)
    offsets = coords[:, None] - coords[None, :] + np.asarray(window) - 1
    expected = np.ravel_multi_index(tuple(np.moveaxis(offsets, -1, 0)),
                                    tuple(2 * w - 1 for w in window))
    np.testing.assert_array_equal(index, expected)


def test_shifted_window_mask_separates_wrapped_regions():
    size, window, shift = (4, 6, 8), (2, 3, 4), (1, 1, 2)
    mask = shifted_window_mask(size, window, shift)
    # After rolling by -shift, position q along an axis of length n came from
    # across the border iff q >= n - shift; within a window, two tokens may attend
    # to each other iff they agree on that for every axis.
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), axis=-1)
    wrapped = grid >= np.asarray(size) - np.asarray(shift)
    code = np.asarray(window_partition((wrapped @ np.asarray([1, 2, 4]))[None, ..., None]
                                       .astype(np.float32), window))[..., 0]
    expected = np.where(code[:, :, None] == code[:, None, :], 0.0, -100.0)
    np.testing.assert_array_equal(mask, expected)


def test_window_attention_matches_pytorch():
    """Masked window attention with relative position bias, written out in PyTorch."""
    torch = pytest.importorskip("torch")
    window, heads, dim, batch = (2, 3, 2), 2, 8, 2
    size, shift = (4, 6, 4), (1, 1, 1)
    mask = shifted_window_mask(size, window, shift)
    n_windows, n = mask.shape[0], mask.shape[1]
    x = np.random.default_rng(11).standard_normal((batch * n_windows, n, dim)).astype(np.float32)
    module = WindowAttention(dim, window, heads, qkv_bias=False, attn_drop_rate=0.0,
                             proj_drop_rate=0.0)
    params = module.init(KEY, jnp.asarray(x), mask, True)["params"]
    got = module.apply({"params": params}, jnp.asarray(x), mask, True)

    t = lambda a: torch.from_numpy(np.array(a, np.float64))
    q, k, v = torch.split(t(x) @ t(params["qkv"]["kernel"]), dim, dim=-1)
    split = lambda z: z.reshape(batch * n_windows, n, heads, dim // heads).transpose(1, 2)
    q, k, v = split(q) / (dim // heads) ** 0.5, split(k), split(v)
    logits = q @ k.transpose(-1, -2)                        # (B*nW, heads, N, N)
    table = t(params["relative_position_bias_table"])
    bias = table[torch.from_numpy(relative_position_index(window))]  # (N, N, heads)
    logits = logits + bias.permute(2, 0, 1)
    logits = logits + t(mask).repeat(batch, 1, 1)[:, None]
    out = (torch.softmax(logits, -1) @ v).transpose(1, 2).reshape(batch * n_windows, n, dim)
    want = out @ t(params["proj"]["kernel"]) + t(params["proj"]["bias"])
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-4, atol=1e-5)


def test_transmorph_runs_on_any_grid_divisible_by_32():
    # Abdomen CT's grid with the published window: stage grids (48, 40, 64), ...,
    # (6, 5, 8), which (5, 6, 7) tiles nowhere: padded as the reference pads.
    model = models.create("transmorph", (192, 160, 256))
    x = jax.ShapeDtypeStruct((1, 192, 160, 256, 2), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    assert _count(model, (192, 160, 256)) == 46_771_251
    out = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
    assert out.shape == (1, 192, 160, 256, 3)
