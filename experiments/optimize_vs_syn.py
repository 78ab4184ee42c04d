"""Registration with no network (``register`` without ``--workdir``) against ANTs SyN.

    python -m experiments.optimize_vs_syn --data ../shared/data/oasis_subject_160x192x224.npz \\
        --ants-python /tmp/ants-venv/bin/python --pairs 5 --cc-pairs 5
    python -m experiments.optimize_vs_syn --data ... --tune     # the sweep behind the defaults

Pairs with known answers from one real brain (``--data``: an ``.npz`` with ``vol``,
a 1 mm T1 scan, and ``seg``, its FreeSurfer labels, on the 160x192x224 LIA grid
of the IXI / OASIS releases). The fixed scan is the subject smoothed (sigma 0.85
mm) and sampled on a 2 mm grid (80x96x112); the moving scan is the same subject
seen through a known transform, sampled on the same grid: a random smooth
diffeomorphic deformation (a Gaussian-smoothed random velocity, 12 mm sigma,
integrated by scaling and squaring, scaled to a mean displacement of 2, 4 or 6
mm over the brain, by pair) and a random rigid motion (3-10 degrees about a
random axis through the brain's centre, 3-10 mm translation). Both get
independent Gaussian noise (1 % of the intensity range). Reported pairs use
seeds 0..N-1, the tuning pairs (``--tune``) seeds 100-102: the defaults were
chosen on pairs that are not reported.

Each pair is registered by every method in turn, ours and ANTs alternating, one
process at a time, so that the load of other jobs affects both alike:
ofg_jax (``python -m ofg_jax.register --affine``, no workdir; default settings,
then ``--diffeomorphic``), each run twice: first with an empty compilation cache
(the compilation seconds), then again with it filled (the whole command's
seconds); ANTs SyN (antspyx, ``--ants-python`` of its own virtualenv; see
``experiments/syn_baseline.py``): ``type_of_transform="SyN"`` (affine +
deformable) with its default Mattes MI metric, and with CC of radius 4 (the
window of ANTs' ``antsRegistrationSyN.sh``) on the first ``--cc-pairs`` pairs.

Every method is scored by the same code from its transform (ours: the written
``transform.nii.gz`` and ``affine.mat``; ANTs: its transforms composed into one
displacement field): Dice over the labels of the fixed segmentation (the moving
labels pulled through the transform, nearest neighbour), HD95 in mm
(``ofg_jax.metrics.hd95``), the transform's error against the known answer (mm,
mean over the brain), % det <= 0 and SDlogJ of the whole transform (voxels).
"""

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "optimize_vs_syn"
SPACING_MM = 2.0
MAGNITUDES_MM = (2.0, 4.0, 6.0)
TUNING_SEEDS = (100, 101, 102)
FILES = ("moving", "fixed", "moving_seg", "fixed_seg")


# Pairs with known answers.

def load_subject(path: str):
    """``(volume float32, labels int32, 1 mm LIA affine centred on 0)``."""
    from ofg_jax.registration import geometry
    data = np.load(path)
    volume = np.asarray(data["vol"], np.float32)
    return (volume, np.rint(data["seg"]).astype(np.int32),
            geometry.centred_grid(volume.shape, (1.0,) * 3, "LIA", (0, 0, 0)).affine)


def _deformation(rng, volume, labels, affine, magnitude_mm):
    """A smooth diffeomorphic deformation ``x -> x + forward(x)`` and its inverse
    ``x -> x + inverse(x)``: ``(forward, inverse, grid)``, fields ``(*S, 3)`` in
    RAS mm on a 4 mm grid, the exponentials of a random velocity and of its
    negation, scaled to a mean displacement of ``magnitude_mm`` over the brain."""
    import jax.numpy as jnp
    from scipy import ndimage
    from ofg_jax.registration import geometry
    from ofg_jax.models.integrate import integrate_velocity
    shape = tuple(n // 4 for n in volume.shape)
    grid = geometry.centred_grid(shape, (4.0,) * 3, "LIA",
                                 geometry.apply_affine(affine, (np.array(
                                     volume.shape) - 1) / 2))
    velocity = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 3.0)
                         for _ in range(3)], -1).astype(np.float32)
    brain = ndimage.zoom(labels > 0, 0.25, order=0)[:shape[0], :shape[1], :shape[2]]
    to_mm = lambda v: np.asarray(integrate_velocity(jnp.asarray(v[None]), 7)[0]
                                 ) @ grid.affine[:3, :3].T
    velocity *= np.float32(magnitude_mm / np.linalg.norm(to_mm(velocity)[brain],
                                                         axis=-1).mean())
    return to_mm(velocity), to_mm(-velocity), grid
