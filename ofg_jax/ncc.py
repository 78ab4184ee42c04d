"""Local normalised cross-correlation (VoxelMorph's windowed NCC)."""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ofg_jax._shapes import check_same_spatial


def box_sum(x: jax.Array, window: int) -> jax.Array:
    """Sums over a centred ``window``-wide box along each spatial axis.

    Equivalent to a dense convolution with a ``window**ndim`` kernel of ones and
    zero padding ``window // 2`` ("same" output size), computed as one 1D
    ``reduce_window`` sum per axis: ``window`` additions per voxel and axis, and
    the same again for the gradient (the transpose of a box sum is a box sum).
    On CPU this beats banded matrix products, whose cost grows with the axis
    length, and cumulative sums (``experiments/RESULTS.md``).

    Args:
      x: ``(*S, C)`` array; the box runs over the ``len(S)`` leading axes.
      window: odd box width in voxels.

    Returns:
      ``(*S, C)`` box sums.
    """
    return jnp.moveaxis(_box_sum_planar(jnp.moveaxis(x, -1, 0), window), 0, -1)


def _box_sum_planar(x, window):
    """:func:`box_sum` of ``(C, *S)`` maps, over their trailing axes.

    The channels first: XLA:CPU's window sum along the contiguous axis is about
    twice as slow with the channels interleaved (``experiments/RESULTS.md``).
    """
    radius = window // 2
    for axis in range(1, x.ndim):
        dims = [1] * x.ndim
        dims[axis] = window
        padding = [(0, 0)] * x.ndim
        padding[axis] = (radius, radius)
        x = jax.lax.reduce_window(x, np.zeros((), x.dtype), jax.lax.add, dims,
                                  [1] * x.ndim, padding)
    return x


def local_ncc_map(a: jax.Array, b: jax.Array, *, window: int = 9,
                  eps: float = 1e-5) -> jax.Array:
    """Per-voxel squared local correlation ``cc`` of two images.

    ``cc = cross**2 / (var_a * var_b + eps)`` with window sums as in VoxelMorph's
    NCC (``../REFERENCE.md``): ``cross = AB - uB*A - uA*B + uA*uB*n`` and
    ``var_a = A2 - 2*uA*A + uA*uA*n``, ``uA = A / n``, ``n = window**ndim``.

    Args:
      a, b: ``(*S)`` images, 2D or 3D, same shape.
      window: odd window width per axis, in voxels.
      eps: added to the denominator.

    Returns:
      ``(*S)`` map of ``cc`` values, in ``[0, 1]`` up to ``eps``.
    """
    check_same_spatial(a.shape, b.shape, "ncc inputs a, b")
    return _cc_map(_window_stats(a, window), b, window, eps)


def _window_stats(a, window):
    """``(a, A, A2)``: an image with its window sums of values and squares."""
    if window < 1 or window % 2 != 1:
        raise ValueError(f"window must be a positive odd integer, got {window}")
    sums = _box_sum_planar(jnp.stack([a, a * a]), window)
    return a, sums[0], sums[1]


def _fixed_window_stats(fixed, window):
    """``_window_stats`` of ``fixed``, which must be a 2D or 3D image."""
    if fixed.ndim not in (2, 3):
        raise ValueError(f"fixed must be a 2D or 3D image of shape (*S), got shape "
                         f"{fixed.shape}")
    return _window_stats(fixed, window)


def _cc_map(a_stats, b, window, eps):
    return _cc_of_sums(a_stats, _b_sums(a_stats[0], b, window), window, eps)


def _b_sums(a, b, window):
    """``(3, *S)``: the window sums of ``b``, ``b * b`` and ``a * b``."""
    return _box_sum_planar(jnp.stack([b, b * b, a * b]), window)


def _cc_of_sums(a_stats, sums, window, eps):
    a, sa, saa = a_stats
    n = float(window ** a.ndim)
    sb, sbb, sab = sums
    ua, ub = sa / n, sb / n
    cross = sab - ub * sa - ua * sb + ua * ub * n
    var_a = saa - 2 * ua * sa + ua * ua * n
    var_b = sbb - 2 * ub * sb + ub * ub * n
    return cross * cross / (var_a * var_b + eps)


def ncc_to(fixed: jax.Array, *, window: int = 9,
           eps: float = 1e-5) -> Callable[[jax.Array], jax.Array]:
    """``b -> ncc(fixed, b)``, with the window sums of ``fixed`` computed once.

    For optimisation loops where ``fixed`` stays the same: each call then box-sums
    three maps instead of five, forward and backward.

    Args:
      fixed: ``(*S)`` image, 2D or 3D.
      window, eps: as :func:`ncc`.

    Returns:
      A function of a ``(*S)`` image returning the scalar similarity.
    """
    stats = _fixed_window_stats(fixed, window)

    def similarity(b):
        check_same_spatial(fixed.shape, b.shape, "ncc inputs fixed, b")
        return jnp.mean(_cc_map(stats, b, window, eps))

    return similarity


def ncc_gradient_to(fixed: jax.Array, *, window: int = 9,
                    eps: float = 1e-5) -> Callable[[jax.Array], jax.Array]:
    """``b -> grad_b ncc(fixed, b)``, written out, with ``fixed``'s window sums computed once.

    ``jax.grad(ncc_to(fixed))`` up to float32 rounding, in fewer passes over
    memory: the derivative of the map in the window sums ``(B, B2, AB)`` of ``b``
    is box-summed once (a box sum is its own transpose), then
    ``grad = S_B + 2 b S_B2 + fixed S_AB``. For loops that take the gradient
    many times (``ofg_jax.refine``).

    Args:
      fixed: ``(*S)`` image, 2D or 3D.
      window, eps: as :func:`ncc`.

    Returns:
      A function of a ``(*S)`` image returning the ``(*S)`` gradient of the
      similarity in it.
    """
    stats = _fixed_window_stats(fixed, window)

    def gradient(b):
        check_same_spatial(fixed.shape, b.shape, "ncc inputs fixed, b")
        _, of_sums = jax.vjp(lambda sums: jnp.mean(_cc_of_sums(stats, sums, window, eps)),
                             _b_sums(fixed, b, window))
        spread = _box_sum_planar(of_sums(jnp.ones((), b.dtype))[0], window)
        return spread[0] + 2 * b * spread[1] + fixed * spread[2]

    return gradient


def ncc(a: jax.Array, b: jax.Array, *, window: int = 9, eps: float = 1e-5) -> jax.Array:
    """VoxelMorph's local NCC similarity: the mean of :func:`local_ncc_map`.

    Higher is more similar (at most ~1); the registration loss is ``-ncc(a, b)``.
    Symmetric in ``a`` and ``b``. For multi-channel images, ``jax.vmap`` over the
    channel axis.

    Args:
      a, b: ``(*S)`` images, 2D or 3D, same shape.
      window: odd window width per axis, in voxels (9 in the reference).
      eps: added to the denominator (1e-5 in the reference).

    Returns:
      Scalar similarity.
    """
    return jnp.mean(local_ncc_map(a, b, window=window, eps=eps))
