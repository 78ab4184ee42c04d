"""The figures of a training run, from the command line.

    python -m ofg_jax.plot --workdir W [--out DIR]

writes into ``DIR`` (default ``W/figures``) the training curves of
``W/metrics.csv`` and the figures of the run's first validation pair, registered
by the checkpoint that ``ofg_jax.register`` picks (the best by validation Dice,
else the latest): ``curves.png``, ``slices.png``, ``grid.png``, ``jacobian.png``
and ``labels.png`` (see ``ofg_jax.registration.figures``).
"""

import os
import sys
from typing import Optional, Sequence

from absl import flags

from ofg_jax import cli
from ofg_jax import data as data_lib
from ofg_jax.registration import network as network_lib
from ofg_jax.registration import scans


def write_training_figures(workdir: str, out_dir: Optional[str] = None) -> list[str]:
    """The figures of a training workdir; returns the paths written.

    Args:
      workdir: a training workdir (``config.json``, ``metrics.csv``,
        ``checkpoints/``).
      out_dir: default ``workdir/figures``.

    Raises:
      FileNotFoundError: a missing workdir, file, checkpoint or training data.
      ValueError: a config whose model or data cannot be rebuilt.
    """
    trained = network_lib.load_trained(workdir)
    data = data_lib.create(trained.config.data, trained.config.seed)
    pairs = data.val_pairs()
    if not len(pairs):
        raise ValueError(f"the dataset of {workdir} has no validation pair")
    return scans.write_run_figures(
        out_dir or os.path.join(workdir, "figures"), trained, pairs[0], data.labels,
        os.path.join(workdir, "metrics.csv"),
        title=os.path.basename(os.path.abspath(workdir)))


def _run(fv: flags.FlagValues) -> None:
    if not fv.workdir:
        raise cli.UsageError("--workdir is required")
    print("wrote " + ", ".join(write_training_figures(fv.workdir, fv.out)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the command line ``argv`` (program name first; default ``sys.argv``);
    returns the exit status."""
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "Training workdir.", flag_values=fv)
    flags.DEFINE_string("out", None, "Output folder; default WORKDIR/figures.",
                        flag_values=fv)
    cli.define_traceback_flag(fv)
    return cli.run(_run, fv, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