def make_pair(subject, seed: int, magnitude_mm: float, noise: float = 0.01
              ) -> dict[str, Any]:
    """Fixed and moving scans and labels on one 2 mm grid, and the known answer:
    ``truth`` ``(*S, 3)``, the moving world point (RAS mm) of each fixed voxel."""
    import jax.numpy as jnp
    from scipy import ndimage
    from scipy.spatial.transform import Rotation
    from ofg_jax.registration import geometry
    from ofg_jax.warp import sample
    volume, labels, affine = subject
    rng = np.random.default_rng(seed)
    shape = tuple(int(n // SPACING_MM) for n in volume.shape)
    grid = geometry.centred_grid(shape, (SPACING_MM,) * 3, "LIA",
                                 geometry.apply_affine(affine, (np.array(
                                     volume.shape) - 1) / 2))
    forward, inverse, field_grid = _deformation(rng, volume, labels, affine,
                                                magnitude_mm)
    axis = rng.normal(size=3)
    rotation = Rotation.from_rotvec(axis / np.linalg.norm(axis) * np.radians(
        rng.uniform(3, 10))).as_matrix()
    shift = rng.normal(size=3)
    shift *= rng.uniform(3, 10) / np.linalg.norm(shift)
    center = geometry.apply_affine(affine, ndimage.center_of_mass(labels > 0))
    points = geometry.apply_affine(grid.affine, np.stack(np.meshgrid(
        *[np.arange(n) for n in shape], indexing="ij"), -1))
    at = lambda field, p: p + np.asarray(sample(jnp.asarray(field), jnp.asarray(
        geometry.apply_affine(np.linalg.inv(field_grid.affine), p), jnp.float32)))
    # The moving voxel at q shows the subject at psi(q) = D(R (q - c) + c + t), D
    # the deformation; the known answer is psi^-1(p) = R^-1 (D^-1(p) - c - t) + c.
    seen = at(forward, (points - center) @ rotation.T + center + shift)
    truth = (at(inverse, points) - center - shift) @ rotation + center
    smooth = jnp.asarray(ndimage.gaussian_filter(volume, 0.85))
    to_voxels = lambda p: jnp.asarray(geometry.apply_affine(np.linalg.inv(affine), p),
                                      jnp.float32)
    noisy = lambda image: (np.asarray(image) + noise * rng.normal(size=shape)
                           ).astype(np.float32)
    return {"moving": noisy(sample(smooth, to_voxels(seen))),
            "fixed": noisy(sample(smooth, to_voxels(points))),
            "moving_seg": np.asarray(sample(jnp.asarray(labels), to_voxels(seen),
                                            order=0)),
            "fixed_seg": np.asarray(sample(jnp.asarray(labels), to_voxels(points),
                                           order=0)),
            "affine": grid.affine, "truth": truth.astype(np.float32),
            "magnitude_mm": magnitude_mm}


def write_pair(folder: str, pair: dict[str, Any]) -> dict[str, str]:
    """The pair's NIfTI files (float32 scans, int16 labels) and ``truth.npy``."""
    import nibabel as nib
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for key in FILES:
        image = nib.Nifti1Image(pair[key].astype(np.int16 if "seg" in key else
                                                  np.float32), pair["affine"])
        image.header.set_qform(pair["affine"], code=1)
        image.header.set_sform(pair["affine"], code=1)
        paths[key] = os.path.join(folder, f"{key}.nii.gz")
        nib.save(image, paths[key])
    np.save(os.path.join(folder, "truth.npy"), pair["truth"])
    return paths


# Scores of a transform, the same for every method.

def score(folder: str, field_lps: Optional[np.ndarray], matrix: Optional[np.ndarray]
          ) -> dict[str, float]:
    """Dice, HD95 (mm), error against the truth (mm), % det <= 0 and SDlogJ of the
    transform ``p -> matrix @ (p + field(p))`` (None: zero field / identity)."""
    import jax.numpy as jnp
    import nibabel as nib
    from ofg_jax.registration import geometry
    from ofg_jax import metrics
    fixed = nib.load(os.path.join(folder, "fixed.nii.gz"))
    affine, shape = fixed.affine, fixed.shape
    seg = lambda key: np.asarray(nib.load(os.path.join(folder, f"{key}.nii.gz")
                                          ).dataobj).astype(np.int32)
    moving_seg, fixed_seg = seg("moving_seg"), seg("fixed_seg")
    field_lps = np.zeros(shape + (3,), np.float32) if field_lps is None else field_lps
    warped_seg = np.asarray(geometry.sample_through(moving_seg, affine, field_lps,
                                                    affine, matrix=matrix, order=0))
    labels = [int(l) for l in np.unique(fixed_seg) if l]
    dice = np.asarray(metrics.dice_per_label(jnp.asarray(warped_seg),
                                             jnp.asarray(fixed_seg), labels))
    voxels = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    points = geometry.apply_affine(affine, voxels) + field_lps * geometry.RAS_TO_LPS
    if matrix is not None:
        points = geometry.apply_affine(matrix, points)
    truth = np.load(os.path.join(folder, "truth.npy"))
    brain = fixed_seg > 0
    disp = jnp.asarray(geometry.apply_affine(np.linalg.inv(affine), points) - voxels,
                       jnp.float32)
    return {"dice": float(dice.mean()),
            "hd95_mm": metrics.hd95(fixed_seg, warped_seg, labels,
                                    spacing=(SPACING_MM,) * 3),
            "error_mm": float(np.linalg.norm(points - truth, axis=-1)[brain].mean()),
            "non_pos_jacobian_pct": float(metrics.non_positive_jacobian_pct(disp)),
            "sdlogj": float(metrics.sdlogj(disp))}


def truth_field(folder: str) -> np.ndarray:
    """The known answer as an ITK field on the fixed grid (LPS mm)."""
    import nibabel as nib
    from ofg_jax.registration import geometry
    fixed = nib.load(os.path.join(folder, "fixed.nii.gz"))
    voxels = np.stack(np.meshgrid(*[np.arange(n) for n in fixed.shape],
                                  indexing="ij"), -1)
    offset = np.load(os.path.join(folder, "truth.npy")) - geometry.apply_affine(
        fixed.affine, voxels)
    return (offset * geometry.RAS_TO_LPS).astype(np.float32)


# The methods.

def _seconds(pattern: str, text: str) -> float:
    match = re.search(pattern, text, re.M)
    if not match:
        raise ValueError(f"no {pattern!r} in the register log:\n{text}")
    return float(match.group(1))


def run_ours(paths: dict[str, str], out: str, flags: Sequence[str], cache: str
             ) -> dict[str, Any]:
    """``register --affine`` twice with the cache folder ``cache`` (empty at first)."""
    command = [sys.executable, "-m", "ofg_jax.register", f"--moving={paths['moving']}",
               f"--fixed={paths['fixed']}", f"--out={out}", "--affine", *flags]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, XDG_CACHE_HOME=cache)
    logs, walls = [], []
    for _ in range(2):
        start = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        walls.append(time.perf_counter() - start)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}")
        logs.append(done.stdout)
    affine = r"^affine .*; (\S+) s, and (\S+) s compiling"
    first, second = logs
    return {"seconds": _seconds(affine, second) + _seconds(
                r"^optimisation: (\S+) s", second),
            "optimization_seconds": _seconds(r"^optimisation: (\S+) s", second),
            "compile_seconds": _seconds(r"^time: \S+ s for this pair, (\S+) s", first),
            "command_seconds": walls[1], "first_command_seconds": walls[0],
            "second_compile_seconds": _seconds(r"^time: \S+ s for this pair, (\S+) s",
                                               second),
            "log": second}


