"""Importing the authors' PyTorch weights: ``ofg-import`` (``python -m ofg_jax.import_torch``).

    ofg-import --checkpoint=FILE.pth.tar --config=ixi --workdir=W
    ofg-register --workdir=W --moving=m.nii.gz --fixed=f.nii.gz --out=out/
    ofg-train --config=ixi --config.train.init_from=W --workdir=W2

Reads a checkpoint of the PyTorch VoxelMorph-1 / -2, ViT-V-Net or TransMorph
(-Large) of the TransMorph authors (or of the OFG reference code, which trains
the same models) with ``ofg_jax.models.from_torch``, and writes a new workdir
``W`` that the other commands take like a training run's: ``ofg-register
--workdir=W`` registers scans with the network, ``ofg-evaluate --workdir=W``
scores it on a split of the config's data set, and ``ofg-train
--config.train.init_from=W`` trains a new run from it (fine-tuning, with OFG or
unsupervised). ``W`` holds ``config.json`` (``--config`` with the network as
imported), ``checkpoints/0`` (the network's variables) and ``imported.json``
(where they came from).

The network is the one the checkpoint holds (``--config.model.name`` may only
confirm it); what its shapes show (widths, depths, heads, window, the OASIS
release's half-resolution flow) is read from it, and its other options come
from the config (``--config.model.<option>=...``). The grid is
``--config.data.img_size`` when the config sets it, else the checkpoint's. No
data set is read. Every check comes before anything is written, and ``W`` must
be new (or an empty folder). Errors print one ``error:`` line and exit with
status 2 (command line, config) or 1 (checkpoint, workdir); without PyTorch
the line says which extra to install.
"""

import hashlib
import json
import os
import shutil
import sys
from typing import Any, Optional, Sequence

from absl import flags
import jax
import ml_collections
import numpy as np

from ofg_jax.training import checkpoints as checkpoints_lib
from ofg_jax import cli
from ofg_jax.settings import config as config_lib
from ofg_jax import models
from ofg_jax.training import workdir as workdir_lib
from ofg_jax.models import torch_weights


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_new_workdir(workdir: str) -> None:
    if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
        raise FileExistsError(f"workdir {workdir} exists and is not an empty folder; "
                              "ofg-import writes a new workdir")
    workdir_lib.check_writable(workdir)


def import_checkpoint(checkpoint: str, config: ml_collections.ConfigDict, workdir: str,
                      given: Sequence[str] = ()) -> dict[str, Any]:
    """Writes the workdir of the authors' PyTorch ``checkpoint``; returns its
    ``imported.json``.

    Args:
      checkpoint: a ``.pth`` / ``.pth.tar`` file (``models.from_torch``).
      config: a training config; its ``model.name`` switches to the checkpoint's
        network unless ``"name"`` is in ``given``.
      workdir: a new folder (or an empty one).
      given: the ``model`` options set on the command line: they take precedence
        over what the checkpoint shows (and fail its checks if they contradict
        it). The config's ``model_defaults`` for the network apply too.

    Raises:
      FileNotFoundError, FileExistsError, PermissionError: the checkpoint, the
        workdir.
      ImportError: no PyTorch.
      ConfigError: an invalid config.
      ValueError: a checkpoint of no known network, of another one than a given
        ``model.name``, or one that does not fit the config (named keys).
    """
    _check_new_workdir(workdir)
    state_dict, saved = torch_weights.read_checkpoint(checkpoint)
    name = config.model.name if "name" in given else torch_weights.network_of(state_dict)
    if name is None:
        raise ValueError(f"checkpoint {checkpoint} is none of the authors' networks "
                         f"({', '.join(models.NAMES)}): its first keys are "
                         f"{', '.join(list(state_dict)[:3])}")
    if name != config.model.name:
        config = config_lib.with_overrides(config, {"model.name": name})
    resolved = config_lib.resolve(config)
    config = resolved.config
    options = dict((config.get("model_defaults") or {}).get(name) or {})
    options.update({key: value for key, value in resolved.model_options.items()
                    if key in given})
    factor = int(config.data.get("downsample") or 1)
    img_size = config.data.get("img_size")
    grid = tuple(int(n) // factor for n in img_size) if img_size else None
    model, variables = models.from_torch(state_dict, name, grid, **options)
    config = config_lib.with_overrides(config, {
        **{f"model.{key}": getattr(model, key) for key in models.options(name)
           if getattr(model, key) is not None},
        "data.img_size": tuple(n * factor for n in model.img_size)})
    record = config_lib.record(config, config.data.img_size)
    imported = {"checkpoint": os.path.abspath(checkpoint), "sha256": _sha256(checkpoint),
                "network": torch_weights.variant(model), "model": name,
                "img_size": list(model.img_size),
                "parameters": sum(int(np.size(leaf))
                                  for leaf in jax.tree.leaves(variables["params"])),
                **saved}

    partial = f"{workdir.rstrip(os.sep)}.import-partial-{os.getpid()}"
    try:
        os.makedirs(partial)
        with open(os.path.join(partial, workdir_lib.CONFIG), "w") as f:
            json.dump(record, f, indent=2)
        checkpoints = checkpoints_lib.Checkpoints(os.path.join(partial, "checkpoints"),
                                                 config.checkpoint.keep_best)
        try:
            checkpoints.save(0, variables, {"step": 0, "epoch": 0, "best": None})
        finally:
            checkpoints.close()
        with open(os.path.join(partial, workdir_lib.IMPORTED), "w") as f:
            json.dump(imported, f, indent=2)
        if os.path.isdir(workdir):
            os.rmdir(workdir)  # empty, checked above
        os.rename(partial, workdir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return imported


def _run(fv: flags.FlagValues, overrides: Sequence[str]) -> None:
    if not (fv.checkpoint and fv.workdir):
        raise cli.UsageError("--checkpoint and --workdir are required")
    config = config_lib.load(fv.config, overrides)
    given = [o.split("=", 1)[0][len("model."):] for o in overrides
             if o.startswith("model.")]
    imported = import_checkpoint(fv.checkpoint, config, fv.workdir, given)
    print(f"imported {imported['network']} ({imported['parameters']:,} parameters) at "
          f"{'x'.join(map(str, imported['img_size']))} from {fv.checkpoint} into "
          f"{fv.workdir}")
    print(f"register: ofg-register --workdir={fv.workdir} --moving=M --fixed=F --out=DIR")
    print(f"fine-tune: ofg-train --config={fv.config or 'demo'} "
          f"--config.train.init_from={fv.workdir} --workdir=NEW")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the command line ``argv`` (program name first; default ``sys.argv``);
    returns the exit status."""
    argv, overrides = config_lib.split_overrides(sys.argv if argv is None else argv)
    fv = flags.FlagValues()
    define = dict(flag_values=fv)
    flags.DEFINE_string("checkpoint", None, "The authors' PyTorch checkpoint (.pth, "
                        ".pth.tar: a dict with 'state_dict', or a state_dict).", **define)
    flags.DEFINE_string("config", None, "Training config: a shipped config's name "
                        f"({', '.join(config_lib.shipped_configs())}) or a file; "
                        "default: demo. Override fields with --config.<path>=<value>.",
                        **define)
    flags.DEFINE_string("workdir", None, "The new workdir to write.", **define)
    cli.define_traceback_flag(fv)
    return cli.run(lambda fv: _run(fv, overrides), fv, argv, __doc__,
                   expected=(ImportError,))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
