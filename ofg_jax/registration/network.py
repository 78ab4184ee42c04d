"""A trained network: restored from a training workdir, and its prediction.

:func:`load_trained` rebuilds the network of a workdir from its ``config.json``
(``model.*`` and the grid ``data.img_size``) and restores its variables from
``checkpoints/<step>``: by default the checkpoint of the best validation Dice
(``best.step`` in the metadata of the latest checkpoint) when it is still on
disk, else the latest. It reads only: nothing in the workdir is created or
removed, so it is safe beside a running training.
"""

import dataclasses
import os
from typing import Any, Callable, Union

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from ofg_jax.settings import config as config_lib
from ofg_jax import data as data_lib
from ofg_jax.registration import geometry
from ofg_jax import models
from ofg_jax import nifti
from ofg_jax.settings.config import read_config
from ofg_jax.settings.inner_optimizer import RefineSettings
from ofg_jax.settings.inner_optimizer import make_refiner
from ofg_jax.resolution import block_mean
from ofg_jax.resolution import upsample_displacement


@dataclasses.dataclass(frozen=True)
class Trained:
    """A network with its variables, and where they came from.

    Attributes:
      config: the training config (``config.json``).
      model: the network, built for ``img_size``.
      variables: the network's variables for ``model.apply`` (``params``, and
        ``batch_stats`` for networks with BatchNorm).
      step: the training step of the variables.
      selection: why that checkpoint: "best validation Dice", "latest", "as
        requested", or "in memory" (a running training's state).
      img_size: ``(D, H, W)`` grid of the network, in voxels.
      workdir: the training workdir.
      downsample: the network's resolution factor (``data.downsample``): it
        registers images of ``downsample * img_size``.
    """
    config: ml_collections.ConfigDict
    model: models.RegistrationNetwork
    variables: Any
    step: int
    selection: str
    img_size: tuple[int, int, int]
    workdir: str = ""
    downsample: int = 1

    @property
    def full_size(self) -> tuple[int, int, int]:
        """``(D, H, W)`` of the images the network registers: ``img_size`` times
        ``downsample``."""
        return tuple(n * self.downsample for n in self.img_size)


def predict(model: models.RegistrationNetwork, variables: Any, moving: jax.Array,
            fixed: jax.Array, downsample: int = 1) -> jax.Array:
    """The network's displacement ``(*S, 3)`` (voxels) for one pair of ``(*S)`` images.

    Evaluation mode (no dropout, BatchNorm running statistics). A network trained
    at ``1 / downsample`` resolution (``data.downsample``) sees the block means
    of the images, and its displacement is upsampled to ``(*S, 3)`` in full
    voxels (``ofg_jax.resolution``). Pure: call it inside ``jax.jit``, or use
    :func:`predict_jit`.
    """
    if downsample > 1:
        moving, fixed = block_mean(moving, downsample), block_mean(fixed, downsample)
    disp = model.apply(variables, jnp.stack([moving, fixed], -1)[None], train=False)[0]
    return upsample_displacement(disp, downsample) if downsample > 1 else disp


predict_jit = jax.jit(predict, static_argnums=(0, 4))


def registration_fn(trained: "Trained", refine_steps: int = 0
                    ) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Jitted ``(moving, fixed) -> disp`` of ``trained``: its prediction, refined
    by ``refine_steps`` steps of the run's inner optimiser (test-time OFG, at the
    learning rate of epoch 0, on the images' grid).

    Raises:
      ValueError: refinement of a run whose inner optimiser trains network
        weights (``ofg.design="network"``), or ``refine_steps < 0``.
    """
    settings = RefineSettings.from_config(trained.config.ofg).at_test_time(refine_steps)
    refiner = make_refiner(settings, trained.full_size) if refine_steps else None

    @jax.jit
    def register(variables, moving, fixed):
        disp = predict(trained.model, variables, moving, fixed, trained.downsample)
        return refiner(moving, fixed, disp, settings.learning_rate) if refiner else disp

    return lambda moving, fixed: register(trained.variables, moving, fixed)


def network_geometry(config: ml_collections.ConfigDict
                     ) -> tuple[tuple[float, float, float], str]:
    """The voxel size (mm) and orientation (axis codes) of the network's grid.

    ``config.data.spacing`` and ``config.data.orientation`` where the config
    states them; where they are None, read from the header of the training
    data's first image (the NIfTI datasets; the data must be on disk).

    Raises:
      ValueError: no geometry in the config and none readable from the data.
    """
    spacing, axcodes = config.data.get("spacing"), config.data.get("orientation")
    if spacing is None or axcodes is None:
        header_grid = geometry.grid_of(nifti.load(_header_source(config),
                                                  "training image"))
        spacing = header_grid.spacing if spacing is None else spacing
        axcodes = header_grid.axcodes if axcodes is None else axcodes
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"data.spacing must be 3 positive voxel sizes in mm, got "
                         f"{spacing}")
    geometry.orientation_matrix(axcodes)  # Checks the codes.
    return spacing, str(axcodes).upper()


def _header_source(config: ml_collections.ConfigDict) -> str:
    """A training image whose header gives the grid's geometry, or a ValueError."""
    missing = ("the training config states no data.spacing / data.orientation "
               "(voxel size and axis codes of the network's grid)")
    try:
        dataset = data_lib.create(config.data, config.seed)
    except (OSError, ValueError) as e:
        raise ValueError(f"{missing}, and the training data to read them from is not "
                         f"available: {e}") from e
    if getattr(dataset, "atlas_path", None):  # LPBA40: the atlas.
        return dataset.atlas_path
    if getattr(dataset, "train_keys", None):  # Abdomen CT: the first image.
        return os.path.join(dataset.root, dataset.train_keys[0])
    raise ValueError(f"{missing}, and the {config.data.name} data has no headers to "
                     "read them from; set them in the config")