def run_syn(paths: dict[str, str], out: str, ants_python: str, metric: str,
            sampling: int) -> dict[str, Any]:
    """ANTs SyN in its own interpreter (:func:`syn_worker`); whole command timed."""
    os.makedirs(out, exist_ok=True)
    command = [ants_python, "-m", "experiments.optimize_vs_syn", "--syn-worker",
               paths["fixed"], paths["moving"], paths["moving_seg"], out, metric,
               str(sampling)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}")
    with open(os.path.join(out, "syn.json")) as f:
        return dict(json.load(f), command_seconds=wall)


def syn_worker(fixed: str, moving: str, moving_seg: str, out: str, metric: str,
               sampling: str) -> None:
    """Runs in the antspyx interpreter: registers, writes the warped scan and
    labels and the composed field, and ``syn.json`` with the seconds."""
    import ants
    fixed_image, moving_image = ants.image_read(fixed), ants.image_read(moving)
    start = time.perf_counter()
    reg = ants.registration(fixed=fixed_image, moving=moving_image,
                            type_of_transform="SyN", syn_metric=metric,
                            syn_sampling=int(sampling),
                            outprefix=os.path.join(out, "syn_"))
    seconds = time.perf_counter() - start
    ants.image_write(reg["warpedmovout"], os.path.join(out, "warped.nii.gz"))
    ants.image_write(ants.apply_transforms(
        fixed=fixed_image, moving=ants.image_read(moving_seg),
        transformlist=reg["fwdtransforms"], interpolator="nearestNeighbor"),
        os.path.join(out, "warped_seg.nii.gz"))
    composed = ants.apply_transforms(fixed=fixed_image, moving=moving_image,
                                     transformlist=reg["fwdtransforms"],
                                     compose=os.path.join(out, "composed_"))
    with open(os.path.join(out, "syn.json"), "w") as f:
        json.dump({"seconds": seconds, "composed": composed}, f)


