"""Training checkpoints: the latest one and the best few by validation Dice.

Built on ``orbax.checkpoint.CheckpointManager``. Orbax writes each checkpoint into a
``<step>.orbax-checkpoint-tmp-*`` directory and renames it to ``<step>`` only once
every file is written, so a process killed mid-save leaves at worst an unfinished
temporary directory, which is ignored (and removed on the next start); the
previous checkpoint stays usable. Saves are synchronous: the training step
donates the state's buffers, so nothing may still be reading them afterwards.
"""

import logging
import os
from typing import Any, Optional

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

# Orbax warns at every save without metrics when a best-checkpoint metric is
# tracked; checkpoints between evaluations have none by design.
logging.getLogger("absl").addFilter(
    lambda record: "did not provide metrics" not in record.getMessage())


class Checkpoints:
    """Saves and restores ``(train state, JSON metadata)`` under one directory.

    Keeps the most recent checkpoint and the ``keep_best`` checkpoints with the
    highest validation Dice (those saved with a ``dice``).
    """

    def __init__(self, directory: str, keep_best: int):
        if keep_best < 0:
            raise ValueError(f"checkpoint.keep_best must be >= 0, got {keep_best}")
        policy = checkpoint_managers.AnyPreservationPolicy([
            checkpoint_managers.LatestN(n=1),
            checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics["dice"], n=keep_best,
                keep_checkpoints_without_metrics=False),
        ])
        # best_fn makes orbax write each checkpoint's Dice to disk, so that a
        # resumed run still ranks the checkpoints of the interrupted one.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, best_fn=lambda metrics: metrics["dice"],
            best_mode="max", enable_async_checkpointing=False,
            cleanup_tmp_directories=True, create=True)
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        """The step of the most recent complete checkpoint, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def best_step(self) -> Optional[int]:
        """The step of the kept checkpoint with the highest Dice, or None."""
        return self._manager.best_step()

    def save(self, step: int, state: Any, meta: dict[str, Any],
             dice: Optional[float] = None) -> None:
        """Writes ``state`` and ``meta`` (JSON-serialisable) as checkpoint ``step``.

        ``dice`` ranks the checkpoint among the best; without it the checkpoint is kept
        only while it is the latest.
        """
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    meta=ocp.args.JsonSave(meta)),
            metrics=None if dice is None else {"dice": float(dice)},
            force=True)

    def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        """Restores checkpoint ``step`` into the structure and shardings of ``target``.

        Raises:
          ValueError: the checkpoint does not fit ``target`` (another network or
            optimiser); the message names the checkpoint, not both trees.
        """
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                        meta=ocp.args.JsonRestore()))
        except Exception as e:  # pylint: disable=broad-except
            # Orbax reports a mismatch with a dump of both trees (megabytes).
            reason = " ".join(str(e).split())[:200]
            raise ValueError(f"checkpoint {step} in {self.directory} does not fit this "
                             f"config's network and optimiser ({type(e).__name__}: "
                             f"{reason}...)") from None
        return restored.state, restored.meta

    def close(self) -> None:
        self._manager.close()
