"""Warping an image by a dense displacement field."""

import functools
import itertools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from ofg_jax._shapes import check_disp, check_image


def sample(image: jax.Array, coords: jax.Array, *, order: int = 1) -> jax.Array:
    """Samples ``image`` at the voxel coordinates ``coords`` (of any grid).

    Voxel centres of ``image`` are the integer coordinates ``0 .. S_k - 1``; every
    interpolation neighbour outside the volume counts as 0 (so a point more than one
    voxel outside gives 0, and the last voxel fades to 0 over the voxel beyond it).
    The interpolation and its derivative are those of :func:`warp`, which is
    ``sample(image, grid + disp)``. Differentiable in ``image`` and (for
    ``order=1``) in ``coords``, in forward and reverse mode.

    Args:
      image: ``(*S)`` or ``(*S, C)`` array, 2D or 3D (``N = len(S)``).
      coords: ``(*T, N)`` float coordinates in ``image``'s voxels, any leading
        shape ``T``; component ``k`` indexes array axis ``k``.
      order: 1 for (bi/tri)linear interpolation, 0 for nearest neighbour (label
        maps; ties round half to even, as ``grid_sample``).

    Returns:
      ``(*T)`` (or ``(*T, C)``) array, dtype of ``image``.
    """
    image, coords = jnp.asarray(image), jnp.asarray(coords)
    if coords.ndim < 1 or coords.shape[-1] not in (2, 3):
        raise ValueError(f"coords must have shape (*T, N) with N = 2 or 3, got shape "
                         f"{coords.shape}")
    ndim = coords.shape[-1]
    if image.ndim not in (ndim, ndim + 1):
        raise ValueError(f"image of shape {image.shape} does not match coords with "
                         f"{ndim} components: expected {ndim} spatial axes and an "
                         "optional channel axis")
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order}")
    return _sample(image, tuple(coords[..., k] for k in range(ndim)), order)


def warp(image: jax.Array, disp: jax.Array, *, order: int = 1) -> jax.Array:
    """Samples ``image`` at ``x + disp(x)`` for every voxel ``x`` of the grid.

    The same numbers as PyTorch ``grid_sample(align_corners=True,
    padding_mode="zeros")`` applied through VoxelMorph's spatial transformer:
    voxel centres are the integer coordinates ``0 .. S_k - 1`` and every
    interpolation neighbour that falls outside the volume counts as 0.
    Differentiable in ``image`` and (for ``order=1``) in ``disp``, in forward and
    reverse mode. ``warp(image, disp) == sample(image, grid + disp)``.

    Args:
      image: ``(*S)`` or ``(*S, C)`` array, 2D or 3D.
      disp: ``(*S, N)`` displacement in voxels, ``N = len(S)``; component ``k``
        moves along array axis ``k``.
      order: 1 for (bi/tri)linear interpolation, 0 for nearest neighbour (label
        maps; ties round half to even, as ``grid_sample``).

    Returns:
      The warped image, same shape and dtype as ``image``.
    """
    image, disp = jnp.asarray(image), jnp.asarray(disp)
    spatial = check_disp(disp.shape)
    check_image(image.shape, spatial)
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order}")
    return _sample(image, _grid_plus(disp), order)


