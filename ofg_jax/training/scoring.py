"""Scoring registered pairs: Dice of warped labels, folding and SDlogJ of the field.

Computed as the reference does: the moving label map is warped with nearest
neighbour interpolation and Dice is taken per label of interest; a pair's Dice is
their mean over the labels (or, for Abdomen CT, their sum over the labels
present in both scans divided by their number), then averaged over pairs;
folding is the percentage of voxels whose Jacobian determinant is <= 0; SDlogJ
is Learn2Reg's (``ofg_jax.metrics.sdlogj``). Training validation, the
evaluation command and the experiments all score through :func:`pair_metrics`,
:func:`pair_row` and :class:`EvalResult`.
"""

import csv
import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ofg_jax.training import distributed
from ofg_jax.registration.network import predict
from ofg_jax.metrics import dice_per_label
from ofg_jax.metrics import non_positive_jacobian_pct
from ofg_jax.metrics import sdlogj
from ofg_jax.warp import warp

# How a pair's Dice averages its labels: "labels" = the mean over all labels of
# interest (a label absent from both maps scores 0); "present" = the sum over
# the labels divided by the number of labels present in both scans.
DICE_OVER = ("labels", "present")

PairMetrics = dict[str, jax.Array]
PairMetricsFn = Callable[..., PairMetrics]


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Metrics of one evaluation over all pairs.

    Attributes:
      dice: mean over pairs of the pair's Dice.
      non_pos_jacobian_pct: mean over pairs of the % of voxels with det <= 0.
      sdlogj: mean over pairs of SDlogJ.
      rows: one dict per pair: ``name``, ``dice``, ``non_pos_jacobian_pct``,
        ``sdlogj``, any extra columns, and ``dice_<label>`` for every label.
    """
    dice: float
    non_pos_jacobian_pct: float
    sdlogj: float
    rows: list[dict[str, Any]]

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, Any]]) -> "EvalResult":
        """The means over pairs of per-pair rows (:func:`pair_row`)."""
        if not rows:
            raise ValueError("evaluation needs at least one pair, got none")
        mean = lambda key: float(np.mean([row[key] for row in rows]))
        return cls(dice=mean("dice"), non_pos_jacobian_pct=mean("non_pos_jacobian_pct"),
                   sdlogj=mean("sdlogj"), rows=list(rows))

    def summary(self, step: int) -> dict[str, Any]:
        """``{"dice", "non_pos_jacobian_pct", "sdlogj", "step"}``."""
        return {"dice": self.dice, "non_pos_jacobian_pct": self.non_pos_jacobian_pct,
                "sdlogj": self.sdlogj, "step": step}


def pair_dice(dice: np.ndarray, present: np.ndarray, dice_over: str = "labels"
              ) -> float:
    """A pair's Dice from its per-label Dice (see :data:`DICE_OVER`)."""
    if dice_over == "labels":
        return float(np.mean(dice))
    if dice_over == "present":
        return float(np.sum(dice) / max(int(np.sum(present)), 1))
    raise ValueError(f"dice_over must be one of {DICE_OVER}, got {dice_over!r}")


def pair_row(name: str, metrics: dict[str, Any], labels: Sequence[int], *,
             dice_over: str = "labels", **extra: Any) -> dict[str, Any]:
    """One pair's row from :func:`pair_metrics` (on the host): ``name``, ``dice``,
    ``non_pos_jacobian_pct``, ``sdlogj``, the ``extra`` columns, then
    ``dice_<label>`` for every label."""
    dice = np.asarray(metrics["dice"])
    row = {"name": str(name),
           "dice": pair_dice(dice, np.asarray(metrics["present"]), dice_over),
           "non_pos_jacobian_pct": float(metrics["non_pos_jacobian_pct"]),
           "sdlogj": float(metrics["sdlogj"]), **extra}
    row.update({f"dice_{label}": float(d) for label, d in zip(labels, dice)})
    return row


