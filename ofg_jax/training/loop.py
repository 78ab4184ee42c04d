"""The training loop: OFG or unsupervised training of a registration network.

``train_and_evaluate(config, workdir)`` runs a whole experiment: it checks the
config, the workdir and every input file, evaluates the untrained network
(step 0), trains epoch by epoch with the jitted train step
(``ofg_jax.training.step``), evaluates after every ``train.eval_every_epochs``
epochs, and writes ``metrics.csv``, ``eval/step_XXXXXX.csv``, TensorBoard scalars,
orbax checkpoints and ``summary.json`` into ``workdir``. Re-running with the same
workdir resumes from the latest checkpoint and continues exactly the sequence of
an uninterrupted run; a finished run is left as it is.
"""

import dataclasses
import json
import math
import os
import sys
from typing import Any, Callable, Optional, Protocol

import jax
import ml_collections
import numpy as np
import tqdm

from ofg_jax.training import checkpoints as checkpoints_lib
from ofg_jax import data as data_lib
from ofg_jax.training import distributed
from ofg_jax.training import scoring
from ofg_jax.training import host_memory
from ofg_jax.registration import network as network_lib
from ofg_jax.training import parallel
from ofg_jax.registration import scans
from ofg_jax.training import workdir as workdir_lib
from ofg_jax.training.input_pipeline import Prefetcher
from ofg_jax.training.input_pipeline import epoch_batches
from ofg_jax.training.interrupt import Interrupted
from ofg_jax.training.interrupt import StopRequest
from ofg_jax.training.log import Fetched
from ofg_jax.training.log import MetricsLog
from ofg_jax.training.log import Throughput
from ofg_jax.training.step import TrainState
from ofg_jax.training.step import create_train_state
from ofg_jax.training.step import make_train_step


class NonFiniteLossError(RuntimeError):
    """The loss or the update became NaN or infinite; training was stopped."""


class PseudoLabels(Protocol):
    """Fixed training targets in place of OFG's refined predictions (self-training)."""

    def for_epoch(self, variables: Any, epoch: int
                  ) -> Callable[[data_lib.TrainItem], np.ndarray]:
        """``target(item) -> (*S, 3)`` of the epoch's items, given the network's
        variables at the start of the epoch."""


@dataclasses.dataclass(frozen=True)
class _Run:
    """What stays fixed during a run: its config, data, network and outputs."""
    config: ml_collections.ConfigDict
    workdir: str
    data: data_lib.RegistrationData
    labels: tuple[int, ...]
    model: Any
    img_size: tuple[int, ...]
    steps_per_epoch: int
    total_steps: int
    mesh: Any
    chief: bool  # On several hosts every process trains, the first one writes.
    train_step: Callable[[TrainState, Any], tuple[TrainState, Any]]
    eval_fn: scoring.PairMetricsFn
    val_pairs: data_lib.PairList
    checkpoints: checkpoints_lib.Checkpoints
    log: MetricsLog
    stop: StopRequest


def _say(message: str) -> None:
    """A line on stderr above the progress bar (never glued onto it); on several
    processes only the first one speaks."""
    if jax.process_index() == 0:
        tqdm.tqdm.write(message, file=sys.stderr)


def _stopping(run: _Run, step: Optional[int] = None) -> bool:
    """Whether a stop signal ends training after ``step`` (None: now).

    One process stops after any step. Several processes agree (a collective) at
    every ``train.log_every``-th step, where the metrics are fetched anyway, so
    that all stop and save at the same step.
    """
    every = 1 if jax.process_count() == 1 else run.config.train.log_every
    return (step is None or step % every == 0) and run.stop.agreed() is not None


def format_table(rows: dict[str, Optional[dict[str, Any]]]) -> str:
    """A small text table of Dice, folding and SDlogJ, one line per evaluation."""
    lines = [f"{'':10s} {'Dice':>8s} {'% det<=0':>9s} {'SDlogJ':>8s} {'step':>7s}"]
    for name, metrics in rows.items():
        if metrics:
            sdlogj = metrics.get("sdlogj")
            lines.append(f"{name:10s} {metrics['dice']:8.4f} "
                         f"{metrics['non_pos_jacobian_pct']:9.3f} "
                         f"{'-' if sdlogj is None else f'{sdlogj:.4f}':>8s} "
                         f"{metrics['step']:>7}")
    return "\n".join(lines)


