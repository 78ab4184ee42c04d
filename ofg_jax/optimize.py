"""Registration by optimisation alone: coarse-to-fine instance optimisation, no network.

:func:`optimize_displacement` registers one pair of images with no trained
network: it minimises the energy of :func:`ofg_jax.refine` (local NCC or MSE
plus ``reg_weight`` times Grad) over a pyramid, coarse to fine (block means of
the images at factors ``levels``, e.g. 4, 2, 1), each level starting from the
previous level's field upsampled. With ``diffeomorphic=True`` the optimised
variable is a stationary velocity field and the displacement its exponential
(scaling and squaring), which does not fold (:func:`optimize_velocity` returns
the velocity itself). Arrays in, displacement out: pure, unbatched, jit- and
vmap-friendly, 2D or 3D.

:class:`OptimizeSettings` holds the same options as one value; its defaults are
the library's, chosen from measurements on 2 mm brain pairs that are not the
reported ones (``python -m experiments.optimize_vs_syn --tune``).
"""

import functools
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from ofg_jax._shapes import check_optional_shapes
from ofg_jax._shapes import check_same_spatial
from ofg_jax.models.integrate import integrate_velocity
from ofg_jax.options import OptimizeSettings
from ofg_jax.options import check_options
from ofg_jax.options import per_level
from ofg_jax.refine import _data_gradient_fn
from ofg_jax.refine import _optimizer
from ofg_jax.refine import refine
from ofg_jax.regularizers import grad_loss_gradient
from ofg_jax.resolution import block_mean
from ofg_jax.resolution import upsample_displacement

Optimizer = Union[str, optax.GradientTransformation]


_DEFAULTS = OptimizeSettings()


def _transformation(optimizer: Optimizer, learning_rate) -> optax.GradientTransformation:
    """``refine``'s optimiser named by ``optimizer`` at ``learning_rate``; a
    transformation passed as ``optimizer`` keeps its own learning rate."""
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    return _optimizer(optimizer, learning_rate, default_lr=learning_rate)


def _pyramid(image: jax.Array, levels: Sequence[int], multiple: int) -> list[jax.Array]:
    """The image at each level: block means of the image edge-padded to a multiple
    of ``multiple`` (a multiple of the coarsest factor; factor 1: the image
    itself)."""
    padded = _pad_to_multiple(image, multiple)
    return [image if f == 1 else block_mean(padded, f, spatial_dims=image.ndim)
            for f in levels]


def _pad_to_multiple(image: jax.Array, factor: int) -> jax.Array:
    return jnp.pad(image, [(0, -n % factor) for n in image.shape], mode="edge")


def _to_finer(field: jax.Array, ratio: int, shape: Sequence[int]) -> jax.Array:
    """A level's field ``(*S_l, N)`` upsampled ``ratio`` times (values in the finer
    voxels) and cropped to ``shape``."""
    if ratio > 1:
        field = upsample_displacement(field, ratio)
    return field[tuple(slice(0, n) for n in shape)]


