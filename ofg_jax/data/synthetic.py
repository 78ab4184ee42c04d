"""The built-in synthetic dataset: atlas -> subject pairs of the procedural brain phantom."""

import numpy as np

from ofg_jax.data import phantom
from ofg_jax.data.base import Pair, PairList, RegistrationData, read_only

# Streams of the phantom's random generator: (phantom_seed, _STREAM, index).
_ANATOMY, _TRAIN, _VAL, _TEST = 0, 1, 2, 3


class Synthetic(RegistrationData):
    """Atlas (moving) -> subject (fixed) pairs, generated on demand; needs no files.

    The content (anatomy, subjects, noise) depends on ``phantom_seed`` only, so runs
    with different training seeds see the same data; the training ``seed`` only
    shuffles the plan and draws the flips. Each training subject is used once per
    epoch. Labels of interest: all 26 structures of :data:`phantom.STRUCTURES`.

    Args:
      img_size: grid ``(D, H, W)``; any size of at least 8 per axis.
      num_train: number of training subjects.
      val_subjects: number of validation subjects (pairs).
      test_subjects: number of test subjects (pairs), for the evaluation command.
      phantom_seed: seed of the anatomy and of every subject.
      deformation: size of the random subject transformations.
      appearance: contrast, texture, blur, bias and noise of the images.
    """

    name = "synthetic"
    labels = phantom.LABELS

    def __init__(self, *, img_size, num_train: int, seed: int, augment: bool, num_val: int,
                 split_seed: int = 42, val_subjects: int = 4, test_subjects: int = 4,
                 phantom_seed: int = 0,
                 deformation: phantom.Deformation = phantom.Deformation(),
                 appearance: phantom.Appearance = phantom.Appearance()):
        super().__init__(seed=seed, augment=augment, num_val=num_val,
                         split_seed=split_seed)
        img_size = tuple(int(n) for n in img_size)
        if len(img_size) != 3 or min(img_size) < 8:
            raise ValueError(f"data.img_size must be 3 sizes of at least 8, got {img_size}")
        if min(int(num_train), int(val_subjects), int(test_subjects)) < 1:
            raise ValueError(f"data.num_train, data.val_subjects and data.test_subjects "
                             f"must be >= 1, got {num_train}, {val_subjects} and "
                             f"{test_subjects}")
        if int(phantom_seed) < 0:
            raise ValueError(f"data.phantom_seed must be >= 0, got {phantom_seed}")
        self.img_size = img_size
        self.num_train = int(num_train)
        self.val_subjects = int(val_subjects)
        self.test_subjects = int(test_subjects)
        self.phantom_seed = int(phantom_seed)
        self.deformation = deformation
        self.appearance = appearance
        self.anatomy = phantom.Anatomy.draw(self._rng(_ANATOMY, 0))

    @classmethod
    def from_config(cls, config, seed):
        """``data.img_size`` and ``data.num_train`` are required; the phantom's keys
        (``val_subjects``, ``phantom_seed``, ``warp_rms``, ``scale_std``,
        ``shift_std``, ``noise_std``, ``bias_std``) default to the phantom's own
        defaults where absent."""
        if config.get("img_size") is None or config.get("num_train") is None:
            raise ValueError("the synthetic dataset needs data.img_size (3 ints) and "
                             "data.num_train")
        given = lambda keys: {field: config[key] for key, field in keys.items()
                              if config.get(key) is not None}
        # ``num_train`` is the number of subjects generated, not a subset.
        deformation = phantom.Deformation(**given(
            {"warp_rms": "warp", "scale_std": "scale", "shift_std": "shift"}))
        appearance = phantom.Appearance(**given({"noise_std": "noise",
                                                 "bias_std": "bias"}))
        return cls(img_size=config.img_size, num_train=int(config.num_train),
                   deformation=deformation, appearance=appearance,
                   **given({"val_subjects": "val_subjects",
                            "test_subjects": "test_subjects",
                            "phantom_seed": "phantom_seed"}),
                   **cls.common_options(config, seed))

    def verify(self, progress=None, workers: int = 4) -> int:
        """Nothing to read: the volumes are generated."""
        del progress, workers
        return 0

    def _rng(self, stream: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.phantom_seed, stream, index])

    def atlas(self) -> tuple[np.ndarray, np.ndarray]:
        """The atlas image ``float32 (*img_size)`` and labels ``int32`` (cached, read-only)."""
        def render():
            points = phantom.identity(self.img_size)
            return read_only(*phantom.render(points, self.anatomy, self._rng(_ANATOMY, 1),
                                             self.appearance))
        return self._cached("atlas", render)

    def subject(self, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image and labels of subject ``index`` of ``split`` (``"train"``,
        ``"val"`` or ``"test"``)."""
        count = {"train": self.num_train, "val": self.val_subjects,
                 "test": self.test_subjects}.get(split)
        if count is None or not 0 <= index < count:
            raise KeyError(f"no synthetic subject {split}/{index}")
        rng = self._rng({"train": _TRAIN, "val": _VAL, "test": _TEST}[split], index)
        points = phantom.transform(rng, self.img_size, self.deformation)
        return phantom.render(points, self.anatomy, rng, self.appearance)

    def _plan_pairs(self, rng):
        return [("atlas", f"train/{i:04d}") for i in rng.permutation(self.num_train)]

    def _load_image(self, key):
        if key == "atlas":
            return self.atlas()[0]
        split, _, index = key.partition("/")
        if not index.isdigit():
            raise KeyError(f"no synthetic volume {key!r}")
        return self.subject(split, int(index))[0]

    def _val_names(self):
        return [f"atlas_to_val{i:04d}" for i in range(self.val_subjects)]

    def _load_val_pair(self, index):
        return self._atlas_pair("val", index)

    def _atlas_pair(self, split: str, index: int) -> Pair:
        atlas, atlas_seg = self.atlas()
        image, seg = self.subject(split, index)
        return Pair(f"atlas_to_{split}{index:04d}", atlas, image, atlas_seg, seg)

    def test_pairs(self):
        names = [f"atlas_to_test{i:04d}" for i in range(self.test_subjects)]
        return PairList(names, lambda i: self._atlas_pair("test", i))

    def split_files(self):
        return {"train": [f"train/{i:04d}" for i in range(self.num_train)],
                "val": list(self.val_pairs().names),
                "test": list(self.test_pairs().names)}
