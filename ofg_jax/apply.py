"""Carrying a saved registration over to other images of the moving subject.

    python -m ofg_jax.apply --registration=DIR --image=X --out=Y [--interpolation=nearest]
    python -m ofg_jax.apply --registration=DIR --image=X --out=Y --inverse

``DIR`` is an output folder of ``python -m ofg_jax.register``. ``X`` (labels,
another contrast, a probability map; any shape, voxel size and orientation) is
sampled once through the saved transform, ``transform.nii.gz`` then
``affine.mat`` when present, onto the fixed image's grid; ``Y`` gets the fixed
image's affine and header. Applied to the moving segmentation with
``--interpolation=nearest`` it reproduces ``warped_seg.nii.gz`` exactly.
``--inverse`` carries an image of the fixed subject onto the moving image's grid
through ``inverse.nii.gz`` (written by ``register --inverse``).
"""

import os
import sys
from typing import Optional, Sequence

from absl import flags
import numpy as np

from ofg_jax import cli
from ofg_jax import nifti
from ofg_jax.registration import transforms

INTERPOLATIONS = {"linear": 1, "nearest": 0}


def _define_flags(fv: flags.FlagValues) -> None:
    define = dict(flag_values=fv)
    flags.DEFINE_string("registration", None, "Output folder of ofg_jax.register "
                        "(transform.nii.gz, optional affine.mat).", **define)
    flags.DEFINE_string("image", None, "Image to carry over (NIfTI or anything "
                        "nibabel reads), in its own geometry.", **define)
    flags.DEFINE_string("out", None, "Output file (.nii.gz).", **define)
    flags.DEFINE_enum("interpolation", "linear", list(INTERPOLATIONS),
                      "linear: intensities, probability maps; nearest: label maps "
                      "(values kept).", **define)
    flags.DEFINE_bool("inverse", False, "Carry an image of the fixed subject onto "
                      "the moving grid (inverse.nii.gz).", **define)
    cli.define_traceback_flag(fv)


def read_input(path: str, *, nearest: bool) -> transforms.Volume:
    """The image to carry over: float32, or int32 labels for an integer file read
    with nearest interpolation. Checked before anything is written."""
    integer = np.issubdtype(nifti.load(path, "image").get_data_dtype(), np.integer)
    return transforms.read_volume(path, "image", labels=nearest and integer)


def _run(fv: flags.FlagValues) -> None:
    if not (fv.registration and fv.image and fv.out):
        raise cli.UsageError("--registration, --image and --out are required")
    if os.path.isdir(fv.out):
        raise IsADirectoryError(f"--out {fv.out} is a folder; give a file name such "
                                "as warped_t2.nii.gz")
    folder = os.path.dirname(os.path.abspath(fv.out))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"output folder {folder} is a file")
    transform = transforms.load_transform(fv.registration, inverse=fv.inverse)
    nearest = fv.interpolation == "nearest"
    image = read_input(fv.image, nearest=nearest)
    result = transforms.apply_transform(transform, image,
                                          order=INTERPOLATIONS[fv.interpolation])
    os.makedirs(folder, exist_ok=True)
    nifti.write_like(fv.out, result, transform.field_image)
    print(f"wrote {fv.out} ({'x'.join(map(str, result.shape))}, {result.dtype})")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the command line ``argv`` (program name first; default ``sys.argv``);
    returns the exit status."""
    fv = flags.FlagValues()
    _define_flags(fv)
    return cli.run(_run, fv, argv, __doc__, expected=(IsADirectoryError,))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
