"""Registering your own scans, with no network or with a trained one, from the command line.

    python -m ofg_jax.register --moving m.nii.gz --fixed f.nii.gz --out DIR [--affine]
    python -m ofg_jax.register --workdir W --moving m.nii.gz --fixed f.nii.gz --out DIR
    python -m ofg_jax.register [--workdir W] --pairs pairs.csv --out DIR

Scans of any shape, voxel size and orientation (anything nibabel reads). Without
``--workdir`` the field is found by optimisation alone (``ofg_jax.optimize``):
coarse to fine (``--levels``, ``--steps``) on the fixed image's grid (or a grid
of ``--voxel-size`` mm), minimising local NCC (or MSE) plus ``--reg-weight``
times Grad; ``--diffeomorphic`` optimises a velocity field instead (no
folding). With ``--workdir`` the network is rebuilt from ``W/config.json`` and
restored from its best checkpoint by validation Dice when it is still on disk,
else the latest (``--checkpoint=STEP`` picks one); moving and fixed are
resampled once onto the network's grid (the training data's voxel size and
orientation, centred over the fixed image or ``--fov-center``; inputs already
on the training grid are used as they are). Either way an optional affine
pre-alignment (``--affine``) comes first, the result comes back on the fixed
image's own grid, and the log says which path ran. Compiled programs are kept
in a persistent compilation cache (``$XDG_CACHE_HOME/ofg_jax``, by default
``~/.cache/ofg_jax``; ``--nocompilation-cache`` turns it off), so that a second
run on scans of the same shapes does not compile again.

Into ``DIR`` go, with the fixed image's affine and header: ``warped.nii.gz``
(the moving image sampled once through the whole transform, linear),
``warped_seg.nii.gz`` (the moving labels, nearest neighbour, with
``--moving-seg``), ``jacobian.nii.gz`` (the determinant of the deformable
part), ``transform.nii.gz`` (an ITK / ANTs displacement field: LPS mm, fixed
grid) and with ``--affine`` ``affine.mat`` (an ITK affine: ANTs applies
``-t transform.nii.gz -t affine.mat``); with ``--inverse`` ``inverse.nii.gz``
(fixed <- moving, on the moving grid). A field found on the fixed grid with the
moving image as it is (the same grid, no affine) also gets ``disp.nii.gz``
(``(*S, 3)`` in voxels, component ``k`` along array axis ``k``: the fixed voxel
``x`` takes the moving value at ``x + disp(x)``, the Learn2Reg convention).
Dice is the mean over the labels present in the fixed segmentation, 0
excluded. Other images of the moving subject: ``python -m ofg_jax.apply``.
From Python: ``ofg_jax.optimize_displacement`` (arrays),
``ofg_jax.registration.register_volumes`` (volumes of any geometry) and
``ofg_jax.registration.network.load_trained``.
"""

import contextlib
import csv
import math
import os
import sys
from typing import Any, Iterator, Optional, Sequence

from absl import flags

from ofg_jax import cli
from ofg_jax.settings import config as config_lib
from ofg_jax.registration import pairs as pairs_lib
from ofg_jax.options import OPTIMIZERS
from ofg_jax.options import SIMILARITIES
from ofg_jax.options import OptimizeSettings
from ofg_jax.options import check_options
from ofg_jax.registration.pairs import PairFiles

# JAX, and all that runs on it, is imported once every flag and file is checked
# (_run): a bad command line or input is reported before it, in well under a
# second.

SUMMARY_COLUMNS = ("name", "moving", "fixed", "dice", "non_pos_jacobian_pct",
                   "energy")
DEFAULTS = OptimizeSettings()
# Flags that only one of the two paths takes.
NETWORK_FLAGS = ("refine-steps", "checkpoint", "fov-center")
OPTIMIZATION_FLAGS = ("levels", "steps", "learning-rate", "reg-weight", "similarity",
                      "window", "optimizer", "diffeomorphic", "int-steps",
                      "velocity-factor", "voxel-size",
                      "fixed-mask", "moving-mask")
# Programs that compile faster than this are not written to the persistent cache
# (JAX's default is 1 s).
CACHE_MIN_COMPILE_SECONDS = 0.0


