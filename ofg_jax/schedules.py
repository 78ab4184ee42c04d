"""Learning rates by epoch: the reference's polynomial decay, as optax schedules.

The reference changes both learning rates (the model's and the inner
optimiser's) once per epoch. The train step derives the epoch from the update
count, so one compiled step serves the whole run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def poly_lr(lr0: float, epoch, max_epoch: int):
    """The reference's polynomial decay: ``round(lr0 * (1 - epoch/max_epoch)**0.9, 8)``.

    Works on Python numbers and on traced arrays (``epoch`` may be traced).
    """
    lr = lr0 * (1.0 - epoch / max_epoch) ** 0.9
    if isinstance(lr, float):
        return round(lr, 8)
    return jnp.round(lr, 8)


def epoch_lr_table(lr0: float, epochs: int) -> np.ndarray:
    """``(epochs,)`` float32: ``poly_lr(lr0, e, epochs)`` for every epoch ``e``."""
    return np.asarray([poly_lr(lr0, epoch, epochs) for epoch in range(epochs)],
                      np.float32)


def epoch_of_step(step: jax.Array, steps_per_epoch: int, epochs: int) -> jax.Array:
    """0-based epoch of the update with 0-based index ``step``, clipped to the last."""
    return jnp.minimum(step // steps_per_epoch, epochs - 1)


def make_lr_schedule(lr0: float, epochs: int, steps_per_epoch: int) -> optax.Schedule:
    """An optax schedule of the update count that holds ``poly_lr`` per epoch."""
    table = jnp.asarray(epoch_lr_table(lr0, epochs))
    return lambda count: table[epoch_of_step(count, steps_per_epoch, epochs)]
