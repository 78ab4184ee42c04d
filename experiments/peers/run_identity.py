"""No registration: a constant displacement field (zero by default), for checks.

    python -m experiments.peers.run_identity --fixed F --moving M --out DIR --threads N \\
        [--shift X,Y,Z]

Writes what a peer adapter writes (``field.nii.gz``: ``--shift``, LPS mm, at
every voxel of the fixed grid, as an ITK vector image ``(X, Y, Z, 1, 3)``;
``peer.json``), with nibabel alone (the repository's virtualenv): the whole
path from a tool's process to the scores, checked with a transform known in
advance.
"""

import os

from experiments.peers import protocol


def main(argv=None) -> None:
    arguments = protocol.parser(__doc__.split("\n\n")[0])
    arguments.add_argument("--shift", default="0,0,0",
                           help="the displacement, LPS mm (default 0,0,0)")
    args = protocol.parse(__doc__, argv, arguments)
    try:
        shift = [float(v) for v in args.shift.split(",")]
    except ValueError:
        shift = []
    if len(shift) != 3:
        protocol.fail(f"--shift must be three numbers X,Y,Z, not {args.shift!r}")
    import nibabel as nib
    import numpy as np
    fixed = nib.load(args.fixed)

    def write():
        field = np.broadcast_to(np.asarray(shift, np.float32),
                                tuple(fixed.shape[:3]) + (1, 3))
        header = fixed.header.copy()
        header.set_data_dtype(np.float32)
        image = nib.Nifti1Image(np.ascontiguousarray(field), fixed.affine, header)
        image.header.set_intent("vector")
        nib.save(image, os.path.join(args.out, protocol.FIELD_FILE))

    _, seconds = protocol.timed(write)
    protocol.write_result(args.out, tool="identity", version="-", seconds=seconds,
                          recipe={"shift_lps_mm": shift})


if __name__ == "__main__":
    protocol.run(main)