def _define_flags(fv: flags.FlagValues) -> None:
    define = dict(flag_values=fv)
    flags.DEFINE_string("workdir", None, "Training workdir (config.json, "
                        "checkpoints/); without it the field is found by "
                        "optimisation alone.", **define)
    flags.DEFINE_string("moving", None, "Moving image (NIfTI or anything nibabel "
                        "reads; any geometry).", **define)
    flags.DEFINE_string("fixed", None, "Fixed image (NIfTI); the outputs take its "
                        "affine and header.", **define)
    flags.DEFINE_string("moving-seg", None, "Moving label map: warped too.", **define)
    flags.DEFINE_string("fixed-mask", None, "No --workdir: cost-function mask of "
                        "the fixed image (NIfTI, any geometry; weights in [0, 1]): "
                        "the similarity counts only where it is > 0.", **define)
    flags.DEFINE_string("moving-mask", None, "No --workdir: cost-function mask of "
                        "the moving image (NIfTI, any geometry; weights in [0, 1]), "
                        "warped with the transform and multiplied into the fixed "
                        "mask.", **define)
    flags.DEFINE_string("fixed-seg", None, "Fixed label map: with --moving-seg, "
                        "Dice is printed.", **define)
    flags.DEFINE_string("pairs", None, "Batch mode: CSV file with columns moving,"
                        "fixed[,moving_seg,fixed_seg][,moving_mask,fixed_mask]"
                        "[,name] (paths relative to the "
                        "CSV's folder); one subfolder of --out per pair and "
                        "summary.csv.", **define)
    flags.DEFINE_string("out", None, "Output folder.", **define)
    flags.DEFINE_integer("refine-steps", 0, "Test-time OFG refinement steps with "
                         "the run's ofg.* settings (0 = none).", lower_bound=0,
                         **define)
    flags.DEFINE_integer("checkpoint", None, "Checkpoint step; default: the best "
                         "validation Dice if still on disk, else the latest.",
                         **define)
    flags.DEFINE_bool("figures", False, "Also write the PNG figures of each pair.",
                      **define)
    flags.DEFINE_bool("affine", False, "Align the moving image to the fixed one by a "
                      "12-parameter affine registration first (writes affine.mat).",
                      **define)
    flags.DEFINE_bool("inverse", False, "Also write inverse.nii.gz, the fixed <- "
                      "moving transform on the moving grid, and print its "
                      "inverse-consistency error.", **define)
    flags.DEFINE_string("fov-center", None, "X,Y,Z: centre (RAS mm, world "
                        "coordinates of the fixed image) of the network's field of "
                        "view; default: the fixed image's centre.", **define)
    # Optimisation alone (no --workdir).
    join = lambda values: ",".join(map(str, values))
    flags.DEFINE_list("levels", join(DEFAULTS.levels), "No --workdir: pyramid factors, "
                      "coarse to fine, each a multiple of the next.", **define)
    flags.DEFINE_list("steps", join(DEFAULTS.steps), "No --workdir: optimiser updates "
                      "at each level.", **define)
    flags.DEFINE_float("learning-rate", DEFAULTS.learning_rate, "No --workdir: "
                       "optimiser step, in voxels of each level.", **define)
    flags.DEFINE_float("reg-weight", DEFAULTS.reg_weight, "No --workdir: weight of "
                       "the Grad smoothness term.", **define)
    flags.DEFINE_enum("similarity", DEFAULTS.similarity, list(SIMILARITIES),
                      "No --workdir: ncc (local NCC, any contrast) or mse.", **define)
    flags.DEFINE_integer("window", DEFAULTS.window, "No --workdir: NCC window width, "
                         "voxels of each level (odd).", **define)
    flags.DEFINE_enum("optimizer", DEFAULTS.optimizer, list(OPTIMIZERS),
                      "No --workdir: the optimiser.", **define)
    flags.DEFINE_bool("diffeomorphic", DEFAULTS.diffeomorphic, "No --workdir: "
                      "optimise a stationary velocity field (scaling and squaring): "
                      "no folding.", **define)
    flags.DEFINE_integer("int-steps", DEFAULTS.int_steps, "No --workdir, "
                         "--diffeomorphic: squarings of the integration.", **define)
    flags.DEFINE_integer("integrate-every", DEFAULTS.integrate_every, "No --workdir, "
                         "--diffeomorphic: the velocity's exponential is taken anew "
                         "every this many steps (in between, to first order).",
                         **define)
    flags.DEFINE_list("velocity-factor", None, "No --workdir, --diffeomorphic: per "
                      "level, the velocity lives on a grid this many times coarser "
                      "than the level (1: the level's grid); default: 2 at every "
                      "level but the last, 1 at the last.", **define)
    flags.DEFINE_float("voxel-size", None, "No --workdir: optimise on a grid of this "
                       "voxel size (mm) along the fixed image's axes, for large "
                       "scans; default: the fixed grid.", **define)
    flags.DEFINE_bool("compilation-cache", True, "Keep compiled programs in "
                      "$XDG_CACHE_HOME/ofg_jax (~/.cache/ofg_jax) and reuse them.",
                      **define)
    cli.define_traceback_flag(fv)


