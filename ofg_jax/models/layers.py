"""Flax layers with PyTorch's defaults: the ``Conv3D`` module, ``torch_dense`` and
the initialisers."""

import math
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from ofg_jax.models.conv import IntOr3, conv3d_of_parts, triple


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

    The input may be a tuple of arrays: the convolution of their concatenation
    along the channels (a skip connection), by ``conv3d_of_parts``.
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
    def __call__(self, x: Union[jax.Array, Sequence[jax.Array]]) -> jax.Array:
        """``(B, D, H, W, C_in) -> (B, D', H', W', features)``; ``x`` may be a tuple
        of ``(B, D, H, W, C_i)`` arrays with ``sum(C_i) = C_in``."""
        size = triple(self.kernel_size, "kernel_size")
        parts = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        in_features = sum(part.shape[-1] for part in parts)
        fan_in = in_features * math.prod(size)
        kernel = self.param("kernel", self.kernel_init or torch_kernel_init(),
                            (*size, in_features, self.features), self.param_dtype)
        dtype = self.dtype or parts[0].dtype
        y = conv3d_of_parts([part.astype(dtype) for part in parts], kernel.astype(dtype),
                            self.strides, self.padding, self.impl)
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


