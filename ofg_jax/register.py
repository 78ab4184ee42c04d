"""Registering your own scans with a trained network, from the command line.

    python -m ofg_jax.register --workdir W --moving m.nii.gz --fixed f.nii.gz --out DIR
    python -m ofg_jax.register --workdir W --pairs pairs.csv --out DIR

The network is rebuilt from ``W/config.json`` and restored from its best
checkpoint by validation Dice when it is still on disk, else the latest
(``--checkpoint=STEP`` picks one). The inputs must lie on the network's grid
already: same shape as the model and, for moving and fixed, the same affine;
nothing is resampled.

Into ``DIR`` go ``warped.nii.gz`` (the moving image warped, linear),
``warped_seg.nii.gz`` (the moving labels warped, nearest neighbour, with
``--moving-seg``), ``disp.nii.gz`` (the displacement, ``(*S, 3)`` in voxels,
component ``k`` along array axis ``k``: the fixed voxel ``x`` takes the moving
value at ``x + disp(x)``) and ``jacobian.nii.gz`` (the determinant of the Jacobian
of ``x + disp(x)``), all with the fixed image's affine and header. Dice is the
mean over the labels present in the fixed segmentation, 0 excluded. From Python:
``ofg_jax.inference.load_trained`` and ``ofg_jax.registration.register_arrays``.
"""

import csv
import os
import sys
from typing import Any, Sequence

from absl import flags

from ofg_jax import cli
from ofg_jax import inference
from ofg_jax import registration
from ofg_jax.registration import PairFiles

SUMMARY_COLUMNS = ("name", "moving", "fixed", "dice", "non_pos_jacobian_pct",
                   "energy")


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
    cli.define_traceback_flag(fv)


def _pairs_from_flags(fv: flags.FlagValues) -> list[PairFiles]:
    single = [fv[name].value for name in ("moving", "fixed", "moving-seg",
                                          "fixed-seg")]
    if fv.pairs:
        if any(single):
            raise cli.UsageError("give either --pairs or --moving/--fixed, not both")
        return registration.read_pairs_csv(fv.pairs)
    if not (fv.moving and fv.fixed):
        raise cli.UsageError("--moving and --fixed (or --pairs) are required")
    if fv["fixed-seg"].value and not fv["moving-seg"].value:
        raise cli.UsageError("--fixed-seg needs --moving-seg")
    return [PairFiles(registration.pair_name(fv.moving, fv.fixed), *single)]


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
    pairs = _pairs_from_flags(fv)
    grid = inference.model_grid(inference.read_config(fv.workdir))
    for pair in pairs:
        registration.check_volume_headers(pair.roles(), grid)
    trained = inference.load_trained(fv.workdir, fv.checkpoint)
    print(f"checkpoint: step {trained.step} of "
          f"{os.path.abspath(os.path.join(fv.workdir, 'checkpoints'))} "
          f"({trained.selection})")
    batch = bool(fv.pairs)
    rows = []
    for pair in pairs:
        out_dir = os.path.join(fv.out, pair.name) if batch else fv.out
        result = registration.register_files(
            trained, pair, out_dir, refine_steps=fv["refine-steps"].value,
            with_figures=fv.figures)
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


def main(argv: Sequence[str]) -> int:
    """Runs the command line ``argv`` (program name first); returns the exit status."""
    fv = flags.FlagValues()
    _define_flags(fv)
    return cli.run(_run, fv, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