def _evaluate(run: _Run, state: TrainState, step: int,
              meta: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """Validates ``state`` at ``step``; writes the rows; returns (Dice, new meta)."""
    result = scoring.evaluate(run.eval_fn, state.variables, run.val_pairs,
                                 run.labels, dice_over=run.data.dice_over)
    if run.chief:
        scoring.write_rows(
            os.path.join(run.workdir, "eval", f"step_{step:06d}.csv"), result)
    run.log.write_eval(step, result)
    _say(f"step {step}: validation Dice {result.dice:.4f}, "
         f"{result.non_pos_jacobian_pct:.3f}% voxels with det <= 0, "
         f"SDlogJ {result.sdlogj:.4f}")
    final = result.summary(step)
    best = meta["best"]
    if best is None or result.dice > best["dice"]:
        best = final
    return result.dice, {**meta, "final": final, "best": best}


def _save(run: _Run, state: TrainState, step: int, meta: dict[str, Any],
          dice: Optional[float] = None) -> dict[str, Any]:
    """Writes checkpoint ``step``; returns the meta saved with it."""
    epoch, position = divmod(step, run.steps_per_epoch)
    meta = {**meta, "step": step, "epoch": epoch, "position": position}
    run.checkpoints.save(step, state, meta, dice=dice)
    return meta


def _check_finite(fetched: Fetched) -> None:
    for step, metrics in fetched:
        values = [metrics[k] for k in ("loss", "grad_norm", "update_norm")]
        if not all(math.isfinite(v) for v in values):
            raise NonFiniteLossError(
                f"non-finite training loss or update at step {step} (loss="
                f"{values[0]}, gradient norm {values[1]}, update norm "
                f"{values[2]}, lr {metrics['lr']})")


def _flush(log: MetricsLog) -> Optional[float]:
    """Writes the pending training steps, checked; returns their mean loss."""
    fetched = log.fetch()
    if not fetched:
        return None
    _check_finite(fetched)
    return log.write_train(fetched)


def _train_epoch(run: _Run, state: TrainState, step: int, meta: dict[str, Any],
                 throughput: Throughput, progress: tqdm.tqdm,
                 targets: Optional[Callable[[data_lib.TrainItem], np.ndarray]]
                 ) -> tuple[TrainState, int, dict[str, Any]]:
    """Trains from ``step`` to the end of its epoch (or ``total_steps``)."""
    config = run.config
    epoch, position = divmod(step, run.steps_per_epoch)
    batch_size = config.train.batch_size
    prefetcher = Prefetcher(
        epoch_batches(run.data, epoch, position, run.steps_per_epoch, batch_size,
                      local=parallel.local_slice(batch_size), targets=targets),
        put=lambda batch: parallel.shard_batch(batch, run.mesh))
    try:
        for i, batch in enumerate(prefetcher):
            state, metrics = run.train_step(state, batch)
            if i == 0:  # after the compilation (first epoch) or the evaluation before
                host_memory.release_freed_memory()
            step += 1
            run.log.add_train_step(step, metrics)
            throughput.step(run.log, metrics)
            progress.update(1)
            if step % config.train.log_every == 0:
                loss = _flush(run.log)
                progress.set_postfix(loss=f"{loss:.4g}", epoch=epoch)
            every = config.checkpoint.every_steps
            if every and step % every == 0 and step % run.steps_per_epoch:
                _flush(run.log)  # Never save a state whose update was not finite.
                meta = _save(run, state, step, meta)
            if step >= run.total_steps or _stopping(run, step):
                break
    finally:
        prefetcher.close()
    _flush(run.log)
    return state, step, meta


def _figure_state(run: _Run, state: TrainState, meta: dict[str, Any]) -> tuple[Any, int]:
    """Variables (on the host) and step for the figures: the best checkpoint if
    kept, else ``state``. Every process must call it (a restore is collective)."""
    best = (meta.get("best") or {}).get("step")
    if best is not None and best != int(state.step) and best in run.checkpoints.all_steps():
        restored, _ = run.checkpoints.restore(best, state)
        return jax.device_get(restored.variables), best
    return jax.device_get(state.variables), int(state.step)


def _write_figures(run: _Run, state: TrainState, meta: dict[str, Any]) -> None:
    """Every process takes part; process 0 draws, on its own devices."""
    variables, step = _figure_state(run, state, meta)
    if not run.chief:
        return
    trained = network_lib.Trained(config=run.config, model=run.model, variables=variables,
                                step=step, selection="in memory",
                                img_size=run.img_size, workdir=run.workdir,
                                downsample=run.data.downsample)
    scans.write_run_figures(
        os.path.join(run.workdir, "figures"), trained, run.val_pairs[0], run.labels,
        run.log.path, title=os.path.basename(os.path.abspath(run.workdir)))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       pseudo_labels: Optional[PseudoLabels] = None,
                       allow_config_change: bool = False,
                       force_evaluate: bool = False) -> dict[str, Any]:
    """Trains and evaluates as configured; returns the content of ``summary.json``.

    Everything is checked before anything is written: the config, the workdir,
    every training and validation file, the network's grid, and, when the
    workdir holds a run, that this config is the run's (``config.json``). The
    run holds the workdir's lock (``workdir.exclusive``) from the start to the
    end. On several processes (``jax.distributed``), every process calls this
    with the same config: each trains on its share of every batch, process 0
    writes.

    Args:
      config: a training config (``configs/*.py``).
      workdir: the run's folder; an existing run there is resumed, a finished
        one is left as it is.
      pseudo_labels: fixed targets for the "ofg" mode instead of the refined
        predictions (self-training, ``experiments/self_training.py``).
      allow_config_change: resume although ``config.CHANGEABLE_KEYS`` changed;
        ``config.json`` then records the change in its history.
      force_evaluate: evaluate a finished run's final checkpoint again.

    Raises:
      ConfigError: invalid settings, or a resumed run whose config changed.
      WorkdirInUseError: another run holds the workdir (its host and pid named).
      ValueError, OSError: invalid data or workdir (the message names them), or
        processes with different configs.
      NonFiniteLossError: if the loss or an update becomes non-finite; the
        checkpoints written before stay as they are.
      Interrupted: SIGINT or SIGTERM; a checkpoint of the last step was written.
    """
    with workdir_lib.exclusive(workdir):
        checked = workdir_lib.check_run(config, workdir, allow_config_change)
        distributed.check_same_on_every_process(
            json.dumps(checked.record, sort_keys=True), "config")
        checkpoints = checkpoints_lib.Checkpoints(
            os.path.join(workdir, "checkpoints"), checked.config.checkpoint.keep_best)
        try:
            resume_step = checkpoints.latest_step()
            summary_path = os.path.join(workdir, workdir_lib.SUMMARY)
            if (resume_step is not None and resume_step >= checked.total_steps
                    and os.path.isfile(summary_path) and not force_evaluate):
                with open(summary_path) as f:
                    summary = json.load(f)
                _say(f"{workdir} holds a finished run (step {resume_step}); nothing to "
                     "do (--force_evaluate evaluates its final checkpoint again)")
                if jax.process_index() == 0:
                    print(format_table({key: summary.get(key) for key in
                                        ("identity", "initial", "final", "best")}))
                    print(workdir_lib.describe(workdir, checkpoints.all_steps()))
                return summary
            return _train(checked, checkpoints, resume_step, pseudo_labels,
                          force_evaluate)
        finally:
            checkpoints.close()


