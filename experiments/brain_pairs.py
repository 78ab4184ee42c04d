"""Inter-subject brain pairs: an OASIS subject and the MNI152 template, GM/WM labelled.

    python -m experiments.brain_pairs --data ../shared/data/oasis_subject_160x192x224.npz \\
        --out /tmp/brain_pairs

Two different brains, which is the real job of registration with no network:
the OASIS subject of ``--data`` (an ``.npz`` with ``vol``, a skull-stripped 1 mm
T1 on the 160x192x224 LIA grid of the IXI / OASIS releases, and ``seg``, its
FreeSurfer labels) and nilearn's MNI152 template (ICBM 2009a, skull-stripped,
1 mm and 2 mm, with its grey and white matter probability maps; shipped inside
the ``nilearn`` package, nothing is downloaded). Both get the same two labels:
1 grey matter, 2 white matter (:data:`GREY`, :data:`WHITE`: the subject's from
its FreeSurfer codes; the template's where its GM or WM probability is the
largest of GM, WM and the rest).

Each pair is a folder: ``moving.nii.gz``, ``fixed.nii.gz`` (float32, intensities
in [0, 1]), ``moving_seg.nii.gz``, ``fixed_seg.nii.gz`` (int16 labels), and for a
pair with a known answer ``truth.npy`` (the moving world point, RAS mm, of each
fixed voxel). The pairs (:data:`PAIRS`):

- ``subject_to_mni_2mm``, ``subject_to_mni_1mm``: the subject (1 mm, as it is)
  onto the template at 2 and 1 mm: the reported pairs.
- ``mni_to_subject_2mm``, ``mni_to_subject_1mm``: the template onto the subject
  (at 2 mm: its 2x2x2 block means, labels by majority): the tuning pairs.
- ``known_<seed>``: the 2 mm template against a copy of itself seen through a
  known smooth deformation of 8 or 10 mm mean displacement over the brain and a
  rigid motion (``experiments.optimize_vs_syn.make_pair``; seeds 200 and 201).

:func:`score` scores any method by its transform, the same code for all.
"""

import argparse
import os
from typing import Any, Optional

import numpy as np

# FreeSurfer codes of the two tissues (aseg): cortex, cerebellar cortex and the
# subcortical grey nuclei; cerebral and cerebellar white matter and the brainstem.
GREY = (3, 42, 8, 47, 10, 49, 11, 50, 12, 51, 13, 52, 17, 53, 18, 54, 26, 58, 28, 60)
WHITE = (2, 41, 7, 46, 16)
LABELS = (1, 2)  # grey, white
PAIRS = ("subject_to_mni_2mm", "mni_to_subject_2mm", "subject_to_mni_1mm",
         "mni_to_subject_1mm", "known_200", "known_201")
KNOWN = {"known_200": 8.0, "known_201": 10.0}  # seed -> mean displacement, mm


def subject(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image float32, tissue labels int16, 1 mm LIA affine)`` of the subject."""
    from ofg_jax.registration import geometry
    data = np.load(path)
    image = np.asarray(data["vol"], np.float32)
    codes = np.rint(data["seg"]).astype(np.int32)
    labels = np.where(np.isin(codes, GREY), 1, np.where(np.isin(codes, WHITE), 2, 0))
    affine = geometry.centred_grid(image.shape, (1.0,) * 3, "LIA", (0, 0, 0)).affine
    return image, labels.astype(np.int16), affine


def template(resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image float32 in [0, 1], tissue labels int16, affine)`` of MNI152 at
    ``resolution`` mm (1 or 2), from the files that nilearn ships."""
    from nilearn import datasets
    t1 = datasets.load_mni152_template(resolution=resolution)
    grey = np.asarray(datasets.load_mni152_gm_template(resolution=resolution).dataobj,
                      np.float32)
    white = np.asarray(datasets.load_mni152_wm_template(resolution=resolution).dataobj,
                       np.float32)
    image = np.asarray(t1.dataobj, np.float32)
    image = (image - image.min()) / (image.max() - image.min())
    rest = np.clip(1.0 - grey - white, 0.0, 1.0)
    labels = np.argmax(np.stack([rest, grey, white]), 0)
    return image, labels.astype(np.int16), np.asarray(t1.affine, np.float64)


