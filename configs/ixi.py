"""OFG training of VoxelMorph on IXI (atlas-to-subject), as in the paper.

Data: TransMorph's preprocessed IXI release, 160x192x224: `Train/*.pkl`,
`Val/*.pkl` (each `(image, seg)`) and `atlas.pkl` under `data.root`. The atlas is
the moving image. Validation Dice over 30 FreeSurfer structures.

    python -m ofg_jax.main --config=configs/ixi.py --config.data.root=/path/to/IXI_data
"""

import ml_collections

from ofg_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.data.name = "ixi"
    config.data.root = "data/IXI_data"
    # The .pkl files have no header: 1 mm voxels in FreeSurfer's LIA layout (axis 0
    # to the Left, 1 Inferior, 2 Anterior), read off the labels' positions.
    config.data.spacing = (1.0, 1.0, 1.0)
    config.data.orientation = "LIA"
    # The reference's subsets of Train/ and Val/ (the paper: 200 and 20).
    config.data.num_train = 200
    config.data.num_val = 20
    config.data.augment = True  # The same random flip of each axis on both images.
    return config