def _train(checked: workdir_lib.CheckedRun, checkpoints: checkpoints_lib.Checkpoints,
           resume_step: Optional[int], pseudo_labels: Optional[PseudoLabels],
           force_evaluate: bool) -> dict[str, Any]:
    """The run itself, once every input is checked (``train_and_evaluate``)."""
    config, workdir, data = checked.config, checked.workdir, checked.data
    img_size, steps_per_epoch = tuple(data.img_size), checked.steps_per_epoch
    mesh = parallel.data_mesh()
    chief = jax.process_index() == 0  # On several hosts the first one writes.
    os.makedirs(workdir, exist_ok=True)
    state = create_train_state(config, checked.model, img_size, steps_per_epoch)
    if checked.initial_variables is not None:  # train.init_from, a new run
        state = state.replace(params=checked.initial_variables["params"],
                              batch_stats=checked.initial_variables.get("batch_stats", {}))
    state = parallel.replicate(state, mesh)
    # Saved with every checkpoint; "initial", "best" and "final" are evaluations.
    meta = {"steps_per_epoch": steps_per_epoch, "step": 0, "epoch": 0,
            "position": 0, "identity": None, "initial": None, "best": None,
            "final": None}
    previous_rate = None
    if resume_step is not None:
        state, saved = checkpoints.restore(resume_step, state)
        if saved["steps_per_epoch"] != steps_per_epoch:
            raise ValueError(
                f"the checkpoint in {checkpoints.directory} was trained with "
                f"{saved['steps_per_epoch']} steps per epoch, this config gives "
                f"{steps_per_epoch}; use another --workdir")
        meta.update(saved)
        _say(f"resuming from step {resume_step} of {checkpoints.directory}")
        if force_evaluate and os.path.isfile(os.path.join(workdir, workdir_lib.SUMMARY)):
            with open(os.path.join(workdir, workdir_lib.SUMMARY)) as f:
                previous_rate = json.load(f).get("steps_per_second")
    if chief and (checked.recorded is None or checked.changed):
        # The run's record, and what ``ofg_jax.register`` rebuilds the network from.
        workdir_lib.write_record(checked, resume_step or 0)
    if chief:
        with open(os.path.join(workdir, workdir_lib.SPLITS), "w") as f:
            json.dump(data.split_files(), f, indent=2)
    with StopRequest() as stop:
        run = _Run(config=config, workdir=workdir, data=data, labels=checked.labels,
                   model=checked.model, img_size=img_size,
                   steps_per_epoch=steps_per_epoch, total_steps=checked.total_steps,
                   mesh=mesh, chief=chief,
                   train_step=make_train_step(checked.resolved, steps_per_epoch,
                                              img_size),
                   eval_fn=scoring.make_model_eval_fn(checked.model, checked.labels,
                                                         data.downsample),
                   val_pairs=data.val_pairs(), checkpoints=checkpoints,
                   log=MetricsLog(workdir, steps_per_epoch, resume_step, write=chief,
                                  reevaluate=force_evaluate),
                   stop=stop)
        try:
            state, step, meta, rate = _loop(run, state, meta, resume_step,
                                            pseudo_labels, force_evaluate)
        finally:
            run.log.close()
    summary = {
        "identity": meta["identity"], "initial": meta["initial"],
        "final": meta["final"], "best": meta["best"], "steps": step,
        "steps_per_second": rate if rate is not None else previous_rate,
    }
    if chief:
        with open(os.path.join(workdir, workdir_lib.SUMMARY), "w") as f:
            json.dump(summary, f, indent=2)
    if config.train.figures:
        _write_figures(run, state, meta)
    if chief:
        print(format_table({key: meta[key] for key in ("identity", "initial", "final",
                                                        "best")}))
        print(workdir_lib.describe(workdir, checkpoints.all_steps()))
    return summary


