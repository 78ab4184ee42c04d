"""Registration datasets: ``create(config, seed)`` builds one from the ``data`` config.

Every dataset is a :class:`RegistrationData`: a deterministic per-epoch training plan
(:meth:`~RegistrationData.train_plan`), loading of a planned pair
(:meth:`~RegistrationData.load_train`) and the validation pairs
(:meth:`~RegistrationData.val_pairs`). The file layouts are in the guide ``docs/datasets.md``.
A new dataset is one module with a ``RegistrationData`` subclass and one line in
:data:`DATASETS`.
"""

from typing import Any

from ofg_jax.data.abdomen_ct import AbdomenCT
from ofg_jax.data.base import DEMO_HINT, Pair, PairList, RegistrationData, TrainItem
from ofg_jax.data.downsampled import Downsampled
from ofg_jax.data.ixi import IXI
from ofg_jax.data.lpba import LPBA
from ofg_jax.data.oasis import OASIS
from ofg_jax.data.synthetic import Synthetic

DATASETS = {"synthetic": Synthetic, "ixi": IXI, "oasis": OASIS, "lpba": LPBA,
            "abdomen_ct": AbdomenCT}
NAMES = tuple(DATASETS)

__all__ = ["AbdomenCT", "DATASETS", "DEMO_HINT", "IXI", "LPBA", "NAMES", "OASIS", "Pair",
           "PairList", "RegistrationData", "Synthetic", "TrainItem", "create"]


def create(config: Any, seed: int) -> RegistrationData:
    """Builds the dataset described by the ``data`` section of a training config.

    Args:
      config: ``ml_collections.ConfigDict`` (or dict) with ``name`` and the keys
        described in ``docs/datasets.md``.
      seed: seed of the training plans (shuffling, partners, flips).

    Returns:
      The dataset (with ``data.downsample > 1``, seen through block means,
      ``ofg_jax.data.downsampled``). Only cheap checks of the layout happen here;
      volumes are read when they are loaded.
    """
    name = config.get("name") or ""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset data.name={name!r}; valid names: "
                         f"{', '.join(NAMES)}")
    data = DATASETS[name].from_config(config, seed)
    factor = config.get("downsample") or 1
    return Downsampled(data, factor) if factor != 1 else data
