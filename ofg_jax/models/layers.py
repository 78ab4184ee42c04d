"""The 3D convolution shared by all networks, with a fast exact CPU formulation.

XLA:CPU runs ``lax.conv_general_dilated`` in 3D several times slower than PyTorch
(oneDNN), while its 2D convolution and its matrix products are fast. On CPU,
``conv3d`` therefore rewrites the convolution in terms of those:

* forward and input gradient: one 2D convolution over ``(H, W)`` of every depth
  slice with all ``k`` depth taps stacked on the output channels, then a sum of
  ``k`` depth-shifted slices;
* kernel gradient: ``k * k`` matrix products over the flattened, zero-padded
  volume (one per in-plane tap, the ``k`` depth taps stacked on the columns),
  operands channels-last so that no transposes are needed;
* stride ``s``: the stride-1 result at every ``s``-th voxel;
* kernel equal to stride, no padding (patch embeddings): a reshape and one matrix
  product.

Everything else, and every other backend (cuDNN on GPU), uses
``lax.conv_general_dilated``. All formulations compute the same sums in float32;
they agree with ``lax.conv_general_dilated`` to float32 rounding.
"""

import math
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

IntOr3 = Union[int, Sequence[int]]
IMPLS = ("auto", "xla", "cpu")

_DN3 = ("NDHWC", "DHWIO", "NDHWC")
_DN2 = ("NHWC", "HWIO", "NHWC")


def _triple(value: IntOr3, name: str) -> tuple[int, int, int]:
    values = (value,) * 3 if isinstance(value, (int, np.integer)) else tuple(value)
    if len(values) != 3 or any(int(v) != v for v in values):
        raise ValueError(f"{name} must be an int or 3 ints, got {value!r}")
    return tuple(int(v) for v in values)


