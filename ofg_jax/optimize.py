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

import dataclasses
import functools
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import optax

from ofg_jax._shapes import check_same_spatial
from ofg_jax.models.integrate import integrate_velocity
from ofg_jax.refine import OPTIMIZERS
from ofg_jax.refine import SIMILARITIES
from ofg_jax.refine import _data_term
from ofg_jax.refine import _minimise
from ofg_jax.refine import _optimizer
from ofg_jax.refine import refine
from ofg_jax.regularizers import grad_loss
from ofg_jax.resolution import block_mean
from ofg_jax.resolution import upsample_displacement
from ofg_jax.warp import warp

Optimizer = Union[str, optax.GradientTransformation]


@dataclasses.dataclass(frozen=True)
class OptimizeSettings:
    """The options of :func:`optimize_displacement`; the defaults are the library's.

    Attributes:
      levels: pyramid factors, coarse to fine, each a multiple of the next
        (``(4, 2, 1)``: quarter, half and full resolution; a last factor above
        1 leaves the full resolution to the upsampled field).
      steps: optimiser updates at each level.
      learning_rate: step size of the named optimiser, in voxels of each level.
      reg_weight: weight of the Grad smoothness term.
      similarity: ``"ncc"`` (local NCC, any contrast) or ``"mse"``.
      window: NCC window width, in voxels of each level.
      optimizer: ``"adam"``, ``"amsgrad"`` (PyTorch semantics) or ``"sgd"``.
      diffeomorphic: optimise a stationary velocity field (no folding).
      int_steps: squarings of the velocity's integration.
    """
    levels: tuple[int, ...] = (4, 2, 1)
    steps: tuple[int, ...] = (100, 50, 20)
    learning_rate: float = 0.2
    reg_weight: float = 2.0
    similarity: str = "ncc"
    window: int = 5
    optimizer: str = "adam"
    diffeomorphic: bool = False
    int_steps: int = 7

    def options(self) -> dict:
        """The keyword options of :func:`optimize_displacement`."""
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line: ``levels 4,2,1 x steps 100,50,10, adam at 0.1, ...``."""
        join = lambda values: ",".join(map(str, values))
        mode = ("diffeomorphic (velocity, "
                f"{self.int_steps} squarings)" if self.diffeomorphic else "displacement")
        return (f"levels {join(self.levels)} x steps {join(self.steps)}, "
                f"{self.optimizer} at {self.learning_rate:g}, -{self.similarity} "
                f"(window {self.window}) + {self.reg_weight:g} Grad, {mode}")


_DEFAULTS = OptimizeSettings()


def check_options(*, levels: Sequence[int], steps: Sequence[int], learning_rate,
                  reg_weight, similarity: str, window: int, optimizer: Optimizer,
                  int_steps: int, **_) -> None:
    """Raises ``ValueError`` naming the first invalid option of
    :func:`optimize_displacement` (Python values; traced scalars are not checked)."""
    levels, steps = tuple(levels), tuple(steps)
    if not levels or len(levels) != len(steps):
        raise ValueError(f"levels {levels} and steps {steps} must be non-empty and of "
                         "the same length")
    if not all(isinstance(f, int) and f >= 1 for f in levels) or any(
            coarse <= fine or coarse % fine for coarse, fine in zip(levels, levels[1:])):
        raise ValueError(f"levels must be positive integers, coarse to fine, each a "
                         f"multiple of the next (e.g. (4, 2, 1)), got {levels}")
    if not all(isinstance(n, int) and n >= 0 for n in steps):
        raise ValueError(f"steps must be integers >= 0, got {steps}")
    for name, value in (("learning_rate", learning_rate), ("reg_weight", reg_weight)):
        if isinstance(value, (int, float)) and not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if not (isinstance(window, int) and window >= 1 and window % 2):
        raise ValueError(f"window must be a positive odd integer, got {window!r}")
    if not (isinstance(optimizer, optax.GradientTransformation) or optimizer in OPTIMIZERS):
        raise ValueError(f"optimizer must be one of {OPTIMIZERS} or an "
                         f"optax.GradientTransformation, got {optimizer!r}")
    if not (isinstance(int_steps, int) and int_steps >= 0):
        raise ValueError(f"int_steps must be an integer >= 0, got {int_steps!r}")


def _transformation(optimizer: Optimizer, learning_rate) -> optax.GradientTransformation:
    """``refine``'s optimiser named by ``optimizer`` at ``learning_rate``; a
    transformation passed as ``optimizer`` keeps its own learning rate."""
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    return _optimizer(optimizer, learning_rate, default_lr=learning_rate)


def _pyramid(image: jax.Array, levels: Sequence[int]) -> list[jax.Array]:
    """The image at each level: block means of the image edge-padded to a multiple
    of the coarsest factor (factor 1: the image itself)."""
    padded = _pad_to_multiple(image, levels[0])
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


def _coarse_to_fine(moving, fixed, levels, steps, optimize_level) -> jax.Array:
    """Runs ``optimize_level(moving_l, fixed_l, start, count)`` at each level and
    returns the last field at full resolution."""
    check_same_spatial(moving.shape, fixed.shape, "moving, fixed")
    shape = fixed.shape
    padded_shape = tuple(-(-n // levels[0]) * levels[0] for n in shape)
    level_shape = lambda f: shape if f == 1 else tuple(n // f for n in padded_shape)
    field = jnp.zeros(level_shape(levels[0]) + (len(shape),), jnp.float32)
    pyramids = zip(levels, steps, _pyramid(moving, levels), _pyramid(fixed, levels))
    for k, (factor, count, moving_l, fixed_l) in enumerate(pyramids):
        if k:
            field = _to_finer(field, levels[k - 1] // factor, level_shape(factor))
        if count:
            field = optimize_level(moving_l, fixed_l, field, count)
    return _to_finer(field, levels[-1], shape)


def optimize_displacement(moving: jax.Array, fixed: jax.Array, *,
                          levels: Sequence[int] = _DEFAULTS.levels,
                          steps: Sequence[int] = _DEFAULTS.steps,
                          learning_rate=_DEFAULTS.learning_rate,
                          reg_weight=_DEFAULTS.reg_weight,
                          similarity: str = _DEFAULTS.similarity,
                          window: int = _DEFAULTS.window,
                          optimizer: Optimizer = _DEFAULTS.optimizer,
                          diffeomorphic: bool = _DEFAULTS.diffeomorphic,
                          int_steps: int = _DEFAULTS.int_steps) -> jax.Array:
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

    Returns:
      ``(*S, N)`` float32 displacement in voxels of ``fixed``: the fixed voxel
      ``x`` takes the moving value at ``x + disp(x)`` (:func:`ofg_jax.warp`).

    Raises:
      ValueError: images of different shapes or not 2D / 3D, or an invalid
        option (named).
    """
    options = dict(levels=levels, steps=steps, learning_rate=learning_rate,
                   reg_weight=reg_weight, similarity=similarity, window=window,
                   optimizer=optimizer, int_steps=int_steps)
    if diffeomorphic:
        velocity = optimize_velocity(moving, fixed, **options)
        return integrate_velocity(velocity[None], int_steps)[0]
    check_options(**options)
    opt = _transformation(optimizer, learning_rate)
    return _coarse_to_fine(
        moving, fixed, tuple(levels), tuple(steps),
        lambda m, f, start, count: refine(m, f, start, steps=count, optimizer=opt,
                                          reg_weight=reg_weight,
                                          similarity=similarity, window=window))