def warp_and_slopes(image: jax.Array, disp: jax.Array
                    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """:func:`warp` (linear) and its derivative in each displacement component.

    For reverse-mode code that writes its gradient out: the gradient of
    ``f(warp(image, disp))`` in ``disp[..., k]`` is ``df/dwarped * slopes[k]``.
    The corner values are read once for the value and all slopes.

    Args:
      image: ``(*S)`` single-channel image, 2D or 3D.
      disp: ``(*S, N)`` displacement in voxels.

    Returns:
      ``(warped, slopes)``: the ``(*S)`` warped image and ``N`` arrays ``(*S)``,
      ``d warped / d disp[..., k]``, in image units per voxel.
    """
    spatial = check_disp(disp.shape)
    if tuple(image.shape) != spatial:
        raise ValueError(f"image of shape {image.shape} must have the displacement's "
                         f"spatial shape {spatial}")
    cell, frac = _cells(jnp.pad(image[..., None], [(1, 1)] * len(spatial) + [(0, 0)]),
                        _grid_plus(disp))
    slopes = tuple(_slope(cell, frac, k)[..., 0] for k in range(len(spatial)))
    return _interpolate(cell, frac)[..., 0], slopes


def _grid_plus(disp):
    """``x + disp(x)`` as one array per axis.

    Not a stacked grid: that would be materialised in memory, where each
    component's iota is otherwise computed where it is used.
    """
    return tuple(jax.lax.broadcasted_iota(disp.dtype, disp.shape[:-1], k) + disp[..., k]
                 for k in range(disp.shape[-1]))


def _sample(image, coords, order):
    """``sample`` with ``coords`` as one ``(*T)`` array per spatial axis."""
    ndim = len(coords)
    has_channels = image.ndim == ndim + 1
    spatial = tuple(image.shape[:ndim])
    values = image if has_channels else image[..., None]
    coords = tuple(c if jnp.issubdtype(c.dtype, jnp.floating) else c.astype(jnp.float32)
                   for c in coords)
    if order == 0:
        index = [jnp.round(c).astype(jnp.int32) for c in coords]
        out = _gather(values.reshape(-1, values.shape[-1]), index, spatial)
    else:
        padded = jnp.pad(values, [(1, 1)] * ndim + [(0, 0)])
        out = _linear(padded, coords)
    out = out.astype(image.dtype)
    return out if has_channels else out[..., 0]


def _gather(values, index, spatial):
    """``values`` at the integer voxel ``index``, from ``(prod(S), C)``; 0 outside."""
    inside = True
    flat = 0
    for i, n in zip(index, spatial):
        inside = inside & (i >= 0) & (i < n)
        flat = flat * n + jnp.clip(i, 0, n - 1)
    picked = values.at[flat.reshape(-1)].get(
        mode="promise_in_bounds").reshape(*flat.shape, -1)
    return jnp.where(inside[..., None], picked, 0)


def _prod(factors):
    return functools.reduce(lambda a, b: a * b, factors)


_CORNERS = {ndim: tuple(itertools.product((0, 1), repeat=ndim)) for ndim in (2, 3)}


def _cells(padded, coords):
    """The ``2**N`` corner values around each point, and its offsets in the cell.

    ``padded`` is the ``(*S + 2, C)`` image with one voxel of zeros on every side,
    so that every corner of a point less than one voxel outside the volume is
    read from it (as 0 where it lies outside). One gather reads each point's
    ``2 x ... x 2`` cell: ``(*T, 2**N, C)``, in the order of ``_CORNERS``. Points
    farther outside, all of whose corners are outside, get 0.
    """
    ndim = len(coords)
    lower = [jnp.floor(c) for c in coords]
    inside = _prod([(lo >= -1) & (lo <= n - 3)
                    for lo, n in zip(lower, padded.shape[:ndim])])
    start = jnp.stack([lo.astype(jnp.int32) + 1 for lo in lower], axis=-1)
    batch = start.ndim - 1
    dims = jax.lax.GatherDimensionNumbers(
        offset_dims=tuple(range(batch, batch + ndim + 1)), collapsed_slice_dims=(),
        start_index_map=tuple(range(ndim)))
    cell = jax.lax.gather(padded, start, dims, (2,) * ndim + padded.shape[ndim:],
                          mode="clip")
    cell = cell.reshape(*start.shape[:-1], 2 ** ndim, padded.shape[-1])
    frac = [(c - lo)[..., None] for c, lo in zip(coords, lower)]
    return jnp.where(inside[..., None, None], cell, 0), frac


def _weights(frac, corner):
    return [f if upper else 1.0 - f for f, upper in zip(frac, corner)]


def _interpolate(cell, frac):
    """``(*T, C)``: the corner values of ``cell`` weighted by their trilinear weights."""
    return sum(_prod(_weights(frac, corner)) * cell[..., i, :]
               for i, corner in enumerate(_CORNERS[len(frac)]))


def _slope(cell, frac, axis):
    """``(*T, C)``: the derivative of ``_interpolate`` in the coordinate ``axis``."""
    slope = 0.0
    for i, corner in enumerate(_CORNERS[len(frac)]):
        weights = _weights(frac, corner)
        term = _prod([weights[j] for j in range(len(frac)) if j != axis]) * cell[..., i, :]
        slope = slope + term if corner[axis] else slope - term
    return slope


# The derivative of linear interpolation in the coordinates is written out: the
# corner values are shared with the forward pass, which makes the backward pass
# several times faster on CPU than differentiating through the weights.
@jax.custom_jvp
def _linear(padded, coords):
    """Linear interpolation of the zero-padded ``(*S + 2, C)`` image at ``coords``."""
    return _interpolate(*_cells(padded, coords))


@functools.partial(_linear.defjvp, symbolic_zeros=True)
def _linear_jvp(primals, tangents):
    padded, coords = primals
    padded_dot, coords_dot = tangents
    cell, frac = _cells(padded, coords)
    out = _interpolate(cell, frac)
    out_dot = jnp.zeros_like(out)
    for axis, c_dot in enumerate(coords_dot):
        if not isinstance(c_dot, SymbolicZero):
            out_dot = out_dot + _slope(cell, frac, axis) * c_dot[..., None]
    if not isinstance(padded_dot, SymbolicZero):
        out_dot = out_dot + _interpolate(_cells(padded_dot, coords)[0], frac)
    return out, out_dot
