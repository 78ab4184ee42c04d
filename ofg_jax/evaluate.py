"""Evaluating a trained run on its held-out pairs, with Learn2Reg's metrics.

    python -m ofg_jax.evaluate --workdir=W [--split=test|val]
        [--checkpoint=best|latest|STEP] [--out=DIR] [--refine-steps=K] [--save-fields]

Restores the network of the training workdir ``W`` (by default the checkpoint of
the best validation Dice), registers every pair of the dataset's split (IXI:
atlas -> ``Test/*.pkl``; OASIS: ``Test/*.pkl``, else the Learn2Reg validation
pairs; LPBA40: ``Test/`` subjects -> atlas; Abdomen CT: the test pairs; the
synthetic data: its test subjects), optionally refined by ``K`` steps of test-time
OFG, and writes into ``DIR`` (default ``W/eval_<split>_step<step>``):

- ``pairs.csv``: one row per pair: ``name, dice, hd95, sdlogj,
  non_pos_jacobian_pct, identity_dice, seconds, dice_<label>...``;
- ``summary.json``: the mean and std of each column, with ``split``, ``step``,
  ``checkpoint`` and ``pairs``;
- ``dice_per_structure.png``: a box plot of the Dice of every label;
- with ``--save-fields``, ``fields/disp_<name>.nii.gz``: each displacement in the
  Learn2Reg convention, ``(*S, 3)`` in voxels on the fixed grid (fixed voxel ``x``
  samples the moving image at ``x + disp(x)``).

Dice as the dataset's reference computes it; HD95 (voxels) and SDlogJ as the
Learn2Reg evaluation does (``ofg_jax.metrics``); ``seconds``: the network and the
refinement of one pair, compiled, after a warm-up pair.
"""

import csv
import json
import os
import shutil
import sys
import time
from typing import Any, Optional, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np

from ofg_jax import cli
from ofg_jax import data as data_lib
from ofg_jax.training import scoring
from ofg_jax.registration import figures
from ofg_jax.registration import network as network_lib
from ofg_jax.metrics import hd95
from ofg_jax.warp import warp

SPLITS = ("test", "val")
COLUMNS = ("name", "dice", "hd95", "sdlogj", "non_pos_jacobian_pct", "identity_dice",
           "seconds")


def _scores(labels: Sequence[int]):
    """Jitted ``(disp, moving_seg, fixed_seg) -> (pair metrics, warped labels,
    identity metrics)``."""

    @jax.jit
    def scores(disp, moving_seg, fixed_seg):
        identity = scoring.pair_metrics(jnp.zeros_like(disp), moving_seg, fixed_seg,
                                           labels)
        return (scoring.pair_metrics(disp, moving_seg, fixed_seg, labels),
                warp(moving_seg, disp, order=0), identity)

    return scores


def _register_pairs(pairs, register, scores, labels: Sequence[int], dice_over: str,
                    fields: Optional[str]) -> list[dict[str, Any]]:
    """The rows of ``pairs.csv``; each displacement saved into ``fields`` if given."""
    rows = []
    for index, pair in enumerate(pairs):
        moving = jnp.asarray(pair.moving, jnp.float32)
        fixed = jnp.asarray(pair.fixed, jnp.float32)
        if index == 0:
            jax.block_until_ready(register(moving, fixed))  # Compilation.
        start = time.perf_counter()
        disp = jax.block_until_ready(register(moving, fixed))
        seconds = time.perf_counter() - start
        metrics, warped_seg, identity = jax.device_get(scores(
            disp, jnp.asarray(pair.moving_seg, jnp.int32),
            jnp.asarray(pair.fixed_seg, jnp.int32)))
        present = [l for l, p in zip(labels, metrics["present"]) if p]
        rows.append(scoring.pair_row(
            pair.name, metrics, labels, dice_over=dice_over,
            hd95=hd95(pair.fixed_seg, warped_seg, present),
            identity_dice=scoring.pair_dice(identity["dice"], identity["present"],
                                               dice_over),
            seconds=seconds))
        if fields:
            os.makedirs(fields, exist_ok=True)
            nib.save(nib.Nifti1Image(np.asarray(disp, np.float32), np.eye(4)),
                     os.path.join(fields, f"disp_{pair.name}.nii.gz"))
        print(f"{pair.name}: Dice {rows[-1]['dice']:.4f}, HD95 {rows[-1]['hd95']:.3f}, "
              f"SDlogJ {rows[-1]['sdlogj']:.4f}", file=sys.stderr)
    return rows


