"""Several processes on JAX's distributed runtime: starting it, and agreeing.

Every process of a job runs the same program; ``jax.distributed`` connects them
through a coordinator that process 0 serves. :func:`initialize` starts the
runtime with a bounded wait: a process that cannot reach the coordinator, or a
job in which fewer processes connect than ``num_processes`` says, ends with one
``error:`` line after ``timeout_s`` instead of hanging (JAX itself would abort
with a C++ stack trace).

The other functions are collectives: on several processes every process must
call them at the same point of the program, or they wait for one another. On
one process they cost nothing and only return their input. They make the
decisions that all processes must take alike (stop here? is the workdir free?
which evaluation counts?) from one value that every process sees.
"""

import hashlib
import os
import sys
import threading
from typing import Any, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

# JAX's own deadline, past ours: its expiry aborts the process without a message.
_JAX_DEADLINE_MARGIN_S = 60
_EXIT_FAILURE = 1  # ``ofg_jax.cli.EXIT_FAILURE``: the distributed runtime did not start.
_TEXT_BYTES = 2048  # Room for a message shared by :func:`text_from_first_process`.


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, timeout_s: float) -> None:
    """Starts ``jax.distributed`` and checks that the job is the one described.

    With all three of ``coordinator_address``, ``num_processes`` and
    ``process_id`` None, JAX finds them in the cluster's environment (SLURM,
    Open MPI). Must be called before anything else uses JAX.

    If not every process has connected after ``timeout_s`` seconds (an
    unreachable or wrong coordinator address, a process that did not start, a
    ``num_processes`` larger than the job), this process prints one ``error:``
    line and exits with status 1 at once: nothing has been written by then.

    Args:
      coordinator_address: ``host:port`` of process 0, reachable from every host.
      num_processes: the number of processes of the job.
      process_id: this process's index, ``0 .. num_processes - 1``.
      timeout_s: the longest wait for the other processes, in seconds.

    Raises:
      ValueError: no cluster environment to find the processes in (with any of
        the three arguments None), or processes that connected but were started
        with another ``num_processes`` than the number that connected (raised
        on every process alike).
    """
    where = (f"coordinator {coordinator_address}" if coordinator_address
             else "the coordinator named by the cluster's environment")

    def give_up():
        print(f"error: process {process_id if process_id is not None else '?'} gave up "
              f"waiting for the job's processes after {timeout_s:g} s ({where}, "
              f"num_processes={num_processes}): check that every process was "
              "started, with the same --coordinator_address and --num_processes, "
              "and that process 0's host and port are reachable "
              "(--distributed_timeout sets the wait)", file=sys.stderr, flush=True)
        os._exit(_EXIT_FAILURE)  # The connecting thread cannot be interrupted.

    watchdog = threading.Timer(timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address, num_processes, process_id,
            initialization_timeout=int(timeout_s) + _JAX_DEADLINE_MARGIN_S)
    except ValueError as e:
        if None not in (coordinator_address, num_processes, process_id):
            raise
        raise ValueError(
            "found no cluster (SLURM, Open MPI) in the environment to learn the "
            "coordinator address, the number of processes and this process's id "
            f"from ({e}): give all three") from None
    finally:
        watchdog.cancel()
    _check_num_processes(num_processes)


def _check_num_processes(num_processes: Optional[int]) -> None:
    """Raises on every process if any process expected another number of processes."""
    count = jax.process_count()
    expected = gather(np.int32(count if num_processes is None else num_processes))
    wrong = [i for i, n in enumerate(expected) if n != count]
    if wrong:
        raise ValueError(
            f"{count} processes connected, but process(es) {wrong} were started with "
            f"--num_processes={[int(expected[i]) for i in wrong]}: give every "
            "process the same --num_processes")


def gather(value: np.ndarray) -> np.ndarray:
    """Every process's ``value``, stacked in process order: ``(processes, *shape)``.

    A collective on several processes; ``value`` must have the same shape and
    dtype on every process.
    """
    value = np.asarray(value)
    if jax.process_count() == 1:
        return value[None]
    return np.asarray(multihost_utils.process_allgather(value, tiled=False))


def from_first_process(tree: Any) -> Any:
    """Process 0's ``tree`` (of arrays with the same shapes on every process), on
    every process: what each process then decides from it, it decides alike.

    A collective on several processes.
    """
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree))


def text_from_first_process(text: str) -> str:
    """Process 0's ``text`` (at most 2048 bytes of UTF-8), on every process.

    A collective on several processes.
    """
    if jax.process_count() == 1:
        return text
    data = text.encode()[:_TEXT_BYTES]
    padded = np.zeros(_TEXT_BYTES + 1, np.uint8)  # The last byte holds nothing.
    padded[:len(data)] = np.frombuffer(data, np.uint8)
    shared = from_first_process(padded)
    return bytes(shared[:int(np.argmin(shared))]).decode(errors="replace")


def check_same_on_every_process(text: str, what: str) -> None:
    """Raises ``ValueError`` on every process unless ``text`` is the same on all.

    A collective on several processes (it compares SHA-256 digests).
    """
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
    digests = gather(digest)
    differ = [i for i in range(len(digests)) if not np.array_equal(digests[i], digests[0])]
    if differ:
        raise ValueError(f"process(es) {differ} run another {what} than process 0: "
                         "start every process with the same command line")
