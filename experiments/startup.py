"""Where ``ofg-register``'s time goes: a bad command line, and a warm second run.

    python -m experiments.startup --data ../shared/data/oasis_subject_160x192x224.npz \\
        --dir /tmp/startup [--repeats 5]

Writes a pair into ``--dir``: the OASIS subject of ``--data`` (an ``.npz`` with
``vol`` and ``seg`` on the 160x192x224 grid) at 1 mm, LIA, as the moving scan,
and its 2x2x2 block means (80x96x112 at 2 mm, centred 3, -2, 4 mm away) as the
fixed one, with both segmentations. Then times, each run in a fresh process, the
median of ``--repeats`` runs after one that is not counted:

- ``error``: ``python -m ofg_jax.register --moving=missing.nii.gz --fixed=x
  --out=o``, the whole process;
- ``warm``: optimisation alone of the pair with ``--affine`` and the
  segmentations, the compilation cache in ``DIR/cache`` (filled by the first
  run): the whole process, and inside it each phase, timed around the functions
  that do it, with the seconds of compiling programs or loading them from the
  cache (``ofg_jax.registration.compile_time``).

The imports are timed by importing, before the command runs, the modules that
optimisation alone imports.
"""

import argparse
import collections
import functools
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Optional, Sequence

# What optimisation alone imports (the command imports them once its checks pass).
MODULES = ("ofg_jax.register", "ofg_jax.registration.pairs", "ofg_jax.registration.scans",
           "ofg_jax.registration.arrays", "ofg_jax.registration.affine",
           "ofg_jax.registration.transforms", "ofg_jax.registration.geometry", "ofg_jax.nifti",
           "ofg_jax.registration.compile_time",
           "jax.experimental.compilation_cache.compilation_cache")
# (module, function, phase): the functions timed in the warm run, by the module
# that defines them (every module's name for them is replaced).
PHASES = (
    ("ofg_jax.registration.pairs", "check_headers", "header checks"),
    ("ofg_jax.registration.transforms", "read_volume", "read the scans"),
    ("ofg_jax.registration.scans", "resample_volume", "resample onto the working grid"),
    ("ofg_jax.registration.affine", "register_affine", "affine"),
    ("ofg_jax.registration.arrays", "optimize_arrays", "deformable optimisation"),
    ("ofg_jax.registration.transforms", "field_transform", "transform, warp, Jacobian, Dice"),
    ("ofg_jax.registration.transforms", "apply_transform", "transform, warp, Jacobian, Dice"),
    ("ofg_jax.registration.transforms", "jacobian_on_grid", "transform, warp, Jacobian, Dice"),
    ("ofg_jax.registration.arrays", "dice_scores", "transform, warp, Jacobian, Dice"),
    ("ofg_jax.nifti", "write_like", "write the outputs"),
    ("ofg_jax.registration.geometry", "write_itk_displacement", "write the outputs"),
    ("ofg_jax.registration.geometry", "write_itk_affine", "write the outputs"),
)
SHIFT_MM = (3.0, -2.0, 4.0)