# ofg_jax default and diffeomorphic, ANTs SyN with MI and with CC, in this order
# for every pair: (label, kind, options).
METHODS = (("ofg_jax (default)", "ours", ()),
           ("ANTs SyN (MI)", "syn", ("mattes", 32)),
           ("ofg_jax (diffeomorphic)", "ours", ("--diffeomorphic",)),
           ("ANTs SyN (CC, radius 4)", "syn", ("CC", 4)))


def run_method(label: str, kind: str, options, paths, pair_dir: str, work: str,
               ants_python: str) -> dict[str, Any]:
    """Registers one pair by one method and scores its transform."""
    from ofg_jax.registration import geometry
    from ofg_jax.registration import transforms
    out = os.path.join(pair_dir, re.sub(r"\W+", "_", label).strip("_"))
    load = os.getloadavg()[0]
    if kind == "ours":
        timing = run_ours(paths, out, options, os.path.join(
            work, "cache", f"{os.path.basename(pair_dir)}_{os.path.basename(out)}"))
        transform = transforms.load_transform(out)
        scores = score(pair_dir, transform.field_lps, transform.matrix)
        timing["affine_only"] = score(pair_dir, None, transform.matrix)
        del timing["log"]
    else:
        timing = run_syn(paths, out, ants_python, *options)
        field, _ = geometry.read_itk_displacement(timing.pop("composed"))
        scores = score(pair_dir, field, None)
    return {"label": label, **scores, **timing,
            "load_average": [load, os.getloadavg()[0]]}


