"""Registering pairs of NIfTI files: the pairs CSV, header checks, the outputs.

:func:`read_pairs_csv` reads the pairs of ``register --pairs``;
:func:`check_headers` checks a pair's files from their headers alone, so that
every pair of a batch is checked before the first is registered;
:func:`register_files` registers one pair, with a trained network or by
optimisation alone (``ofg_jax.registration.register_volumes``), and writes its
outputs (``ofg_jax.registration.transforms.OUTPUT_FILES``) only once everything is computed.
"""

import csv
import dataclasses
import os
from typing import TYPE_CHECKING, Any, Optional, Sequence

import nibabel as nib
import numpy as np

from ofg_jax import nifti
from ofg_jax.nifti import AFFINE_TOLERANCE
from ofg_jax.volumes import as_mask

# The registration (JAX) is imported by register_files: a command line reads the
# pairs and checks their headers (this module's other functions) before it
# imports JAX.
if TYPE_CHECKING:
    from ofg_jax.registration.scans import Method


@dataclasses.dataclass(frozen=True)
class PairFiles:
    """The input files of one registration (segmentations and cost-function masks
    optional)."""
    name: str
    moving: str
    fixed: str
    moving_seg: Optional[str] = None
    fixed_seg: Optional[str] = None
    moving_mask: Optional[str] = None
    fixed_mask: Optional[str] = None

    def roles(self) -> dict[str, str]:
        """``{description: path}`` of the files that are given."""
        roles = {"moving image": self.moving, "fixed image": self.fixed,
                 "moving segmentation": self.moving_seg,
                 "fixed segmentation": self.fixed_seg,
                 "moving mask": self.moving_mask, "fixed mask": self.fixed_mask}
        return {what: path for what, path in roles.items() if path}


def check_headers(files: PairFiles) -> list[str]:
    """Checks the input files of a pair from their headers alone (no voxels read),
    and the cost-function masks' voxels too (:func:`read_mask`: small, and a bad
    mask is then found before any pair of a batch is registered).

    Returns:
      A warning line for each file whose header states no orientation
      (``ofg_jax.nifti.orientation_warning``).

    Raises:
      FileNotFoundError: a missing file.
      ValueError: an unreadable file, one that is not a single 3D volume, a
        segmentation whose grid (shape or affine) differs from its image's, or a
        mask with non-finite values, values outside ``[0, 1]`` or only zeros.
    """
    grids = {what: nifti.volume_grid(path, what)
             for what, path in files.roles().items()}
    for side in ("moving", "fixed"):
        seg = grids.get(f"{side} segmentation")
        if seg is None:
            continue
        image = grids[f"{side} image"]
        seg_path, image_path = getattr(files, f"{side}_seg"), getattr(files, side)
        if seg[0] != image[0]:
            raise ValueError(f"{side} segmentation {seg_path} has shape {seg[0]}, "
                             f"its image {image_path} {image[0]}: they must share a "
                             "grid")
        if not np.allclose(seg[1], image[1], rtol=0, atol=AFFINE_TOLERANCE):
            difference = float(np.max(np.abs(seg[1] - image[1])))
            raise ValueError(f"{side} segmentation {seg_path} and its image "
                             f"{image_path} have different affines (entries differ "
                             f"by up to {difference:.4g}): they must share a grid")
    for path, what in ((files.moving_mask, "moving mask"),
                       (files.fixed_mask, "fixed mask")):
        if path:
            read_mask(path, what)
    warnings = (nifti.orientation_warning(path, what)
                for what, path in files.roles().items())
    return [line for line in warnings if line]


