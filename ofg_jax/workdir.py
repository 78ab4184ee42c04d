"""A training workdir: checked before anything is written, described at the end.

A workdir holds one run: ``config.json`` (its config, with the history of the
changes accepted on resume), ``splits.json``, ``checkpoints/``, ``metrics.csv``,
``eval/``, ``tensorboard/``, ``summary.json`` and ``figures/``. A run started in a workdir
that already holds one resumes it, and only with the same config
(``ofg_jax.config.check_resume``).
"""

import os
from typing import Any, Optional

from ofg_jax import config as config_lib

CONFIG = "config.json"
SUMMARY = "summary.json"
SPLITS = "splits.json"  # The files of the train, val and test splits.


def check_writable(workdir: str) -> None:
    """Raises unless ``workdir`` is, or can be created as, a writable directory.

    Raises:
      NotADirectoryError: ``workdir`` (or a parent) is a file.
      PermissionError: no write access (permissions, a read-only file system).
    """
    path = os.path.abspath(workdir)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"workdir {workdir}: {existing} is a file, not a "
                                 "directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"workdir {workdir}: {existing} is not writable "
                              "(permissions or a read-only file system)")


def recorded_config(workdir: str) -> Optional[dict[str, Any]]:
    """The record of the run in ``workdir`` (``config.json``), or None for a new one.

    Raises:
      ValueError: checkpoints without a ``config.json`` (not a workdir of this
        program, or a damaged one), or an unreadable ``config.json``.
    """
    path = os.path.join(workdir, CONFIG)
    if os.path.isfile(path):
        return config_lib.read_record(path)
    if os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(
            os.path.join(workdir, "checkpoints")):
        raise ValueError(f"{workdir} holds checkpoints but no {CONFIG}: it cannot "
                         "be resumed; use another --workdir")
    return None


def describe(workdir: str, checkpoint_steps: list[int]) -> str:
    """One line saying where the run's outputs are."""
    names = [name for name in (SUMMARY, "metrics.csv", "eval/", "tensorboard/",
                               "figures/", CONFIG, SPLITS)
             if os.path.exists(os.path.join(workdir, name.rstrip("/")))]
    steps = ", ".join(str(s) for s in checkpoint_steps)
    return (f"outputs in {os.path.abspath(workdir)}: {', '.join(names)}, "
            f"checkpoints/ (steps {steps})")