def _loop(run: _Run, state: TrainState, meta: dict[str, Any],
          resume_step: Optional[int], pseudo_labels: Optional[PseudoLabels],
          force_evaluate: bool) -> tuple[TrainState, int, dict[str, Any], Optional[float]]:
    """Evaluates, trains and checkpoints until ``total_steps``; returns the final
    state, step, meta and training steps per second (None without training)."""
    step = int(state.step)
    throughput = Throughput()
    progress = tqdm.tqdm(total=run.total_steps, initial=step, unit="step",
                         dynamic_ncols=True, disable=parallel.progress_disabled())
    try:
        if resume_step is None:
            identity = scoring.evaluate(scoring.make_identity_eval_fn(run.labels),
                                           None, run.val_pairs, run.labels,
                                           dice_over=run.data.dice_over)
            meta["identity"] = identity.summary(0)
            dice, meta = _evaluate(run, state, step, meta)
            meta["initial"] = meta["final"]
            meta = _save(run, state, step, meta, dice=dice)
        elif force_evaluate and step >= run.total_steps:
            dice, meta = _evaluate(run, state, step, meta)
        while step < run.total_steps:
            if _stopping(run):
                raise Interrupted(_interrupted_message(run, step))
            targets = (pseudo_labels.for_epoch(state.variables,
                                               step // run.steps_per_epoch)
                       if pseudo_labels else None)
            throughput.resume()
            run.log.restart_clock()
            state, step, meta = _train_epoch(run, state, step, meta, throughput,
                                             progress, targets)
            throughput.pause()
            epochs_done, mid_epoch = divmod(step, run.steps_per_epoch)
            eval_every = run.config.train.eval_every_epochs
            if step >= run.total_steps or (not mid_epoch and eval_every
                                           and epochs_done % eval_every == 0):
                dice, meta = _evaluate(run, state, step, meta)
                meta = _save(run, state, step, meta, dice=dice)
            else:
                meta = _save(run, state, step, meta)
    except NonFiniteLossError as e:
        last = run.checkpoints.latest_step()
        kept = ("no checkpoint had been written" if last is None else
                f"the last good checkpoint, step {last} in {run.checkpoints.directory}, "
                "is kept")
        raise NonFiniteLossError(
            f"{e}. Training stopped; {kept}. Lower train.learning_rate or check "
            "the data.") from None
    finally:
        progress.close()
    return state, step, meta, throughput.steps_per_second


def _interrupted_message(run: _Run, step: int) -> str:
    return (f"interrupted by {run.stop.signal} at step {step} of {run.total_steps}; "
            f"checkpoint {run.checkpoints.latest_step()} is in "
            f"{run.checkpoints.directory}: run the same command again to resume")
