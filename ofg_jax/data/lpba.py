"""LPBA40 brain MRI (LONI, delineation space, NIfTI): subject -> atlas S01."""

import os

import numpy as np

from ofg_jax import nifti
from ofg_jax.data import readers
from ofg_jax.data.base import (Pair, PairList, RegistrationData, check_grid, data_root,
                               read_only, reference_subset)
from ofg_jax.volumes import as_image, as_labels

IMAGE_SUFFIX = ".delineation.skullstripped.nii.gz"
LABEL_SUFFIX = ".delineation.structure.label.nii.gz"
ATLAS_ID = "S01"

LAYOUT = f"""\
  ROOT/S01{IMAGE_SUFFIX}     atlas image (the fixed image of every pair)
  ROOT/S01{LABEL_SUFFIX}    atlas labels
  ROOT/Train/SXX{IMAGE_SUFFIX}  training subjects (moving); labels optional
  ROOT/Val/SXX{IMAGE_SUFFIX}    validation subjects, with
  ROOT/Val/SXX{LABEL_SUFFIX}   their labels
  ROOT/Test/SXX...             optional, test subjects with labels (as Val/)"""

LABELS = (tuple(range(21, 35)) + tuple(range(41, 51)) + tuple(range(61, 69))
          + tuple(range(81, 93)) + (101, 102, 121, 122) + tuple(range(161, 167)))


def normalize(image: np.ndarray, path: str) -> np.ndarray:
    """Min-max scales an image to [0, 1]."""
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        raise ValueError(f"image {path} is constant ({lo}); cannot scale it to [0, 1]")
    return ((image - lo) / (hi - lo)).astype(np.float32)


class LPBA(RegistrationData):
    """Subject (moving) -> atlas S01 (fixed). Each training subject once per epoch.

    Images are used with their raw intensities, as the reference reads them
    (``normalize=True`` min-max scales each volume to [0, 1]); labels keep their
    LPBA40 codes. A copy of S01 inside ``Train/``, ``Val/`` or ``Test/`` is
    skipped. ``num_train`` / ``num_val`` select the reference's subsets of the
    subjects; the test split is ``Test/``.
    """

    name = "lpba"
    labels = LABELS

    @classmethod
    def from_config(cls, config, seed):
        return cls(data_root(config, "LPBA40"), img_size=config.get("img_size"),
                   num_train=cls.num_train(config),
                   normalize=bool(config.get("normalize") or False),
                   **cls.common_options(config, seed))

    def __init__(self, root: str, *, seed: int, augment: bool, num_val: int,
                 num_train: int = 0, split_seed: int = 42, normalize: bool = False,
                 img_size=None):
        super().__init__(seed=seed, augment=augment, num_val=num_val,
                         split_seed=split_seed)
        self.normalize = normalize
        readers.require_dir(root, "LPBA40 data root", LAYOUT)
        self.root = root
        self.atlas_path = readers.require_file(os.path.join(root, ATLAS_ID + IMAGE_SUFFIX),
                                               "LPBA40 atlas image", LAYOUT)
        readers.require_file(self._label_path(self.atlas_path), "LPBA40 atlas labels",
                             LAYOUT)
        self.train_paths = reference_subset(self._subjects("Train", need_labels=False),
                                            num_train, split_seed,
                                            "LPBA40 training subjects")
        self.val_paths = self._subjects("Val", need_labels=True)
        self.img_size = nifti.header_shape(self.atlas_path)
        if len(self.img_size) != 3:
            raise ValueError(f"atlas {self.atlas_path} must be a 3D volume, got shape "
                             f"{self.img_size}")
        if img_size and tuple(img_size) != self.img_size:
            raise ValueError(f"data.img_size {tuple(img_size)} does not match the shape "
                             f"{self.img_size} of {self.atlas_path}")
        for path in [self.atlas_path] + self.train_paths + self.val_paths:
            for p in (path, self._label_path(path)):
                if not os.path.isfile(p):  # a training subject without labels
                    continue
                shape = nifti.header_shape(p)
                if shape != self.img_size:
                    raise ValueError(f"volume shape {shape} of {p} does not match the "
                                     f"dataset grid {self.img_size} (from {self.atlas_path})")

    def _subjects(self, split: str, need_labels: bool) -> list[str]:
        paths = readers.list_files(os.path.join(self.root, split), IMAGE_SUFFIX,
                                   f"LPBA40 {split}", LAYOUT)
        paths = [p for p in paths if self._subject_id(p) != ATLAS_ID]
        for p in paths if need_labels else ():
            readers.require_file(self._label_path(p), f"label file of {p}", LAYOUT)
        if not paths:
            raise FileNotFoundError(f"LPBA40 {split} folder {os.path.join(self.root, split)}"
                                    f" holds no subject besides the atlas {ATLAS_ID}")
        return paths

    @staticmethod
    def _subject_id(path: str) -> str:
        return os.path.basename(path)[:-len(IMAGE_SUFFIX)]

    @staticmethod
    def _label_path(image_path: str) -> str:
        return image_path[:-len(IMAGE_SUFFIX)] + LABEL_SUFFIX

    def _read(self, path: str, with_labels: bool):
        image = as_image(nifti.read_array(path), path)
        if self.normalize:
            image = normalize(image, path)
        check_grid(image, path, self.img_size, self.atlas_path)
        if not with_labels:
            return image, None
        label_path = self._label_path(path)
        seg = as_labels(nifti.read_array(label_path, labels=True), label_path)
        check_grid(seg, label_path, self.img_size, self.atlas_path)
        return image, seg

    def _plan_pairs(self, rng):
        order = rng.permutation(len(self.train_paths))
        return [(os.path.relpath(self.train_paths[i], self.root), "atlas") for i in order]

    def _load_image(self, key):
        if key == "atlas":
            return self._cached("atlas_image",
                                lambda: read_only(self._read(self.atlas_path, False)[0]))[0]
        return self._read(os.path.join(self.root, key), False)[0]

    def _val_names(self):
        return [self._subject_id(p) for p in self.val_paths]

    def _load_val_pair(self, index):
        return self._atlas_pair(self.val_paths[index])

    def _atlas_pair(self, path: str) -> Pair:
        atlas, atlas_seg = self._cached("atlas",
                                        lambda: read_only(*self._read(self.atlas_path, True)))
        image, seg = self._read(path, True)
        return Pair(self._subject_id(path), image, atlas, seg, atlas_seg)

    def _test_paths(self) -> list[str]:
        return self._subjects("Test", need_labels=True)

    def test_pairs(self):
        paths = self._test_paths()
        return PairList([self._subject_id(p) for p in paths],
                        lambda i: self._atlas_pair(paths[i]))

    def split_files(self):
        key = lambda path: os.path.relpath(path, self.root)
        val = dict(zip(self._val_names(), self.val_paths))
        test = (self._test_paths() if os.path.isdir(os.path.join(self.root, "Test"))
                else [])
        atlas = key(self.atlas_path)
        return {"train": [atlas] + [key(p) for p in self.train_paths],
                "val": [key(val[name]) for name in self.val_pairs().names],
                "test": [key(p) for p in test]}
