"""``conv3d`` / ``Conv3D``: the CPU formulation against XLA, NumPy and PyTorch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ofg_jax.models import conv
from ofg_jax.models.conv import conv3d
from ofg_jax.models.layers import Conv3D

# (batch, spatial, c_in, c_out, kernel, stride, padding)
CASES = [
    (2, (6, 7, 9), 3, 5, 3, 1, 1),     # the networks' conv, batch > 1, uneven sizes
    (1, (8, 8, 8), 2, 4, 3, 2, 1),     # VoxelMorph's stride-2 encoder conv
    (1, (9, 7, 5), 4, 3, 3, 2, 1),     # stride 2 on odd sizes
    (1, (5, 6, 7), 3, 2, 1, 1, 0),     # 1x1x1
    (1, (7, 7, 7), 2, 3, 5, 1, 2),     # larger odd kernel
    (1, (8, 12, 16), 2, 6, 4, 4, 0),   # patch embedding (kernel == stride)
    (1, (6, 6, 6), 3, 2, 3, 1, 0),     # no fast formulation: falls back to XLA
]


def _numpy_conv3d(x, kernel, stride, padding):
    """Float64 reference: sum over kernel taps of strided input windows."""
    x = np.pad(np.asarray(x, np.float64), [(0, 0)] + [(padding, padding)] * 3 + [(0, 0)])
    kernel = np.asarray(kernel, np.float64)
    k = kernel.shape[0]
    out_size = [(n - k) // stride + 1 for n in x.shape[1:4]]
    out = 0.0
    for a in range(k):
        for b in range(k):
            for c in range(k):
                window = x[:, a:a + stride * out_size[0]:stride,
                           b:b + stride * out_size[1]:stride,
                           c:c + stride * out_size[2]:stride]
                out = out + window @ kernel[a, b, c]
    return out


def _xla_conv3d(x, kernel, stride, padding):
    return lax.conv_general_dilated(x, kernel, (stride,) * 3, [(padding, padding)] * 3,
                                    dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


def _inputs(case, seed):
    batch, spatial, c_in, c_out, k, _, _ = case
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, *spatial, c_in)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, k, c_in, c_out)), jnp.float32)
    return x, kernel


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_numpy_and_xla(case):
    *_, stride, padding = case
    x, kernel = _inputs(case, seed=1)
    fast = jax.jit(lambda x, k: conv3d(x, k, stride, padding, impl="cpu"))(x, kernel)
    expected = _numpy_conv3d(x, kernel, stride, padding)
    assert fast.shape == expected.shape
    assert _rel_err(fast, expected) < 1e-5
    assert _rel_err(fast, _xla_conv3d(x, kernel, stride, padding)) < 1e-5


@pytest.mark.parametrize("case", CASES)
def test_gradients_match_xla(case):
    *_, stride, padding = case
    x, kernel = _inputs(case, seed=2)
    fast = lambda x, k: conv3d(x, k, stride, padding, impl="cpu")
    reference = lambda x, k: _xla_conv3d(x, k, stride, padding)
    y, vjp = jax.vjp(fast, x, kernel)
    cotangent = jnp.asarray(np.random.default_rng(3).standard_normal(y.shape), jnp.float32)
    dx, dk = jax.jit(vjp)(cotangent)
    dx_ref, dk_ref = jax.vjp(reference, x, kernel)[1](cotangent)
    assert _rel_err(dx, dx_ref) < 1e-5
    assert _rel_err(dk, dk_ref) < 1e-5


def _conv_and_grads(x, kernel, cotangent, impl):
    y, vjp = jax.vjp(lambda x, k: conv3d(x, k, 1, kernel.shape[0] // 2, impl=impl), x, kernel)
    return (y, *jax.jit(vjp)(cotangent))


def test_chunked_loops_match_xla(monkeypatch):
    """Large volumes go through loops over chunks; force them on a small one."""
    monkeypatch.setattr(conv, "_CHUNK_BYTES", 20_000)
    monkeypatch.setattr(conv, "_MIN_CHUNK_ROWS", 100)
    loops = []
    fori_loop = jax.lax.fori_loop
    monkeypatch.setattr(conv.lax, "fori_loop",
                        lambda *args, **kw: loops.append(args[:2]) or fori_loop(*args, **kw))
    case = (2, (23, 8, 6), 3, 4, 3, 1, 1)
    x, kernel = _inputs(case, seed=9)
    cotangent = jnp.asarray(np.random.default_rng(10).standard_normal((2, 23, 8, 6, 4)),
                            jnp.float32)
    got = _conv_and_grads(x, kernel, cotangent, "cpu")
    # The forward and input-gradient passes each looped over chunks, the kernel
    # gradient once per sample.
    assert len(loops) >= 4 and all(stop - start > 1 for start, stop in loops), loops
    for g, want in zip(got, _conv_and_grads(x, kernel, cotangent, "xla")):
        assert _rel_err(g, want) < 1e-5


# (depth, kernel, chunk budget in bytes): chunks at the ends only, a last chunk
# shorter than the halo, depth below the kernel, a 5^3 and a 1x1x1 kernel.
EDGE_PLANS = [(3, 3, 2_000), (10, 3, 2_000), (9, 3, 5_000), (12, 5, 3_000),
              (2, 3, 1_000), (7, 1, 1_500)]


@pytest.mark.parametrize("depth, k, budget", EDGE_PLANS)
def test_chunk_edges_match_xla(monkeypatch, depth, k, budget):
    monkeypatch.setattr(conv, "_CHUNK_BYTES", budget)
    monkeypatch.setattr(conv, "_MIN_CHUNK_ROWS", 10)
    x, kernel = _inputs((1, (depth, 5, 6), 2, 3, k, 1, k // 2), seed=11)
    cotangent = jnp.asarray(np.random.default_rng(12).standard_normal((1, depth, 5, 6, 3)),
                            jnp.float32)
    got = _conv_and_grads(x, kernel, cotangent, "cpu")
    for g, want in zip(got, _conv_and_grads(x, kernel, cotangent, "xla")):
        assert _rel_err(g, want) < 1e-5


def test_chunk_plan_covers_every_slice_once():
    for d in range(1, 30):
        for chunk in range(1, d + 2):
            for before, after in ((1, 1), (2, 2), (0, 1), (1, 2)):
                edge, start, count = conv._chunk_plan(d, chunk, before, after)
                slices = [s + i for s, n in edge for i in range(n)]
                slices += list(range(start, start + count * chunk))
                assert sorted(slices) == list(range(d))
                assert count == 0 or count >= 2
                # The loop's chunks read only inside the volume.
                assert count == 0 or (start >= before
                                      and start + count * chunk + after <= d)


@pytest.mark.parametrize("channels", [(8,), (5, 3)])
def test_large_volumes_need_no_copy_of_the_volume(monkeypatch, channels):
    """Forward and backward: nothing of the volume's size besides inputs and outputs.

    The temporary buffers (XLA's buffer assignment) of the value and gradients
    stay below half the input (a few slices' worth: the chunks), where padding or
    stacking the volume needed five volumes; for a skip connection given as two
    parts, the concatenation of the parts is never built either.
    """
    monkeypatch.setattr(conv, "_CHUNK_BYTES", 40_000)
    parts = tuple(jax.ShapeDtypeStruct((1, 96, 24, 24, c), jnp.float32) for c in channels)
    kernel = jax.ShapeDtypeStruct((3, 3, 3, 8, 8), jnp.float32)

    def value_and_grads(parts, kernel):
        y, vjp = jax.vjp(lambda x, k: conv.conv3d_of_parts(x, k, 1, 1, impl="cpu"),
                         parts, kernel)
        return y, vjp(y)

    stats = jax.jit(value_and_grads).lower(parts, kernel).compile().memory_analysis()
    volume = 96 * 24 * 24 * 8 * 4
    assert stats.temp_size_in_bytes < volume / 2, (stats.temp_size_in_bytes, volume)


def test_loop_accumulators_are_not_kept_across_layers(monkeypatch):
    """Four chunked layers, forward and backward: no zero accumulator outlives its loop.

    What must be live at XLA's peak is the four layers' outputs (kept for
    the backward pass; the last is also the cotangent), the gradient
    being propagated and the one being produced: six volumes. Plain zeros as
    the loops' start, which XLA merges into one array and copies for every
    loop, needed about nine.
    """
    monkeypatch.setattr(conv, "_CHUNK_BYTES", 40_000)
    x = jax.ShapeDtypeStruct((1, 96, 24, 24, 8), jnp.float32)
    kernels = [jax.ShapeDtypeStruct((3, 3, 3, 8, 8), jnp.float32)] * 4

    def grads(x, kernels):
        def net(x, kernels):
            for kernel in kernels:
                x = jnp.tanh(conv3d(x, kernel, 1, 1, impl="cpu"))
            return x
        y, vjp = jax.vjp(net, x, kernels)
        return vjp(y)

    stats = jax.jit(grads).lower(x, kernels).compile().memory_analysis()
    volumes = stats.temp_size_in_bytes / (96 * 24 * 24 * 8 * 4)
    assert volumes < 6.5, volumes


@pytest.mark.parametrize("first", [-2.5, 0.0, np.inf, -np.inf, np.nan])
def test_zeros_after_is_exactly_zero_for_any_input(first):
    x = jnp.asarray(np.random.default_rng(8).standard_normal((1, 4, 3, 3, 2)), jnp.float32)
    x = x.at[0, 0, 0, 0, 0].set(first)
    zeros = conv._zeros_after(x, (2, 5, 3))
    assert zeros.shape == (2, 5, 3) and zeros.dtype == x.dtype
    np.testing.assert_array_equal(zeros, 0)


@pytest.mark.parametrize("impl,stride,budget", [("cpu", 1, None), ("cpu", 1, 20_000),
                                                  ("cpu", 2, 20_000), ("xla", 1, None),
                                                  ("xla", 1, 20_000)])
def test_parts_give_the_convolution_of_their_concatenation(monkeypatch, impl, stride, budget):
    """``conv3d_of_parts`` against XLA's convolution of the concatenation: value and
    the gradients of every part and of the kernel, in one piece and by chunks."""
    if budget:
        monkeypatch.setattr(conv, "_CHUNK_BYTES", budget)
        monkeypatch.setattr(conv, "_MIN_CHUNK_ROWS", 100)
    rng = np.random.default_rng(9)
    parts = tuple(jnp.asarray(rng.standard_normal((1, 20, 7, 6, c)), jnp.float32)
                  for c in (3, 1, 2))
    kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 6, 4)), jnp.float32)
    out_shape = jax.eval_shape(lambda: _xla_conv3d(jnp.concatenate(parts, -1), kernel,
                                                   stride, 1)).shape
    w = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)
    fused = lambda parts, k: jnp.sum(w * conv.conv3d_of_parts(parts, k, stride, 1, impl))
    plain = lambda parts, k: jnp.sum(w * _xla_conv3d(jnp.concatenate(parts, -1), k,
                                                     stride, 1))
    got = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(parts, kernel)
    want = jax.value_and_grad(plain, argnums=(0, 1))(parts, kernel)
    assert _rel_err(got[0], want[0]) < 1e-5
    for g, r in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        assert g.shape == r.shape and _rel_err(g, r) < 1e-5


def test_second_layer_gradient_through_jit():
    """Two stacked fast convs: the input gradient of one feeds the other's."""
    x, k1 = _inputs(CASES[0], seed=4)
    k2 = jnp.asarray(np.random.default_rng(5).standard_normal((3, 3, 3, 5, 2)), jnp.float32)

    def loss(impl, x, k1, k2):
        h = jnp.tanh(conv3d(x, k1, 1, 1, impl=impl))
        return jnp.sum(conv3d(h, k2, 2, 1, impl=impl) ** 2)

    fast = jax.jit(jax.grad(lambda *a: loss("cpu", *a), argnums=(0, 1, 2)))(x, k1, k2)
    reference = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(x, k1, k2)
    for got, want in zip(fast, reference):
        assert _rel_err(got, want) < 1e-5


def test_auto_uses_fast_path_for_float32_on_cpu_only():
    # The two formulations round differently, so the bits tell which one ran.
    x, kernel = _inputs(CASES[0], seed=6)
    run = lambda impl, dtype: np.asarray(conv3d(x.astype(dtype), kernel.astype(dtype), 1, 1,
                                                impl=impl), np.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
        assert not np.array_equal(run("cpu", dtype), run("xla", dtype))
    fast = "cpu" if jax.default_backend() == "cpu" else "xla"
    np.testing.assert_array_equal(run("auto", jnp.float32), run(fast, jnp.float32))
    np.testing.assert_array_equal(run("auto", jnp.bfloat16), run("xla", jnp.bfloat16))


def test_invalid_arguments_raise():
    x, kernel = _inputs(CASES[0], seed=7)
    with pytest.raises(ValueError, match="C_in"):
        conv3d(x, kernel[..., :2, :])
    with pytest.raises(ValueError, match="impl"):
        conv3d(x, kernel, impl="fast")
    with pytest.raises(ValueError, match="stride"):
        conv3d(x, kernel, stride=(1, 1))
    with pytest.raises(ValueError, match="smaller than kernel"):
        conv3d(x[:, :2], kernel)


def test_module_matches_torch_conv3d():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 8, 6, 10, 3)).astype(np.float32)
    for stride in (1, 2):
        module = Conv3D(4, 3, stride, 1)
        variables = module.init(jax.random.key(stride, impl="rbg"), jnp.asarray(x))
        got = np.asarray(module.apply(variables, jnp.asarray(x)))
        ref = torch.nn.Conv3d(3, 4, 3, stride, 1)
        with torch.no_grad():
            ref.weight.copy_(torch.from_numpy(
                np.asarray(variables["params"]["kernel"]).transpose(4, 3, 0, 1, 2).copy()))
            ref.bias.copy_(torch.from_numpy(np.array(variables["params"]["bias"])))
            want = ref(torch.from_numpy(x).permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


def test_default_init_is_torch_kaiming_uniform():
    module = Conv3D(32, 3)
    params = module.init(jax.random.key(0, impl="rbg"), jnp.zeros((1, 3, 3, 3, 32)))["params"]
    bound = 1.0 / math.sqrt(32 * 27)
    kernel, bias = np.asarray(params["kernel"]), np.asarray(params["bias"])
    assert kernel.shape == (3, 3, 3, 32, 32) and bias.shape == (32,)
    assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
    # U(-b, b) has standard deviation b / sqrt(3); 27648 draws pin it to ~1%.
    assert abs(kernel.std() / (bound / math.sqrt(3)) - 1) < 0.03
