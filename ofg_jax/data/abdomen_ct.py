"""Learn2Reg AbdomenCTCT (inter-subject abdominal CT, NIfTI): the Learn2Reg dataset
JSON or the reference's pairs files."""

import json
import os
from typing import Optional

import numpy as np

from ofg_jax import nifti
from ofg_jax.data import readers
from ofg_jax.data.base import (Pair, PairList, RegistrationData, check_grid, data_root,
                               random_partners, reference_subset)
from ofg_jax.volumes import as_image, as_labels

JSON_NAME = "AbdomenCTCT_dataset.json"
INTENSITY_SCALE = 500.0
LABELS = tuple(range(1, 14))
IMAGE = "imagesTr/AbdomenCTCT_{:04d}_0000.nii.gz"  # The reference's pair ids.

LAYOUT = f"""\
  ROOT/{JSON_NAME}                 Learn2Reg dataset JSON (or data.pairs_json)
  ROOT/imagesTr/AbdomenCTCT_XXXX_0000.nii.gz  images
  ROOT/labelsTr/AbdomenCTCT_XXXX_0000.nii.gz  labels, same file names
data.pairs_json is either a Learn2Reg dataset JSON, whose keys used are "training"
(list of {{"image", "label"}}), "registration_val" (list of {{"fixed", "moving"}})
and, if present, "training_paired_images" and "registration_test" (lists of
{{"fixed", "moving"}}), paths relative to ROOT; or the reference's pairs file
{{"pairs": [[i, j], ...]}} of image ids (moving i, fixed j), with the test pairs
in data.test_pairs_json."""


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            content = json.load(f)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"could not read dataset JSON {path}: {type(e).__name__}: {e}") from e
    if not isinstance(content, dict):
        raise ValueError(f"dataset JSON {path} must hold an object, got {type(content).__name__}")
    return content


def _entries(content: dict, key: str, fields: tuple[str, ...], path: str,
             required: bool = True) -> list[dict]:
    """The list ``content[key]`` of objects with the given string ``fields``."""
    if key not in content:
        if required:
            raise ValueError(f"dataset JSON {path} has no key {key!r}\n{LAYOUT}")
        return []
    entries = content[key]
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and all(isinstance(e.get(f), str) for f in fields)
            for e in entries):
        raise ValueError(f"{key!r} in dataset JSON {path} must be a list of objects with "
                         f"string fields {fields}")
    return entries


def _key(json_path: str) -> str:
    return os.path.normpath(json_path)


def _json_pairs(content: dict, key: str, path: str, required: bool = True
                ) -> list[tuple[str, str]]:
    """``(moving key, fixed key)`` of the Learn2Reg JSON list ``key``."""
    return [(_key(e["moving"]), _key(e["fixed"]))
            for e in _entries(content, key, ("fixed", "moving"), path, required)]


def _id_pairs(path: str) -> list[tuple[str, str]]:
    """``(moving key, fixed key)`` of the reference's ``{"pairs": [[i, j], ...]}``."""
    pairs = _read_json(path).get("pairs")
    if not isinstance(pairs, list) or not pairs or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(i, int) for i in p)
            for p in pairs):
        raise ValueError(f"pairs file {path} must hold {{\"pairs\": [[i, j], ...]}} "
                         "with integer image ids")
    return [(_key(IMAGE.format(i)), _key(IMAGE.format(j))) for i, j in pairs]


