"""``models.from_torch`` against the authors' own PyTorch model code.

    python -m experiments.authors_parity --repo=PATH [--size=160,192,224] [--out=FILE]

``PATH`` is a checkout of the authors' repository
(github.com/junyuchen245/TransMorph_Transformer_for_Medical_Image_Registration);
nothing of it is part of ofg_jax. For each published layout the script builds
their model from their files (``IXI/Baseline_registration_methods/VoxelMorph``,
``IXI/Baseline_Transformers`` for ViT-V-Net, ``IXI/TransMorph`` and
``OASIS/TransMorph`` with their configs, ``img_size`` set to ``--size``), draws
every parameter and BatchNorm statistic at random, runs their forward on a
random pair in eval mode, imports their ``state_dict`` with
``ofg_jax.models.from_torch`` and prints the largest difference between their
``flow`` and our displacement, in voxels, and whether ``to_torch`` gives their
state_dict back (every key and value but ``num_batches_tracked`` and the unused
OASIS ``c2``). Needs PyTorch and ml-collections; their ``timm`` import is served
by a stand-in of the three names they use when timm is not installed.
"""

import argparse
import importlib
import json
import os
import sys
import types

import jax
import numpy as np
import torch

from experiments.torch_networks import randomise
from ofg_jax import models

# layout -> (folder of their code, module, our network, their model's constructor).
LAYOUTS = {
    "voxelmorph1": ("IXI/Baseline_registration_methods/VoxelMorph", "models", "voxelmorph",
                    lambda m, size: m.VxmDense_1(size)),
    "voxelmorph2": ("IXI/Baseline_registration_methods/VoxelMorph", "models", "voxelmorph",
                    lambda m, size: m.VxmDense_2(size)),
    "vitvnet": ("IXI/Baseline_Transformers", "models.ViTVNet", "vitvnet",
                lambda m, size: m.ViTVNet(m.CONFIGS["ViT-V-Net"], img_size=size)),
    "transmorph": ("IXI/TransMorph", "models.TransMorph", "transmorph",
                   lambda m, size: m.TransMorph(_config(m, "TransMorph", size))),
    "transmorph_oasis": ("OASIS/TransMorph", "models.TransMorph", "transmorph",
                         lambda m, size: m.TransMorph(_config(m, "TransMorph", size))),
    "transmorph_large_oasis": ("OASIS/TransMorph", "models.TransMorph", "transmorph",
                               lambda m, size: m.TransMorph(
                                   _config(m, "TransMorph-Large", size))),
}


def _config(module, name, size):
    config = module.CONFIGS[name]
    config.img_size = tuple(size)
    return config


def _timm_stand_in() -> None:
    """``timm.models.layers`` with what their TransMorph imports (eval mode only)."""
    if importlib.util.find_spec("timm") is not None:
        return
    layers = types.ModuleType("timm.models.layers")
    layers.to_3tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x,) * 3
    layers.trunc_normal_ = lambda t, std=1.0: torch.nn.init.trunc_normal_(t, std=std)
    layers.DropPath = lambda rate=0.0: torch.nn.Identity()
    for name, module in (("timm", types.ModuleType("timm")),
                         ("timm.models", types.ModuleType("timm.models")),
                         ("timm.models.layers", layers)):
        sys.modules[name] = module


def _their_module(repo, folder, module):
    for name in [n for n in sys.modules if n == "models" or n.startswith("models.")]:
        del sys.modules[name]  # each folder has its own package "models"
    sys.path.insert(0, os.path.join(repo, folder))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.pop(0)


def compare(repo: str, layout: str, size, seed: int = 0) -> dict:
    """Their forward against ours after import, for one layout."""
    folder, module, name, build = LAYOUTS[layout]
    net = randomise(build(_their_module(repo, folder, module), tuple(size)), seed)
    x = np.random.default_rng(seed).standard_normal((1, 2, *size)).astype(np.float32)
    with torch.no_grad():
        _, flow = net(torch.from_numpy(x))
    want = np.moveaxis(flow.numpy(), 1, -1)
    model, variables = models.from_torch(net.state_dict(), name)
    got = np.asarray(jax.jit(model.apply)(variables, np.moveaxis(x, 1, -1)))
    exported = models.to_torch(model, variables)
    theirs = net.state_dict()
    # Not compared: BatchNorm's step counter, and the OASIS model's unused c2.
    skipped = lambda key: key.endswith("num_batches_tracked") or (
        key == "c2.0.weight" and getattr(model, "half_resolution_flow", False))
    same = set(exported) == set(theirs) and all(
        np.array_equal(exported[key], value.numpy())
        for key, value in theirs.items() if not skipped(key))
    return {"layout": layout, "size": list(size), "keys": len(theirs),
            "flow_max_abs": float(np.abs(want).max()),
            "max_abs_error_voxels": float(np.abs(got - want).max()),
            "export_equals_their_state_dict": bool(same)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", required=True, help="checkout of the authors' repository")
    parser.add_argument("--size", default="160,192,224", help="grid D,H,W")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--out", help="JSON file of the results")
    args = parser.parse_args(argv)
    if not os.path.isdir(os.path.join(args.repo, "IXI", "TransMorph")):
        parser.error(f"--repo {args.repo} is not a checkout of the authors' repository")
    _timm_stand_in()
    size = tuple(int(n) for n in args.size.split(","))
    rows = [compare(args.repo, layout, size) for layout in args.layouts.split(",")]
    for row in rows:
        print(f"{row['layout']:24s} {row['keys']:4d} keys  |flow| max "
              f"{row['flow_max_abs']:6.3f}  max error {row['max_abs_error_voxels']:.2e} "
              f"voxels  export = their state_dict: {row['export_equals_their_state_dict']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
