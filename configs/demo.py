"""A quick demo on synthetic brain phantoms: runs on a laptop CPU in minutes.

OFG-trained VoxelMorph on small procedurally generated phantoms (no download).
Compared with the reference settings (`default.py`), the demo is much smaller
and shorter: a small grid, a few subjects, a few epochs, and a model learning
rate far above the reference's 1e-4 so that it learns something in that time.

    python -m ofg_jax.main --config=configs/demo.py --workdir=/tmp/ofg_demo
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.data.name = "synthetic"
    config.data.root = ""  # Generated in memory; nothing is read.
    config.data.img_size = (48, 48, 48)
    config.data.num_train = 16
    config.data.num_val = 4
    config.data.augment = False

    config.train.epochs = 8
    config.train.learning_rate = 1e-3  # The reference's 1e-4 needs hundreds of epochs.
    config.train.log_every = 4
    config.checkpoint.keep_best = 1
    return config
