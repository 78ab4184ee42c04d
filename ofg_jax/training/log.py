"""``metrics.csv`` and TensorBoard scalars of a training run (writing only).

Training metrics arrive as device arrays, one dict per step, and are fetched to
the host only every ``train.log_every`` steps (:meth:`MetricsLog.fetch`), so the
train steps run ahead of the logging; the loop checks what was fetched and
then writes it as one row (:meth:`MetricsLog.write_train`).
"""

import csv
import os
import time
from typing import Any, Optional

import jax
import numpy as np

from ofg_jax.training.scoring import EvalResult

COLUMNS = ("step", "epoch", "split", "loss", "dice", "non_pos_jacobian_pct", "sdlogj",
           "lr", "ofg_lr", "steps_per_s")

# (step, metrics of that step as Python floats)
Fetched = list[tuple[int, dict[str, float]]]


class MetricsLog:
    """Rows of ``metrics.csv`` and TensorBoard scalars, for training and validation.

    On resume from ``resume_step``, rows and events that the interrupted run
    wrote after that step are dropped, so the files read like one uninterrupted
    run; with ``reevaluate`` the validation row of ``resume_step`` goes too (it
    is evaluated again). With ``write=False`` (the other processes of a
    multi-host run) nothing is written.
    """

    def __init__(self, workdir: str, steps_per_epoch: int,
                 resume_step: Optional[int], write: bool = True,
                 reevaluate: bool = False):
        self.path = os.path.join(workdir, "metrics.csv")
        self._steps_per_epoch = steps_per_epoch
        self._pending = []  # (step, device metrics), not fetched yet.
        self._rate = ""  # Steps per second of the last fetched interval.
        self.restart_clock()
        self._tb = None
        if not write:
            return
        kept = []
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path, newline="") as f:
                kept = [row for row in csv.DictReader(f)
                        if int(row["step"]) < resume_step or (
                            int(row["step"]) == resume_step
                            and not (reevaluate and row["split"] == "val"))]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(kept)
        # Imported here: tensorboardX imports PyTorch when it is installed, which
        # takes seconds that runs failing early should not pay.
        import tensorboardX  # pylint: disable=g-import-not-at-top
        purge = None if resume_step is None else resume_step + 1
        self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"),
                                              purge_step=purge)

    def restart_clock(self, skip_pending: bool = False) -> None:
        """Starts timing the step rate now (after compilation, evaluation, saving).

        With ``skip_pending`` the steps added so far are not counted in the rate.
        """
        self._clock = time.perf_counter()
        self._untimed = len(self._pending) if skip_pending else 0

    def add_train_step(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self._pending.append((step, metrics))

    def fetch(self) -> Fetched:
        """The pending training steps' metrics on the host, oldest first; clears them."""
        if not self._pending:
            return []
        timed = len(self._pending) - self._untimed
        steps = [step for step, _ in self._pending]
        fetched = jax.device_get([metrics for _, metrics in self._pending])
        elapsed = time.perf_counter() - self._clock
        self._pending = []
        self._rate = timed / elapsed if timed > 0 else ""
        return [(step, {key: float(value) for key, value in metrics.items()})
                for step, metrics in zip(steps, fetched)]

    def write_train(self, fetched: Fetched) -> float:
        """Writes fetched steps as one row (mean loss); returns that mean loss."""
        loss = float(np.mean([metrics["loss"] for _, metrics in fetched]))
        step, last = fetched[-1]
        self._write({"step": step, "split": "train", "loss": loss,
                     "lr": _round(last["lr"]), "ofg_lr": _round(last["ofg_lr"]),
                     "steps_per_s": self._rate})
        self.restart_clock()
        return loss

    def write_eval(self, step: int, result: EvalResult) -> None:
        self._write({"step": step, "split": "val", "dice": result.dice,
                     "non_pos_jacobian_pct": result.non_pos_jacobian_pct,
                     "sdlogj": result.sdlogj})

    def _write(self, row: dict[str, Any]) -> None:
        if self._tb is None:
            return
        row = {"epoch": round(row["step"] / self._steps_per_epoch, 4), **row}
        row = {key: row.get(key, "") for key in COLUMNS}
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS).writerow(row)
        for key in COLUMNS[3:]:
            if row[key] != "":
                self._tb.add_scalar(f"{row['split']}/{key}", row[key], row["step"])
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class Throughput:
    """Training seconds and steps of this process, for ``summary.json``.

    Excludes the first step (compilation), evaluation and checkpointing.
    """

    def __init__(self):
        self.seconds, self.steps, self._clock = 0.0, 0, None

    def step(self, log: MetricsLog, metrics: Any) -> None:
        if self._clock is None:
            jax.block_until_ready(metrics)
            log.restart_clock(skip_pending=True)
            self._clock = time.perf_counter()
        else:
            self.steps += 1

    def pause(self) -> None:
        if self._clock is not None:
            self.seconds += time.perf_counter() - self._clock

    def resume(self) -> None:
        if self._clock is not None:
            self._clock = time.perf_counter()

    @property
    def steps_per_second(self) -> Optional[float]:
        return self.steps / self.seconds if self.steps else None


def _round(value) -> float:
    # float32 learning rates, written without float32 noise (1e-4, not 9.99e-05).
    return float(f"{float(value):.7g}")
