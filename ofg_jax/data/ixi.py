"""IXI brain MRI in the TransMorph ``.pkl`` release: atlas -> subject registration."""

import os

import numpy as np

from ofg_jax.data import readers
from ofg_jax.data.base import (Pair, PairList, RegistrationData, check_grid, data_root,
                               read_only, reference_subset)
from ofg_jax.volumes import as_image, as_labels

LAYOUT = """\
  ROOT/atlas.pkl        (image, seg), the moving image of every pair
  ROOT/Train/*.pkl      (image, seg) per training subject (the fixed images)
  ROOT/Val/*.pkl        (image, seg) per validation subject
  ROOT/Test/*.pkl       (image, seg) per test subject (python -m ofg_jax.evaluate)"""

# FreeSurfer label codes of the IXI segmentations; a code's index in this table is
# the label used for Dice.
FREESURFER_CODES = (0, 2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 26, 28,
                    30, 31, 41, 42, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54, 58, 60, 62, 63,
                    72, 77, 80, 85, 251, 252, 253, 254, 255)
LABELS = (1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18, 20, 21, 22, 23, 25, 26,
          27, 28, 29, 30, 31, 32, 34, 36)


def freesurfer_to_index(seg: np.ndarray, path: str) -> np.ndarray:
    """Maps FreeSurfer codes ``int (*S)`` to table indices 0..45; unknown codes raise."""
    lut = np.full(max(FREESURFER_CODES) + 1, -1, dtype=np.int32)
    lut[list(FREESURFER_CODES)] = np.arange(len(FREESURFER_CODES), dtype=np.int32)
    in_range = (seg >= 0) & (seg < lut.size)
    mapped = np.where(in_range, lut[np.clip(seg, 0, lut.size - 1)], -1)
    if np.any(mapped < 0):
        unknown = np.unique(seg[mapped < 0])[:10].tolist()
        raise ValueError(f"segmentation in {path} holds labels {unknown} that are not "
                         f"FreeSurfer codes of the IXI table {FREESURFER_CODES}")
    return mapped


class IXI(RegistrationData):
    """Atlas (moving) -> subject (fixed). Each training subject once per epoch, shuffled.

    The reference's subsets: ``num_train`` of the sorted ``Train/*.pkl`` and
    ``num_val`` of the sorted ``Val/*.pkl``, each ``random.Random(split_seed)
    .sample``-d and sorted again (the paper: 200 and 20); the test split is
    every ``Test/*.pkl``.
    """

    name = "ixi"
    labels = LABELS

    @classmethod
    def from_config(cls, config, seed):
        return cls(data_root(config, "IXI"), img_size=config.get("img_size"),
                   num_train=cls.num_train(config), **cls.common_options(config, seed))

    def __init__(self, root: str, *, seed: int, augment: bool, num_val: int,
                 num_train: int = 0, split_seed: int = 42, img_size=None):
        super().__init__(seed=seed, augment=augment, num_val=num_val,
                         split_seed=split_seed)
        readers.require_dir(root, "IXI data root", LAYOUT)
        self.root = root
        self.atlas_path = readers.require_file(os.path.join(root, "atlas.pkl"), "IXI atlas",
                                               LAYOUT)
        self.train_paths = reference_subset(
            readers.list_files(os.path.join(root, "Train"), ".pkl", "IXI Train", LAYOUT),
            num_train, split_seed, "IXI training subjects")
        self.val_paths = readers.list_files(os.path.join(root, "Val"), ".pkl", "IXI Val",
                                            LAYOUT)
        atlas, _ = self._atlas()
        self.img_size = tuple(atlas.shape)
        self._grid_source = self.atlas_path
        if img_size and tuple(img_size) != self.img_size:
            raise ValueError(f"data.img_size {tuple(img_size)} does not match the shape "
                             f"{self.img_size} of {self.atlas_path}")

    def _key(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def _read(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        image, seg = readers.read_pkl(path, 2)
        image = as_image(image, path)
        seg = freesurfer_to_index(as_labels(seg, path), path)
        if seg.shape != image.shape:
            raise ValueError(f"segmentation shape {seg.shape} differs from image shape "
                             f"{image.shape} in {path}")
        return image, seg

    def _atlas(self) -> tuple[np.ndarray, np.ndarray]:
        return self._cached("atlas", lambda: read_only(*self._read(self.atlas_path)))

    def _read_subject(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        image, seg = self._read(path)
        check_grid(image, path, self.img_size, self._grid_source)
        return image, seg

    def _plan_pairs(self, rng):
        order = rng.permutation(len(self.train_paths))
        return [("atlas", self._key(self.train_paths[i])) for i in order]

    def _load_image(self, key):
        if key == "atlas":
            return self._atlas()[0]
        return self._read_subject(os.path.join(self.root, key))[0]

    def _val_names(self):
        return [os.path.splitext(os.path.basename(p))[0] for p in self.val_paths]

    def _load_val_pair(self, index):
        return self._atlas_pair(self.val_paths[index])

    def _atlas_pair(self, path: str) -> Pair:
        atlas, atlas_seg = self._atlas()
        image, seg = self._read_subject(path)
        return Pair(os.path.splitext(os.path.basename(path))[0], atlas, image, atlas_seg,
                    seg)

    def _test_paths(self) -> list[str]:
        return readers.list_files(os.path.join(self.root, "Test"), ".pkl", "IXI Test",
                                  LAYOUT)

    def test_pairs(self):
        paths = self._test_paths()
        return PairList([os.path.splitext(os.path.basename(p))[0] for p in paths],
                        lambda i: self._atlas_pair(paths[i]))

    def split_files(self):
        val = {os.path.splitext(os.path.basename(p))[0]: p for p in self.val_paths}
        test = (self._test_paths() if os.path.isdir(os.path.join(self.root, "Test"))
                else [])
        return {"train": ["atlas.pkl"] + [self._key(p) for p in self.train_paths],
                "val": [self._key(val[name]) for name in self.val_pairs().names],
                "test": [self._key(p) for p in test]}
