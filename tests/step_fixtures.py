"""Stand-in networks and batches for the train-step tests: the step works with any
flax module that maps ``(B, *S, 2)`` to ``(B, *S, 3)``."""

import flax.linen as nn
import numpy as np


class TinyNet(nn.Module):
    """Two 3D convolutions with dropout in between (none with ``dropout=0``)."""

    dropout: float = 0.2

    @nn.compact
    def __call__(self, x, train=False):
        h = nn.leaky_relu(nn.Conv(4, (3, 3, 3))(x), 0.2)
        if self.dropout:
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return nn.Conv(3, (3, 3, 3), kernel_init=nn.initializers.normal(0.1))(h)


def random_batch(rng, batch, size):
    """Smooth random moving and fixed images ``(batch, *size)`` in [0, 1]."""
    shape = (batch,) + tuple(size)
    smooth = lambda x: (x + np.roll(x, 1, 1) + np.roll(x, 1, 2) + np.roll(x, 1, 3)) / 4
    return {"moving": smooth(rng.random(shape)).astype(np.float32),
            "fixed": smooth(rng.random(shape)).astype(np.float32)}