def tuning_pairs(subject, folder: str):
    """The tuning pairs (written into ``folder``) after the affine pre-alignment, as
    ``register`` prepares them: ``(folder, moving on the fixed grid, fixed volume,
    matrix)``."""
    from ofg_jax.registration import affine as affine_lib
    from ofg_jax.registration import scans
    from ofg_jax.registration.transforms import Volume
    prepared = []
    for seed, magnitude in zip(TUNING_SEEDS, MAGNITUDES_MM):
        pair = make_pair(subject, seed, magnitude)
        pair_dir = os.path.join(folder, f"pair{seed}")
        write_pair(pair_dir, pair)
        moving, fixed = (Volume(pair[key], pair["affine"]) for key in ("moving", "fixed"))
        matrix = affine_lib.register_affine(moving.array, fixed.array,
                                            moving_affine=moving.affine,
                                            fixed_affine=fixed.affine)
        prepared.append((pair_dir, scans.resample_volume(moving, fixed.grid, matrix),
                         fixed, matrix))
    return prepared


# The settings tried on the tuning pairs: (changes to OptimizeSettings, diffeomorphic).
TUNING_GRID = tuple(
    (dict(levels=levels, steps=steps, learning_rate=rate, reg_weight=weight,
          window=window), diffeomorphic)
    for levels, steps, rate, weight, window, diffeomorphic in (
        ((4, 2), (100, 50), 0.2, 1.0, 9, False),
        ((4, 2, 1), (100, 50, 10), 0.1, 1.0, 9, False),
        ((4, 2, 1), (100, 50, 10), 0.2, 2.0, 9, False),
        ((4, 2, 1), (100, 50, 20), 0.2, 2.0, 9, False),
        ((4, 2, 1), (100, 50, 20), 0.2, 3.0, 9, False),
        ((4, 2, 1), (100, 50, 20), 0.2, 2.0, 5, False),
        ((4, 2, 1), (100, 50, 20), 0.2, 3.0, 5, False),
        ((4, 2, 1), (100, 50, 10), 0.2, 2.0, 5, False),
        ((4, 2, 1), (50, 25, 10), 0.2, 2.0, 5, False),
        ((4, 2, 1), (100, 50, 40), 0.2, 2.0, 5, False),
        ((4, 2, 1), (100, 50, 20), 0.3, 2.0, 5, False),
        ((4, 2, 1), (200, 100, 20), 0.2, 2.0, 5, False),
        ((4, 2, 1), (100, 50, 20), 0.2, 1.0, 9, True),
        ((4, 2, 1), (100, 50, 20), 0.2, 2.0, 5, True),
        ((4, 2, 1), (100, 50, 10), 0.2, 1.0, 5, True),
        ((4, 2), (100, 50), 0.2, 1.0, 5, True)))


def tune(subject, grid: Sequence[tuple[dict, bool]], folder: str
         ) -> list[dict[str, Any]]:
    """The scores and compiled seconds of each setting on the tuning pairs."""
    import jax
    from ofg_jax.registration import transforms
    from ofg_jax.registration.compile_time import compile_ahead
    from ofg_jax.registration.arrays import _optimize
    from ofg_jax.optimize import OptimizeSettings
    prepared = tuning_pairs(subject, folder)
    rows = []
    for change, diffeomorphic in grid:
        settings = OptimizeSettings(**dict(change, diffeomorphic=diffeomorphic))
        for seed, (pair_dir, moving, fixed, matrix) in zip(TUNING_SEEDS, prepared):
            program, _ = compile_ahead(_optimize, moving, fixed.array, settings=settings)
            start = time.perf_counter()
            found = jax.device_get(jax.block_until_ready(program(moving, fixed.array)))
            seconds = time.perf_counter() - start
            transform = transforms.field_transform(found["disp"], fixed.grid, fixed,
                                                   matrix)
            rows.append(dict(score(pair_dir, transform.field_lps, matrix),
                             label=settings.describe(), seed=seed, seconds=seconds,
                             load_average=os.getloadavg()[0]))
            print(json.dumps(rows[-1]), flush=True)
    return rows


