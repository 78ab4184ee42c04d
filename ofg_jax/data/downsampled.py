"""Half-resolution training (``data.downsample``): a dataset seen through block means.

The training images are the dataset's, block-averaged by ``factor`` on every axis
(labels are not needed in training), so the network is built for, and the inner
OFG optimisation runs on, the coarse grid. Validation and test pairs stay at full
resolution: the evaluation predicts from block means and upsamples the
displacement (``ofg_jax.registration.network.predict``), so its Dice, folding and SDlogJ
compare with full-resolution runs.
"""

import numpy as np

from ofg_jax.data.base import RegistrationData
from ofg_jax.resolution import block_mean


class Downsampled(RegistrationData):
    """``data`` with its training images block-averaged by ``factor``.

    Attributes:
      img_size: the coarse grid, the network's.
      downsample: ``factor``.
      full_size: the dataset's grid, that of the validation and test pairs.
    """

    def __init__(self, data: RegistrationData, factor: int):
        if int(factor) != factor or factor < 1:
            raise ValueError(f"data.downsample must be a positive integer, got {factor!r}")
        if any(n % factor for n in data.img_size):
            raise ValueError(f"data.downsample={factor} needs every axis of the grid "
                             f"{tuple(data.img_size)} divisible by it")
        self._data = data
        self.downsample = int(factor)
        self.name, self.labels, self.dice_over = data.name, data.labels, data.dice_over
        self.img_size = tuple(n // factor for n in data.img_size)
        self.seed, self.augment = data.seed, data.augment

    @classmethod
    def from_config(cls, config, seed):
        raise TypeError("built by ofg_jax.data.create from data.downsample")

    def train_plan(self, epoch):
        return self._data.train_plan(epoch)

    def load_train(self, item):
        pair = self._data.load_train(item)
        return {key: block_mean(np.asarray(value, np.float32), self.downsample)
                for key, value in pair.items()}

    def val_pairs(self):
        return self._data.val_pairs()

    def test_pairs(self):
        return self._data.test_pairs()

    def split_files(self):
        return self._data.split_files()

    def verify(self, progress=None, workers: int = 4) -> int:
        return self._data.verify(progress, workers)

    # The wrapped dataset does the loading; these are never called.
    def _plan_pairs(self, rng):
        raise NotImplementedError

    def _load_image(self, key):
        raise NotImplementedError

    def _val_names(self):
        return self._data._val_names()  # pylint: disable=protected-access

    def _load_val_pair(self, index):
        raise NotImplementedError
