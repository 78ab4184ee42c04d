"""Exporting a network as the authors' PyTorch code loads it: ``ofg-export``.

    ofg-export --workdir=W --out=FILE.pth.tar [--checkpoint=best|latest|STEP]

Writes the network of the workdir ``W`` (a training run's, by default its best
checkpoint by validation Dice, or an ``ofg-import``'s) as a ``torch.save``
file that the authors' model of the same configuration loads strictly::

    model.load_state_dict(torch.load("FILE.pth.tar")["state_dict"])

The file holds ``{"state_dict": ..., "step": ..., "workdir": ...}``: the
state_dict under the authors' names and layouts (``ofg_jax.models.to_torch``),
buffers included. Needs PyTorch (``pip install 'ofg_jax[torch]'``). An
existing ``FILE`` is not overwritten; the file appears only once complete.
"""

import os
import sys
from typing import Optional, Sequence

from absl import flags

from ofg_jax import cli
from ofg_jax.registration import network as network_lib
from ofg_jax import models
from ofg_jax.models import torch_weights


def export(workdir: str, out: str, checkpoint: network_lib.Selection = "best") -> str:
    """Writes ``out`` from the network of ``workdir``; returns a one-line summary.

    Raises:
      ImportError: no PyTorch.
      FileNotFoundError: no such workdir or checkpoint.
      FileExistsError, NotADirectoryError: ``out`` exists, or its folder is a file.
    """
    torch = torch_weights.import_torch()
    if os.path.exists(out):
        raise FileExistsError(f"--out {out} exists; remove it or choose another name")
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"output folder {folder} is a file")
    trained = network_lib.load_trained(workdir, checkpoint)
    state_dict = models.to_torch(trained.model, trained.variables)
    content = {"state_dict": {key: torch.from_numpy(value)
                              for key, value in state_dict.items()},
               "step": trained.step, "workdir": os.path.abspath(workdir)}
    os.makedirs(folder, exist_ok=True)
    partial = f"{out}.partial-{os.getpid()}"
    try:
        torch.save(content, partial)
        os.rename(partial, out)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    note = (" Its authors' counterpart has no integration: integrate the flow it returns "
            f"({trained.model.int_steps} squarings) to get this network's displacement."
            if trained.model.diffeomorphic else "")
    return (f"wrote {out}: {torch_weights.variant(trained.model)} at "
            f"{'x'.join(map(str, trained.img_size))}, step {trained.step} "
            f"({trained.selection}), {len(state_dict)} state_dict entries.{note}")


def _run(fv: flags.FlagValues) -> None:
    if not (fv.workdir and fv.out):
        raise cli.UsageError("--workdir and --out are required")
    print(export(fv.workdir, fv.out, cli.checkpoint_of(fv)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the command line ``argv`` (program name first; default ``sys.argv``);
    returns the exit status."""
    fv = flags.FlagValues()
    define = dict(flag_values=fv)
    flags.DEFINE_string("workdir", None, "Workdir of a training run or of ofg-import.",
                        **define)
    flags.DEFINE_string("out", None, "The file to write (.pth.tar).", **define)
    cli.define_checkpoint_flag(fv)
    cli.define_traceback_flag(fv)
    return cli.run(_run, fv, argv, __doc__, expected=(ImportError,))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