def evaluate_split(workdir: str, *, split: str = "test", checkpoint: Any = "best",
                   out: Optional[str] = None, refine_steps: int = 0,
                   save_fields: bool = False) -> dict[str, Any]:
    """Evaluates a training run on a split; writes and returns ``summary.json``.

    Everything is checked (workdir, checkpoint, split, grid, output folder)
    before anything is written.

    Args:
      workdir: a training workdir.
      split: "test" or "val".
      checkpoint: "best", "latest" or a step.
      out: output folder; default ``workdir/eval_<split>_step<step>``.
      refine_steps: test-time OFG steps after the network.
      save_fields: also write the displacements (Learn2Reg convention).

    Raises:
      FileNotFoundError: no workdir, checkpoint or split (named).
      ValueError: an empty split, a split off the network's grid, ``out`` a file.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    trained = network_lib.load_trained(workdir, checkpoint)
    data = data_lib.create(trained.config.data, trained.config.seed)
    if tuple(data.img_size) != tuple(trained.img_size):
        raise ValueError(f"the {split} split of {data.name} is on the grid "
                         f"{tuple(data.full_size)}, the network's is {trained.img_size} "
                         f"(data.downsample={trained.downsample})")
    pairs = data.test_pairs() if split == "test" else data.val_pairs()
    if not len(pairs):
        raise ValueError(f"the {split} split of {data.name} holds no pair")
    out = out or os.path.join(workdir, f"eval_{split}_step{trained.step}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"--out {out} is a file, not a directory")
    labels = tuple(int(label) for label in data.labels)
    register = network_lib.registration_fn(trained, refine_steps)
    scores = _scores(labels)

    # Fields go to a hidden folder first: a failure leaves no half-written fields/.
    fields = os.path.join(out, ".fields.partial")
    created = not os.path.exists(out)
    try:
        rows = _register_pairs(pairs, register, scores, labels, data.dice_over,
                               fields if save_fields else None)
    except BaseException:
        shutil.rmtree(out if created else fields, ignore_errors=True)
        raise
    if save_fields:
        shutil.rmtree(os.path.join(out, "fields"), ignore_errors=True)
        os.rename(fields, os.path.join(out, "fields"))
    os.makedirs(out, exist_ok=True)
    columns = list(COLUMNS) + [f"dice_{label}" for label in labels]
    with open(os.path.join(out, "pairs.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows([{key: row[key] for key in columns} for row in rows])
    summary = {"split": split, "step": trained.step,
               "checkpoint": f"{trained.step} ({trained.selection})",
               "pairs": len(rows), "refine_steps": refine_steps}
    for key in columns[1:]:
        values = np.asarray([row[key] for row in rows], np.float64)
        summary[key] = {"mean": float(np.nanmean(values)),
                        "std": float(np.nanstd(values, ddof=1)) if len(values) > 1
                        else 0.0}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    figures.plot_dice_per_structure(
        os.path.join(out, "dice_per_structure.png"),
        {label: [row[f"dice_{label}"] for row in rows] for label in labels},
        title=f"{os.path.basename(os.path.abspath(workdir))}, {split}, step "
              f"{trained.step}")
    print(format_summary(summary))
    print(f"wrote {os.path.join(out, 'pairs.csv')}, summary.json, dice_per_structure.png"
          + (", fields/" if save_fields else ""))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The table the command prints: mean and std of each metric."""
    lines = [f"{summary['split']} split, {summary['pairs']} pairs, checkpoint "
             f"{summary['checkpoint']}, {summary['refine_steps']} refinement steps"]
    for key in COLUMNS[1:]:
        lines.append(f"{key:22s} {summary[key]['mean']:10.4f} ± {summary[key]['std']:.4f}")
    return "\n".join(lines)


def _run(fv: flags.FlagValues) -> None:
    if not fv.workdir:
        raise cli.UsageError("--workdir is required")
    evaluate_split(fv.workdir, split=fv.split, checkpoint=cli.checkpoint_of(fv), out=fv.out,
                   refine_steps=fv["refine-steps"].value, save_fields=fv["save-fields"].value)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the command line ``argv`` (program name first; default ``sys.argv``);
    returns the exit status."""
    fv = flags.FlagValues()
    define = dict(flag_values=fv)
    flags.DEFINE_string("workdir", None, "Training workdir.", **define)
    flags.DEFINE_enum("split", "test", SPLITS, "The split to register.", **define)
    cli.define_checkpoint_flag(fv)
    flags.DEFINE_string("out", None, "Output folder; default "
                        "WORKDIR/eval_<split>_step<step>.", **define)
    flags.DEFINE_integer("refine-steps", 0, "Test-time OFG steps after the network.",
                         lower_bound=0, **define)
    flags.DEFINE_bool("save-fields", False, "Write each displacement as "
                      "fields/disp_<name>.nii.gz (Learn2Reg convention).", **define)
    cli.define_traceback_flag(fv)
    return cli.run(_run, fv, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