def _pairs_from_flags(fv: flags.FlagValues) -> list[PairFiles]:
    single = [fv[name].value for name in ("moving", "fixed", "moving-seg",
                                          "fixed-seg", "moving-mask", "fixed-mask")]
    if fv.pairs:
        if any(single):
            raise cli.UsageError("give either --pairs or --moving/--fixed, not both")
        return pairs_lib.read_pairs_csv(fv.pairs)
    if not (fv.moving and fv.fixed):
        raise cli.UsageError("--moving and --fixed (or --pairs) are required")
    if fv["fixed-seg"].value and not fv["moving-seg"].value:
        raise cli.UsageError("--fixed-seg needs --moving-seg")
    return [PairFiles(pairs_lib.pair_name(fv.moving, fv.fixed), *single)]


def _fov_center(value: Optional[str]) -> Optional[tuple[float, float, float]]:
    """The parsed ``--fov-center=X,Y,Z`` (RAS mm), or None."""
    if value is None:
        return None
    try:
        center = tuple(float(v) for v in value.split(","))
    except ValueError:
        center = ()
    if len(center) != 3 or not all(map(math.isfinite, center)):
        raise cli.UsageError(f"--fov-center must be three numbers X,Y,Z (RAS mm), "
                             f"got {value!r}")
    return center


def _integers(fv: flags.FlagValues, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in fv[name].value)
    except ValueError:
        raise cli.UsageError(f"--{name} must be integers separated by commas, got "
                             f"{','.join(fv[name].value)!r}") from None


def _settings(fv: flags.FlagValues) -> OptimizeSettings:
    """The optimiser's settings from the flags, checked."""
    settings = OptimizeSettings(
        levels=_integers(fv, "levels"), steps=_integers(fv, "steps"),
        learning_rate=fv["learning-rate"].value, reg_weight=fv["reg-weight"].value,
        similarity=fv.similarity, window=fv.window, optimizer=fv.optimizer,
        diffeomorphic=fv.diffeomorphic, int_steps=fv["int-steps"].value,
        integrate_every=fv["integrate-every"].value,
        velocity_factor=(_integers(fv, "velocity-factor")
                         if fv["velocity-factor"].value else None))
    try:
        check_options(**settings.options())
    except ValueError as e:
        raise cli.UsageError(f"{e} (from --levels, --steps, ...)") from None
    voxel_size = fv["voxel-size"].value
    if voxel_size is not None and not (math.isfinite(voxel_size) and voxel_size > 0):
        raise cli.UsageError(f"--voxel-size must be a positive number of mm, got "
                             f"{voxel_size}")
    return settings


def _check_paths(fv: flags.FlagValues) -> None:
    """Refuses flags of the other path: the network's without --workdir, the
    optimiser's with it."""
    given = lambda names: [f"--{name}" for name in names if fv[name].present]
    if fv.workdir and given(OPTIMIZATION_FLAGS):
        raise cli.UsageError(f"{', '.join(given(OPTIMIZATION_FLAGS))}: only for the "
                             "optimisation without a network; leave out --workdir to "
                             "use it")
    if not fv.workdir and given(NETWORK_FLAGS):
        raise cli.UsageError(f"{', '.join(given(NETWORK_FLAGS))}: only with a "
                             "trained network (--workdir)")


def compilation_cache_dir() -> str:
    """``$XDG_CACHE_HOME/ofg_jax``, or ``~/.cache/ofg_jax``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                            ".cache")
    return os.path.join(base, "ofg_jax")


@contextlib.contextmanager
def persistent_compilation_cache(enabled: bool) -> Iterator[str]:
    """JAX's persistent compilation cache in :func:`compilation_cache_dir` (or
    ``JAX_COMPILATION_CACHE_DIR`` when set) while active, or none; yields the
    log line saying which. JAX's previous settings are restored on exit."""
    # pylint: disable=g-import-not-at-top
    import jax
    from jax.experimental.compilation_cache import compilation_cache
    names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
             "jax_persistent_cache_min_compile_time_secs")
    previous = {name: getattr(jax.config, name) for name in names}
    directory = previous["jax_compilation_cache_dir"] or compilation_cache_dir()
    if not enabled:
        settings, line = {"jax_enable_compilation_cache": False}, (
            "compilation cache: off (--nocompilation-cache): every program compiles")
    else:
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            enabled = False
            settings, line = {"jax_enable_compilation_cache": False}, (
                f"warning: compilation cache off: cannot create {directory}: {e}")
        else:
            settings = {"jax_enable_compilation_cache": True,
                        "jax_compilation_cache_dir": directory,
                        "jax_persistent_cache_min_compile_time_secs":
                            CACHE_MIN_COMPILE_SECONDS}
            line = f"compilation cache: {directory}"
    for name, value in settings.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    try:
        yield line
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def _check_out_dirs(out: str, names: Sequence[str]) -> None:
    """Raises ``NotADirectoryError`` when an output folder is an existing file."""
    for path in [out] + [os.path.join(out, name) for name in names]:
        if os.path.exists(path) and not os.path.isdir(path):
            raise NotADirectoryError(f"output folder {path} is a file")


