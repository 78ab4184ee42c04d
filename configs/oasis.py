"""OFG training of VoxelMorph on OASIS (subject-to-subject), as in the paper.

Data: Learn2Reg 2021 task 3 in TransMorph's pkl layout, 160x192x224: training
`.pkl` files hold `(image, seg)`, validation `.pkl` files `(x, y, x_seg, y_seg)`.
Each training subject is paired with a random partner and trained in both
directions. Validation Dice over labels 1..35.

    python -m ofg_jax.main --config=configs/oasis.py --config.data.root=/path/to/OASIS
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.data.name = "oasis"
    config.data.root = "data/OASIS"
    config.data.num_val = 0  # 0 = every validation pair (19 in the paper).
    config.data.augment = False
    return config
