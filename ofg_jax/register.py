"""Registering your own scans with a trained network, from the command line.

    python -m ofg_jax.register --workdir W --moving m.nii.gz --fixed f.nii.gz --out DIR
    python -m ofg_jax.register --workdir W --pairs pairs.csv --out DIR

Scans of any shape, voxel size and orientation (anything nibabel reads). The
network is rebuilt from ``W/config.json`` and restored from its best checkpoint
by validation Dice when it is still on disk, else the latest
(``--checkpoint=STEP`` picks one). Moving and fixed are resampled once onto the
network's grid (the training data's voxel size and orientation, centred over
the fixed image or ``--fov-center``; inputs already on the training grid are
used as they are), optionally after an affine pre-alignment (``--affine``);
the result comes back on the fixed image's own grid.

Into ``DIR`` go, with the fixed image's affine and header: ``warped.nii.gz``
(the moving image sampled once through the whole transform, linear),
``warped_seg.nii.gz`` (the moving labels, nearest neighbour, with
``--moving-seg``), ``jacobian.nii.gz`` (the determinant of the deformable
part), ``transform.nii.gz`` (an ITK / ANTs displacement field: LPS mm, fixed
grid) and with ``--affine`` ``affine.mat`` (an ITK affine: ANTs applies
``-t transform.nii.gz -t affine.mat``); with ``--inverse`` ``inverse.nii.gz``
(fixed <- moving, on the moving grid). Inputs on the training grid also get
``disp.nii.gz`` (``(*S, 3)`` in voxels, component ``k`` along array axis ``k``:
the fixed voxel ``x`` takes the moving value at ``x + disp(x)``, the Learn2Reg
convention). Dice is the mean over the labels present in the fixed
segmentation, 0 excluded. Other images of the moving subject:
``python -m ofg_jax.apply``. From Python: ``ofg_jax.inference.load_trained``
and ``ofg_jax.registration.register_volumes``.
"""

import csv
import math
import os
import sys
from typing import Any, Optional, Sequence

from absl import flags

from ofg_jax import cli
from ofg_jax import inference
from ofg_jax import pair_files
from ofg_jax.pair_files import PairFiles

SUMMARY_COLUMNS = ("name", "moving", "fixed", "dice", "non_pos_jacobian_pct",
                   "energy")


def _define_flags(fv: flags.FlagValues) -> None:
    define = dict(flag_values=fv)
    flags.DEFINE_string("workdir", None, "Training workdir (config.json, "
                        "checkpoints/).", **define)
    flags.DEFINE_string("moving", None, "Moving image (NIfTI or anything nibabel "
                        "reads; any geometry).", **define)
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
    flags.DEFINE_bool("affine", False, "Align the moving image to the fixed one by a "
                      "12-parameter affine registration first (writes affine.mat).",
                      **define)
    flags.DEFINE_bool("inverse", False, "Also write inverse.nii.gz, the fixed <- "
                      "moving transform on the moving grid, and print its "
                      "inverse-consistency error.", **define)
    flags.DEFINE_string("fov-center", None, "X,Y,Z: centre (RAS mm, world "
                        "coordinates of the fixed image) of the network's field of "
                        "view; default: the fixed image's centre.", **define)
    cli.define_traceback_flag(fv)


def _pairs_from_flags(fv: flags.FlagValues) -> list[PairFiles]:
    single = [fv[name].value for name in ("moving", "fixed", "moving-seg",
                                          "fixed-seg")]
    if fv.pairs:
        if any(single):
            raise cli.UsageError("give either --pairs or --moving/--fixed, not both")
        return pair_files.read_pairs_csv(fv.pairs)
    if not (fv.moving and fv.fixed):
        raise cli.UsageError("--moving and --fixed (or --pairs) are required")
    if fv["fixed-seg"].value and not fv["moving-seg"].value:
        raise cli.UsageError("--fixed-seg needs --moving-seg")
    return [PairFiles(pair_files.pair_name(fv.moving, fv.fixed), *single)]


def _fov_center(value: Optional[str]) -> Optional[tuple[float, float, float]]:
    """The parsed ``--fov-center=X,Y,Z`` (RAS mm), or None."""
    if value is None:
        return None
    try:
        center = tuple(float(v) for v in value.split(","))
    except ValueError:
        center = ()
    if len(center) != 3 or not all(map(math.isfinite, center)):
        raise cli.UsageError(f"--fov-center must be three numbers X,Y,Z (RAS mm), "
                             f"got {value!r}")
    return center


def _check_out_dirs(out: str, names: Sequence[str]) -> None:
    """Raises ``NotADirectoryError`` when an output folder is an existing file."""
    for path in [out] + [os.path.join(out, name) for name in names]:
        if os.path.exists(path) and not os.path.isdir(path):
            raise NotADirectoryError(f"output folder {path} is a file")


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
        raise cli.UsageError("--workdir and --out are required")
    fov_center = _fov_center(fv["fov-center"].value)
    pairs = _pairs_from_flags(fv)
    inference.read_config(fv.workdir)
    batch = bool(fv.pairs)
    _check_out_dirs(fv.out, [pair.name for pair in pairs] if batch else [])
    for pair in pairs:
        pair_files.check_headers(pair)
    trained = inference.load_trained(fv.workdir, fv.checkpoint)
    print(f"checkpoint: step {trained.step} of "
          f"{os.path.abspath(os.path.join(fv.workdir, 'checkpoints'))} "
          f"({trained.selection})")
    rows = []
    for pair in pairs:
        out_dir = os.path.join(fv.out, pair.name) if batch else fv.out
        result = pair_files.register_files(
            trained, pair, out_dir, refine_steps=fv["refine-steps"].value,
            with_figures=fv.figures, affine=fv.affine, inverse=fv.inverse,
            fov_center=fov_center)
        metrics = _format_metrics(result, refined=fv["refine-steps"].value > 0)
        metrics += "".join(f"\n{line}" for line in result["log"])
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the command line ``argv`` (program name first; default ``sys.argv``);
    returns the exit status."""
    fv = flags.FlagValues()
    _define_flags(fv)
    return cli.run(_run, fv, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
