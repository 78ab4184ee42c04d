"""ANTs SyN through antspyx (``ants.registration``), in the ``ants`` virtualenv.

    python -m experiments.peers.run_ants --fixed F --moving M --out DIR --threads N \\
        [--recipe antsRegistrationSyN[s]|SyN]

Recipes (antspyx's own ``type_of_transform`` presets, documented in the
docstring of ``ants.registration``; every stage starts from ANTs' centre of mass
alignment ``-r [fixed,moving,1]``):

- ``antsRegistrationSyN[s]`` (default): antspyx's recreation of ANTs'
  ``antsRegistrationSyN.sh`` (the ANTs authors' recommended pipeline): rigid
  then affine (MI, 32 bins, 25 % regular sampling, 1000x500x250x100
  iterations, shrink 8x4x2x1, smoothing 3x2x1x0 voxels), then SyN[0.2,3,0]
  with CC of radius 2, 100x70x50x20 iterations, shrink 8x4x2x1, smoothing
  3x2x1x0 voxels.
- ``SyN``: antspyx's default ``type_of_transform`` (affine with Mattes MI, then
  SyN with Mattes MI, 40x20x0 iterations, flow sigma 3).

The forward transforms (warp, affine) are composed into one displacement field
on the fixed grid by ``ants.apply_transforms(compose=...)``. Threads: ITK's
``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` (set by the caller).
"""

import os

from experiments.peers import protocol

RECIPES = {
    "antsRegistrationSyN[s]": {
        "initial": "centre of mass [fixed,moving,1]",
        "linear": "Rigid[0.1] then Affine[0.1]: MI[32 bins, Regular, 0.25], "
                  "[1000x500x250x100,1e-6,10], shrink 8x4x2x1, smoothing 3x2x1x0vox",
        "deformable": "SyN[0.2,3,0]: CC radius 2, [100x70x50x20,1e-6,10], shrink "
                      "8x4x2x1, smoothing 3x2x1x0vox"},
    "SyN": {
        "initial": "centre of mass [fixed,moving,1]",
        "linear": "Affine: Mattes MI 32 bins, 20 % random sampling, iterations "
                  "2100x1200x1200x10, shrink 6x4x2x1, smoothing 3x2x1x0",
        "deformable": "SyN[0.2,3,0]: Mattes MI 32 bins, iterations 40x20x0"},
}


def main(argv=None) -> None:
    arguments = protocol.parser(__doc__.split("\n\n")[0])
    arguments.add_argument("--recipe", choices=sorted(RECIPES),
                           default="antsRegistrationSyN[s]")
    args = protocol.parse(__doc__, argv, arguments)
    import ants
    fixed, moving = ants.image_read(args.fixed), ants.image_read(args.moving)
    reg, seconds = protocol.timed(lambda: ants.registration(
        fixed=fixed, moving=moving, type_of_transform=args.recipe,
        outprefix=os.path.join(args.out, "ants_")))
    composed = ants.apply_transforms(fixed=fixed, moving=moving,
                                     transformlist=reg["fwdtransforms"],
                                     compose=os.path.join(args.out, "composed_"))
    os.replace(composed, os.path.join(args.out, protocol.FIELD_FILE))
    ants.image_write(reg["warpedmovout"], os.path.join(args.out, protocol.WARPED_FILE))
    protocol.write_result(args.out, tool="antspyx", version=ants.__version__,
                          seconds=seconds,
                          recipe=dict(RECIPES[args.recipe],
                                      type_of_transform=args.recipe),
                          transforms=reg["fwdtransforms"])


if __name__ == "__main__":
    protocol.run(main)
