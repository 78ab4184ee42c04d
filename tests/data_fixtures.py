"""Writers of tiny datasets in every supported on-disk format, for the data tests."""

import json
import os
import pickle

import numpy as np

IXI_CODES = (0, 2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 26, 28, 30, 31,
             41, 42, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54, 58, 60, 62, 63, 72, 77, 80, 85,
             251, 252, 253, 254, 255)
LPBA_CODES = (0, 21, 22, 41, 42, 61, 62, 81, 82, 101, 102, 121, 122, 161, 166, 181, 182)
SHAPE = (8, 10, 12)


def write_pkl(path: str, *arrays) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(tuple(arrays), f)


def write_nifti(path: str, array: np.ndarray) -> None:
    import nibabel as nib

    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)


def image(rng: np.random.Generator, shape=SHAPE, dtype=np.float32) -> np.ndarray:
    return rng.random(shape).astype(dtype)


def codes(rng: np.random.Generator, table, shape=SHAPE, dtype=np.int16) -> np.ndarray:
    return rng.choice(np.asarray(table), size=shape).astype(dtype)


def write_ixi(root: str, rng: np.random.Generator, num_train: int = 6, num_val: int = 3,
              shape=SHAPE, num_test: int = 0) -> dict:
    """TransMorph IXI layout; segmentations hold FreeSurfer codes (float, as released)."""
    volumes = {}
    names = (["atlas.pkl"] + [f"Train/subject_{i}.pkl" for i in range(num_train)]
             + [f"Val/subject_{100 + i}.pkl" for i in range(num_val)]
             + [f"Test/subject_{200 + i}.pkl" for i in range(num_test)])
    for name in names:
        volumes[name] = (image(rng, shape), codes(rng, IXI_CODES, shape, np.float32))
        write_pkl(os.path.join(root, name), *volumes[name])
    return volumes


def write_oasis(root: str, rng: np.random.Generator, num_train: int = 5, num_val: int = 2,
                shape=SHAPE) -> dict:
    """TransMorph OASIS layout: train (image, seg), val (x, y, x_seg, y_seg)."""
    volumes = {}
    for i in range(num_train):
        name = f"Train/OASIS_{i:04d}.pkl"
        volumes[name] = (image(rng, shape), rng.integers(0, 36, shape).astype(np.uint8))
        write_pkl(os.path.join(root, name), *volumes[name])
    for i in range(num_val):
        name = f"Val/p_{i}_{i + 1}.pkl"
        volumes[name] = (image(rng, shape), image(rng, shape),
                         rng.integers(0, 36, shape).astype(np.uint8),
                         rng.integers(0, 36, shape).astype(np.uint8))
        write_pkl(os.path.join(root, name), *volumes[name])
    return volumes


LPBA_IMAGE = ".delineation.skullstripped.nii.gz"
LPBA_LABEL = ".delineation.structure.label.nii.gz"


def write_lpba(root: str, rng: np.random.Generator, train=("S02", "S03", "S04"),
               val=("S05", "S06"), shape=SHAPE) -> dict:
    """LPBA40 layout: atlas S01 at the top, subjects in Train/ and Val/ (raw intensities)."""
    volumes = {}
    for folder, ids in (("", ("S01",)), ("Train", train), ("Val", val)):
        for sid in ids:
            vol = (image(rng, shape) * 300.0 + 20.0, codes(rng, LPBA_CODES, shape, np.uint8))
            volumes[sid] = vol
            write_nifti(os.path.join(root, folder, sid + LPBA_IMAGE), vol[0])
            write_nifti(os.path.join(root, folder, sid + LPBA_LABEL), vol[1])
    return volumes


def abdomen_name(i: int) -> str:
    return f"AbdomenCTCT_{i:04d}_0000.nii.gz"


def write_abdomen(root: str, rng: np.random.Generator, num: int = 6, val_ids=(5, 6),
                  shape=SHAPE, json_extra=None) -> dict:
    """Learn2Reg AbdomenCTCT layout with its dataset JSON; images in Hounsfield units."""
    volumes = {}
    for i in range(1, num + 1):
        vol = ((rng.random(shape) * 2000.0 - 1000.0).astype(np.float32),
               rng.integers(0, 14, shape).astype(np.uint8))
        volumes[i] = vol
        write_nifti(os.path.join(root, "imagesTr", abdomen_name(i)), vol[0])
        write_nifti(os.path.join(root, "labelsTr", abdomen_name(i)), vol[1])
    content = {
        "name": "AbdomenCTCT",
        "training": [{"image": f"./imagesTr/{abdomen_name(i)}",
                      "label": f"./labelsTr/{abdomen_name(i)}"} for i in range(1, num + 1)],
        "training_paired_images": [],
        "registration_val": [{"fixed": f"./imagesTr/{abdomen_name(val_ids[0])}",
                              "moving": f"./imagesTr/{abdomen_name(val_ids[1])}"},
                             {"fixed": f"./imagesTr/{abdomen_name(val_ids[1])}",
                              "moving": f"./imagesTr/{abdomen_name(val_ids[0])}"}],
    }
    content.update(json_extra or {})
    with open(os.path.join(root, "AbdomenCTCT_dataset.json"), "w") as f:
        json.dump(content, f)
    return volumes


def read_ixi_pair(root: str, name: str) -> tuple:
    """``(image, labels as IXI table indices)`` of a file written by ``write_ixi``."""
    with open(os.path.join(root, name), "rb") as f:
        image, seg = pickle.load(f)
    index = {code: i for i, code in enumerate(IXI_CODES)}
    return image, np.vectorize(index.get)(seg.astype(int))
