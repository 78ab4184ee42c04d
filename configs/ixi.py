"""OFG training of VoxelMorph on IXI (atlas-to-subject), as in the paper.

Data: TransMorph's preprocessed IXI release, 160x192x224: `Train/*.pkl`,
`Val/*.pkl` (each `(image, seg)`) and `atlas.pkl` under `data.root`. The atlas is
the moving image. Validation Dice over 30 FreeSurfer structures.

    python -m ofg_jax.main --config=configs/ixi.py --config.data.root=/path/to/IXI_data
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.data.name = "ixi"
    config.data.root = "data/IXI_data"
    config.data.num_val = 0  # 0 = every validation subject (20 in the paper).
    config.data.augment = True  # The same random flip of each axis on both images.
    return config
