"""FireANTs on the CPU: moments, affine, greedy deformable with CC, in the ``fireants``
virtualenv.

    python -m experiments.peers.run_fireants --fixed F --moving M --out DIR --threads N

The recipe of FireANTs' documentation, on the CPU with its non-fused PyTorch
operations (``pip install fireants`` brings no fused CUDA ops; the loss is
``loss_type="cc"``, the CPU choice of its own ``scripts/pairwise`` scripts):

1. ``MomentsRegistration(scale=4, moments=1)``: centre of mass alignment (the
   moments stage of its template pipeline, ``scripts/template/configs``;
   ``docs/advanced/moments.md``), passed on as ``init_rigid``;
2. ``AffineRegistration([4, 2, 1], [200, 100, 50], optimizer="Adam",
   optimizer_lr=3e-3, cc_kernel_size=5)`` (``docs/quickstart.md``);
3. ``GreedyRegistration(scales=[4, 2, 1], iterations=[200, 100, 25],
   cc_kernel_size=5, deformation_type="compositive", smooth_grad_sigma=1,
   optimizer="adam", optimizer_lr=0.5, init_affine=<the affine>)``
   (``docs/quickstart.md``; ``smooth_warp_sigma`` its default 0.5).

``save_as_ants_transforms`` writes the whole transform (affine and warp
composed) as an ANTs displacement field on the fixed grid. Threads:
``torch.set_num_threads`` and ``OMP_NUM_THREADS``.
"""

import os

from experiments.peers import protocol

RECIPE = {
    "moments": {"scale": 4, "moments": 1},
    "affine": {"scales": [4, 2, 1], "iterations": [200, 100, 50], "optimizer": "Adam",
               "optimizer_lr": 3e-3, "cc_kernel_size": 5, "loss_type": "cc"},
    "greedy": {"scales": [4, 2, 1], "iterations": [200, 100, 25], "cc_kernel_size": 5,
               "deformation_type": "compositive", "smooth_grad_sigma": 1,
               "optimizer": "adam", "optimizer_lr": 0.5, "loss_type": "cc"},
}


def main(argv=None) -> None:
    args = protocol.parse(__doc__, argv)
    import torch
    torch.set_num_threads(args.threads)
    from importlib import metadata

    from fireants.io import BatchedImages
    from fireants.io import Image
    from fireants.io.image import FakeBatchedImages
    from fireants.registration.affine import AffineRegistration
    from fireants.registration.greedy import GreedyRegistration
    from fireants.registration.moments import MomentsRegistration
    fixed = BatchedImages([Image.load_file(args.fixed, device="cpu")])
    moving = BatchedImages([Image.load_file(args.moving, device="cpu")])

    def register():
        moments = MomentsRegistration(fixed_images=fixed, moving_images=moving,
                                      progress_bar=False, **RECIPE["moments"])
        moments.optimize()
        affine_recipe = dict(RECIPE["affine"])
        affine = AffineRegistration(affine_recipe.pop("scales"),
                                    affine_recipe.pop("iterations"), fixed, moving,
                                    init_rigid=moments.get_affine_init(),
                                    progress_bar=False, **affine_recipe)
        affine.optimize()
        greedy = GreedyRegistration(fixed_images=fixed, moving_images=moving,
                                    init_affine=affine.get_affine_matrix().detach(),
                                    progress_bar=False, **RECIPE["greedy"])
        greedy.optimize()
        return greedy

    greedy, seconds = protocol.timed(register)
    greedy.save_as_ants_transforms(os.path.join(args.out, protocol.FIELD_FILE))
    with torch.no_grad():
        moved = greedy.evaluate(fixed, moving)
    FakeBatchedImages(moved, fixed).write_image(os.path.join(args.out,
                                                             protocol.WARPED_FILE))
    protocol.write_result(args.out, tool="fireants", version=metadata.version("fireants"),
                          seconds=seconds, recipe=RECIPE,
                          versions={"torch": torch.__version__},
                          torch_threads=torch.get_num_threads())


if __name__ == "__main__":
    protocol.run(main)
