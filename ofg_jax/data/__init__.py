"""Registration datasets: ``create(config, seed)`` builds one from the ``data`` config.

Every dataset is a :class:`RegistrationData`: a deterministic per-epoch training plan
(:meth:`~RegistrationData.train_plan`), loading of a planned pair
(:meth:`~RegistrationData.load_train`) and the validation pairs
(:meth:`~RegistrationData.val_pairs`). See ``README_DATA.md`` for the file layouts.
"""

import os

from ofg_jax.data import phantom
from ofg_jax.data.abdomen_ct import AbdomenCT
from ofg_jax.data.base import DEMO_HINT, Pair, PairList, RegistrationData, TrainItem
from ofg_jax.data.ixi import IXI
from ofg_jax.data.lpba import LPBA
from ofg_jax.data.oasis import OASIS
from ofg_jax.data.synthetic import Synthetic

NAMES = ("synthetic", "ixi", "oasis", "lpba", "abdomen_ct")

__all__ = ["AbdomenCT", "IXI", "LPBA", "NAMES", "OASIS", "Pair", "PairList",
           "RegistrationData", "Synthetic", "TrainItem", "create"]


def _get(config, key: str, default=None):
    value = config.get(key, default)
    return default if value is None else value


def _root(config, name: str) -> str:
    root = _get(config, "root", "")
    if not root:
        raise ValueError(f"data.root must name the {name} data folder. {DEMO_HINT}")
    return os.path.expanduser(str(root))


def create(config, seed: int) -> RegistrationData:
    """Builds the dataset described by the ``data`` section of a training config.

    Args:
      config: ``ml_collections.ConfigDict`` (or dict) with ``name``, ``root``,
        ``num_val`` and ``augment``, plus the dataset-specific keys described in
        ``README_DATA.md``.
      seed: seed of the training plans (shuffling, partners, flips).

    Returns:
      The dataset. Only cheap checks of the layout happen here; volumes are read
      when they are loaded.
    """
    name = _get(config, "name", "")
    common = dict(seed=int(seed), augment=bool(_get(config, "augment", False)),
                  num_val=int(_get(config, "num_val", 0)))
    img_size = _get(config, "img_size", None)
    if name == "synthetic":
        if img_size is None or _get(config, "num_train", None) is None:
            raise ValueError("the synthetic dataset needs data.img_size (3 ints) and "
                             "data.num_train")
        defaults_d, defaults_a = phantom.Deformation(), phantom.Appearance()
        deformation = phantom.Deformation(
            warp=float(_get(config, "warp_rms", defaults_d.warp)),
            scale=float(_get(config, "scale_std", defaults_d.scale)),
            shift=float(_get(config, "shift_std", defaults_d.shift)))
        appearance = phantom.Appearance(
            noise=float(_get(config, "noise_std", defaults_a.noise)),
            bias=float(_get(config, "bias_std", defaults_a.bias)))
        return Synthetic(img_size=img_size, num_train=int(config.get("num_train")),
                         val_subjects=int(_get(config, "val_subjects", 4)),
                         phantom_seed=int(_get(config, "phantom_seed", 0)),
                         deformation=deformation, appearance=appearance, **common)
    if name == "ixi":
        return IXI(_root(config, "IXI"), img_size=img_size, **common)
    if name == "oasis":
        return OASIS(_root(config, "OASIS"), img_size=img_size, **common)
    if name == "lpba":
        return LPBA(_root(config, "LPBA40"), img_size=img_size, **common)
    if name == "abdomen_ct":
        pairs_json = os.path.expanduser(str(_get(config, "pairs_json", "")))
        return AbdomenCT(_root(config, "Abdomen CT"), pairs_json=pairs_json,
                         img_size=img_size, **common)
    raise ValueError(f"unknown dataset data.name={name!r}; valid names: {', '.join(NAMES)}")
