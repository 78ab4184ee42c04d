"""A training workdir: checked before anything is written, described at the end.

A workdir holds one run: ``config.json`` (its config, with the history of the
changes accepted on resume), ``splits.json``, ``checkpoints/``, ``metrics.csv``,
``eval/``, ``tensorboard/``, ``summary.json`` and ``figures/``. A run started in a workdir
that already holds one resumes it, and only with the same config
(``ofg_jax.settings.config.check_resume``).

One run at a time: a run holds an exclusive lock on its workdir (:func:`exclusive`,
``fcntl.flock`` on ``.lock``) from before it writes anything until it ends; a
second run there is refused. The operating system releases the lock when the
process ends, however it ends, so a killed run never blocks the next one (its
``.lock`` stays, unlocked, until the next run).
"""

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import socket
from typing import Any, Iterator, Optional

import jax
import ml_collections
import tqdm

from ofg_jax.settings import config as config_lib
from ofg_jax import data as data_lib
from ofg_jax.training import distributed
from ofg_jax.registration import network as network_lib
from ofg_jax.training import parallel

CONFIG = "config.json"
# The provenance of a workdir of ofg-import: a network to register with or to
# train from (train.init_from), not a run to resume.
IMPORTED = "imported.json"
SUMMARY = "summary.json"
SPLITS = "splits.json"  # The files of the train, val and test splits.
LOCK = ".lock"  # "<host> <pid>" of the running run, which locks it; removed at its end.


class WorkdirInUseError(OSError):
    """Another run holds the workdir's lock; the message names its host and pid."""


def check_writable(workdir: str) -> None:
    """Raises unless ``workdir`` is, or can be created as, a writable directory.

    Raises:
      NotADirectoryError: ``workdir`` (or a parent) is a file.
      PermissionError: no write access (permissions, a read-only file system).
    """
    path = os.path.abspath(workdir)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"workdir {workdir}: {existing} is a file, not a "
                                 "directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"workdir {workdir}: {existing} is not writable "
                              "(permissions or a read-only file system)")


@contextlib.contextmanager
def exclusive(workdir: str) -> Iterator[None]:
    """Holds the lock of ``workdir`` while active: one run per workdir.

    Creates ``workdir`` if needed; if the run then ends before it wrote
    anything (a refused config, bad data), the new workdir is removed again.
    In a job of several processes, process 0 holds the lock for the job and
    every process learns whether it got it (a collective).

    Raises:
      WorkdirInUseError: another run holds the lock; the message names the
        holder's host and pid.
      NotADirectoryError, PermissionError: see :func:`check_writable`.
      OSError: on the other processes of a job, process 0's error.
    """
    check_writable(workdir)
    with contextlib.ExitStack() as held:
        error = None
        if jax.process_index() == 0:
            try:
                held.enter_context(_flock(workdir))
            except OSError as e:
                error = e
        refusal = distributed.text_from_first_process(str(error) if error else "")
        if error is not None:
            raise error
        if refusal:
            raise OSError(f"process 0: {refusal}")
        yield


@contextlib.contextmanager
def _flock(workdir: str) -> Iterator[None]:
    created = not os.path.exists(workdir)
    path = os.path.join(workdir, LOCK)
    fd = _locked_file(workdir, path)
    try:
        if fd is not None:  # A killed run's file may still hold its host and pid.
            os.ftruncate(fd, 0)
            os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        yield
    finally:
        # Removed while still locked; a run that opened it meanwhile sees that
        # and locks a new file (_locked_file).
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        if created and not os.listdir(workdir):
            os.rmdir(workdir)  # Nothing was written: leave no workdir behind.
        if fd is not None:
            os.close(fd)  # Releases the lock.