def pair_metrics(disp: jax.Array, moving_seg: jax.Array, fixed_seg: jax.Array,
                 labels: Sequence[int]) -> PairMetrics:
    """The scores of one registered pair.

    Args:
      disp: ``(*S, 3)`` displacement in voxels, moving -> fixed.
      moving_seg, fixed_seg: ``(*S)`` integer label maps.
      labels: the labels of interest.

    Returns:
      ``dice``: ``(len(labels),)`` Dice of the warped moving labels against the
      fixed labels; ``present``: ``(len(labels),)`` whether each label is in both
      the moving and the fixed map; ``non_pos_jacobian_pct``: % of voxels with a
      non-positive Jacobian determinant; ``sdlogj``: Learn2Reg's SDlogJ.
    """
    warped_seg = warp(moving_seg, disp, order=0)
    labels_array = jnp.asarray(labels)
    in_map = lambda seg: jax.vmap(lambda l: jnp.any(seg == l))(labels_array)
    return {"dice": dice_per_label(warped_seg, fixed_seg, labels),
            "present": in_map(moving_seg) & in_map(fixed_seg),
            "non_pos_jacobian_pct": non_positive_jacobian_pct(disp),
            "sdlogj": sdlogj(disp)}


def make_model_eval_fn(model, labels: Sequence[int], downsample: int = 1
                       ) -> PairMetricsFn:
    """Returns ``fn(variables, moving, fixed, moving_seg, fixed_seg) -> pair_metrics``.

    Images and label maps are unbatched ``(*S)``; the model runs with ``train=False``
    (at ``1 / downsample`` resolution, its displacement upsampled: see
    ``ofg_jax.registration.network.predict``). The function is jitted once for the
    dataset's shape.
    """
    labels = tuple(int(label) for label in labels)

    @jax.jit
    def eval_fn(variables, moving, fixed, moving_seg, fixed_seg):
        disp = predict(model, variables, moving, fixed, downsample)
        return pair_metrics(disp, moving_seg, fixed_seg, labels)

    return eval_fn


def make_identity_eval_fn(labels: Sequence[int]) -> PairMetricsFn:
    """Like ``make_model_eval_fn``, for the zero displacement (no registration)."""
    labels = tuple(int(label) for label in labels)

    @jax.jit
    def eval_fn(variables, moving, fixed, moving_seg, fixed_seg):
        del variables, fixed
        disp = jnp.zeros(moving.shape + (moving.ndim,), jnp.float32)
        return pair_metrics(disp, moving_seg, fixed_seg, labels)

    return eval_fn


def evaluate(eval_fn: PairMetricsFn, variables: Any, pairs: Sequence[Any],
             labels: Sequence[int], *, dice_over: str = "labels") -> EvalResult:
    """Runs ``eval_fn`` on every pair and averages.

    Args:
      eval_fn: from ``make_model_eval_fn`` or ``make_identity_eval_fn``.
      variables: the model variables passed to ``eval_fn``.
      pairs: objects with ``name``, ``moving``, ``fixed`` (float ``(*S)``),
        ``moving_seg`` and ``fixed_seg`` (integer ``(*S)``).
      labels: the labels ``eval_fn`` was built for, to name the per-label columns.
      dice_over: how a pair's Dice averages its labels (:data:`DICE_OVER`).

    On several processes this is a collective: every process evaluates every
    pair, and all return process 0's numbers.
    """
    if not pairs:
        raise ValueError("evaluation needs at least one validation pair, got none")
    metrics = [jax.device_get(eval_fn(variables, jnp.asarray(pair.moving, jnp.float32),
                                      jnp.asarray(pair.fixed, jnp.float32),
                                      jnp.asarray(pair.moving_seg, jnp.int32),
                                      jnp.asarray(pair.fixed_seg, jnp.int32)))
               for pair in pairs]
    # On several processes every one evaluates, and process 0's numbers count
    # everywhere: the checkpoint kept as the best must be the same on all.
    metrics = distributed.from_first_process(metrics)
    return EvalResult.from_rows([pair_row(pair.name, m, labels, dice_over=dice_over)
                                 for pair, m in zip(pairs, metrics)])


def write_rows(path: str, result: EvalResult) -> None:
    """Writes the per-pair rows of ``result`` to the CSV file ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(result.rows[0]))
        writer.writeheader()
        writer.writerows(result.rows)