def read_mask(path: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """A cost-function mask file (any geometry): its voxels, checked (finite,
    within ``[0, 1]``, somewhere > 0; ``ofg_jax.volumes.as_mask``) as float32, and
    its ``(4, 4)`` affine."""
    _, affine = nifti.volume_grid(path, what)
    return as_mask(nifti.read_array(path), path, what), affine


def register_files(method: "Method", files: PairFiles, out_dir: str, *,
                   refine_steps: int = 0, with_figures: bool = False,
                   affine: bool = False, inverse: bool = False,
                   fov_center: Optional[Sequence[float]] = None,
                   voxel_size: Optional[float] = None) -> dict[str, Any]:
    """Registers one pair of NIfTI files and writes the outputs into ``out_dir``.

    ``method`` is a trained network (``ofg_jax.registration.network.load_trained``) or the
    settings of optimisation alone (``ofg_jax.optimize.OptimizeSettings``). The
    files must have passed :func:`check_headers`. Every voxel is read and
    checked and the registration computed before anything is written. Returns
    the result of :func:`~ofg_jax.registration.register_volumes` plus
    ``written``, the paths written.
    """
    # pylint: disable=g-import-not-at-top
    from ofg_jax.registration import figures
    from ofg_jax.registration import geometry
    from ofg_jax.registration.scans import register_volumes
    from ofg_jax.registration.transforms import AFFINE_FILE
    from ofg_jax.registration.transforms import INVERSE_FILE
    from ofg_jax.registration.transforms import OUTPUT_FILES
    from ofg_jax.registration.transforms import Volume
    from ofg_jax.registration.transforms import read_volume
    moving, fixed = read_volume(files.moving, "moving image"), read_volume(
        files.fixed, "fixed image")
    moving_seg, fixed_seg = (read_volume(path, what, labels=True) if path else None
                             for path, what in ((files.moving_seg, "moving segmentation"),
                                                (files.fixed_seg, "fixed segmentation")))
    moving_mask, fixed_mask = (Volume(*read_mask(path, what)) if path else None
                               for path, what in ((files.moving_mask, "moving mask"),
                                                  (files.fixed_mask, "fixed mask")))
    result = register_volumes(method, moving, fixed, moving_seg, fixed_seg,
                              refine_steps=refine_steps, affine=affine,
                              inverse=inverse, fov_center=fov_center,
                              voxel_size=voxel_size, fixed_mask=fixed_mask,
                              moving_mask=moving_mask)
    fixed_image = nib.load(files.fixed)
    os.makedirs(out_dir, exist_ok=True)
    join = lambda name: os.path.join(out_dir, name)
    written = []
    for key in ("warped", "warped_seg", "disp", "jacobian"):
        if key in result and (key != "disp" or result["direct"]):
            written.append(join(OUTPUT_FILES[key]))
            nifti.write_like(written[-1], np.asarray(result[key]), fixed_image)
    written.append(join(OUTPUT_FILES["transform"]))
    geometry.write_itk_displacement(written[-1], result["transform"].field_lps,
                                    fixed_image)
    if result["transform"].matrix is not None:
        written.append(join(AFFINE_FILE))
        geometry.write_itk_affine(written[-1], result["transform"].matrix)
    if inverse:
        written.append(join(INVERSE_FILE))
        geometry.write_itk_displacement(written[-1], result["inverse_lps"],
                                        nib.load(files.moving))
    if with_figures:
        if result["direct"]:
            shown_moving, shown = moving.array, result
        else:  # The moving image on the fixed grid as the scanner placed it, and
            # the deformable part of the transform in fixed voxels.
            shown_moving = np.asarray(geometry.resample(moving.array, moving.affine,
                                                        fixed.grid))
            to_voxels = np.linalg.inv(fixed.affine[:3, :3])
            shown = dict(result, disp=(result["transform"].field_lps
                                       * geometry.RAS_TO_LPS) @ to_voxels.T)
        written += figures.write_pair_figures(
            out_dir, fixed.array, shown_moving, shown,
            fixed_seg=None if fixed_seg is None else fixed_seg.array, title=files.name)
    result["written"] = written
    return result


def read_pairs_csv(path: str) -> list[PairFiles]:
    """The pairs of a CSV file:
    ``moving,fixed[,moving_seg,fixed_seg][,moving_mask,fixed_mask][,name]``.

    Relative paths are taken from the CSV file's folder; an empty segmentation
    or mask cell means none (each mask column is optional on its own). A missing
    name is ``<moving stem>_to_<fixed stem>``.

    Raises:
      FileNotFoundError: a missing CSV file.
      ValueError: missing or unknown columns, a row without moving or fixed, a
        fixed_seg without moving_seg, no rows, or names that are not distinct
        folder names.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pairs file {path} not found")
    folder = os.path.dirname(os.path.abspath(path))
    allowed = {"moving", "fixed", "moving_seg", "fixed_seg", "moving_mask",
               "fixed_mask", "name"}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        if not {"moving", "fixed"} <= set(columns) or set(columns) - allowed:
            raise ValueError(
                f"{path} has columns {columns}; expected moving,fixed and optionally "
                "moving_seg, fixed_seg, moving_mask, fixed_mask, name")
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
                               resolve(row.get("fixed_seg")),
                               resolve(row.get("moving_mask")),
                               resolve(row.get("fixed_mask"))))
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