def _coarse_to_fine(moving, fixed, levels, steps, optimize_level, fixed_mask=None,
                    moving_mask=None, field_factors: Optional[Sequence[int]] = None
                    ) -> jax.Array:
    """Runs ``optimize_level(moving_l, fixed_l, start, count, fixed_mask_l,
    moving_mask_l, field_factor_l)`` at each level (the masks' block means, or
    None) and returns the last field at full resolution. The field of level
    ``l`` lives on a grid ``field_factors[l]`` (default 1) times coarser than the
    level's images (which are edge-padded to a multiple of the coarsest field
    grid's factor)."""
    check_same_spatial(moving.shape, fixed.shape, "moving, fixed")
    check_optional_shapes(fixed.shape, fixed_mask=fixed_mask,
                          moving_mask=moving_mask)
    shape = fixed.shape
    field_factors = tuple(field_factors or (1,) * len(levels))
    grids = [level * factor for level, factor in zip(levels, field_factors)]
    padded_shape = tuple(-(-n // grids[0]) * grids[0] for n in shape)
    grid = lambda f: shape if f == 1 else tuple(n // f for n in padded_shape)
    field = jnp.zeros(grid(grids[0]) + (len(shape),), jnp.float32)
    pyramid = lambda image: _pyramid(image, levels, grids[0])
    masks = [[None] * len(levels) if mask is None else pyramid(mask)
             for mask in (fixed_mask, moving_mask)]
    pyramids = zip(steps, field_factors, pyramid(moving), pyramid(fixed), *masks)
    for k, (count, field_factor, moving_l, fixed_l, *masks_l) in enumerate(pyramids):
        if k:
            field = _to_finer(field, grids[k - 1] // grids[k], grid(grids[k]))
        if count:
            field = optimize_level(moving_l, fixed_l, field, count, *masks_l, field_factor)
    return _to_finer(field, grids[-1], shape)


def optimize_displacement(moving: jax.Array, fixed: jax.Array, *,
                          levels: Sequence[int] = _DEFAULTS.levels,
                          steps: Sequence[int] = _DEFAULTS.steps,
                          learning_rate=_DEFAULTS.learning_rate,
                          reg_weight=_DEFAULTS.reg_weight,
                          similarity: str = _DEFAULTS.similarity,
                          window: int = _DEFAULTS.window,
                          optimizer: Optimizer = _DEFAULTS.optimizer,
                          diffeomorphic: bool = _DEFAULTS.diffeomorphic,
                          int_steps: int = _DEFAULTS.int_steps,
                          velocity_factor=_DEFAULTS.velocity_factor,
                          integrate_every: int = _DEFAULTS.integrate_every,
                          fixed_mask: Optional[jax.Array] = None,
                          moving_mask: Optional[jax.Array] = None) -> jax.Array:
    """Registers ``moving`` to ``fixed`` by coarse-to-fine optimisation alone.

    At each level ``f`` of ``levels`` (coarse to fine) both images are replaced by
    their ``f``-block means (edge-padded to a multiple of ``levels[0]``; ``f = 1``
    is the image itself) and the field, in that level's voxels, takes ``steps``
    updates of ``optimizer`` on :func:`ofg_jax.registration_energy`
    (:func:`ofg_jax.refine` at that level), starting from zero at the first level
    and from the previous level's field upsampled linearly
    (``ofg_jax.resolution.upsample_displacement``) at the others. With
    ``diffeomorphic`` the variable is a velocity field ``v`` and the energy is
    that of ``exp(v)`` with Grad on ``v`` (:func:`optimize_velocity`).

    Cost-function masks (ANTs' ``-x [fixedMask,movingMask]``) weight the data
    term of every level (their block means at coarse levels): it is the
    weighted mean ``sum(w * c) / sum(w)`` of the per-voxel local NCC ``cc`` (or
    squared error) over ``w = fixed_mask * moving_mask∘disp``, the moving mask
    warped by the current field (linear, 0 outside; not differentiated), so a
    lesion, a cut field of view or a skull-stripping error masked in either
    image pulls on nothing; Grad stays over the whole field, which is therefore
    interpolated smoothly under the masked region. A counted voxel's NCC window
    still sees ``window // 2`` voxels past a mask's edge. Without masks the
    computation is exactly the unmasked one.

    Unbatched (``jax.vmap`` over pairs gives each its own optimiser state);
    ``levels``, ``steps``, ``similarity``, ``window``, ``optimizer``,
    ``diffeomorphic`` and ``int_steps`` are static under ``jit``, the learning
    rate and weight may be traced.

    Args:
      moving, fixed: ``(*S)`` images, 2D or 3D, one shape.
      levels: pyramid factors, coarse to fine, each a multiple of the next.
      steps: optimiser updates per level (0: the level only upsamples).
      learning_rate: step of a named optimiser, in voxels of each level.
      reg_weight: weight of the Grad term.
      similarity: ``"ncc"`` or ``"mse"``.
      window: NCC window width, in voxels of each level.
      optimizer: ``"adam"``, ``"amsgrad"``, ``"sgd"`` or any
        ``optax.GradientTransformation`` (its own learning rate; fresh state at
        every level).
      diffeomorphic: optimise a stationary velocity field (scaling and squaring).
      int_steps: squarings of the velocity's integration.
      velocity_factor: with ``diffeomorphic``, how many times coarser than the
        level's images the velocity's grid is, per level or one for all; None: 2
        at every level but the last, 1 there (:func:`optimize_velocity`).
      integrate_every: with ``diffeomorphic``, the optimiser steps between two
        exponentials of the velocity (:func:`optimize_velocity`).
      fixed_mask: None, or a ``(*S)`` cost-function mask on the fixed grid:
        weights in ``[0, 1]`` (0 / 1, or soft); the data term counts where it
        is > 0. Not checked for its values here (they may be traced).
      moving_mask: None, or a ``(*S)`` mask of the moving image (its grid, the
        same values), warped with the field and multiplied into the weights.

    Returns:
      ``(*S, N)`` float32 displacement in voxels of ``fixed``: the fixed voxel
      ``x`` takes the moving value at ``x + disp(x)`` (:func:`ofg_jax.warp`).

    Raises:
      ValueError: images or masks of different shapes or not 2D / 3D, or an
        invalid option (named).
    """
    options = dict(levels=levels, steps=steps, learning_rate=learning_rate,
                   reg_weight=reg_weight, similarity=similarity, window=window,
                   optimizer=optimizer, int_steps=int_steps)
    if diffeomorphic:
        velocity = optimize_velocity(moving, fixed, fixed_mask=fixed_mask,
                                     moving_mask=moving_mask,
                                     velocity_factor=velocity_factor,
                                     integrate_every=integrate_every, **options)
        return integrate_velocity(velocity[None], int_steps)[0]
    check_options(**options)
    opt = _transformation(optimizer, learning_rate)
    return _coarse_to_fine(
        moving, fixed, tuple(levels), tuple(steps),
        lambda m, f, start, count, fm, mm, _: refine(
            m, f, start, steps=count, optimizer=opt, reg_weight=reg_weight,
            similarity=similarity, window=window, fixed_mask=fm, moving_mask=mm),
        fixed_mask, moving_mask)


def optimize_velocity(moving: jax.Array, fixed: jax.Array, *,
                      levels: Sequence[int] = _DEFAULTS.levels,
                      steps: Sequence[int] = _DEFAULTS.steps,
                      learning_rate=_DEFAULTS.learning_rate,
                      reg_weight=_DEFAULTS.reg_weight,
                      similarity: str = _DEFAULTS.similarity,
                      window: int = _DEFAULTS.window,
                      optimizer: Optimizer = _DEFAULTS.optimizer,
                      int_steps: int = _DEFAULTS.int_steps,
                      velocity_factor=_DEFAULTS.velocity_factor,
                      integrate_every: int = _DEFAULTS.integrate_every,
                      fixed_mask: Optional[jax.Array] = None,
                      moving_mask: Optional[jax.Array] = None) -> jax.Array:
    """The stationary velocity field of :func:`optimize_displacement` with
    ``diffeomorphic=True``.

    At each level the optimised variable ``w`` lives on a grid
    ``velocity_factor`` (that level's) times coarser than the level's images
    (starting from the previous level's velocity) and gives the velocity
    ``v = B(w)``, ``B`` a ``[1, 2, 1] / 4`` filter along each axis. The energy
    is ``-NCC(fixed, moving∘U(exp(v))) + reg_weight * Grad(v)`` (or MSE), with
    ``exp`` ``int_steps`` squarings on the velocity's grid
    (``ofg_jax.models.integrate.integrate_velocity``, VoxelMorph's ``VecInt``)
    and ``U`` linear upsampling to the images' grid (VoxelMorph's
    ``int_downsize``): the squarings cost ``1 / velocity_factor**N`` of the
    images' grid. The data term's gradient in ``v`` is taken as its gradient in
    the displacement, upsampled's adjoint aside (to first order ``exp(v + dv)
    = exp(v) + dv``, the update of log-domain demons), written out as
    :func:`ofg_jax.refine`'s; this spares the backward pass through the
    squarings. The same first order spares most of the squarings themselves:
    the exponential ``exp(v0)`` is taken anew every ``integrate_every`` steps
    and in between the displacement is ``U(exp(v0)) + U(v - v0)``; what is
    returned is the last velocity, whose own exponential is the result. The
    filter (as SyN and demons smooth their updates) keeps the velocity smooth
    enough that its discrete exponential does not fold; it is its own adjoint,
    so the gradient in ``w`` is the filtered gradient in ``v``. Masks weight
    the data term as in :func:`optimize_displacement`, the moving mask warped
    by the field; Grad stays on the whole ``v``.

    Args:
      moving, fixed: as in :func:`optimize_displacement`.
      levels, steps, learning_rate, reg_weight: as there.
      similarity, window, optimizer, int_steps: as there.
      velocity_factor: per level (or one for all), the velocity's grid is this
        many times coarser than the level's images (1: the same grid); each
        level's factor times the level's is a multiple of the next level's.
        None: 2 at every level but the last, 1 there
        (``ofg_jax.options.per_level``): half resolution where the coarse
        shape is found, full resolution where the details are.
      integrate_every: the optimiser steps between two exponentials (1: at
        every step, the exact energy's data term).
      fixed_mask, moving_mask: as there.

    Returns:
      ``(*S, N)`` float32 velocity in voxels of ``fixed`` (the last level's,
      upsampled linearly); the displacement is ``integrate_velocity(v[None],
      int_steps)[0]`` and the inverse's ``integrate_velocity(-v[None],
      int_steps)[0]``.

    Raises:
      ValueError: as :func:`optimize_displacement`.
    """
    check_options(levels=levels, steps=steps, learning_rate=learning_rate,
                  reg_weight=reg_weight, similarity=similarity, window=window,
                  optimizer=optimizer, int_steps=int_steps,
                  velocity_factor=velocity_factor, integrate_every=integrate_every)
    opt = _transformation(optimizer, learning_rate)

    def optimize_level(moving_l, fixed_l, start, count, fixed_mask_l, moving_mask_l,
                       field_factor):
        data_gradient = _data_gradient_fn(moving_l, fixed_l, similarity, window,
                                          fixed_mask_l, moving_mask_l)
        upsample = lambda field: _to_finer(field, field_factor, fixed_l.shape)

        def anchor(variable):
            velocity = _binomial_filter(variable)
            return velocity, upsample(integrate_velocity(velocity[None], int_steps)[0])

        def gradient(variable, anchor):
            velocity = _binomial_filter(variable)
            anchor_velocity, anchor_disp = anchor
            change, upsample_adjoint = jax.vjp(upsample, velocity - anchor_velocity)
            smooth = reg_weight * grad_loss_gradient(velocity)
            if field_factor == 1:
                g = data_gradient(anchor_disp + change, smooth)
            else:
                g = upsample_adjoint(data_gradient(anchor_disp + change))[0] + smooth
            return _binomial_filter(g)  # the filter is its own adjoint

        variable = _minimise_anchored(gradient, anchor, start, opt, count, integrate_every)
        return _binomial_filter(variable)

    return _coarse_to_fine(moving, fixed, tuple(levels), tuple(steps), optimize_level,
                           fixed_mask, moving_mask,
                           per_level(velocity_factor, len(tuple(levels))))


def _minimise_anchored(gradient: Callable[[Any, Any], Any],
                       anchor_of: Callable[[Any], Any], params: Any,
                       opt: optax.GradientTransformation, steps: int, every: int) -> Any:
    """``params`` after ``steps`` updates of ``opt`` on ``gradient(params, anchor)``,
    the anchor ``anchor_of(params)`` taken anew every ``every`` steps (nested
    loops, not a conditional, so that under ``vmap`` the skipped anchors cost
    nothing)."""

    def step(_, carry):
        params, opt_state, anchor = carry
        updates, opt_state = opt.update(gradient(params, anchor), opt_state, params)
        return optax.apply_updates(params, updates), opt_state, anchor

    def block(count):
        def run(_, carry):
            params, opt_state = carry
            carry = (params, opt_state, anchor_of(params))
            return jax.lax.fori_loop(0, count, step, carry)[:2]
        return run

    carry = jax.lax.fori_loop(0, steps // every, block(every), (params, opt.init(params)))
    if steps % every:
        carry = block(steps % every)(0, carry)
    return carry[0]


def _binomial_filter(field: jax.Array) -> jax.Array:
    """``(*S, N)`` filtered by ``[1, 2, 1] / 4`` along each spatial axis (edges
    repeated)."""
    for axis in range(field.ndim - 1):
        n = field.shape[axis]
        take = functools.partial(jax.lax.slice_in_dim, field, axis=axis)
        before = jnp.concatenate([take(0, 1), take(0, n - 1)], axis)
        after = jnp.concatenate([take(1, n), take(n - 1, n)], axis)
        field = 0.5 * field + 0.25 * (before + after)
    return field