def _both_directions(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [direction for a, b in pairs for direction in ((a, b), (b, a))]


class AbdomenCT(RegistrationData):
    """Inter-subject abdominal CT registration, every pair trained both ways.

    With a Learn2Reg dataset JSON, the training subjects are the ``"training"``
    images that appear in no ``"registration_val"`` pair (``num_train`` of them,
    the reference's subset); each epoch visits them in shuffled order, each
    drawing a random partner, and trains the pair in both directions (two
    consecutive items, as OASIS). With ``"training_paired_images"`` in the JSON,
    or the reference's pairs file as ``pairs_json``, those pairs are trained
    instead, shuffled, both directions each. Validation: the JSON's
    ``"registration_val"``; with the reference's pairs files, the test pairs (as
    the reference validates). Test: ``test_pairs_json``, else the JSON's
    ``"registration_test"``. Intensities are divided by 500 (no clipping); labels
    keep their values 0..13, and a pair's Dice is the sum over labels 1..13
    divided by the number of labels present in both scans (the reference's).
    Pairs are named ``<fixed id>_<moving id>`` (Learn2Reg's ``disp_`` names).
    """

    name = "abdomen_ct"
    labels = LABELS
    dice_over = "present"

    @classmethod
    def from_config(cls, config, seed):
        path = lambda key: os.path.expanduser(str(config.get(key) or ""))
        return cls(data_root(config, "Abdomen CT"), pairs_json=path("pairs_json"),
                   test_pairs_json=path("test_pairs_json"), img_size=config.get("img_size"),
                   num_train=cls.num_train(config), **cls.common_options(config, seed))

    def __init__(self, root: str, *, seed: int, augment: bool, num_val: int,
                 pairs_json: str = "", test_pairs_json: str = "", num_train: int = 0,
                 split_seed: int = 42, img_size=None):
        super().__init__(seed=seed, augment=augment, num_val=num_val,
                         split_seed=split_seed)
        readers.require_dir(root, "Abdomen CT data root", LAYOUT)
        self.root = root
        json_path = readers.require_file(pairs_json or os.path.join(root, JSON_NAME),
                                         "Abdomen CT pairs JSON", LAYOUT)
        content = _read_json(json_path)
        self.test_pairs_keys: Optional[list[tuple[str, str]]] = None
        if test_pairs_json:
            self.test_pairs_keys = _id_pairs(readers.require_file(
                test_pairs_json, "Abdomen CT test pairs file", LAYOUT))
        self.train_pair_keys = None
        if "pairs" in content:  # The reference's pairs files.
            self.train_pair_keys = _id_pairs(json_path)
            if self.test_pairs_keys is None:
                raise ValueError(f"{json_path} is a pairs file: data.test_pairs_json must "
                                 "name the test pairs file (the validation pairs)")
            self.val_pairs_keys = self.test_pairs_keys
        else:
            self.val_pairs_keys = _json_pairs(content, "registration_val", json_path)
            if not self.val_pairs_keys:
                raise ValueError(f"'registration_val' in dataset JSON {json_path} is empty")
            if self.test_pairs_keys is None and content.get("registration_test"):
                self.test_pairs_keys = _json_pairs(content, "registration_test", json_path)
            paired = _json_pairs(content, "training_paired_images", json_path,
                                 required=False)
            self.train_pair_keys = paired or None
        val_keys = {k for pair in self.val_pairs_keys for k in pair}
        if self.train_pair_keys is not None:
            self.train_keys = sorted({k for pair in self.train_pair_keys for k in pair})
        else:
            training = [e["image"] for e in _entries(content, "training", ("image",),
                                                     json_path)]
            self.train_keys = reference_subset(
                [k for k in map(_key, training) if k not in val_keys], num_train,
                split_seed, "Abdomen CT training subjects")
            if len(self.train_keys) < 2:
                raise ValueError(
                    f"dataset JSON {json_path} leaves {len(self.train_keys)} training images "
                    f"outside the 'registration_val' pairs; at least 2 are needed")
        for key in self.train_keys + sorted(val_keys):
            readers.require_file(os.path.join(root, key), f"image listed in {json_path}",
                                 LAYOUT)
        for key in sorted(val_keys):
            readers.require_file(self._label_path(key), f"label of {key}", LAYOUT)
        self._grid_source = os.path.join(root, self.train_keys[0])
        self.img_size = nifti.header_shape(self._grid_source)
        if len(self.img_size) != 3:
            raise ValueError(f"{self._grid_source} must be a 3D volume, got shape "
                             f"{self.img_size}")
        if img_size and tuple(img_size) != self.img_size:
            raise ValueError(f"data.img_size {tuple(img_size)} does not match the shape "
                             f"{self.img_size} of {self._grid_source}")
        paths = ([os.path.join(root, k) for k in self.train_keys + sorted(val_keys)]
                 + [self._label_path(k) for k in sorted(val_keys)])
        for path in paths:
            shape = nifti.header_shape(path)
            if shape != self.img_size:
                raise ValueError(f"volume shape {shape} of {path} does not match the dataset "
                                 f"grid {self.img_size} (from {self._grid_source})")

    def _label_path(self, key: str) -> str:
        return os.path.join(self.root, "labelsTr", os.path.basename(key))

    def _plan_pairs(self, rng):
        if self.train_pair_keys is not None:
            order = rng.permutation(len(self.train_pair_keys))
            return _both_directions([self.train_pair_keys[i] for i in order])
        order = rng.permutation(len(self.train_keys))
        partners = random_partners(rng, len(self.train_keys))
        return _both_directions([(self.train_keys[a], self.train_keys[partners[a]])
                                 for a in order])

    def _load_image(self, key):
        path = os.path.join(self.root, key)
        image = as_image(nifti.read_array(path), path) / np.float32(INTENSITY_SCALE)
        check_grid(image, path, self.img_size, self._grid_source)
        return image

    def _load_seg(self, key):
        path = self._label_path(key)
        seg = as_labels(nifti.read_array(path, labels=True), path)
        check_grid(seg, path, self.img_size, self._grid_source)
        return seg

    @staticmethod
    def _pair_name(moving: str, fixed: str) -> str:
        subject = lambda key: os.path.basename(key).split("_")[1]
        return f"{subject(fixed)}_{subject(moving)}"

    def _val_names(self):
        return [self._pair_name(m, f) for m, f in self.val_pairs_keys]

    def _load_val_pair(self, index):
        return self._load_pair(*self.val_pairs_keys[index])

    def _load_pair(self, moving: str, fixed: str) -> Pair:
        return Pair(self._pair_name(moving, fixed), self._load_image(moving),
                    self._load_image(fixed), self._load_seg(moving), self._load_seg(fixed))

    def test_pairs(self):
        if self.test_pairs_keys is None:
            raise FileNotFoundError(
                f"the Abdomen CT data in {self.root} has no test split: give "
                "data.test_pairs_json, or a dataset JSON with 'registration_test'")
        keys = self.test_pairs_keys
        return PairList([self._pair_name(m, f) for m, f in keys],
                        lambda i: self._load_pair(*keys[i]))

    def split_files(self):
        val = dict(zip(self._val_names(), self.val_pairs_keys))
        return {"train": list(self.train_keys),
                "val": [list(val[name]) for name in self.val_pairs().names],
                "test": [list(pair) for pair in self.test_pairs_keys or []]}