def _locked_file(workdir: str, path: str) -> Optional[int]:
    """A descriptor of ``path``, locked; None where the file system cannot lock."""
    while True:
        os.makedirs(workdir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkdirInUseError(
                f"workdir {workdir} is in use by another run ({_holder(path)}); wait "
                "for it to end, or use another --workdir") from None
        except OSError as e:  # A file system without locks (some network ones).
            os.close(fd)
            logging.warning("cannot lock %s (%s): nothing keeps a second run out of "
                            "this workdir", path, e)
            return None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # Its holder removed the file meanwhile: lock the new one.


def _holder(path: str) -> str:
    """``host <name>, pid <pid>`` of the run that holds the lock ``path``."""
    try:
        with open(path) as f:
            host, pid = f.read().split()
    except (OSError, ValueError):
        return "its host and pid are not written yet"
    return f"host {host}, pid {pid}"


def recorded_config(workdir: str) -> Optional[dict[str, Any]]:
    """The record of the run in ``workdir`` (``config.json``), or None for a new one.

    Raises:
      ValueError: checkpoints without a ``config.json`` (not a workdir of this
        program, or a damaged one), or an unreadable ``config.json``.
    """
    path = os.path.join(workdir, CONFIG)
    if os.path.isfile(path):
        return config_lib.read_record(path)
    if os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(
            os.path.join(workdir, "checkpoints")):
        raise ValueError(f"{workdir} holds checkpoints but no {CONFIG}: it cannot "
                         "be resumed; use another --workdir")
    return None


def describe(workdir: str, checkpoint_steps: list[int]) -> str:
    """One line saying where the run's outputs are."""
    names = [name for name in (SUMMARY, "metrics.csv", "eval/", "tensorboard/",
                               "figures/", CONFIG, SPLITS)
             if os.path.exists(os.path.join(workdir, name.rstrip("/")))]
    steps = ", ".join(str(s) for s in checkpoint_steps)
    return (f"outputs in {os.path.abspath(workdir)}: {', '.join(names)}, "
            f"checkpoints/ (steps {steps})")


@dataclasses.dataclass(frozen=True)
class CheckedRun:
    """A run's inputs, every one checked, before anything is written."""
    resolved: config_lib.Resolved  # The config, complete, valid and resolved.
    workdir: str
    data: data_lib.RegistrationData
    model: Any
    labels: tuple[int, ...]
    steps_per_epoch: int
    total_steps: int
    record: dict[str, Any]  # What config.json holds for this config.
    recorded: Optional[dict[str, Any]]  # What config.json held, if resuming.
    changed: dict[str, tuple[Any, Any]]  # Accepted changes from ``recorded``.
    # A new run's initial network variables (train.init_from), else None.
    initial_variables: Optional[Any] = None

    @property
    def config(self) -> ml_collections.ConfigDict:
        """The complete config (``resolved.config``)."""
        return self.resolved.config


def check_run(config: ml_collections.ConfigDict, workdir: str,
                  allow_config_change: bool) -> CheckedRun:
    """Checks the config, every training and validation file, the network's grid
    and, when ``workdir`` holds a run, that ``config`` is its config
    (``ofg_jax.settings.config.check_resume``); writes nothing. (:func:`exclusive`
    checks that the workdir can be written.)

    Raises:
      ConfigError: an invalid setting or a refused change of a resumed run.
      ValueError, OSError: bad data or workdir, named.
    """
    resolved = config_lib.resolve(config)
    config = resolved.config
    if os.path.isfile(os.path.join(workdir, IMPORTED)):
        raise ValueError(
            f"{workdir} holds imported weights (ofg-import), not a training run; train "
            f"from them in another workdir with --config.train.init_from={workdir}")
    recorded = recorded_config(workdir)
    data = data_lib.create(config.data, config.seed)
    record = config_lib.record(config, data.full_size)
    changed = {}
    if recorded is not None:
        changed = config_lib.check_resume(recorded, record, workdir, allow_config_change)
    model = resolved.build_model(data.img_size)
    batch_size = config.train.batch_size
    parallel.check_batch_size(batch_size, parallel.data_mesh())
    items_per_epoch = len(data.train_plan(0))
    steps_per_epoch = items_per_epoch // batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"dataset {data.name!r} has {items_per_epoch} training items per epoch, "
            f"fewer than train.batch_size={batch_size}")
    total_steps = steps_per_epoch * config.train.epochs
    if config.train.max_steps:
        total_steps = min(total_steps, config.train.max_steps)
    initial = None
    if recorded is None and config.train.init_from:
        initial = network_lib.initial_variables(config.train.init_from, model)
    with tqdm.tqdm(total=None, unit="file", desc="checking the data", leave=False,
                   disable=parallel.progress_disabled()) as bar:
        data.verify(progress=bar.update)
    return CheckedRun(resolved=resolved, workdir=workdir, data=data, model=model,
                    labels=tuple(int(label) for label in data.labels),
                    steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                    record=record, recorded=recorded, changed=changed,
                    initial_variables=initial)


def write_record(checked: CheckedRun, step: int) -> None:
    """Writes ``config.json``: the run's config and the history of accepted changes."""
    history = list((checked.recorded or {}).get(config_lib.HISTORY, []))
    if checked.changed:
        history.append({"step": step, "changed": {
            key: {"from": old, "to": new} for key, (old, new) in checked.changed.items()}})
    record = {**checked.record, config_lib.HISTORY: history} if history else checked.record
    with open(os.path.join(checked.workdir, CONFIG), "w") as f:
        json.dump(record, f, indent=2)
