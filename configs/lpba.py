"""OFG training of VoxelMorph on LPBA40 (subject-to-atlas), as in the paper.

Data: LPBA40 `.nii.gz` volumes, 160x192x160, with
`*.delineation.structure.label.nii.gz` label maps; subject S01 is the atlas (the
fixed image). Validation Dice over 54 structures.

    python -m ofg_jax.main --config=configs/lpba.py --config.data.root=/path/to/LPBA40
"""

import ml_collections

from ofg_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.data.name = "lpba"
    config.data.root = "data/LPBA40"
    # None: the voxel size and orientation are read from the atlas's NIfTI header.
    config.data.spacing = None
    config.data.orientation = None
    config.data.num_val = 0  # 0 = every validation subject (9 in the paper).
    # The reference's loader builds a random flip but never applies it, and reads
    # raw intensities: augment=True and normalize=True (min-max to [0, 1]) are
    # options beyond the paper's protocol.
    config.data.augment = False
    config.data.normalize = False
    # The reference's TransMorph window for this grid (46,745,907 parameters).
    config.model_defaults.transmorph = ml_collections.ConfigDict(
        {"window_size": (5, 6, 5)})
    # 30 training subjects: the paper suggests weight decay 0.02 for data sets this
    # small (--config.train.weight_decay=0.02); the reference code trains without.
    return config