def conv3d(x: jax.Array, kernel: jax.Array, stride: IntOr3 = 1, padding: IntOr3 = 0,
           impl: str = "auto") -> jax.Array:
    """3D cross-correlation, the operation of PyTorch ``Conv3d`` without its bias.

    Args:
      x: ``(B, D, H, W, C_in)`` channels-last input.
      kernel: ``(k_d, k_h, k_w, C_in, C_out)``.
      stride: int or 3 ints.
      padding: zero padding in voxels on both sides of each spatial axis, int or 3
        ints.
      impl: ``"xla"`` for ``lax.conv_general_dilated``; ``"cpu"`` for the
        formulation in this module's docstring (any backend; it only pays off on
        CPU); ``"auto"`` picks ``"cpu"`` on the CPU backend for float32 and
        ``"xla"`` otherwise.

    Returns:
      ``(B, D', H', W', C_out)`` with ``D' = (D + 2 p - k) // s + 1`` per axis, in the
      result dtype of ``x`` and ``kernel``.
    """
    stride, padding = _triple(stride, "stride"), _triple(padding, "padding")
    if x.ndim != 5 or kernel.ndim != 5 or kernel.shape[3] != x.shape[4]:
        raise ValueError(
            f"conv3d expects x (B, D, H, W, C_in) and kernel (kd, kh, kw, C_in, C_out); "
            f"got x {x.shape} and kernel {kernel.shape}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    size = kernel.shape[:3]
    for n, k, p, s in zip(x.shape[1:4], size, padding, stride):
        if n + 2 * p < k or s < 1 or p < 0:
            raise ValueError(
                f"conv3d: spatial size {x.shape[1:4]} with padding {padding} is smaller "
                f"than kernel {size}, or stride {stride} / padding is invalid")
    if impl == "auto":
        dtype = jnp.result_type(x, kernel)
        impl = "cpu" if jax.default_backend() == "cpu" and dtype == jnp.float32 else "xla"
    if impl == "cpu":
        if size == stride and padding == (0, 0, 0):
            return _patch_conv(x, kernel)
        k = size[0]
        if (size == (k,) * 3 and k % 2 == 1 and padding == (k // 2,) * 3
                and stride == (stride[0],) * 3):
            s = stride[0]
            y = _conv_same(x, kernel)
            return y if s == 1 else y[:, ::s, ::s, ::s]
    return lax.conv_general_dilated(
        x, kernel, stride, [(p, p) for p in padding], dimension_numbers=_DN3)


def _patch_conv(x, kernel):
    """Non-overlapping patches (kernel == stride, no padding): reshape + matmul."""
    b, c = x.shape[0], x.shape[4]
    kd, kh, kw, _, o = kernel.shape
    d, h, w = x.shape[1] // kd, x.shape[2] // kh, x.shape[3] // kw
    x = x[:, :d * kd, :h * kh, :w * kw]
    patches = x.reshape(b, d, kd, h, kh, w, kw, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    patches = patches.reshape(b, d, h, w, kd * kh * kw * c)
    return jnp.dot(patches, kernel.reshape(-1, o))


# Intermediates above this size are processed in a loop over chunks, so that a
# full-resolution layer needs O(input + output) memory.
_CHUNK_BYTES = 128 * 2 ** 20
_MIN_CHUNK_ROWS = 4096


def _depth_stacked_conv(x, kernel):
    """Stride-1 'same' correlation by 2D convs over (H, W); odd cubic kernel.

    ``out[d] = sum_a conv2d(x[d + a - p], kernel[a])``: one 2D convolution of the
    depth slices with the ``k`` depth taps stacked on its output channels, then
    each tap's output added ``a - p`` slices away. Large volumes go through a loop
    over chunks of depth slices that accumulates into the output.
    """
    b, d, h, w, c = x.shape
    k, o = kernel.shape[0], kernel.shape[4]
    p = k // 2
    stacked = kernel.transpose(1, 2, 3, 0, 4).reshape(k, k, c, k * o)

    def taps(xs):  # (b, n, h, w, c) -> (b, n + 2p, h, w, o): every tap, shifted
        n = xs.shape[1]
        y = lax.conv_general_dilated(xs.reshape(b * n, h, w, c), stacked, (1, 1),
                                     [(p, p), (p, p)], dimension_numbers=_DN2)
        y = y.reshape(b, n, h, w, k, o)
        return sum(jnp.pad(y[:, :, :, :, a], ((0, 0), (2 * p - a, a), (0, 0), (0, 0), (0, 0)))
                   for a in range(k))

    chunk = max(1, _CHUNK_BYTES // (b * h * w * k * o * x.dtype.itemsize))
    if chunk >= d:
        return taps(x)[:, p:p + d]
    n_chunks = -(-d // chunk)
    x = jnp.pad(x, ((0, 0), (0, n_chunks * chunk - d), (0, 0), (0, 0), (0, 0)))

    def body(i, out):
        start = i * chunk
        slab = lax.dynamic_slice_in_dim(out, start, chunk + 2 * p, axis=1)
        slab = slab + taps(lax.dynamic_slice_in_dim(x, start, chunk, axis=1))
        return lax.dynamic_update_slice_in_dim(out, slab, start, axis=1)

    out = jnp.zeros((b, n_chunks * chunk + 2 * p, h, w, o), x.dtype)
    return lax.fori_loop(0, n_chunks, body, out)[:, p:p + d]


def _kernel_grad(x, g, k):
    """Gradient of the stride-1 'same' correlation with respect to its kernel.

    With the volume zero-padded by ``p = k // 2`` and flattened channels-last to
    ``(L, C)``, the tap ``(a, b, c)`` is the row offset ``a * S + b * W' + c``
    (``W' = W + 2p``, ``S = (H + 2p) W'``). The output gradient ``g`` is laid out on
    the same padded grid (zeros off the volume) with its ``k`` depth shifts stacked
    on the columns, so each in-plane tap is one product ``x_shifted^T @ g_stacked``
    of channels-last operands, which needs no transpose. Large volumes go through a
    loop over chunks of rows.
    """
    bsz, d, h, w, c = x.shape
    o = g.shape[4]
    p = k // 2
    wp, hp = w + 2 * p, h + 2 * p
    plane = hp * wp
    offsets = [i * wp + j for i in range(k) for j in range(k)]
    halo = offsets[-1]
    xf = jnp.pad(x, ((0, 0), (p, p), (p, p), (p, p), (0, 0))).reshape(-1, c)
    rows = xf.shape[0] - halo
    gf = jnp.pad(g, ((0, 0), (0, 2 * p), (0, 2 * p), (0, 2 * p), (0, 0))).reshape(-1, o)[:rows]
    chunk = max(_MIN_CHUNK_ROWS, _CHUNK_BYTES // ((k * k * c + k * o) * x.dtype.itemsize))
    n_chunks = -(-rows // chunk)
    if n_chunks == 1:
        chunk = rows
    # Row r of the stacked gradient holds g[r - a * plane] for each depth tap a.
    gf = jnp.pad(gf, (((k - 1) * plane, n_chunks * chunk - rows), (0, 0)))
    xf = jnp.pad(xf, ((0, n_chunks * chunk - rows), (0, 0)))
    contract = (((0,), (0,)), ((), ()))

    def chunk_grad(start):
        xs = lax.dynamic_slice_in_dim(xf, start, chunk + halo)
        gs = lax.dynamic_slice_in_dim(gf, start, chunk + (k - 1) * plane)
        shift = (k - 1) * plane
        g_stacked = jnp.concatenate(
            [gs[shift - a * plane:shift - a * plane + chunk] for a in range(k)], axis=1)
        return jnp.stack([lax.dot_general(xs[t:t + chunk], g_stacked, contract)
                          for t in offsets])                            # (k*k, C, k*O)

    if n_chunks == 1:
        grad = chunk_grad(0)
    else:
        grad = lax.fori_loop(
            0, n_chunks, lambda i, acc: acc + chunk_grad(i * chunk),
            jnp.zeros((k * k, c, k * o), x.dtype))
    grad = grad.reshape(k, k, c, k, o)                                  # (b, c, C, a, O)
    return grad.transpose(3, 0, 1, 2, 4).astype(x.dtype)


@jax.custom_vjp
def _conv_same(x, kernel):
    return _depth_stacked_conv(x, kernel)


def _conv_same_fwd(x, kernel):
    return _depth_stacked_conv(x, kernel), (x, kernel)


def _conv_same_bwd(res, g):
    x, kernel = res
    flipped = jnp.swapaxes(kernel[::-1, ::-1, ::-1], 3, 4)
    dx = _depth_stacked_conv(g.astype(x.dtype), flipped)
    return dx, _kernel_grad(x, g.astype(x.dtype), kernel.shape[0]).astype(kernel.dtype)


_conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


# ---------------------------------------------------------------------------
# Initialisers with PyTorch's defaults.


def torch_kernel_init() -> Callable:
    """PyTorch's default for conv and linear weights: ``U(-1/sqrt(fan_in), +)``.

    (``kaiming_uniform_(a=sqrt(5))``; ``fan_in`` = input channels x kernel volume.)
    """
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> Callable:
    """PyTorch's default for conv and linear biases: ``U(-1/sqrt(fan_in), +)``."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def flow_head_init() -> tuple[Callable, Callable]:
    """Kernel ``N(0, 1e-5)`` and zero bias: an untrained network predicts ~0."""
    return nn.initializers.normal(1e-5), nn.initializers.zeros


class Conv3D(nn.Module):
    """``conv3d`` as a flax module; PyTorch ``Conv3d`` defaults for init.

    Attributes:
      features: output channels.
      kernel_size, strides, padding: int or 3 ints (padding: zeros, both sides).
      use_bias: add a bias.
      kernel_init, bias_init: default to PyTorch's (``torch_kernel_init``,
        ``torch_bias_init``).
      dtype: compute dtype (inputs and kernel are cast to it); ``None`` keeps the
        input's.
      param_dtype: parameter dtype.
      impl: see ``conv3d``.
    """

    features: int
    kernel_size: IntOr3 = 3
    strides: IntOr3 = 1
    padding: IntOr3 = 0
    use_bias: bool = True
    kernel_init: Optional[Callable] = None
    bias_init: Optional[Callable] = None
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``(B, D, H, W, C_in) -> (B, D', H', W', features)``."""
        size = _triple(self.kernel_size, "kernel_size")
        in_features = x.shape[-1]
        fan_in = in_features * math.prod(size)
        kernel = self.param("kernel", self.kernel_init or torch_kernel_init(),
                            (*size, in_features, self.features), self.param_dtype)
        dtype = self.dtype or x.dtype
        y = conv3d(x.astype(dtype), kernel.astype(dtype), self.strides, self.padding,
                   self.impl)
        if self.use_bias:
            bias = self.param("bias", self.bias_init or torch_bias_init(fan_in),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(dtype)
        return y


def torch_dense(features: int, in_features: int, use_bias: bool = True,
                dtype: Optional[Any] = None, name: Optional[str] = None) -> nn.Dense:
    """``nn.Dense`` initialised as PyTorch's ``nn.Linear``."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=torch_kernel_init(),
                    bias_init=torch_bias_init(in_features), name=name)


__all__ = ["Conv3D", "IMPLS", "conv3d", "flow_head_init", "torch_bias_init",
           "torch_dense", "torch_kernel_init"]
