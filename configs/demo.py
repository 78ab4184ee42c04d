"""A quick demo on synthetic brain phantoms: a few minutes on a laptop CPU.

OFG-trained VoxelMorph on small procedurally generated phantoms (no download).
Compared with the reference settings (`default.py`), the demo is much smaller
and shorter: a 32^3 grid, 32 training subjects, 30 epochs (960 updates), and a
model learning rate ten times the reference's 1e-4 so that it learns something
in that time. Subjects differ from the atlas by a global scaling and shift of a
couple of voxels on top of the smooth local deformation, so that the identity
starts far from aligned (Dice about 0.23) and progress shows in the Dice of
nearest-neighbour-warped labels.

    python -m ofg_jax.main --config=configs/demo.py --workdir=/tmp/ofg_demo
"""

import ml_collections

from ofg_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.data.name = "synthetic"
    config.data.root = ""  # Generated in memory; nothing is read.
    config.data.img_size = (32, 32, 32)
    # The phantom has no header: its axes run left -> right, posterior ->
    # anterior, inferior -> superior, and it fills its grid, so 6 mm voxels make
    # the 32^3 demo grid a 192 mm head-sized box (`register` resamples scans so).
    config.data.spacing = (6.0, 6.0, 6.0)
    config.data.orientation = "RAS"
    config.data.num_train = 32
    config.data.num_val = 4
    config.data.augment = False
    config.data.val_subjects = 4
    config.data.test_subjects = 4  # The held-out pairs of python -m ofg_jax.evaluate.
    config.data.phantom_seed = 0  # The anatomy and every subject; `seed` only orders.
    # The subject transformations, in half-box units (1 = half the grid).
    config.data.warp_rms = 0.05  # The smooth local deformation: ~1 voxel here.
    config.data.scale_std = 0.1  # Global scaling: about 1.6 voxels at the border.
    config.data.shift_std = 0.06  # Global shift: about 1 voxel.
    config.data.noise_std = 0.02
    config.data.bias_std = 0.1  # Std of the log bias field.

    config.train.epochs = 30
    config.train.learning_rate = 1e-3  # The reference's 1e-4 needs hundreds of epochs.
    config.train.log_every = 32
    config.checkpoint.keep_best = 1
    return config