def block_mean2(image: np.ndarray, labels: np.ndarray, affine: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The volume at twice the voxel size: 2x2x2 block means, labels by majority
    (ties to the larger label), the affine of the blocks' centres."""
    shape = tuple(n // 2 for n in image.shape)
    crop = tuple(slice(0, 2 * n) for n in shape)
    blocks = lambda a: a[crop].reshape(shape[0], 2, shape[1], 2, shape[2], 2)
    mean = blocks(image).mean((1, 3, 5)).astype(np.float32)
    counts = np.stack([(blocks(labels) == label).sum((1, 3, 5))
                       for label in (0, *LABELS)])
    majority = (len(counts) - 1 - np.argmax(counts[::-1], 0)).astype(np.int16)
    scale = np.diag([2.0, 2.0, 2.0, 1.0])
    scale[:3, 3] = 0.5
    return mean, majority, affine @ scale


def make_pairs(data: str, out: str, names=PAIRS) -> dict[str, str]:
    """Writes the pairs ``names`` under ``out``; returns ``{name: folder}``."""
    from experiments import optimize_vs_syn
    volumes = {"subject_1mm": subject(data), "mni_1mm": template(1),
               "mni_2mm": template(2)}
    volumes["subject_2mm"] = block_mean2(*volumes["subject_1mm"])
    sources = {"subject_to_mni_2mm": ("subject_1mm", "mni_2mm"),
               "mni_to_subject_2mm": ("mni_2mm", "subject_2mm"),
               "subject_to_mni_1mm": ("subject_1mm", "mni_1mm"),
               "mni_to_subject_1mm": ("mni_1mm", "subject_1mm")}
    folders = {}
    for name in names:
        folder = folders[name] = os.path.join(out, name)
        if name in sources:
            moving, fixed = (volumes[key] for key in sources[name])
            write(folder, {"moving": moving[0], "moving_seg": moving[1],
                           "moving_affine": moving[2], "fixed": fixed[0],
                           "fixed_seg": fixed[1], "fixed_affine": fixed[2]})
        else:
            seed = int(name.split("_")[1])
            pair = optimize_vs_syn.make_pair(volumes["mni_1mm"], seed, KNOWN[name])
            write(folder, {**{key: pair[key] for key in ("moving", "fixed", "moving_seg",
                                                         "fixed_seg")},
                           "moving_affine": pair["affine"], "fixed_affine": pair["affine"],
                           "truth": pair["truth"]})
    return folders


def write(folder: str, pair: dict[str, Any]) -> None:
    """The pair's NIfTI files (float32 images, int16 labels) and ``truth.npy``."""
    import nibabel as nib
    os.makedirs(folder, exist_ok=True)
    for role in ("moving", "fixed"):
        affine = pair[f"{role}_affine"]
        for key, dtype in ((role, np.float32), (f"{role}_seg", np.int16)):
            image = nib.Nifti1Image(np.asarray(pair[key]).astype(dtype), affine)
            image.header.set_qform(affine, code=1)
            image.header.set_sform(affine, code=1)
            nib.save(image, os.path.join(folder, f"{key}.nii.gz"))
    if "truth" in pair:
        np.save(os.path.join(folder, "truth.npy"), pair["truth"])


def score(folder: str, field_lps: Optional[np.ndarray], matrix: Optional[np.ndarray]
          ) -> dict[str, float]:
    """The scores of the transform ``p -> matrix @ (p + field(p))`` (ITK: LPS mm,
    on the fixed grid; None: zero field / identity): Dice of GM and WM and their
    mean, HD95 (mm, mean over the two), % of the brain's voxels (fixed labels
    > 0) where the transform's Jacobian determinant is <= 0, SDlogJ over the
    brain, and for a known answer the mean error over the brain (mm)."""
    import jax.numpy as jnp
    import nibabel as nib
    from ofg_jax.registration import geometry
    from ofg_jax import metrics
    fixed = nib.load(os.path.join(folder, "fixed.nii.gz"))
    moving = nib.load(os.path.join(folder, "moving_seg.nii.gz"))
    shape, spacing = fixed.shape, tuple(float(z) for z in fixed.header.get_zooms()[:3])
    fixed_seg = np.asarray(nib.load(os.path.join(folder, "fixed_seg.nii.gz")).dataobj,
                           np.int32)
    field_lps = np.zeros(shape + (3,), np.float32) if field_lps is None else field_lps
    warped = np.asarray(geometry.sample_through(
        np.asarray(moving.dataobj, np.int32), moving.affine, field_lps, fixed.affine,
        matrix=matrix, order=0))
    dice = np.asarray(metrics.dice_per_label(jnp.asarray(warped), jnp.asarray(fixed_seg),
                                             LABELS))
    voxels = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    points = geometry.apply_affine(fixed.affine, voxels) + field_lps * geometry.RAS_TO_LPS
    if matrix is not None:
        points = geometry.apply_affine(matrix, points)
    # The whole transform in fixed voxels, so that its determinant is unitless.
    disp = jnp.asarray(geometry.apply_affine(np.linalg.inv(fixed.affine), points) - voxels,
                       jnp.float32)
    det = np.asarray(metrics.jacobian_determinant(disp))
    brain = fixed_seg > 0
    scores = {"dice": float(dice.mean()), "dice_gm": float(dice[0]),
              "dice_wm": float(dice[1]),
              "hd95_mm": float(metrics.hd95(fixed_seg, warped, LABELS, spacing=spacing)),
              "det_le0_brain_pct": float(100.0 * np.mean(det[brain] <= 0)),
              "sdlogj_brain": float(np.std(np.log(np.clip(det[brain], 1e-9, None))))}
    truth = os.path.join(folder, "truth.npy")
    if os.path.isfile(truth):
        scores["error_mm"] = float(np.linalg.norm(points - np.load(truth), axis=-1)[brain]
                                   .mean())
    return scores


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the subject's .npz (vol, seg)")
    parser.add_argument("--out", required=True, help="folder of the pairs")
    parser.add_argument("--pairs", default=",".join(PAIRS))
    args = parser.parse_args(argv)
    for name, folder in make_pairs(args.data, args.out, args.pairs.split(",")).items():
        identity = score(folder, None, None)
        print(f"{name:22s} {folder}: identity Dice {identity['dice']:.3f}")


if __name__ == "__main__":
    main()
