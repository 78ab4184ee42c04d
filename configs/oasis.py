"""OFG training of VoxelMorph on OASIS (subject-to-subject), as in the paper.

Data: Learn2Reg 2021 task 3 in TransMorph's pkl layout, 160x192x224: training
`.pkl` files hold `(image, seg)`, validation `.pkl` files `(x, y, x_seg, y_seg)`.
Each training subject is paired with a random partner and trained in both
directions. Validation Dice over labels 1..35.

    python -m ofg_jax.main --config=configs/oasis.py --config.data.root=/path/to/OASIS
"""

import ml_collections

from ofg_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.data.name = "oasis"
    config.data.root = "data/OASIS"
    # The .pkl files have no header: 1 mm voxels in FreeSurfer's LIA layout (axis 0
    # to the Left, 1 Inferior, 2 Anterior), read off the labels' positions.
    config.data.spacing = (1.0, 1.0, 1.0)
    config.data.orientation = "LIA"
    # The reference's subset of Train/ (200) and every Learn2Reg validation pair (19).
    config.data.num_train = 200
    config.data.num_val = 0
    config.data.augment = False
    return config
