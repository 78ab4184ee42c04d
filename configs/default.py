"""Reference hyper-parameters of OFG training, shared by every dataset config.

The values are those of the public reference implementation: VoxelMorph trained
for 500 epochs at batch size 1 with PyTorch-style Adam (amsgrad) at lr 1e-4; every
training pair's prediction refined by 10 Adam steps at lr 0.1 on
`-NCC + 1.0 * Grad`; model loss `MSE(pred, refined) + 0.02 * Grad(pred)`. Both
learning rates decay by epoch as `lr0 * (1 - epoch / epochs) ** 0.9`.

A dataset config starts from `get_config()` and sets its `data` block.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    """Returns the shared defaults; `data` is left for the dataset config to fill."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    # The grid (D, H, W). None = read from the data (the synthetic data needs it).
    config.data.img_size = config_dict.placeholder(tuple)
    # The grid's voxel size (mm, per array axis) and orientation (the direction
    # each array axis runs to, e.g. "RAS": axis 0 to the Right, 1 Anterior, 2
    # Superior; "LIA" is FreeSurfer's). `ofg_jax.register` resamples scans of any
    # geometry onto this grid. None = read from the header of the training data's
    # first image (NIfTI datasets); data without headers must state them.
    config.data.spacing = config_dict.placeholder(tuple)
    config.data.orientation = config_dict.placeholder(str)
    # The reference's subsets: sort the files, random.seed(split_seed),
    # random.sample(files, n), sort again. 0 = every training subject / every
    # validation pair (the synthetic data: num_train subjects are generated).
    config.data.num_train = 0
    config.data.num_val = 0
    config.data.split_seed = 42
    # 2 = train at half resolution: the network, and the inner optimisation, on
    # block means of the images; evaluation at full resolution (the displacement
    # upsampled), so the metrics compare with full-resolution runs.
    config.data.downsample = 1

    # Any name known to `ofg_jax.models.create`: voxelmorph, vitvnet, transmorph.
    # The chosen network's options (widths, windows, `diffeomorphic`, `dtype`, ...)
    # are added to `model` with their published defaults when the config is
    # loaded, so `--config.model.<option>=...` works for each of them.
    config.model = ml_collections.ConfigDict()
    config.model.name = "voxelmorph"
    # Options of a network that differ from its published defaults for this
    # dataset, e.g. {"transmorph": {"window_size": (5, 6, 5)}}: they become the
    # defaults of config.model whenever that network is chosen.
    config.model_defaults = ml_collections.ConfigDict()

    config.train = ml_collections.ConfigDict()
    # "ofg": MSE to the refined field + reg_weight * Grad.
    # "unsupervised": -similarity(fixed, warped moving) + reg_weight * Grad.
    config.train.mode = "ofg"
    config.train.epochs = 500
    config.train.max_steps = 0  # Stop after this many updates; 0 = no cap.
    config.train.batch_size = 1
    config.train.learning_rate = 1e-4  # At epoch 0; decays polynomially by epoch.
    # The paper suggests 0.02 for small data sets; the reference code uses 0.
    config.train.weight_decay = 0.0
    # Weight of Grad(pred) in the model loss. None = the mode's reference value
    # below; pairs trained without an OFG target (ofg.every_epochs, ofg.fraction)
    # always use the unsupervised one.
    config.train.reg_weight = config_dict.placeholder(float)
    config.train.reference_reg_weight = ml_collections.ConfigDict(
        {"ofg": 0.02, "unsupervised": 1.0})
    config.train.similarity = "ncc"  # Unsupervised mode only: "ncc" or "mse".
    config.train.log_every = 50  # Steps between training rows in metrics.csv.
    config.train.eval_every_epochs = 1  # 0 = evaluate only at step 0 and the end.
    # PNGs of a registered validation pair and the curves in <workdir>/figures.
    config.train.figures = True
    # Rematerialise the network's stages in the backward pass (nn.remat): keeps
    # only each stage's inputs between the forward and the backward pass and runs
    # each stage's forward pass twice. The same losses and gradients; at full size
    # it lowers the OFG step's peak by 7 % (VoxelMorph), 31 % (ViT-V-Net) and
    # 39 % (TransMorph) (experiments/RESULTS.md: memory and time).
    config.train.remat = False
    # Start from the network of another workdir instead of a random
    # initialisation: one written by `ofg-import` (the authors' published
    # PyTorch weights) or a training run (its best checkpoint by validation Dice,
    # else the latest). Its network must have this config's variables (names and
    # shapes). Read once, when the run starts; a resume continues from the run's
    # own checkpoints. None = random initialisation from `seed`.
    config.train.init_from = config_dict.placeholder(str)

    # The inner optimisation that produces each pair's training target.
    config.ofg = ml_collections.ConfigDict()
    config.ofg.steps = 10
    config.ofg.learning_rate = 0.1  # At epoch 0; decays like the model's.
    config.ofg.reg_weight = 1.0
    config.ofg.similarity = "ncc"  # Energy: -NCC ("ncc") or MSE ("mse") + Grad.
    config.ofg.optimizer = "amsgrad"
    config.ofg.downsample = 1  # 2 = optimise a half-resolution field.
    # The paper's ablations (experiments/); the defaults are plain OFG.
    # Optimiser design: "instance" (the field itself, the default) or "network"
    # (a cascaded VoxelMorph of width network_width, re-initialised for every
    # pair, whose weights take the `steps` updates; use a smaller learning_rate).
    config.ofg.design = "instance"
    config.ofg.network_width = 32  # 32 = the reference VoxelMorph's channels.
    # OFG intensity. Pairs without an OFG target get the unsupervised loss
    # (-similarity + 1.0 * Grad): all pairs of the epochs e with
    # e % every_epochs != 0, and each pair with probability 1 - fraction.
    config.ofg.every_epochs = 1
    config.ofg.fraction = 1.0
    # Adds ncc_weight * -similarity(fixed, warped moving) to the OFG loss.
    config.ofg.ncc_weight = 0.0

    config.checkpoint = ml_collections.ConfigDict()
    # Checkpoints kept: the latest, plus the keep_best best by validation Dice.
    config.checkpoint.keep_best = 3
    config.checkpoint.every_steps = 0  # Extra saves between epoch ends; 0 = none.
    return config
