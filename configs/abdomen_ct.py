"""OFG training of VoxelMorph on Learn2Reg Abdomen CT-CT.

Data: `imagesTr/AbdomenCTCT_XXXX_0000.nii.gz` with `labelsTr/` of the same names,
192x160x256, intensities divided by 500; training images and validation pairs
listed in the Learn2Reg dataset JSON (`data.pairs_json`). Validation Dice over
labels 1..13.

For VoxelMorph the paper refines with an MSE energy and 3 steps (set here); for
TransMorph it keeps NCC with 5 steps:
    --config.model.name=transmorph --config.ofg.similarity=ncc --config.ofg.steps=5
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.data.name = "abdomen_ct"
    config.data.root = "data/AbdomenCTCT"
    config.data.pairs_json = ""  # "" = ROOT/AbdomenCTCT_dataset.json.
    config.data.num_val = 0  # 0 = every validation pair.
    config.data.augment = False

    config.ofg.similarity = "mse"
    config.ofg.steps = 3
    return config