def write_pair(data: str, folder: str) -> dict[str, str]:
    """The moving and fixed scans and segmentations of the docstring, as NIfTI."""
    import nibabel as nib
    import numpy as np

    from ofg_jax.registration import geometry
    os.makedirs(folder, exist_ok=True)
    arrays = np.load(data)
    image = np.asarray(arrays["vol"], np.float32)
    labels = np.rint(arrays["seg"]).astype(np.int16)
    half = tuple(n // 2 for n in image.shape)
    moving = geometry.centred_grid(image.shape, (1.0,) * 3, "LIA", (0, 0, 0)).affine
    fixed = geometry.centred_grid(half, (2.0,) * 3, "LIA", SHIFT_MM).affine
    blocks = image[:2 * half[0], :2 * half[1], :2 * half[2]].reshape(
        half[0], 2, half[1], 2, half[2], 2).mean((1, 3, 5))
    paths = {}
    for name, array, affine in (("moving", image, moving), ("moving_seg", labels, moving),
                                ("fixed", blocks, fixed),
                                ("fixed_seg", labels[::2, ::2, ::2], fixed)):
        paths[name] = os.path.join(folder, f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(array, affine), paths[name])
    return paths


def _seconds_since_start() -> float:
    """Seconds since this process started (from /proc, to 10 ms)."""
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - ticks / os.sysconf("SC_CLK_TCK")


def child(argv: Sequence[str], out: str) -> None:
    """Runs ``register.main(argv)`` with timers around its phases; writes JSON."""
    started, entered = _seconds_since_start(), time.time()
    for name in MODULES:
        importlib.import_module(name)
    imported = time.time()
    from ofg_jax.registration.compile_time import compile_clock
    seconds, compiling = collections.Counter(), collections.Counter()

    def timed(fn, phase):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with compile_clock() as clock:
                result = fn(*args, **kwargs)
            seconds[phase] += clock.wall_seconds
            compiling[phase] += clock.compile_seconds
            return result
        return wrapper

    for module, function, phase in PHASES:
        original = getattr(sys.modules[module], function)
        wrapper = timed(original, phase)
        for name, loaded in list(sys.modules.items()):
            if name.startswith("ofg_jax.") and vars(loaded).get(function) is original:
                setattr(loaded, function, wrapper)
    with compile_clock() as clock:
        status = sys.modules["ofg_jax.register"].main(["ofg-register", *argv])
    if status:
        raise SystemExit(f"register exited with {status}")
    record = {"Python start-up": [started, 0.0],
              "imports": [imported - entered, 0.0],
              **{phase: [seconds[phase], compiling[phase]] for phase in seconds},
              "rest of the command": [clock.wall_seconds - sum(seconds.values()),
                                      clock.compile_seconds - sum(compiling.values())],
              "main_end": time.time()}
    with open(out, "w") as f:
        json.dump(record, f)


def _run(command: Sequence[str], cwd: Optional[str] = None, **env) -> float:
    """Wall seconds of ``command`` in a fresh process (its output discarded)."""
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, env={**os.environ, **env}, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.child:
        child(rest, args.child)
        return {}
    paths = write_pair(args.data, args.dir)
    cache = os.path.join(args.dir, "cache")
    error = [_run([sys.executable, "-m", "ofg_jax.register", "--moving=missing.nii.gz",
                   "--fixed=x", "--out=o"]) for _ in range(args.repeats + 1)][1:]
    register = [f"--moving={paths['moving']}", f"--fixed={paths['fixed']}",
                f"--moving-seg={paths['moving_seg']}",
                f"--fixed-seg={paths['fixed_seg']}", "--affine",
                f"--out={os.path.join(args.dir, 'out')}"]
    record = os.path.join(args.dir, "phases.json")
    runs = []
    for _ in range(args.repeats + 1):
        wall = _run([sys.executable, "-m", "experiments.startup", "--data", args.data,
                     "--dir", args.dir, "--child", record, *register],
                    XDG_CACHE_HOME=cache)
        with open(record) as f:
            phases = json.load(f)
        phases["exit"] = [time.time() - phases.pop("main_end"), 0.0]
        runs.append((wall, phases))
    runs = runs[1:]
    median = lambda values: statistics.median(values)
    print(f"cpu: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}; "
          f"median of {args.repeats} runs, each in a fresh process")
    print(f"error (missing --moving file): {median(error):.2f} s "
          f"(min {min(error):.2f}, max {max(error):.2f})")
    walls = [wall for wall, _ in runs]
    print(f"warm run, whole process: {median(walls):.2f} s "
          f"(min {min(walls):.2f}, max {max(walls):.2f})")
    print("| phase | s | of it compiling or loading programs (s) |\n|---|---|---|")
    for phase in runs[0][1]:
        values = [phases[phase] for _, phases in runs]
        print(f"| {phase} | {median(v[0] for v in values):.2f} | "
              f"{median(v[1] for v in values):.2f} |")
    return {"error": error, "warm": runs}


if __name__ == "__main__":
    main()
