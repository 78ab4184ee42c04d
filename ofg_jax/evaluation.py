"""Scoring registered pairs: Dice of warped labels and folding of the displacement.

Computed as the reference does: the moving label map is warped with nearest
neighbour interpolation, Dice is taken per label of interest and averaged over
labels, then over pairs; folding is the percentage of voxels whose Jacobian
determinant is <= 0. Training validation, the evaluation command and the
experiments all score through :func:`pair_metrics` and :class:`EvalResult`.
"""

import csv
import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ofg_jax.inference import predict
from ofg_jax.metrics import dice_per_label
from ofg_jax.metrics import non_positive_jacobian_pct
from ofg_jax.warp import warp

PairMetricsFn = Callable[..., tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Metrics of one evaluation over all validation pairs.

    Attributes:
      dice: mean over pairs of the mean Dice over labels.
      non_pos_jacobian_pct: mean over pairs of the % of voxels with det <= 0.
      rows: one dict per pair: ``name``, ``dice``, ``non_pos_jacobian_pct`` and
        ``dice_<label>`` for every label of interest.
    """
    dice: float
    non_pos_jacobian_pct: float
    rows: list[dict[str, Any]]

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, Any]]) -> "EvalResult":
        """The means over pairs of per-pair rows (:func:`pair_row`)."""
        if not rows:
            raise ValueError("evaluation needs at least one pair, got none")
        return cls(dice=float(np.mean([row["dice"] for row in rows])),
                   non_pos_jacobian_pct=float(
                       np.mean([row["non_pos_jacobian_pct"] for row in rows])),
                   rows=list(rows))


def pair_row(name: str, dice: np.ndarray, folding: float,
             labels: Sequence[int], **extra: Any) -> dict[str, Any]:
    """One pair's row: ``name``, mean ``dice``, ``non_pos_jacobian_pct``, any
    ``extra`` columns, then ``dice_<label>`` for every label."""
    row = {"name": str(name), "dice": float(np.mean(dice)),
           "non_pos_jacobian_pct": float(folding), **extra}
    row.update({f"dice_{label}": float(d) for label, d in zip(labels, dice)})
    return row


def pair_metrics(disp: jax.Array, moving_seg: jax.Array, fixed_seg: jax.Array,
                 labels: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """Dice per label and folding of one registered pair.

    Args:
      disp: ``(*S, 3)`` displacement in voxels, moving -> fixed.
      moving_seg, fixed_seg: ``(*S)`` integer label maps.
      labels: the labels of interest.

    Returns:
      ``(len(labels),)`` Dice of the warped moving labels against the fixed labels,
      and the scalar % of voxels with a non-positive Jacobian determinant.
    """
    warped_seg = warp(moving_seg, disp, order=0)
    return (dice_per_label(warped_seg, fixed_seg, labels),
            non_positive_jacobian_pct(disp))


def make_model_eval_fn(model, labels: Sequence[int]) -> PairMetricsFn:
    """Returns ``fn(params, moving, fixed, moving_seg, fixed_seg) -> pair_metrics``.

    Images and label maps are unbatched ``(*S)``; the model runs with ``train=False``.
    The function is jitted once for the dataset's shape.
    """
    labels = tuple(int(label) for label in labels)

    @jax.jit
    def eval_fn(params, moving, fixed, moving_seg, fixed_seg):
        disp = predict(model, params, moving, fixed)
        return pair_metrics(disp, moving_seg, fixed_seg, labels)

    return eval_fn


def make_identity_eval_fn(labels: Sequence[int]) -> PairMetricsFn:
    """Like ``make_model_eval_fn``, for the zero displacement (no registration)."""
    labels = tuple(int(label) for label in labels)

    @jax.jit
    def eval_fn(params, moving, fixed, moving_seg, fixed_seg):
        del params, fixed
        disp = jnp.zeros(moving.shape + (moving.ndim,), jnp.float32)
        return pair_metrics(disp, moving_seg, fixed_seg, labels)

    return eval_fn


def evaluate(eval_fn: PairMetricsFn, params: Any, pairs: Sequence[Any],
             labels: Sequence[int]) -> EvalResult:
    """Runs ``eval_fn`` on every validation pair and averages.

    Args:
      eval_fn: from ``make_model_eval_fn`` or ``make_identity_eval_fn``.
      params: the model variables passed to ``eval_fn``.
      pairs: objects with ``name``, ``moving``, ``fixed`` (float ``(*S)``), ``moving_seg``
        and ``fixed_seg`` (integer ``(*S)``).
      labels: the labels ``eval_fn`` was built for, to name the per-label columns.
    """
    if not pairs:
        raise ValueError("evaluation needs at least one validation pair, got none")
    rows = []
    for pair in pairs:
        dice, folding = jax.device_get(
            eval_fn(params, jnp.asarray(pair.moving, jnp.float32),
                    jnp.asarray(pair.fixed, jnp.float32),
                    jnp.asarray(pair.moving_seg, jnp.int32),
                    jnp.asarray(pair.fixed_seg, jnp.int32)))
        rows.append(pair_row(pair.name, dice, folding, labels))
    return EvalResult.from_rows(rows)


def write_rows(path: str, result: EvalResult) -> None:
    """Writes the per-pair rows of ``result`` to the CSV file ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(result.rows[0]))
        writer.writeheader()
        writer.writerows(result.rows)
