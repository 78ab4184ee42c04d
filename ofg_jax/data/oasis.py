"""OASIS brain MRI (Learn2Reg task 3) in the TransMorph ``.pkl`` release: subject -> subject."""

import os

import numpy as np

from ofg_jax.data import readers
from ofg_jax.data.base import (Pair, PairList, RegistrationData, check_grid, data_root,
                               random_partners, reference_subset)
from ofg_jax.volumes import as_image, as_labels

LAYOUT = """\
  ROOT/Train/*.pkl      (image, seg) per training subject
  ROOT/Val/*.pkl        (x, y, x_seg, y_seg) per validation pair, x moving, y fixed
  ROOT/Test/*.pkl       optional, the same per test pair (else the test split is Val)"""

LABELS = tuple(range(1, 36))


class OASIS(RegistrationData):
    """Subject -> subject with a random partner per epoch, trained in both directions.

    The plan of an epoch visits the training subjects in shuffled order; subject ``a``
    draws a partner ``b != a`` and contributes two consecutive items, ``a -> b`` then
    ``b -> a``, so an epoch has twice as many items as subjects. The reference's
    subsets: ``num_train`` of the sorted ``Train/*.pkl`` (the paper: 200) and
    ``num_val`` of the validation pairs (all 19 of Learn2Reg's), each
    ``random.Random(split_seed).sample``-d and sorted. The test split is
    ``Test/*.pkl`` when present, else the Learn2Reg validation pairs. A pair file
    ``p_<A>_<B>.pkl`` is named ``<A>_<B>``: Learn2Reg's ``<fixed>_<moving>`` in
    TransMorph's release, so ``evaluate --save-fields`` writes ``disp_<A>_<B>``.
    """

    name = "oasis"
    labels = LABELS

    @classmethod
    def from_config(cls, config, seed):
        return cls(data_root(config, "OASIS"), img_size=config.get("img_size"),
                   num_train=cls.num_train(config), **cls.common_options(config, seed))

    def __init__(self, root: str, *, seed: int, augment: bool, num_val: int,
                 num_train: int = 0, split_seed: int = 42, img_size=None):
        super().__init__(seed=seed, augment=augment, num_val=num_val,
                         split_seed=split_seed)
        readers.require_dir(root, "OASIS data root", LAYOUT)
        self.root = root
        self.train_paths = reference_subset(
            readers.list_files(os.path.join(root, "Train"), ".pkl", "OASIS Train",
                               LAYOUT), num_train, split_seed, "OASIS training subjects")
        if len(self.train_paths) < 2:
            raise ValueError(f"OASIS needs at least 2 training subjects in "
                             f"{os.path.join(root, 'Train')}, found {len(self.train_paths)}")
        self.val_paths = readers.list_files(os.path.join(root, "Val"), ".pkl", "OASIS Val",
                                            LAYOUT)
        self._grid_source = self.train_paths[0]
        self.img_size = tuple(self._read_image(self.train_paths[0]).shape)
        if img_size and tuple(img_size) != self.img_size:
            raise ValueError(f"data.img_size {tuple(img_size)} does not match the shape "
                             f"{self.img_size} of {self._grid_source}")

    def _read_image(self, path: str) -> np.ndarray:
        image, _ = readers.read_pkl(path, 2)
        return as_image(image, path)

    def _plan_pairs(self, rng):
        order = rng.permutation(len(self.train_paths))
        partners = random_partners(rng, len(self.train_paths))
        keys = [os.path.relpath(p, self.root) for p in self.train_paths]
        plan = []
        for a in order:
            b = partners[a]
            plan += [(keys[a], keys[b]), (keys[b], keys[a])]
        return plan

    def _load_image(self, key):
        path = os.path.join(self.root, key)
        image = self._read_image(path)
        check_grid(image, path, self.img_size, self._grid_source)
        return image

    @staticmethod
    def _pair_name(path: str) -> str:
        stem = os.path.splitext(os.path.basename(path))[0]
        return stem[2:] if stem.startswith("p_") else stem

    def _val_names(self):
        return [self._pair_name(p) for p in self.val_paths]

    def _load_val_pair(self, index):
        return self._read_pair(self.val_paths[index])

    def _test_paths(self) -> list[str]:
        if os.path.isdir(os.path.join(self.root, "Test")):
            return readers.list_files(os.path.join(self.root, "Test"), ".pkl",
                                      "OASIS Test", LAYOUT)
        return self.val_paths

    def test_pairs(self):
        paths = self._test_paths()
        return PairList([self._pair_name(p) for p in paths],
                        lambda i: self._read_pair(paths[i]))

    def split_files(self):
        key = lambda path: os.path.relpath(path, self.root)
        val = dict(zip(self._val_names(), self.val_paths))
        return {"train": [key(p) for p in self.train_paths],
                "val": [key(val[name]) for name in self.val_pairs().names],
                "test": [key(p) for p in self._test_paths()]}

    def _read_pair(self, path: str) -> Pair:
        x, y, x_seg, y_seg = readers.read_pkl(path, 4)
        x, y = as_image(x, path, "moving image x"), as_image(y, path, "fixed image y")
        x_seg = as_labels(x_seg, path, "moving segmentation x_seg")
        y_seg = as_labels(y_seg, path, "fixed segmentation y_seg")
        for what, volume in (("x", x), ("y", y), ("x_seg", x_seg), ("y_seg", y_seg)):
            check_grid(volume, f"{path} ({what})", self.img_size, self._grid_source)
        return Pair(self._pair_name(path), x, y, x_seg, y_seg)
