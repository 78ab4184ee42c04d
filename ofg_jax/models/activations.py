"""Activations that keep one tensor for their gradient.

The gradients of ReLU and LeakyReLU only need the sign of the input, which the
output has too. Autodiff of ``nn.relu`` / ``nn.leaky_relu`` keeps the input
alive for the backward pass, although the next layer keeps the output anyway:
at full resolution that is one feature map per layer more than needed. These
keep only the output (GELU only its input, softmax only its output). Values and
gradients are the same as flax's and JAX's.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


@jax.custom_vjp
def relu(x: jax.Array) -> jax.Array:
    """``nn.relu``, keeping only its output for the gradient (``g * (y > 0)``)."""
    return jax.nn.relu(x)


def _relu_fwd(x):
    y = jax.nn.relu(x)
    return y, y


def _relu_bwd(y, g):
    return (jnp.where(y > 0, g, jnp.zeros_like(g)),)


relu.defvjp(_relu_fwd, _relu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def leaky_relu(x: jax.Array, negative_slope: float) -> jax.Array:
    """``nn.leaky_relu`` (``negative_slope > 0``), keeping only its output.

    The gradient is ``g`` where ``y >= 0``, else ``negative_slope * g``, as
    flax's, which tests the input instead: they differ only for negative inputs
    so small (``|x| < ~1e-38 / negative_slope``) that ``negative_slope * x``
    flushes or rounds to ``-0.0``.
    """
    return jax.nn.leaky_relu(x, negative_slope)


def _leaky_relu_fwd(x, negative_slope):
    y = jax.nn.leaky_relu(x, negative_slope)
    return y, y


def _leaky_relu_bwd(negative_slope, y, g):
    return (jnp.where(y >= 0, g, negative_slope * g),)


leaky_relu.defvjp(_leaky_relu_fwd, _leaky_relu_bwd)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """``nn.gelu(x, approximate=False)`` (the erf form), keeping only ``x`` for the
    gradient ``g * (Phi(x) + x * phi(x))``; autodiff keeps ``erf(x / sqrt 2)`` too."""
    return jax.nn.gelu(x, approximate=False)


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, g):
    cdf = 0.5 * (1.0 + jax.lax.erf(x * np.float32(1 / np.sqrt(2))).astype(x.dtype))
    pdf = jnp.exp(-0.5 * x * x) * np.float32(1 / np.sqrt(2 * np.pi)).astype(x.dtype)
    return (g * (cdf + x * pdf),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


@jax.custom_vjp
def softmax(logits: jax.Array) -> jax.Array:
    """``jax.nn.softmax`` over the last axis, keeping only its output for the gradient
    ``y * (g - sum(g * y))``; autodiff keeps the unnormalised exponentials too
    (at full size, one attention matrix per block more)."""
    return jax.nn.softmax(logits, axis=-1)


def _softmax_fwd(logits):
    y = jax.nn.softmax(logits, axis=-1)
    return y, y


def _softmax_bwd(y, g):
    return (y * (g - jnp.sum(g * y, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


__all__ = ["gelu", "leaky_relu", "relu", "softmax"]