def model_grid(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """The network's ``(D, H, W)``: the images' grid (``data.img_size``, else the
    training data's) divided by ``data.downsample``."""
    img_size = config.data.get("img_size")
    factor = int(config.data.get("downsample") or 1)
    if img_size:
        return tuple(int(n) // factor for n in img_size)
    try:
        return tuple(data_lib.create(config.data, config.seed).img_size)
    except (OSError, ValueError) as e:
        raise ValueError(
            "config.json has no data.img_size and the grid of the training data "
            f"could not be read: {e}") from e


def _read_only_manager(directory: str) -> ocp.CheckpointManager:
    """An orbax manager that only reads: it creates and deletes nothing."""
    # Not checkpoint.Checkpoints: that one removes unfinished temporary
    # directories, which may be the save in progress of a running training.
    return ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(create=False),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})


def _on_this_device(manager: ocp.CheckpointManager, step: int) -> Any:
    """The shapes and dtypes of checkpoint ``step``'s train state, placed on this
    process's first device: whatever devices and processes trained it."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
        manager.item_metadata(step).state)


# ``load_trained(step=...)``: a step, the best by validation Dice, or the latest.
Selection = Union[int, str, None]


def select_checkpoint(manager: ocp.CheckpointManager,
                      step: Selection) -> tuple[int, str]:
    """The step to restore and why.

    ``step`` is a step number, ``"latest"``, or ``"best"`` / None: the best by
    validation Dice (``meta["best"]["step"]`` of the latest checkpoint) when that
    checkpoint is still on disk, else the latest.

    Raises:
      FileNotFoundError: no checkpoint, or no checkpoint ``step``.
    """
    steps = sorted(manager.all_steps())
    directory = str(manager.directory)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    if step == "latest":
        return steps[-1], "latest"
    if step not in (None, "best"):
        if int(step) not in steps:
            raise FileNotFoundError(
                f"no checkpoint {step} in {directory}; available steps: {steps}")
        return int(step), "as requested"
    meta = manager.restore(steps[-1], args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta
    best = (meta.get("best") or {}).get("step")
    if best in steps:
        return best, "best validation Dice"
    return steps[-1], "latest"


def load_trained(workdir: str, step: Selection = None) -> Trained:
    """Rebuilds the network of a training workdir and restores its variables.

    Only the network's variables are kept (the optimiser state is not needed).
    They are placed on this process's first device, whatever devices and
    processes trained them.

    Args:
      workdir: a workdir of ``python -m ofg_jax.main``.
      step: the checkpoint to restore: a step, ``"latest"``, or ``"best"`` / None
        (the best by validation Dice if it is on disk, else the latest; see
        :func:`select_checkpoint`).

    Raises:
      FileNotFoundError: missing workdir, ``config.json`` or checkpoint (named).
      ValueError: a config whose model or grid cannot be rebuilt.
    """
    config = read_config(workdir)
    img_size = model_grid(config)
    model = config_lib.build_model(config, img_size)
    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint in {workdir}: {directory} not found")
    manager = _read_only_manager(directory)
    try:
        step, selection = select_checkpoint(manager, step)
        state = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_on_this_device(manager, step)))).state
    finally:
        manager.close()
    variables = {"params": state["params"]}
    if state.get("batch_stats"):
        variables["batch_stats"] = state["batch_stats"]
    return Trained(config=config, model=model, variables=variables, step=int(step),
                   selection=selection, img_size=img_size, workdir=workdir,
                   downsample=int(config.data.get("downsample") or 1))


def initial_variables(workdir: str, model: models.RegistrationNetwork) -> dict[str, Any]:
    """The variables of the network of ``workdir`` (:func:`load_trained`), to start
    ``model``'s training from (``train.init_from``).

    Raises:
      FileNotFoundError: no such workdir or checkpoint.
      ValueError: the two networks' variables differ in names or shapes (the
        first differing ones named, with their shapes).
    """
    trained = load_trained(workdir)
    wanted, found = _shapes(model.variable_shapes()), _shapes(trained.variables)
    differ = sorted(set(wanted) ^ set(found)) + sorted(
        path for path in set(wanted) & set(found) if wanted[path] != found[path])
    if differ:
        listed = "; ".join(f"{path}: {found.get(path, 'absent')} there, "
                           f"{wanted.get(path, 'absent')} here" for path in differ[:3])
        raise ValueError(
            f"train.init_from={workdir}: its network ({trained.config.model.name} at "
            f"{trained.img_size}) does not have this run's variables ({listed}"
            f"{f'; {len(differ) - 3} more' if len(differ) > 3 else ''})")
    return trained.variables


def _shapes(variables: Any) -> dict[str, tuple[int, ...]]:
    return {"/".join(path): tuple(leaf.shape) for path, leaf in
            traverse_util.flatten_dict(variables).items()}