def _format_metrics(result: dict[str, Any], refined: bool) -> str:
    lines = []
    if "dice" in result:
        lines.append(f"dice: {result['dice']:.6f} (mean over "
                     f"{len(result['labels'])} labels of the fixed segmentation)")
    lines.append(f"non_pos_jacobian_pct: {result['non_pos_jacobian_pct']:.6f}")
    if "initial_energy" in result:
        lines.append(f"energy: {result['initial_energy']:.6f} (identity) -> "
                     f"{result['energy']:.6f} (optimised)")
    elif refined:
        lines.append(f"energy: {result['network_energy']:.6f} (network) -> "
                     f"{result['energy']:.6f} (refined)")
    return "\n".join(lines)


def _run(fv: flags.FlagValues) -> None:
    if not fv.out:
        raise cli.UsageError("--out is required")
    _check_paths(fv)
    fov_center = _fov_center(fv["fov-center"].value)
    settings = None if fv.workdir else _settings(fv)
    pairs = _pairs_from_flags(fv)
    if fv.workdir and any(pair.moving_mask or pair.fixed_mask for pair in pairs):
        raise cli.UsageError(f"the moving_mask and fixed_mask columns of {fv.pairs}: "
                             "only for the optimisation without a network; leave out "
                             "--workdir to use them")
    if fv.workdir:
        config_lib.read_config(fv.workdir)
    batch = bool(fv.pairs)
    _check_out_dirs(fv.out, [pair.name for pair in pairs] if batch else [])
    for pair in pairs:
        for line in pairs_lib.check_headers(pair):
            print(line)
    # Everything is checked that can be without JAX. Import it, and the registration
    # that runs on it, now: a pair's time does not count the imports.
    from ofg_jax.registration import scans  # noqa: F401  # pylint: disable=g-import-not-at-top
    with persistent_compilation_cache(fv["compilation-cache"].value) as cache_line:
        print(cache_line)
        if fv.workdir:
            from ofg_jax.registration import network as network_lib  # pylint: disable=g-import-not-at-top
            method = network_lib.load_trained(fv.workdir, fv.checkpoint)
            print(f"path: trained network of {os.path.abspath(fv.workdir)}")
            print(f"checkpoint: step {method.step} of "
                  f"{os.path.abspath(os.path.join(fv.workdir, 'checkpoints'))} "
                  f"({method.selection})")
        else:
            method = settings
            print(f"path: optimisation alone, no network (no --workdir): "
                  f"{settings.describe()}")
        rows = [_register_pair(fv, method, pair, batch, fov_center) for pair in pairs]
    if batch:
        path = os.path.join(fv.out, "summary.csv")
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {len(rows)} pairs into {fv.out} and {path}")


def _register_pair(fv: flags.FlagValues, method, pair: PairFiles, batch: bool,
                   fov_center) -> dict[str, Any]:
    """Registers one pair, prints its metrics and log; returns its summary row."""
    from ofg_jax.registration.compile_time import compile_clock  # pylint: disable=g-import-not-at-top
    out_dir = os.path.join(fv.out, pair.name) if batch else fv.out
    with compile_clock() as clock:
        result = pairs_lib.register_files(
            method, pair, out_dir, refine_steps=fv["refine-steps"].value,
            with_figures=fv.figures, affine=fv.affine, inverse=fv.inverse,
            fov_center=fov_center, voxel_size=fv["voxel-size"].value)
    metrics = _format_metrics(result, refined=fv["refine-steps"].value > 0)
    metrics += "".join(f"\n{line}" for line in result["log"])
    metrics += (f"\ntime: {clock.wall_seconds:.2f} s for this pair, "
                f"{clock.compile_seconds:.2f} s of it compiling programs or loading "
                "them from the cache")
    print(f"{pair.name}:\n{metrics}" if batch else metrics)
    if not batch:
        print(f"wrote {', '.join(result['written'])}")
    return {"name": pair.name, "moving": pair.moving, "fixed": pair.fixed,
            "dice": result.get("dice", ""),
            "non_pos_jacobian_pct": result["non_pos_jacobian_pct"],
            "energy": result["energy"]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the command line ``argv`` (program name first; default ``sys.argv``);
    returns the exit status."""
    fv = flags.FlagValues()
    _define_flags(fv)
    return cli.run(_run, fv, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
