"""Experiment 6: ANTs SyN (antspyx) on the validation pairs, as the classical baseline.

    python -m experiments.syn_baseline                         # demo data
    python -m experiments.syn_baseline --type-of-transform SyNOnly --syn-metric CC
    python -m experiments.syn_baseline --config configs/ixi.py --set data.root=/data/IXI_data

Needs antspyx (``pip install antspyx``, or the ``syn`` extra:
``pip install -e ".[syn]"``). antspyx 0.6 pins ``numpy<2.4`` and ``scipy<1.16``; to
keep the main environment as it is, install it in a separate virtualenv.

Every validation pair (the dataset's ``val_pairs()``, the same as the networks'
evaluation) is registered with ``ants.registration(fixed, moving,
type_of_transform)`` on images built with ``ants.from_numpy`` (unit spacing,
identity direction). The forward transforms (affine + SyN warp for "SyN") are
composed into one displacement field (``ants.apply_transforms(compose=...)``),
which ITK defines at each fixed-image point ``x`` as the physical vector ``d(x)``
with the moving point at ``x + d(x)``: ofg_jax's convention, once ``d`` is
converted from physical to voxel units along the array axes
(:func:`physical_to_voxel_displacement`). Dice and folding are then computed by
``ofg_jax.training.scoring.pair_metrics``, exactly as for the networks: moving labels
warped with nearest neighbour, Dice over the dataset's labels of interest, % of
voxels with a non-positive Jacobian determinant. ``--seeds N`` repeats the
registration with ANTs random seeds 0..N-1 (the affine stage samples randomly).
Seconds per pair: wall time of ``ants.registration`` plus the composition.
"""

import os
import shutil
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from experiments import common

NAME = "syn_baseline"
INSTALL_HINT = ("antspyx is not installed: run `pip install antspyx` (or "
                "`pip install -e \".[syn]\"`), preferably in a separate virtualenv "
                "since antspyx pins numpy<2.4 and scipy<1.16")

# register(moving, fixed, seed) -> (field (*S, N) physical, spacing (N,), direction (N, N))
RegisterFn = Callable[[np.ndarray, np.ndarray, int],
                      tuple[np.ndarray, np.ndarray, np.ndarray]]


def physical_to_voxel_displacement(field: np.ndarray, spacing: Sequence[float],
                                   direction: np.ndarray) -> np.ndarray:
    """ITK displacement (physical vectors) -> ofg_jax displacement (voxels per axis).

    A voxel index ``i`` sits at the physical point ``origin + D diag(s) i``, so a
    physical displacement ``d`` moves the index by ``(D diag(s))^-1 d``.

    Args:
      field: ``(*S, N)`` physical displacement, component k along physical axis k.
      spacing: ``(N,)`` voxel spacing.
      direction: ``(N, N)`` direction cosines (columns: the index axes).

    Returns:
      ``(*S, N)`` float32 displacement in voxels, component k along array axis k.
    """
    field = np.asarray(field, np.float64)
    index_to_physical = np.asarray(direction, np.float64) @ np.diag(
        np.asarray(spacing, np.float64))
    return (field @ np.linalg.inv(index_to_physical).T).astype(np.float32)


def ants_register_fn(type_of_transform: str = "SyN", syn_metric: str = "mattes",
                     **kwargs) -> RegisterFn:
    """A :data:`RegisterFn` running ``ants.registration``.

    Raises:
      FileNotFoundError: antspyx is not installed (the message says how to).
    """
    try:
        import ants  # pylint: disable=g-import-not-at-top
    except ImportError:
        raise FileNotFoundError(INSTALL_HINT) from None

    def register(moving, fixed, seed):
        fixed_image = ants.from_numpy(np.asarray(fixed, np.float32))
        moving_image = ants.from_numpy(np.asarray(moving, np.float32))
        tmp = tempfile.mkdtemp(prefix="ofg_syn_")
        try:
            reg = ants.registration(fixed=fixed_image, moving=moving_image,
                                    type_of_transform=type_of_transform,
                                    syn_metric=syn_metric,
                                    outprefix=os.path.join(tmp, "reg_"),
                                    random_seed=int(seed), **kwargs)
            path = ants.apply_transforms(fixed=fixed_image, moving=moving_image,
                                         transformlist=reg["fwdtransforms"],
                                         compose=os.path.join(tmp, "composed_"))
            field = ants.image_read(path)
            return (field.numpy(), np.asarray(field.spacing),
                    np.asarray(field.direction))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    return register


