"""Wall time and accuracy of ``ofg_jax.register_affine`` on brain-sized phantom scans.

    python -m experiments.affine_timing [--shape 160,192,224] [--spacing 1] \
        [--seeds 3] [--repeats 3]

For each seed: a known affine (rotation 10-15 deg, scaling 0.9-1.1, translation
15-20 mm), a fixed phantom scan on an RAS grid of ``--shape`` at ``--spacing``
mm, and a moving scan of the phantom moved by that affine on another grid (voxel
size x1.15, LPI). Prints the first call (compilation included) and the median of
``--repeats`` further calls, and the error of the matrix found: the distance (mm)
between where it and the true affine send the points of the phantom's labels.
"""

import argparse
import statistics
import time
from typing import Optional, Sequence

import numpy as np
from scipy.spatial.transform import Rotation

from experiments.timing import device_description
from experiments.timing import parse_shape
from ofg_jax.registration import geometry
from ofg_jax import register_affine
from ofg_jax.data import phantom

HALF_MM = 70.0  # mm per normalised phantom unit: a 140 mm head.


def known_affine(rng: np.random.Generator) -> np.ndarray:
    """A fixed -> moving world map: rotation, scaling and translation drawn by ``rng``."""
    axis = rng.normal(size=3)
    rotation = Rotation.from_rotvec(
        axis / np.linalg.norm(axis) * np.radians(rng.uniform(10, 15))).as_matrix()
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag(rng.uniform(0.9, 1.1, 3))
    direction = rng.normal(size=3)
    matrix[:3, 3] = direction / np.linalg.norm(direction) * rng.uniform(15, 20)
    return matrix


def render(grid: geometry.Grid, world_to_phantom: np.ndarray):
    """The smooth phantom (no noise) on ``grid``, seen through ``world_to_phantom``."""
    voxels = np.stack(np.meshgrid(*map(np.arange, grid.shape), indexing="ij"), -1)
    points = geometry.apply_affine(world_to_phantom @ grid.affine, voxels) / HALF_MM
    appearance = phantom.Appearance(contrast_jitter=0.0, bias=0.0, noise=0.0,
                                    partial_volume=3.0 / min(grid.spacing))
    anatomy = phantom.Anatomy.draw(np.random.default_rng(0))
    return phantom.render(tuple(points[..., k].astype(np.float32) for k in range(3)),
                          anatomy, np.random.default_rng(1), appearance)


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, float]]:
    """Runs the measurement; returns one row per seed (also printed)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=parse_shape, default=(160, 192, 224))
    parser.add_argument("--spacing", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.repeats < 1:
        parser.error("--seeds and --repeats must be at least 1")
    fixed_grid = geometry.centred_grid(args.shape, (args.spacing,) * 3, "RAS",
                                       (0.0, 0.0, 0.0))
    moving_shape = tuple(int(round(n / 1.15)) for n in args.shape)
    moving_grid = geometry.centred_grid(moving_shape, (args.spacing * 1.15,) * 3,
                                        "LPI", (4.0, -3.0, 2.0))
    fixed, labels = render(fixed_grid, np.eye(4))
    points = geometry.apply_affine(fixed_grid.affine, np.argwhere(labels > 0))
    print(f"{device_description()}; fixed {fixed_grid.describe()}, "
          f"moving {moving_grid.describe()}")
    print("| seed | true motion (mm, mean) | error (mm, mean / max) | first call (s) "
          f"| median of {args.repeats} (s) |")
    print("|---|---|---|---|---|")
    rows = []
    for seed in range(args.seeds):
        matrix = known_affine(np.random.default_rng(seed))
        moving, _ = render(moving_grid, np.linalg.inv(matrix))
        times = []
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            found = register_affine(moving, fixed, moving_affine=moving_grid.affine,
                                    fixed_affine=fixed_grid.affine)
            times.append(time.perf_counter() - start)
        truth = geometry.apply_affine(matrix, points)
        error = np.linalg.norm(geometry.apply_affine(found, points) - truth, axis=-1)
        motion = np.linalg.norm(truth - points, axis=-1).mean()
        rows.append(dict(seed=seed, motion_mm=float(motion),
                         error_mm=float(error.mean()), max_error_mm=float(error.max()),
                         first_s=times[0], median_s=statistics.median(times[1:])))
        print("| {seed} | {motion_mm:.1f} | {error_mm:.3f} / {max_error_mm:.3f} | "
              "{first_s:.2f} | {median_s:.2f} |".format(**rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
