"""Registering scans with a trained network: the arrays, the files, the figures.

:func:`register_arrays` registers one pair of arrays on the network's grid
(optionally refined by test-time OFG with the run's inner optimiser) and returns
the displacement, the warped images, the Jacobian determinant and the scores;
:func:`register_files` does it for NIfTI files and writes the outputs;
:func:`write_run_figures` draws a registered validation pair and the training
curves. The command line is ``python -m ofg_jax.register``.
"""

import csv
import dataclasses
import functools
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ofg_jax import figures
from ofg_jax import nifti
from ofg_jax.data import Pair
from ofg_jax.inference import Trained
from ofg_jax.inference import predict_jit
from ofg_jax.metrics import dice_per_label
from ofg_jax.metrics import jacobian_determinant
from ofg_jax.refine import registration_energy
from ofg_jax.refiner import RefineSettings
from ofg_jax.refiner import make_refiner
from ofg_jax.volumes import volume_shape
from ofg_jax.warp import warp

OUTPUT_FILES = {"warped": "warped.nii.gz", "warped_seg": "warped_seg.nii.gz",
                "disp": "disp.nii.gz", "jacobian": "jacobian.nii.gz"}
# Largest difference of two affines still taken as the same grid (mm).
AFFINE_TOLERANCE = 1e-3


@functools.partial(jax.jit, static_argnames=("similarity",))
def _field_outputs(moving, fixed, disp, reg_weight, similarity):
    return {"warped": warp(moving, disp), "jacobian": jacobian_determinant(disp),
            "energy": registration_energy(moving, fixed, disp, reg_weight=reg_weight,
                                          similarity=similarity)}


_warp_labels = jax.jit(functools.partial(warp, order=0))


@functools.lru_cache(maxsize=8)
def _jitted_refiner(settings: RefineSettings, img_size: tuple[int, ...]):
    return jax.jit(make_refiner(settings, img_size))


def register_arrays(trained: Trained, moving: np.ndarray, fixed: np.ndarray,
                    moving_seg: Optional[np.ndarray] = None,
                    fixed_seg: Optional[np.ndarray] = None, *,
                    refine_steps: int = 0,
                    labels: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """Registers ``moving`` to ``fixed`` with the trained network.

    With ``refine_steps > 0`` the prediction is refined by test-time OFG: the
    run's inner optimiser (``ofg_jax.refiner``, settings of ``config.ofg`` with
    the learning rate of epoch 0) for that many steps.

    Args:
      trained: from ``ofg_jax.inference.load_trained``.
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
    settings = RefineSettings.from_config(trained.config.ofg)
    if refine_steps < 0:
        raise ValueError(f"refine_steps must be >= 0, got {refine_steps}")
    if refine_steps and settings.design != "instance":
        raise ValueError(
            f"test-time refinement optimises the field itself; this run was trained "
            f"with ofg.design={settings.design!r}, whose ofg.learning_rate is meant for "
            "network weights")
    moving = jnp.asarray(moving, jnp.float32)
    fixed = jnp.asarray(fixed, jnp.float32)
    disp = predict_jit(trained.model, trained.variables, moving, fixed)
    outputs = _field_outputs(moving, fixed, disp, settings.reg_weight,
                             settings.similarity)
    network_energy = outputs["energy"]
    if refine_steps:
        refiner = _jitted_refiner(dataclasses.replace(settings, steps=int(refine_steps)),
                                  trained.img_size)
        disp = refiner(moving, fixed, disp, settings.learning_rate)
        outputs = _field_outputs(moving, fixed, disp, settings.reg_weight,
                                 settings.similarity)
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
        images[what] = nifti.load(path, what)
        shape = volume_shape(images[what].shape)
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
                   refine_steps: int = 0, with_figures: bool = False) -> dict[str, Any]:
    """Registers one pair of NIfTI files and writes the outputs into ``out_dir``.

    The files must have passed :func:`check_volume_headers`. With
    ``with_figures`` the pair's figures are written too. Returns the result
    of :func:`register_arrays` plus ``written``, the paths of the files written.
    """
    moving, fixed = nifti.read_volume(files.moving), nifti.read_volume(files.fixed)
    moving_seg, fixed_seg = (nifti.read_volume(path, labels=True) if path else None
                             for path in (files.moving_seg, files.fixed_seg))
    result = register_arrays(trained, moving, fixed, moving_seg, fixed_seg,
                             refine_steps=refine_steps)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for key, name in OUTPUT_FILES.items():
        if key in result:
            written.append(os.path.join(out_dir, name))
            nifti.write_like(written[-1], np.asarray(result[key]), files.fixed)
    if with_figures:
        written += figures.write_pair_figures(out_dir, fixed, moving, result,
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
        name = row.get("name") or pair_name(row["moving"], row["fixed"])
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


def pair_name(moving: str, fixed: str) -> str:
    """``<moving stem>_to_<fixed stem>``: the default name of a pair of files."""
    return f"{_stem(moving)}_to_{_stem(fixed)}"


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return os.path.splitext(name)[0]


def write_run_figures(out_dir: str, trained: Trained, pair: Pair,
                      labels: Sequence[int], metrics_csv: str, title: str = ""
                      ) -> list[str]:
    """The figures of a training run; returns the paths written.

    ``curves.png`` from ``metrics_csv``, then the figures of
    ``figures.write_pair_figures`` for ``pair`` registered by ``trained``, Dice
    over ``labels``.
    """
    os.makedirs(out_dir, exist_ok=True)
    curves = figures.plot_training_curves(os.path.join(out_dir, "curves.png"),
                                          metrics_csv, title=title)
    result = register_arrays(trained, pair.moving, pair.fixed, pair.moving_seg,
                             pair.fixed_seg, labels=labels)
    return [curves] + figures.write_pair_figures(
        out_dir, pair.fixed, pair.moving, result, fixed_seg=pair.fixed_seg,
        title=f"{pair.name}, step {trained.step}")