def evaluate_registration(register: RegisterFn, pairs: Sequence[Any],
                          labels: Sequence[int], seed: int = 0,
                          dice_over: str = "labels"):
    """``(EvalResult, seconds per pair)`` of ``register`` on ``pairs``."""
    import jax
    import jax.numpy as jnp
    from ofg_jax.training import scoring
    labels = tuple(int(label) for label in labels)
    metrics_fn = jax.jit(lambda d, ms, fs: scoring.pair_metrics(d, ms, fs, labels))
    rows, seconds = [], []
    for pair in pairs:
        start = time.perf_counter()
        field, spacing, direction = register(np.asarray(pair.moving, np.float32),
                                             np.asarray(pair.fixed, np.float32), seed)
        seconds.append(time.perf_counter() - start)
        disp = physical_to_voxel_displacement(field, spacing, direction)
        if disp.shape != tuple(pair.moving.shape) + (pair.moving.ndim,):
            raise ValueError(f"registration of {pair.name} returned a field of shape "
                             f"{disp.shape} for images of shape {pair.moving.shape}")
        metrics = jax.device_get(metrics_fn(
            jnp.asarray(disp), jnp.asarray(pair.moving_seg, jnp.int32),
            jnp.asarray(pair.fixed_seg, jnp.int32)))
        rows.append(scoring.pair_row(pair.name, metrics, labels,
                                        dice_over=dice_over))
    return scoring.EvalResult.from_rows(rows), float(np.mean(seconds))


def main(argv: Optional[Sequence[str]] = None,
         register: Optional[RegisterFn] = None) -> dict:
    """Runs the experiment; ``register`` replaces ANTs (for tests)."""
    parser = common.make_parser(__doc__, default_seeds=1)
    parser.add_argument("--type-of-transform", default="SyN",
                        help="ants.registration type_of_transform (default SyN: "
                             "affine + SyN; SyNOnly: deformable only)")
    parser.add_argument("--syn-metric", default="mattes",
                        help="SyN similarity: mattes (default), CC, meansquares")
    args = common.parse_args(parser, argv)
    from ofg_jax import data as data_lib
    from ofg_jax.training import scoring
    if register is None:
        register = ants_register_fn(args.type_of_transform, args.syn_metric)
    base = common.base_config(args)
    data = data_lib.create(base.data, base.seed)
    pairs, labels = data.val_pairs(), tuple(int(l) for l in data.labels)
    identity = scoring.evaluate(scoring.make_identity_eval_fn(labels), None,
                                   pairs, labels, dice_over=data.dice_over)
    records = [{"label": "identity", "seed": 0, "dice": identity.dice,
                "non_pos_jacobian_pct": identity.non_pos_jacobian_pct,
                "seconds_per_pair": 0.0}]
    label = f"ANTs {args.type_of_transform} ({args.syn_metric})"
    for seed in range(args.seeds):
        common.log(f"[{label} seed {seed}] registering {len(pairs)} pairs")
        result, seconds = evaluate_registration(register, pairs, labels, seed,
                                                data.dice_over)
        csv_path = os.path.join(args.workdir, NAME, f"seed{seed}.csv")
        scoring.write_rows(csv_path, result)
        records.append({"label": label, "seed": seed, "dice": result.dice,
                        "non_pos_jacobian_pct": result.non_pos_jacobian_pct,
                        "seconds_per_pair": seconds, "eval_csv": csv_path})
    columns = [common.DICE, common.JACOBIAN, ("seconds_per_pair", "s / pair", 2)]
    table = common.standard_table(records, columns, first_header="method")
    threads = os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
                             f"ITK default, {os.cpu_count()} cores")
    notes = (f"{len(pairs)} validation pairs of {base.data.name}; ITK threads: "
             f"{threads}; paper (IXI): SyN 0.647 Dice.")
    common.write_results(NAME, args, records, table, [c[0] for c in columns], notes)
    return {"records": records, "table": table}


if __name__ == "__main__":
    common.run_main(main)
