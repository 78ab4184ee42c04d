"""What every dataset provides: a deterministic training plan, pair loading, validation pairs.

A dataset is a table of volumes addressed by string keys (``"atlas"``,
``"Train/subject_07.pkl"``, ...). The training plan of an epoch is a list of
:class:`TrainItem` descriptors (moving key, fixed key, flips) computed from
``(seed, epoch)`` alone, so it is cheap and can be recomputed to resume training
mid-epoch. Volumes are only read by :meth:`RegistrationData.load_train` and when a
validation :class:`Pair` is indexed.

Loading is thread-safe: loaders keep no mutable state apart from small caches
guarded by a lock.
"""

import abc
import collections.abc
import concurrent.futures
import dataclasses
import functools
import logging
import os
import random
import threading
from typing import Any, Callable, Hashable, Optional, Sequence

import numpy as np


DEMO_HINT = ("To try the code without any data, use the built-in synthetic phantom: "
             "--config=configs/demo.py")


@dataclasses.dataclass(frozen=True)
class Pair:
    """A validation pair. Images ``float32 (*S)``, segmentations ``int32 (*S)``."""

    name: str
    moving: np.ndarray
    fixed: np.ndarray
    moving_seg: np.ndarray
    fixed_seg: np.ndarray


@dataclasses.dataclass(frozen=True)
class TrainItem:
    """One training sample of a plan: register volume ``moving`` to ``fixed``.

    ``flip[k]`` says whether array axis ``k`` of both images is reversed.
    """

    moving: str
    fixed: str
    flip: tuple[bool, bool, bool] = (False, False, False)


class PairList(collections.abc.Sequence):
    """Validation pairs loaded on access: ``pairs[i]`` reads pair ``i`` from disk.

    Nothing is cached, so iterating over the list holds one pair in memory at a time.
    """

    def __init__(self, names: Sequence[str], load: Callable[[int], Pair]):
        self._names = tuple(names)
        self._load = load

    @property
    def names(self) -> tuple[str, ...]:
        """Pair names, in order, without loading anything."""
        return self._names

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"pair index {index} out of range for {len(self)} pairs")
        return self._load(index % len(self))

    def __repr__(self) -> str:
        return f"PairList({len(self)} pairs)"


def plan_rng(seed: int, epoch: int) -> np.random.Generator:
    """The random stream of one epoch's plan; depends on ``(seed, epoch)`` only."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    return np.random.default_rng([int(seed), int(epoch)])


def random_partners(rng: np.random.Generator, num: int) -> np.ndarray:
    """For each of ``num`` subjects, the index of a uniformly drawn *other* subject."""
    if num < 2:
        raise ValueError(f"pairing subjects needs at least 2 of them, got {num}")
    offsets = rng.integers(1, num, size=num)
    return (np.arange(num) + offsets) % num


def apply_flip(volume: np.ndarray, flip: Sequence[bool]) -> np.ndarray:
    """Reverses the array axes of ``volume (*S)`` where ``flip`` is true."""
    axes = tuple(k for k, f in enumerate(flip) if f)
    return np.ascontiguousarray(np.flip(volume, axes)) if axes else volume


def check_grid(volume: np.ndarray, path: str, grid: tuple[int, ...], grid_source: str
               ) -> None:
    """Raises ``ValueError`` naming both shapes and files if ``volume`` is off the grid."""
    if tuple(volume.shape) != tuple(grid):
        raise ValueError(
            f"volume shape {tuple(volume.shape)} of {path} does not match the dataset "
            f"grid {tuple(grid)} (from {grid_source})")


def read_only(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Marks cached arrays read-only, so no caller can change them for the others."""
    for a in arrays:
        a.flags.writeable = False
    return arrays


def reference_subset(items: Sequence[str], n: int, seed: int, what: str) -> list[str]:
    """The reference's subset of ``n`` items: ``random.seed(seed)`` and
    ``random.sample(sorted(items), n)``, sorted again; all items when ``n`` is 0
    or not smaller than their number (logged when fewer than ``n``)."""
    items = sorted(items)
    if n == 0 or n >= len(items):
        if n > len(items):
            logging.info("%s: %d asked for, %d available: using all", what, n,
                         len(items))
        return items
    return sorted(random.Random(seed).sample(items, n))


def data_root(config: Any, what: str) -> str:
    """``data.root`` with ``~`` expanded; a ``ValueError`` if it is not set."""
    root = config.get("root") or ""
    if not root:
        raise ValueError(f"data.root must name the {what} data folder. {DEMO_HINT}")
    return os.path.expanduser(str(root))


