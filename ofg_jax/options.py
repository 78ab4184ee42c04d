"""The options of registration by optimisation, with no JAX.

The similarity and optimiser names that :func:`ofg_jax.refine` takes
(:data:`SIMILARITIES`, :data:`OPTIMIZERS`) and the settings of optimisation
alone (:class:`OptimizeSettings`, :func:`check_options`; the options of
``ofg_jax.optimize.optimize_displacement``, which re-exports both). Python
values only, so that a command line (``python -m ofg_jax.register``) defines
and checks its flags before it imports JAX.
"""

import dataclasses
from typing import Any, Optional, Sequence, Union

SIMILARITIES = ("ncc", "mse")
OPTIMIZERS = ("amsgrad", "adam", "sgd")


@dataclasses.dataclass(frozen=True)
class OptimizeSettings:
    """The options of ``ofg_jax.optimize.optimize_displacement``; the defaults are
    the library's.

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
      velocity_factor: with ``diffeomorphic``, per level (or one for all), the
        velocity lives on a grid this many times coarser than the level's
        images (1: the level's own grid); during the optimisation its
        exponential is taken there and upsampled. None: 2 at every level but
        the last, 1 at the last (:func:`per_level`).
      integrate_every: with ``diffeomorphic``, the velocity's exponential is
        taken anew every this many optimiser steps; in between, the
        displacement is the last exponential plus the velocity's change (to
        first order, the gradient's own approximation). The result is the
        exponential of the final velocity whatever this is.
    """
    levels: tuple[int, ...] = (4, 2, 1)
    steps: tuple[int, ...] = (200, 100, 20)
    learning_rate: float = 0.1
    reg_weight: float = 1.0
    similarity: str = "ncc"
    window: int = 5
    optimizer: str = "adam"
    diffeomorphic: bool = True
    int_steps: int = 7
    velocity_factor: Optional[Union[int, tuple[int, ...]]] = None
    integrate_every: int = 5

    def options(self) -> dict:
        """The keyword options of ``ofg_jax.optimize.optimize_displacement``."""
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line: ``levels 4,2,1 x steps 100,50,10, adam at 0.1, ...``."""
        join = lambda values: ",".join(map(str, values))
        factors = per_level(self.velocity_factor, len(self.levels))
        grid = ("" if set(factors) == {1} else
                f" on grids {join(factors)} times coarser than the levels")
        mode = (f"diffeomorphic (velocity{grid}, {self.int_steps} squarings every "
                f"{self.integrate_every} steps)"
                if self.diffeomorphic else "displacement")
        return (f"levels {join(self.levels)} x steps {join(self.steps)}, "
                f"{self.optimizer} at {self.learning_rate:g}, -{self.similarity} "
                f"(window {self.window}) + {self.reg_weight:g} Grad, {mode}")


def check_options(*, levels: Sequence[int], steps: Sequence[int], learning_rate,
                  reg_weight, similarity: str, window: int, optimizer: Any,
                  int_steps: int, velocity_factor: Any = None, integrate_every: int = 1,
                  **_) -> None:
    """Raises ``ValueError`` naming the first invalid option of
    ``ofg_jax.optimize.optimize_displacement`` (Python values; traced scalars are
    not checked)."""
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
    if not (isinstance(optimizer, str) and optimizer in OPTIMIZERS
            or _is_transformation(optimizer)):
        raise ValueError(f"optimizer must be one of {OPTIMIZERS} or an "
                         f"optax.GradientTransformation, got {optimizer!r}")
    if not (isinstance(int_steps, int) and int_steps >= 0):
        raise ValueError(f"int_steps must be an integer >= 0, got {int_steps!r}")
    if not (isinstance(integrate_every, int) and integrate_every >= 1):
        raise ValueError(f"integrate_every must be an integer >= 1, got {integrate_every!r}")
    factors = per_level(velocity_factor, len(levels))
    grids = [level * f for level, f in zip(levels, factors)] if all(
        isinstance(f, int) and f >= 1 for f in factors) else []
    if len(factors) != len(levels) or len(grids) != len(levels) or any(
            coarse % fine for coarse, fine in zip(grids, grids[1:])):
        raise ValueError(
            f"velocity_factor must be an integer >= 1 or one per level, each level's "
            f"factor times the level's a multiple of the next level's (e.g. (2, 2, 1) "
            f"for levels (4, 2, 1)), got {velocity_factor!r}")


def per_level(velocity_factor: Any, count: int) -> tuple:
    """The velocity factor of each of ``count`` levels: ``velocity_factor`` itself
    if a sequence, else repeated; None: 2 at every level but the last, 1 there
    (the velocity's resolution where the fine details are fitted, half of it
    where the coarse shape is)."""
    if velocity_factor is None:
        return (2,) * (count - 1) + (1,)
    if isinstance(velocity_factor, (tuple, list)):
        return tuple(velocity_factor)
    return (velocity_factor,) * count


def _is_transformation(value: Any) -> bool:
    """Whether ``value`` is an ``optax.GradientTransformation`` (optax, and with it
    JAX, is imported only for a value that is not an optimiser's name)."""
    if isinstance(value, str):
        return False
    import optax  # pylint: disable=g-import-not-at-top
    return isinstance(value, optax.GradientTransformation)