def optimize_velocity(moving: jax.Array, fixed: jax.Array, *,
                      levels: Sequence[int] = _DEFAULTS.levels,
                      steps: Sequence[int] = _DEFAULTS.steps,
                      learning_rate=_DEFAULTS.learning_rate,
                      reg_weight=_DEFAULTS.reg_weight,
                      similarity: str = _DEFAULTS.similarity,
                      window: int = _DEFAULTS.window,
                      optimizer: Optimizer = _DEFAULTS.optimizer,
                      int_steps: int = _DEFAULTS.int_steps) -> jax.Array:
    """The stationary velocity field of :func:`optimize_displacement` with
    ``diffeomorphic=True``.

    At each level the optimised variable ``w`` (starting from the previous
    level's velocity) gives the velocity ``v = B(w)``, ``B`` a ``[1, 2, 1] / 4``
    filter along each axis, and the energy is ``-NCC(fixed, moving∘exp(v)) +
    reg_weight * Grad(v)`` (or MSE), ``exp`` being ``int_steps`` squarings
    (``ofg_jax.models.integrate.integrate_velocity``, VoxelMorph's ``VecInt``).
    The data term's gradient in ``v`` is taken as its gradient in the
    displacement (to first order ``exp(v + dv) = exp(v) + dv``, the update of
    log-domain demons), which spares the backward pass through the squarings;
    the filter (as SyN and demons smooth their updates) keeps the velocity
    smooth enough that its discrete exponential does not fold.

    Args:
      moving, fixed: as in :func:`optimize_displacement`.
      levels, steps, learning_rate, reg_weight: as there.
      similarity, window, optimizer, int_steps: as there.

    Returns:
      ``(*S, N)`` float32 velocity in voxels of ``fixed``; the displacement is
      ``integrate_velocity(v[None], int_steps)[0]`` and the inverse's
      ``integrate_velocity(-v[None], int_steps)[0]``.

    Raises:
      ValueError: as :func:`optimize_displacement`.
    """
    check_options(levels=levels, steps=steps, learning_rate=learning_rate,
                  reg_weight=reg_weight, similarity=similarity, window=window,
                  optimizer=optimizer, int_steps=int_steps)
    opt = _transformation(optimizer, learning_rate)

    def optimize_level(moving_l, fixed_l, start, count):
        data = _data_term(fixed_l, similarity, window)

        def energy(variable):
            velocity = _binomial_filter(variable)
            disp = integrate_velocity(velocity[None], int_steps)[0]
            disp = velocity + jax.lax.stop_gradient(disp - velocity)
            return data(warp(moving_l, disp)) + reg_weight * grad_loss(velocity)

        return _minimise(energy, _binomial_filter, start, opt, count)

    return _coarse_to_fine(moving, fixed, tuple(levels), tuple(steps), optimize_level)


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
