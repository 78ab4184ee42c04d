"""A tiny trained workdir and NIfTI files of a pair, for the register and plot tests."""

import os

import numpy as np

SIZE = (16, 16, 32)  # Non-cubic: catches swapped axes.
TRAIN_STEPS = 2


def tiny_config():
    """The demo config at toy size: a two-level VoxelMorph (set through the
    ``model.*`` keys), two training steps at a high learning rate (a visible
    displacement), one validation pair."""
    from configs import demo
    config = demo.get_config()
    config.model.enc_features = (4, 8)
    config.model.dec_features = (8, 8)
    config.model.final_features = (4,)
    config.data.img_size = SIZE
    config.data.num_train = 2
    config.data.num_val = 1
    config.data.val_subjects = 1
    config.train.epochs = 2
    config.train.max_steps = TRAIN_STEPS
    config.train.log_every = 1
    config.train.learning_rate = 0.01
    config.ofg.steps = 2
    config.checkpoint.keep_best = 1
    return config


def oblique_affine(zooms=(1.2, 0.9, 2.0), angle=0.5, offset=(-10.0, 20.0, 5.5)):
    """A rotated, anisotropic voxel-to-world affine."""
    c, s = np.cos(angle), np.sin(angle)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag(zooms)
    affine[:3, 3] = offset
    return affine


def write_nifti(path, array, affine, dtype):
    """Writes ``array`` with qform (code 1) and sform (code 2) set to ``affine``."""
    import nibabel as nib
    image = nib.Nifti1Image(np.asarray(array), affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=2)
    image.header["descrip"] = b"ofg_jax test"
    image.set_data_dtype(dtype)
    nib.save(image, path)
    return path


def write_pair(folder, affine=None) -> dict:
    """The synthetic validation pair as NIfTI files in ``folder``.

    The fixed image is stored as int16 with scaling (as scanners write them), the
    moving one as float32, the label maps as uint8.
    """
    from ofg_jax import data as data_lib
    config = tiny_config()
    pair = data_lib.create(config.data, config.seed).val_pairs()[0]
    affine = oblique_affine() if affine is None else affine
    os.makedirs(folder, exist_ok=True)
    join = lambda name: os.path.join(str(folder), name)
    return {
        "moving": write_nifti(join("moving.nii.gz"), pair.moving, affine, np.float32),
        "fixed": write_nifti(join("fixed.nii.gz"), pair.fixed, affine, np.int16),
        "moving_seg": write_nifti(join("moving_seg.nii.gz"), pair.moving_seg, affine,
                                  np.uint8),
        "fixed_seg": write_nifti(join("fixed_seg.nii.gz"), pair.fixed_seg, affine,
                                 np.uint8),
    }
