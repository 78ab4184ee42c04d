"""OFG training of VoxelMorph on LPBA40 (subject-to-atlas), as in the paper.

Data: LPBA40 `.nii.gz` volumes, 160x192x160, with
`*.delineation.structure.label.nii.gz` label maps; subject S01 is the atlas (the
fixed image). Validation Dice over 54 structures.

    python -m ofg_jax.main --config=configs/lpba.py --config.data.root=/path/to/LPBA40
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.data.name = "lpba"
    config.data.root = "data/LPBA40"
    config.data.num_val = 0  # 0 = every validation subject (9 in the paper).
    config.data.augment = True  # The same random flip of each axis on both images.
    # 30 training subjects: the paper suggests weight decay 0.02 for data sets this
    # small (--config.train.weight_decay=0.02); the reference code trains without.
    return config