class RegistrationData(abc.ABC):
    """Base class of the datasets: subclasses provide the volumes and the pairing.

    A dataset is built from the ``data`` section of a training config by its
    :meth:`from_config`; ``ofg_jax.data.DATASETS`` maps ``data.name`` to the class.

    Attributes:
      name: dataset name (``"ixi"``, ``"synthetic"``, ...).
      img_size: ``(D, H, W)`` grid of every volume.
      labels: label values whose Dice is averaged in validation.
      dice_over: how a pair's Dice averages the labels
        (``ofg_jax.training.scoring.DICE_OVER``): the reference's definition for the
        dataset.
      downsample: the factor by which the training images are block-averaged
        (``data.downsample``, ``ofg_jax.data.downsampled``); ``img_size`` is then
        the coarse grid and ``full_size`` that of the validation and test pairs.
    """

    name: str
    img_size: tuple[int, int, int]
    labels: tuple[int, ...]
    dice_over: str = "labels"
    downsample: int = 1

    @property
    def full_size(self) -> tuple[int, ...]:
        """The grid of the validation and test pairs."""
        return tuple(n * self.downsample for n in self.img_size)

    def __init__(self, *, seed: int, augment: bool, num_val: int, split_seed: int = 42):
        if int(num_val) < 0:
            raise ValueError(f"data.num_val must be >= 0 (0 = all pairs), got {num_val}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.seed = int(seed)
        self.augment = bool(augment)
        self.num_val = int(num_val)
        self.split_seed = int(split_seed)
        self._cache_lock = threading.Lock()
        self._cache = {}

    @staticmethod
    def common_options(config: Any, seed: int) -> dict[str, Any]:
        """The constructor arguments every dataset takes: ``seed``, ``augment``,
        ``num_val``, ``split_seed`` (``data.*`` keys; absent = off / all / 42)."""
        split_seed = config.get("split_seed")
        return dict(seed=int(seed), augment=bool(config.get("augment") or False),
                    num_val=int(config.get("num_val") or 0),
                    split_seed=42 if split_seed is None else int(split_seed))

    @staticmethod
    def num_train(config: Any) -> int:
        """``data.num_train``: training subjects to use, 0 (or absent) = all."""
        n = int(config.get("num_train") or 0)
        if n < 0:
            raise ValueError(f"data.num_train must be >= 0 (0 = all), got {n}")
        return n

    # --- what a dataset implements -------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def from_config(cls, config: Any, seed: int) -> "RegistrationData":
        """The dataset of the ``data`` config section; ``seed`` orders the plans."""

    @abc.abstractmethod
    def _plan_pairs(self, rng: np.random.Generator) -> list[tuple[str, str]]:
        """This epoch's ``(moving key, fixed key)`` pairs, in training order."""

    @abc.abstractmethod
    def _load_image(self, key: str) -> np.ndarray:
        """The ``float32 (*img_size)`` image with this key, checked against the grid."""

    @abc.abstractmethod
    def _val_names(self) -> list[str]:
        """Names of all validation pairs, in a fixed order."""

    @abc.abstractmethod
    def _load_val_pair(self, index: int) -> Pair:
        """Validation pair ``index`` of :meth:`_val_names`."""

    @abc.abstractmethod
    def test_pairs(self) -> PairList:
        """The held-out pairs of the evaluation command.

        Raises:
          FileNotFoundError: the dataset has no test split (named).
        """

    @abc.abstractmethod
    def split_files(self) -> dict[str, list[str]]:
        """``{"train", "val", "test"}``: the files (relative to ``data.root``) of
        the subjects or pairs each split uses; ``test`` is empty without one."""

    # --- the public interface ------------------------------------------------------

    def train_plan(self, epoch: int) -> list[Hashable]:
        """Descriptors (:class:`TrainItem`) of this epoch's training samples, in order.

        Computed from ``(seed, epoch)`` only; nothing is loaded. Flips are drawn per
        item (each axis with probability 1/2) when ``augment`` is on.
        """
        rng = plan_rng(self.seed, epoch)
        pairs = self._plan_pairs(rng)
        if self.augment:
            flips = [tuple(bool(f) for f in row) for row in rng.random((len(pairs), 3)) < 0.5]
        else:
            flips = [(False, False, False)] * len(pairs)
        return [TrainItem(m, f, flip) for (m, f), flip in zip(pairs, flips)]

    def num_train_items(self, epoch: int) -> int:
        """``len(train_plan(epoch))``."""
        return len(self.train_plan(epoch))

    def load_train(self, item: TrainItem) -> dict[str, np.ndarray]:
        """``{"moving", "fixed"}``: ``float32 (*img_size)`` images, flips applied."""
        if not isinstance(item, TrainItem):
            raise TypeError(f"expected a TrainItem from train_plan(), got {item!r}")
        moving = self._load_image(item.moving)
        fixed = self._load_image(item.fixed)
        return {"moving": apply_flip(moving, item.flip), "fixed": apply_flip(fixed, item.flip)}

    def val_pairs(self) -> PairList:
        """The validation pairs: the reference's subset of ``num_val`` of them
        (:func:`reference_subset` of the names), or all when it is 0.

        Returned as a :class:`PairList`: a sequence that reads each pair from disk
        when it is indexed or iterated, so the whole set is never held in memory.
        """
        names = self._val_names()
        chosen = reference_subset(names, self.num_val, self.split_seed,
                                  f"{self.name} validation pairs")
        index = {name: i for i, name in enumerate(names)}
        return PairList(chosen, lambda i: self._load_val_pair(index[chosen[i]]))

    def verify(self, progress: Optional[Callable[[int], Any]] = None,
               workers: int = 4) -> int:
        """Reads every volume of training and validation once, checking it.

        The loaders' checks apply: readable files, 3D volumes on the dataset's
        grid, finite intensities, known label codes. Files are read on
        ``workers`` threads; ``progress(1)`` is called after each.

        Returns:
          The number of volumes (or pairs) read.

        Raises:
          FileNotFoundError, ValueError: the first bad file, named.
        """
        keys = sorted({key for item in self.train_plan(0)
                       for key in (item.moving, item.fixed)})
        jobs = [functools.partial(self._load_image, key) for key in keys]
        jobs += [functools.partial(self._load_val_pair, i)
                 for i in range(len(self.val_pairs()))]
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for future in concurrent.futures.as_completed(
                    [pool.submit(job) for job in jobs]):
                future.result()
                if progress is not None:
                    progress(1)
        return len(jobs)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, img_size={self.img_size}, "
                f"{len(self.labels)} labels, {len(self._val_names())} val pairs)")

    # --- helpers for subclasses ----------------------------------------------------

    def _cached(self, key: Hashable, compute: Callable[[], object]):
        """``compute()`` once per key, shared by all threads."""
        with self._cache_lock:
            if key not in self._cache:
                self._cache[key] = compute()
            return self._cache[key]
