"""Registering your own scans with a trained network: inference and its outputs.

    python -m ofg_jax.register --workdir W --moving m.nii.gz --fixed f.nii.gz --out DIR
    python -m ofg_jax.register --workdir W --pairs pairs.csv --out DIR

The network is rebuilt from ``W/config.json`` (``model.*`` and the grid
``data.img_size``) and its parameters are restored from ``W/checkpoints/<step>``:
by default the checkpoint of the best validation Dice of the run (``best.step`` in
the metadata of the latest checkpoint) when it is still on disk, else the latest.
The inputs must lie on the network's grid already: same shape as the model and,
for moving and fixed, the same affine; nothing is resampled.

Into ``DIR`` go ``warped.nii.gz`` (the moving image warped, linear),
``warped_seg.nii.gz`` (the moving labels warped, nearest neighbour, with
``--moving-seg``), ``disp.nii.gz`` (the displacement, ``(*S, 3)`` in voxels,
component ``k`` along array axis ``k``: the fixed voxel ``x`` takes the moving
value at ``x + disp(x)``) and ``jacobian.nii.gz`` (the determinant of the Jacobian
of ``x + disp(x)``), all with the fixed image's affine and header. Dice is the
mean over the labels present in the fixed segmentation, 0 excluded.

The functions :func:`load_trained` and :func:`register_arrays` do the same from
Python.
"""

import csv
import dataclasses
import functools
import json
import os
import sys
from typing import Any, Optional, Sequence

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import nibabel as nib
import numpy as np
import orbax.checkpoint as ocp

from ofg_jax import data as data_lib
from ofg_jax import dice as dice_per_label
from ofg_jax import jacobian_determinant
from ofg_jax import models
from ofg_jax import refine
from ofg_jax import registration_energy
from ofg_jax import train
from ofg_jax import warp
from ofg_jax.data import base
from ofg_jax.data import readers

EXIT_USAGE = 2  # Bad command line.
EXIT_FAILURE = 1  # Bad inputs, workdir or checkpoint.

OUTPUT_FILES = {"warped": "warped.nii.gz", "warped_seg": "warped_seg.nii.gz",
                "disp": "disp.nii.gz", "jacobian": "jacobian.nii.gz"}
SUMMARY_COLUMNS = ("name", "moving", "fixed", "dice", "non_pos_jacobian_pct",
                   "energy")
# Largest difference of two affines still taken as the same grid (mm).
AFFINE_TOLERANCE = 1e-3


# ---------------------------------------------------------------------------
# The trained network of a workdir.


