"""Local normalised cross-correlation (VoxelMorph's windowed NCC)."""

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ofg_jax._shapes import check_optional_shapes, check_same_spatial


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


def masked_mean(values: jax.Array, weights: Optional[jax.Array] = None) -> jax.Array:
    """``mean(values)``, or with ``weights`` their weighted mean ``sum(w * v) / sum(w)``.

    The data terms' mean over a cost-function mask: voxels of weight 0 do not
    count, soft weights count in part. All weights 0 gives 0 (the sum is
    floored at ``1e-12``).

    Args:
      values: ``(*S)`` per-voxel values.
      weights: None, or ``(*S)`` weights ``>= 0`` (a mask: 0 / 1, or in between).

    Returns:
      Scalar.
    """
    if weights is None:
        return jnp.mean(values)
    return jnp.sum(weights * values) / _total(weights)


def _total(weights):
    """``sum(weights)``, floored so that an empty mask divides 0 by a positive number."""
    return jnp.maximum(jnp.sum(weights), 1e-12)


def ncc_to(fixed: jax.Array, *, window: int = 9,
           eps: float = 1e-5) -> Callable[..., jax.Array]:
    """``(b, weights=None) -> ncc(fixed, b, weights=weights)``, with the window sums
    of ``fixed`` computed once.

    For optimisation loops where ``fixed`` stays the same: each call then box-sums
    three maps instead of five, forward and backward.

    Args:
      fixed: ``(*S)`` image, 2D or 3D.
      window, eps: as :func:`ncc`.

    Returns:
      A function of a ``(*S)`` image (and optional ``(*S)`` weights, as
      :func:`ncc`) returning the scalar similarity.
    """
    stats = _fixed_window_stats(fixed, window)

    def similarity(b, weights=None):
        check_same_spatial(fixed.shape, b.shape, "ncc inputs fixed, b")
        check_optional_shapes(fixed.shape, weights=weights)
        return masked_mean(_cc_map(stats, b, window, eps), weights)

    return similarity


def ncc_gradient_to(fixed: jax.Array, *, window: int = 9,
                    eps: float = 1e-5) -> Callable[..., jax.Array]:
    """``(b, weights=None) -> grad_b ncc(fixed, b, weights=weights)``, written out,
    with ``fixed``'s window sums computed once.

    ``jax.grad(ncc_to(fixed))`` up to float32 rounding, in fewer passes over
    memory: the derivative of the map in the window sums ``(B, B2, AB)`` of ``b``
    is box-summed once (a box sum is its own transpose), then
    ``grad = S_B + 2 b S_B2 + fixed S_AB``. With ``weights`` (held constant) the
    per-voxel coefficients are those of ``sum(w * cc) / sum(w)``: each voxel's
    derivative of ``cc`` times ``w / sum(w)``, before the box sums' adjoint;
    without, exactly the unweighted computation. For loops that take the
    gradient many times (``ofg_jax.refine``).

    Args:
      fixed: ``(*S)`` image, 2D or 3D.
      window, eps: as :func:`ncc`.

    Returns:
      A function of a ``(*S)`` image (and optional ``(*S)`` weights, as
      :func:`ncc`) returning the ``(*S)`` gradient of the similarity in the image.
    """
    stats = _fixed_window_stats(fixed, window)

    def gradient(b, weights=None):
        check_same_spatial(fixed.shape, b.shape, "ncc inputs fixed, b")
        check_optional_shapes(fixed.shape, weights=weights)
        sums = _b_sums(fixed, b, window)
        if weights is None:
            _, of_sums = jax.vjp(
                lambda sums: jnp.mean(_cc_of_sums(stats, sums, window, eps)), sums)
            coefficients = of_sums(jnp.ones((), b.dtype))[0]
        else:
            _, of_sums = jax.vjp(lambda sums: _cc_of_sums(stats, sums, window, eps),
                                 sums)
            coefficients = of_sums((weights / _total(weights)).astype(b.dtype))[0]
        spread = _box_sum_planar(coefficients, window)
        return spread[0] + 2 * b * spread[1] + fixed * spread[2]

    return gradient


def ncc(a: jax.Array, b: jax.Array, *, window: int = 9, eps: float = 1e-5,
        weights: Optional[jax.Array] = None) -> jax.Array:
    """VoxelMorph's local NCC similarity: the mean of :func:`local_ncc_map`.

    Higher is more similar (at most ~1); the registration loss is ``-ncc(a, b)``.
    Symmetric in ``a`` and ``b``. For multi-channel images, ``jax.vmap`` over the
    channel axis.

    With ``weights`` (a cost-function mask) the similarity is the weighted mean
    ``sum(w * cc) / sum(w)`` of the map (:func:`masked_mean`): voxels of weight 0
    do not count. The window statistics of a counted voxel still include its
    whole window, so a masked-out region reaches half a window beyond its edge
    (dilate the mask by ``window // 2`` voxels to keep it out entirely).

    Args:
      a, b: ``(*S)`` images, 2D or 3D, same shape.
      window: odd window width per axis, in voxels (9 in the reference).
      eps: added to the denominator (1e-5 in the reference).
      weights: None, or ``(*S)`` weights in ``[0, 1]`` (binary or soft).

    Returns:
      Scalar similarity.
    """
    check_optional_shapes(a.shape, weights=weights)
    return masked_mean(local_ncc_map(a, b, window=window, eps=eps), weights)
