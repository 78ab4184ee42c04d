"""OFG training of VoxelMorph on Learn2Reg Abdomen CT-CT.

Data: `imagesTr/AbdomenCTCT_XXXX_0000.nii.gz` with `labelsTr/` of the same names,
192x160x256, intensities divided by 500; the pairs from the Learn2Reg dataset
JSON or from the reference's pairs files (`data.pairs_json`,
`data.test_pairs_json`), every training pair in both directions. Validation Dice
over the labels 1..13 present in both scans (the reference's definition).

The energies are those of the reference's only MSE-energy code (its Jan-Apr 2024
train.py): inner `MSE + 0.02 Grad`, 3 steps for VoxelMorph (set here) and 5 for
TransMorph, and the unsupervised baseline `MSE + 0.02 Grad` as well:
    --config.model.name=transmorph --config.ofg.steps=5
    --config.train.mode=unsupervised
"""

import ml_collections

from ofg_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.data.name = "abdomen_ct"
    config.data.root = "data/AbdomenCTCT"
    # None: the voxel size and orientation are read from the first training
    # image's NIfTI header (Learn2Reg's release has 2 mm voxels).
    config.data.spacing = None
    config.data.orientation = None
    # A Learn2Reg dataset JSON ("" = ROOT/AbdomenCTCT_dataset.json), or the
    # reference's training pairs file {"pairs": [[i, j], ...]} with its test pairs
    # file in test_pairs_json (then also the validation pairs, as it validates).
    config.data.pairs_json = ""
    config.data.test_pairs_json = ""
    config.data.augment = False

    config.ofg.similarity = "mse"
    config.ofg.reg_weight = 0.02
    config.ofg.steps = 3
    # The unsupervised baseline of this dataset: MSE + 0.02 Grad.
    config.train.similarity = "mse"
    config.train.reference_reg_weight.unsupervised = 0.02
    return config