COLUMNS = (("dice", "Dice", 3), ("hd95_mm", "HD95 mm", 2), ("error_mm", "error mm", 2),
           ("non_pos_jacobian_pct", "% det ≤ 0", 3), ("sdlogj", "SDlogJ", 3),
           ("seconds", "s registration", 2), ("compile_seconds", "s compilation", 1),
           ("command_seconds", "s whole command", 2))


# The table's rows: the references around the methods.
ROW_ORDER = ("identity (no registration)", "ofg_jax affine only", "ofg_jax (default)",
             "ofg_jax (diffeomorphic)", "ANTs SyN (MI)", "ANTs SyN (CC, radius 4)",
             "the known answer (upper bound)")


def table(records: Sequence[dict]) -> str:
    from experiments import common
    records = sorted(records, key=lambda r: ROW_ORDER.index(r["label"]))
    stats = common.aggregate(records, [c[0] for c in COLUMNS])
    rows = []
    for label, metrics in stats.items():
        n = max(s["n"] for s in metrics.values())
        rows.append([label, str(n)] + [common.cell(metrics[m], d) for m, _, d in COLUMNS])
    return common.markdown_table(["method", "pairs"] + [h for _, h, _ in COLUMNS], rows)


def reference_rows(pair_dir: str, ours: dict[str, Any]) -> list[dict[str, Any]]:
    """No registration, ofg_jax's affine alone, and the known answer."""
    return [dict(score(pair_dir, None, None), label="identity (no registration)"),
            dict(ours["affine_only"], label="ofg_jax affine only"),
            dict(score(pair_dir, truth_field(pair_dir), None),
                 label="the known answer (upper bound)")]


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--syn-worker"]:
        syn_worker(*argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the subject's .npz (vol, seg)")
    parser.add_argument("--ants-python", default="python",
                        help="python of the virtualenv with antspyx")
    parser.add_argument("--pairs", type=int, default=3, help="reported pairs")
    parser.add_argument("--cc-pairs", type=int, default=0,
                        help="pairs also registered by SyN with CC of radius 4 (the "
                             "first ones)")
    parser.add_argument("--tune", action="store_true", help="the tuning sweep only")
    parser.add_argument("--workdir", default=os.path.join("workdir", NAME))
    args = parser.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    subject = load_subject(args.data)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if args.tune:
        rows = tune(subject, TUNING_GRID, os.path.join(args.workdir, "tune"))
        with open(os.path.join(args.workdir, "tune.json"), "w") as f:
            json.dump({"date": date, "rows": rows}, f, indent=1)
        return
    path = os.path.join(args.workdir, f"{NAME}.json")
    records, dates = [], [date]
    if os.path.exists(path):  # Resumes: the pairs and methods already done stay.
        with open(path) as f:
            done = json.load(f)
        records, dates = done["records"], done.get("dates", [done["date"]]) + [date]
    for seed in range(args.pairs):
        pair_dir = os.path.join(args.workdir, f"pair{seed}")
        paths = {key: os.path.join(pair_dir, f"{key}.nii.gz") for key in FILES}
        if not os.path.exists(os.path.join(pair_dir, "truth.npy")):
            write_pair(pair_dir, make_pair(subject, seed, MAGNITUDES_MM[seed % 3]))
        for label, kind, options in METHODS:
            wanted = args.cc_pairs if label.startswith("ANTs SyN (CC") else args.pairs
            if seed >= wanted or any(r["label"] == label and r["seed"] == seed
                                     for r in records):
                continue
            print(f"pair {seed}: {label}", file=sys.stderr, flush=True)
            record = run_method(label, kind, options, paths, pair_dir, args.workdir,
                                args.ants_python)
            records.append(dict(record, seed=seed, date=date))
            if kind == "ours" and not options:
                records += [dict(r, seed=seed) for r in reference_rows(pair_dir,
                                                                       record)]
            with open(path, "w") as f:
                json.dump({"date": dates[0], "dates": dates, "command": " ".join(
                    ["python", "-m", f"experiments.{NAME}"] + argv),
                           "records": records}, f, indent=1, default=float)
    text = table(records)
    with open(os.path.join(args.workdir, f"{NAME}.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