@dataclasses.dataclass(frozen=True)
class Trained:
    """A network restored from a training workdir.

    Attributes:
      workdir: the training workdir.
      config: its training config (``config.json``).
      model: the network, built for ``img_size``.
      variables: the network's variables for ``model.apply`` (``params``, and
        ``batch_stats`` for networks with BatchNorm).
      step: the training step of the restored checkpoint.
      selection: why that checkpoint: "best validation Dice", "latest" or
        "as requested".
      img_size: ``(D, H, W)`` grid of the network, in voxels.
    """
    workdir: str
    config: ml_collections.ConfigDict
    model: nn.Module
    variables: Any
    step: int
    selection: str
    img_size: tuple[int, int, int]


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The training config saved in ``workdir/config.json``.

    Raises:
      FileNotFoundError: naming the missing workdir or file.
    """
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir} not found")
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: {workdir} is not a training workdir "
            "(python -m ofg_jax.main --workdir=... writes config.json)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def model_grid(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """The network's ``(D, H, W)``: ``data.img_size``, else the training data's grid."""
    img_size = config.data.get("img_size")
    if img_size:
        return tuple(int(n) for n in img_size)
    try:
        return tuple(data_lib.create(config.data, config.seed).img_size)
    except (OSError, ValueError) as e:
        raise ValueError(
            "config.json has no data.img_size and the grid of the training data "
            f"could not be read: {e}") from e


def _tuples(value):
    """JSON lists back to the tuples of the config (hashable module attributes)."""
    if isinstance(value, (list, tuple)):
        return tuple(_tuples(v) for v in value)
    return value


def build_model(config: ml_collections.ConfigDict,
                img_size: Sequence[int]) -> nn.Module:
    """``models.create(model.name, img_size, **other model.* keys)``."""
    overrides = {key: _tuples(value) for key, value in config.model.items()
                 if key != "name"}
    return models.create(config.model.name, img_size, **overrides)


def _checkpoint_manager(directory: str):
    """An orbax manager that only reads: it creates and deletes nothing."""
    # Not checkpoint.Checkpoints: that one removes unfinished temporary
    # directories, which may be the save in progress of a running training.
    return ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(create=False))


def select_checkpoint(manager, step: Optional[int]) -> tuple[int, str]:
    """The step to restore and why: ``step``, else the best by Dice, else the latest.

    The best is ``meta["best"]["step"]`` of the latest checkpoint (the evaluation
    with the highest validation Dice) when that checkpoint is still on disk.

    Raises:
      FileNotFoundError: no checkpoint, or no checkpoint ``step``.
    """
    steps = sorted(manager.all_steps())
    directory = str(manager.directory)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(
                f"no checkpoint {step} in {directory}; available steps: {steps}")
        return step, "as requested"
    meta = manager.restore(steps[-1], args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta
    best = (meta.get("best") or {}).get("step")
    if best in steps:
        return best, "best validation Dice"
    return steps[-1], "latest"


def load_trained(workdir: str, step: Optional[int] = None) -> Trained:
    """Rebuilds the network of a training workdir and restores its parameters.

    Args:
      workdir: a workdir of ``python -m ofg_jax.main``.
      step: the checkpoint to restore; None = the best by validation Dice if it
        is on disk, else the latest (see :func:`select_checkpoint`).

    Raises:
      FileNotFoundError: missing workdir, ``config.json`` or checkpoint (named).
      ValueError: a config whose model or grid cannot be rebuilt.
    """
    config = read_config(workdir)
    img_size = model_grid(config)
    model = build_model(config, img_size)
    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint in {workdir}: {directory} not found")
    manager = _checkpoint_manager(directory)
    try:
        step, selection = select_checkpoint(manager, step)
        meta = manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta
        # The saved train state's structure, restored onto the default device; the
        # optimiser's learning-rate schedule does not change that structure.
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
            jax.eval_shape(lambda: train.create_train_state(
                config, model, img_size, meta["steps_per_epoch"])))
        state = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target))).state
    finally:
        manager.close()
    return Trained(workdir=workdir, config=config, model=model,
                   variables=state.variables, step=int(step),
                   selection=selection, img_size=img_size)


# ---------------------------------------------------------------------------
# Registering one pair.


@functools.partial(jax.jit, static_argnames=("model",))
def _predict(model, variables, moving, fixed):
    return model.apply(variables, jnp.stack([moving, fixed], -1)[None],
                       train=False)[0]


_refine = jax.jit(refine, static_argnames=("steps", "similarity", "optimizer",
                                           "downsample"))


@functools.partial(jax.jit, static_argnames=("similarity",))
def _field_outputs(moving, fixed, disp, reg_weight, similarity):
    return {"warped": warp(moving, disp), "jacobian": jacobian_determinant(disp),
            "energy": registration_energy(moving, fixed, disp, reg_weight=reg_weight,
                                          similarity=similarity)}


_warp_labels = jax.jit(functools.partial(warp, order=0))


def register_arrays(trained: Trained, moving: np.ndarray, fixed: np.ndarray,
                    moving_seg: Optional[np.ndarray] = None,
                    fixed_seg: Optional[np.ndarray] = None, *,
                    refine_steps: int = 0,
                    labels: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """Registers ``moving`` to ``fixed`` with the trained network.

    With ``refine_steps > 0`` the prediction is refined by test-time OFG:
    ``refine`` for that many steps with the training config's inner settings
    (``ofg.learning_rate`` at epoch 0, ``ofg.reg_weight``, ``ofg.similarity``,
    ``ofg.optimizer``, ``ofg.downsample``).

    Args:
      trained: from :func:`load_trained`.
      moving, fixed: ``(*img_size)`` images, preprocessed like the training data.
      moving_seg, fixed_seg: optional ``(*img_size)`` integer label maps.
      refine_steps: test-time refinement steps (0 = the network's prediction).
      labels: labels whose Dice is averaged; None = those present in
        ``fixed_seg``, 0 excluded.

    Returns:
      ``disp`` ``(*S, 3)`` float32 displacement in voxels; ``warped`` ``(*S)``
      float32; ``jacobian`` ``(*S)`` float32 determinant;
      ``non_pos_jacobian_pct`` (% of voxels with det <= 0); ``network_energy`` and
      ``energy``: the OFG energy (``-NCC + ofg.reg_weight * Grad``, or MSE) of the
      prediction and of the returned field. With ``moving_seg``: ``warped_seg``
      ``(*S)`` int32 (nearest neighbour). With both segmentations: ``labels``,
      ``dice_per_label`` and their mean ``dice``.

    Raises:
      ValueError: an array not on the network's grid, no label to score, or
        refinement of a run trained with ``ofg.design`` other than "instance".
    """
    arrays = {"moving": moving, "fixed": fixed, "moving_seg": moving_seg,
              "fixed_seg": fixed_seg}
    for what, array in arrays.items():
        if array is not None and tuple(np.shape(array)) != trained.img_size:
            raise ValueError(f"{what} has shape {tuple(np.shape(array))}, the "
                             f"network's grid is {trained.img_size}")
    ofg = trained.config.ofg
    if refine_steps < 0:
        raise ValueError(f"refine_steps must be >= 0, got {refine_steps}")
    if refine_steps and ofg.get("design", "instance") != "instance":
        raise ValueError(
            f"test-time refinement optimises the field itself; this run was trained "
            f"with ofg.design={ofg.design!r}, whose ofg.learning_rate is meant for "
            "network weights")
    moving = jnp.asarray(moving, jnp.float32)
    fixed = jnp.asarray(fixed, jnp.float32)
    disp = _predict(trained.model, trained.variables, moving, fixed)
    outputs = _field_outputs(moving, fixed, disp, ofg.reg_weight, ofg.similarity)
    network_energy = outputs["energy"]
    if refine_steps:
        disp = _refine(moving, fixed, disp, steps=int(refine_steps),
                       learning_rate=ofg.learning_rate, reg_weight=ofg.reg_weight,
                       similarity=ofg.similarity, optimizer=ofg.optimizer,
                       downsample=ofg.downsample)
        outputs = _field_outputs(moving, fixed, disp, ofg.reg_weight, ofg.similarity)
    result = jax.device_get({"disp": disp, **outputs,
                             "network_energy": network_energy})
    result["energy"] = float(result["energy"])
    result["network_energy"] = float(result["network_energy"])
    result["non_pos_jacobian_pct"] = 100.0 * float(np.mean(result["jacobian"] <= 0))
    if moving_seg is None:
        return result
    warped_seg = _warp_labels(jnp.asarray(moving_seg, jnp.int32), disp)
    result["warped_seg"] = np.asarray(warped_seg)
    if fixed_seg is None:
        return result
    if labels is None:
        labels = [int(v) for v in np.unique(fixed_seg) if v != 0]
        if not labels:
            raise ValueError("the fixed segmentation holds no label other than 0")
    dice = np.asarray(dice_per_label(warped_seg, jnp.asarray(fixed_seg, jnp.int32),
                                     labels))
    result.update(labels=tuple(int(l) for l in labels), dice_per_label=dice,
                  dice=float(np.mean(dice)))
    return result


# ---------------------------------------------------------------------------
# NIfTI files.


def check_volume_headers(paths: dict[str, str], grid: Sequence[int]) -> None:
    """Checks input files from their headers alone (no voxels are read).

    Args:
      paths: ``{"moving image": path, "fixed image": path, ...}``; the key
        ``"fixed image"`` is required: every other affine is compared with it.
      grid: the network's ``(D, H, W)``.

    Raises:
      FileNotFoundError: a missing file.
      ValueError: an unreadable file, a volume that is not 3D or not on ``grid``,
        or an affine different from the fixed image's (files named).
    """
    images = {}
    for what, path in paths.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what} {path} not found")
        try:
            images[what] = nib.load(path)
        except Exception as e:  # nibabel raises many exception types.
            raise ValueError(f"could not read {what} {path} as NIfTI: "
                             f"{type(e).__name__}: {e}") from e
        shape = _spatial_shape(images[what].shape)
        if len(shape) != 3:
            raise ValueError(f"{what} {path} has shape {images[what].shape}; a 3D "
                             "volume is needed")
        if shape != tuple(grid):
            raise ValueError(
                f"{what} {path} has shape {shape}, the network's grid is "
                f"{tuple(grid)}; resample or crop it to the training grid first")
    fixed_affine = images["fixed image"].affine
    for what, image in images.items():
        if not np.allclose(image.affine, fixed_affine, rtol=0,
                           atol=AFFINE_TOLERANCE):
            difference = float(np.max(np.abs(image.affine - fixed_affine)))
            raise ValueError(
                f"{what} {paths[what]} and fixed image {paths['fixed image']} have "
                f"different affines (entries differ by up to {difference:.4g}); "
                "resample them onto one grid first")


def _spatial_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` without trailing singleton axes beyond the third."""
    shape = tuple(int(n) for n in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def read_volume(path: str, labels: bool = False) -> np.ndarray:
    """The ``(D, H, W)`` voxels of a 3D NIfTI file: float32, or int32 for labels."""
    array = readers.read_nifti(path, labels=labels)
    array = array.reshape(_spatial_shape(array.shape))
    return base.as_labels(array, path) if labels else base.as_image(array, path)


def write_like(path: str, array: np.ndarray, reference_path: str) -> None:
    """Writes ``array`` as NIfTI with the affine and header of ``reference_path``.

    The data type is that of ``array`` (not the reference's), without scaling and
    without the reference's display range.
    """
    reference = nib.load(reference_path)
    image = type(reference)(array, reference.affine, reference.header)
    image.set_data_dtype(array.dtype)
    image.header.set_slope_inter(None, None)
    image.header["cal_min"], image.header["cal_max"] = 0, 0
    nib.save(image, path)


@dataclasses.dataclass(frozen=True)
class PairFiles:
    """The input files of one registration (segmentations optional)."""
    name: str
    moving: str
    fixed: str
    moving_seg: Optional[str] = None
    fixed_seg: Optional[str] = None

    def roles(self) -> dict[str, str]:
        """``{description: path}`` of the files that are given."""
        roles = {"moving image": self.moving, "fixed image": self.fixed,
                 "moving segmentation": self.moving_seg,
                 "fixed segmentation": self.fixed_seg}
        return {what: path for what, path in roles.items() if path}


def register_files(trained: Trained, files: PairFiles, out_dir: str, *,
                   refine_steps: int = 0, figures: bool = False) -> dict[str, Any]:
    """Registers one pair of NIfTI files and writes the outputs into ``out_dir``.

    The files must have passed :func:`check_volume_headers`. Returns the result
    of :func:`register_arrays` plus ``written``, the paths of the files written.
    """
    moving, fixed = read_volume(files.moving), read_volume(files.fixed)
    moving_seg, fixed_seg = (read_volume(path, labels=True) if path else None
                             for path in (files.moving_seg, files.fixed_seg))
    result = register_arrays(trained, moving, fixed, moving_seg, fixed_seg,
                             refine_steps=refine_steps)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for key, name in OUTPUT_FILES.items():
        if key in result:
            written.append(os.path.join(out_dir, name))
            write_like(written[-1], np.asarray(result[key]), files.fixed)
    if figures:
        from ofg_jax import plot  # pylint: disable=g-import-not-at-top
        written += plot.write_pair_figures(out_dir, fixed, moving, result,
                                           fixed_seg=fixed_seg, title=files.name)
    result["written"] = written
    return result


def read_pairs_csv(path: str) -> list[PairFiles]:
    """The pairs of a CSV file: ``moving,fixed[,moving_seg,fixed_seg][,name]``.

    Relative paths are taken from the CSV file's folder; an empty segmentation
    cell means none. A missing name is ``<moving stem>_to_<fixed stem>``.

    Raises:
      FileNotFoundError: a missing CSV file.
      ValueError: missing or unknown columns, a row without moving or fixed, a
        fixed_seg without moving_seg, no rows, or names that are not distinct
        folder names.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pairs file {path} not found")
    folder = os.path.dirname(os.path.abspath(path))
    allowed = {"moving", "fixed", "moving_seg", "fixed_seg", "name"}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        if not {"moving", "fixed"} <= set(columns) or set(columns) - allowed:
            raise ValueError(
                f"{path} has columns {columns}; expected moving,fixed and optionally "
                "moving_seg, fixed_seg, name")
        rows = []
        for row in reader:
            if None in row:  # DictReader's key of the cells past the header's.
                raise ValueError(f"{path}, line {reader.line_num}: more cells than "
                                 f"the columns {columns}")
            rows.append((reader.line_num,
                         {k.strip(): (v or "").strip() for k, v in row.items()}))
    if not rows:
        raise ValueError(f"{path} lists no pairs")
    resolve = lambda p: os.path.join(folder, os.path.expanduser(p)) if p else None
    pairs = []
    for line, row in rows:
        if not row["moving"] or not row["fixed"]:
            raise ValueError(f"{path}, line {line}: moving and fixed must be given")
        if row.get("fixed_seg") and not row.get("moving_seg"):
            raise ValueError(f"{path}, line {line}: fixed_seg needs moving_seg")
        name = row.get("name") or f"{_stem(row['moving'])}_to_{_stem(row['fixed'])}"
        if os.sep in name or name in (".", ".."):
            raise ValueError(f"{path}, line {line}: the name {name!r} is not a "
                             "folder name")
        pairs.append(PairFiles(name, resolve(row["moving"]), resolve(row["fixed"]),
                               resolve(row.get("moving_seg")),
                               resolve(row.get("fixed_seg"))))
    names = [pair.name for pair in pairs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{path}: several pairs are named {duplicates}; give each a "
                         "unique name in a 'name' column")
    return pairs


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return os.path.splitext(name)[0]


# ---------------------------------------------------------------------------
# Command line.


def _define_flags(fv: flags.FlagValues) -> None:
    define = dict(flag_values=fv)
    flags.DEFINE_string("workdir", None, "Training workdir (config.json, "
                        "checkpoints/).", **define)
    flags.DEFINE_string("moving", None, "Moving image (NIfTI).", **define)
    flags.DEFINE_string("fixed", None, "Fixed image (NIfTI); the outputs take its "
                        "affine and header.", **define)
    flags.DEFINE_string("moving-seg", None, "Moving label map: warped too.", **define)
    flags.DEFINE_string("fixed-seg", None, "Fixed label map: with --moving-seg, "
                        "Dice is printed.", **define)
    flags.DEFINE_string("pairs", None, "Batch mode: CSV file with columns moving,"
                        "fixed[,moving_seg,fixed_seg][,name] (paths relative to the "
                        "CSV's folder); one subfolder of --out per pair and "
                        "summary.csv.", **define)
    flags.DEFINE_string("out", None, "Output folder.", **define)
    flags.DEFINE_integer("refine-steps", 0, "Test-time OFG refinement steps with "
                         "the run's ofg.* settings (0 = none).", lower_bound=0,
                         **define)
    flags.DEFINE_integer("checkpoint", None, "Checkpoint step; default: the best "
                         "validation Dice if still on disk, else the latest.",
                         **define)
    flags.DEFINE_bool("figures", False, "Also write the PNG figures of each pair.",
                      **define)
    flags.DEFINE_bool("traceback", False, "Show the traceback of expected errors.",
                      **define)


class _UsageError(Exception):
    """A bad command line."""


def _pairs_from_flags(fv: flags.FlagValues) -> list[PairFiles]:
    single = [fv[name].value for name in ("moving", "fixed", "moving-seg",
                                          "fixed-seg")]
    if fv.pairs:
        if any(single):
            raise _UsageError("give either --pairs or --moving/--fixed, not both")
        return read_pairs_csv(fv.pairs)
    if not (fv.moving and fv.fixed):
        raise _UsageError("--moving and --fixed (or --pairs) are required")
    if fv["fixed-seg"].value and not fv["moving-seg"].value:
        raise _UsageError("--fixed-seg needs --moving-seg")
    return [PairFiles(f"{_stem(fv.moving)}_to_{_stem(fv.fixed)}", *single)]


def _format_metrics(result: dict[str, Any], refined: bool) -> str:
    lines = []
    if "dice" in result:
        lines.append(f"dice: {result['dice']:.6f} (mean over "
                     f"{len(result['labels'])} labels of the fixed segmentation)")
    lines.append(f"non_pos_jacobian_pct: {result['non_pos_jacobian_pct']:.6f}")
    if refined:
        lines.append(f"energy: {result['network_energy']:.6f} (network) -> "
                     f"{result['energy']:.6f} (refined)")
    return "\n".join(lines)


def _run(fv: flags.FlagValues) -> None:
    if not fv.workdir or not fv.out:
        raise _UsageError("--workdir and --out are required")
    pairs = _pairs_from_flags(fv)
    grid = model_grid(read_config(fv.workdir))
    for pair in pairs:
        check_volume_headers(pair.roles(), grid)
    trained = load_trained(fv.workdir, fv.checkpoint)
    print(f"checkpoint: step {trained.step} of "
          f"{os.path.abspath(os.path.join(fv.workdir, 'checkpoints'))} "
          f"({trained.selection})")
    batch = bool(fv.pairs)
    rows = []
    for pair in pairs:
        out_dir = os.path.join(fv.out, pair.name) if batch else fv.out
        result = register_files(trained, pair, out_dir,
                                refine_steps=fv["refine-steps"].value,
                                figures=fv.figures)
        metrics = _format_metrics(result, refined=fv["refine-steps"].value > 0)
        print(f"{pair.name}:\n{metrics}" if batch else metrics)
        rows.append({"name": pair.name, "moving": pair.moving, "fixed": pair.fixed,
                     "dice": result.get("dice", ""),
                     "non_pos_jacobian_pct": result["non_pos_jacobian_pct"],
                     "energy": result["energy"]})
    if batch:
        path = os.path.join(fv.out, "summary.csv")
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {len(rows)} pairs into {fv.out} and {path}")
    else:
        print(f"wrote {', '.join(result['written'])}")


def print_error(error: Any) -> None:
    """Prints ``error: <message>`` on stderr, as one line."""
    print("error: " + " ".join(str(error).split()), file=sys.stderr)


def main(argv: Sequence[str]) -> int:
    """Runs the command line ``argv`` (program name first); returns the exit status.

    Expected errors print one line ``error: ...`` on stderr: status 2 for a bad
    command line, 1 for bad inputs, workdir or checkpoint.
    """
    fv = flags.FlagValues()
    _define_flags(fv)
    if any(arg in ("-h", "--help", "-help") for arg in argv[1:]):
        print("\n\n".join(__doc__.split("\n\n")[:2]) + "\n\n" + fv.get_help())
        return 0
    try:
        rest = fv(list(argv))
        if len(rest) > 1:
            raise _UsageError(f"unexpected arguments {rest[1:]}")
        _run(fv)
    except (flags.Error, _UsageError) as e:
        print_error(e)
        return EXIT_USAGE
    except (FileNotFoundError, ValueError) as e:
        if fv.is_parsed() and fv.traceback:
            raise
        print_error(e)
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
