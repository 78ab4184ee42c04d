"""syntx (JAX backend): affine + SyN with LNCC, in the ``syntx`` virtualenv.

    python -m experiments.peers.run_syntx --fixed F --moving M --out DIR --threads N

The recipe of syntx's README ("Standard API Usage", 1. SyN), with the JAX
backend: ``syntx.registration(fixed, moving, type_of_transform="SyN",
backend="jax", syn_metric="cc2", reg_iterations=[100, 100, 50])`` on
``ants.image_read`` images. Everything else is syntx's default: levels 4, 2, 1;
an affine stage first (Mattes MI, 32 bins, 100x50x20 iterations); LNCC of
radius 2 (5x5x5 windows); CFL step 0.5 voxels; flow sigma 3 (ITK variance);
Gaussian regulariser; Anderson inverse. Its forward transforms (warp, affine,
ANTs files) are composed into one displacement field on the fixed grid by
antspyx's ``ants.apply_transforms(compose=...)``.

syntx 5.4 imports ``antstorch`` when it is imported (``syntx.surface``, for its
sulcal guidance), a package that is not on PyPI and that the SyN recipe never
calls: when it is missing, a stand-in module is registered first, which raises
ImportError on any use, so that nothing of it can run silently. Threads: JAX
(XLA's CPU thread pool, sized by the CPUs the process may run on) and torch
(``torch.set_num_threads``; syntx imports it).
"""

import os
import sys
import types

from experiments.peers import protocol

RECIPE = {"type_of_transform": "SyN", "backend": "jax", "syn_metric": "cc2",
          "reg_iterations": [100, 100, 50]}


def _stand_in_antstorch() -> bool:
    """Registers a module ``antstorch`` that raises ImportError on any use, unless
    antstorch is installed; returns whether it did."""
    try:
        import antstorch  # noqa: F401
        return False
    except ImportError:
        pass
    module = types.ModuleType("antstorch")

    def missing(name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(f"antstorch.{name}: antstorch is not installed (a stand-in "
                          "module of experiments.peers.run_syntx)")

    module.__getattr__ = missing
    sys.modules["antstorch"] = module
    return True


def main(argv=None) -> None:
    args = protocol.parse(__doc__, argv)
    import torch
    torch.set_num_threads(args.threads)
    stand_in = _stand_in_antstorch()
    import ants
    import jax
    import syntx
    from importlib import metadata
    fixed, moving = ants.image_read(args.fixed), ants.image_read(args.moving)
    reg, seconds = protocol.timed(lambda: syntx.registration(
        fixed=fixed, moving=moving, outprefix=os.path.join(args.out, "syntx_"), **RECIPE))
    composed = ants.apply_transforms(fixed=fixed, moving=moving,
                                     transformlist=reg["fwdtransforms"],
                                     compose=os.path.join(args.out, "composed_"))
    os.replace(composed, os.path.join(args.out, protocol.FIELD_FILE))
    ants.image_write(reg["warpedmovout"], os.path.join(args.out, protocol.WARPED_FILE))
    provenance = reg.get("provenance")
    fit_seconds = provenance.get("fit_time") if isinstance(provenance, dict) else None
    protocol.write_result(
        args.out, tool="syntx", version=metadata.version("syntx"), seconds=seconds,
        recipe=RECIPE, transforms=reg["fwdtransforms"],
        versions={"jax": jax.__version__, "torch": torch.__version__,
                  "antspyx": ants.__version__},
        antstorch_stand_in=stand_in, tool_fit_seconds=fit_seconds)


if __name__ == "__main__":
    protocol.run(main)
