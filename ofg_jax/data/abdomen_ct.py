"""Learn2Reg AbdomenCTCT (inter-subject abdominal CT, NIfTI, Learn2Reg dataset JSON)."""

import json
import os

import numpy as np

from ofg_jax import nifti
from ofg_jax.data import readers
from ofg_jax.data.base import Pair, RegistrationData, check_grid, data_root, random_partners
from ofg_jax.volumes import as_image, as_labels

JSON_NAME = "AbdomenCTCT_dataset.json"
INTENSITY_SCALE = 500.0
LABELS = tuple(range(1, 14))

LAYOUT = f"""\
  ROOT/{JSON_NAME}                 Learn2Reg dataset JSON (or data.pairs_json)
  ROOT/imagesTr/AbdomenCTCT_XXXX_0000.nii.gz  images
  ROOT/labelsTr/AbdomenCTCT_XXXX_0000.nii.gz  labels, same file names
The JSON keys used: "training" (list of {{"image", "label"}}), "registration_val"
(list of {{"fixed", "moving"}}) and, if non-empty, "training_paired_images" (list of
{{"fixed", "moving"}}); paths are relative to ROOT."""


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


class AbdomenCT(RegistrationData):
    """Inter-subject abdominal CT registration with the pairs of a Learn2Reg JSON.

    Training subjects are the ``"training"`` images that appear in no
    ``"registration_val"`` pair. Each epoch visits them in shuffled order, each
    registered (moving) to a randomly drawn other subject (fixed); if the JSON lists
    ``"training_paired_images"``, those pairs are used instead, shuffled.
    Intensities are divided by 500 (no clipping); labels keep their values 0..13.
    """

    name = "abdomen_ct"
    labels = LABELS

    @classmethod
    def from_config(cls, config, seed):
        pairs_json = os.path.expanduser(str(config.get("pairs_json") or ""))
        return cls(data_root(config, "Abdomen CT"), pairs_json=pairs_json,
                   img_size=config.get("img_size"), **cls.common_options(config, seed))

    def __init__(self, root: str, *, seed: int, augment: bool, num_val: int,
                 pairs_json: str = "", img_size=None):
        super().__init__(seed=seed, augment=augment, num_val=num_val)
        readers.require_dir(root, "Abdomen CT data root", LAYOUT)
        self.root = root
        json_path = readers.require_file(pairs_json or os.path.join(root, JSON_NAME),
                                         "Abdomen CT dataset JSON", LAYOUT)
        content = _read_json(json_path)
        training = [e["image"] for e in _entries(content, "training", ("image",), json_path)]
        val = _entries(content, "registration_val", ("fixed", "moving"), json_path)
        paired = _entries(content, "training_paired_images", ("fixed", "moving"), json_path,
                          required=False)
        if not val:
            raise ValueError(f"'registration_val' in dataset JSON {json_path} is empty")
        self.val_pairs_keys = [(self._key(e["moving"]), self._key(e["fixed"])) for e in val]
        val_keys = {k for pair in self.val_pairs_keys for k in pair}
        if paired:
            self.train_pair_keys = [(self._key(e["moving"]), self._key(e["fixed"]))
                                    for e in paired]
            self.train_keys = sorted({k for pair in self.train_pair_keys for k in pair})
        else:
            self.train_pair_keys = None
            self.train_keys = [k for k in map(self._key, training) if k not in val_keys]
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

    @staticmethod
    def _key(json_path: str) -> str:
        return os.path.normpath(json_path)

    def _label_path(self, key: str) -> str:
        return os.path.join(self.root, "labelsTr", os.path.basename(key))

    def _plan_pairs(self, rng):
        if self.train_pair_keys is not None:
            return [self.train_pair_keys[i] for i in rng.permutation(len(self.train_pair_keys))]
        order = rng.permutation(len(self.train_keys))
        partners = random_partners(rng, len(self.train_keys))
        return [(self.train_keys[a], self.train_keys[partners[a]]) for a in order]

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

    def _val_names(self):
        def stem(key):
            return os.path.basename(key).split(".")[0]
        return [f"{stem(m)}_to_{stem(f)}" for m, f in self.val_pairs_keys]

    def _load_val_pair(self, index):
        moving, fixed = self.val_pairs_keys[index]
        return Pair(self._val_names()[index], self._load_image(moving), self._load_image(fixed),
                    self._load_seg(moving), self._load_seg(fixed))
