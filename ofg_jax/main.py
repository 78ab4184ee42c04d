"""Trains and evaluates a registration network: ``ofg-train`` (``python -m ofg_jax.main``).

    ofg-train --config=ixi --config.data.root=/data/IXI_data
    ofg-train --config=configs/demo.py --workdir=/tmp/demo
    ofg-train                                   # the synthetic demo

``--config`` names a shipped config or a config file; any field can be
overridden with ``--config.<path>=<value>``. The outputs go to ``--workdir``
(default ``./workdir/<config name>``); re-running with the same workdir resumes
the run (with the same config). Expected errors print one ``error:`` line and
exit with status 2 (command line, config), 1 (data, workdir, a workdir in use
by another run, disk, a diverging loss, processes of a ``--distributed`` job
that did not all connect) or 130 (Ctrl-C or SIGTERM, after writing a
checkpoint); ``--traceback`` shows the full Python traceback instead. The work
itself lives in ``ofg_jax.training.loop``; this module only reads the command line.

With ``--distributed`` the same command runs once per process, for example two
processes on one machine::

    for i in 0 1; do ofg-train --config=demo --workdir=/tmp/wd --distributed \\
        --coordinator_address=127.0.0.1:23456 --num_processes=2 --process_id=$i &
    done; wait
"""

import logging
import os
import pathlib
import sys
from typing import Sequence

from absl import app
from absl import flags
from absl import logging as absl_logging

from ofg_jax import cli
from ofg_jax.settings import config as config_lib

_CONFIG = flags.DEFINE_string(
    "config", None,
    "Training config: the path of a Python file with get_config(), or the name of "
    f"a shipped config ({', '.join(config_lib.shipped_configs())}); default: demo. "
    "Override fields with --config.<path>=<value>.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    "Directory for metrics, checkpoints and summary; default "
    "./workdir/<config file name>. An existing run there is resumed.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Train with several processes (one per host, or one per GPU), on JAX's "
    "distributed runtime: start the same command once per process. Under SLURM or "
    "Open MPI the processes are found from the job's environment; elsewhere pass "
    "--coordinator_address, --num_processes and --process_id to each. Process 0 "
    "writes the workdir, which every process must see (a shared file system).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0, reachable from every process (with --distributed); "
    "process 0 listens on that port.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes of the job (with --distributed).",
    lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None,
    "This process's index, 0 .. num_processes - 1 (with --distributed).",
    lower_bound=0)
_DISTRIBUTED_TIMEOUT = flags.DEFINE_float(
    "distributed_timeout", 300.0,
    "Seconds each process waits for all --num_processes processes to connect "
    "(with --distributed); past it, the process ends with one error line.",
    lower_bound=1.0)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume a run although train.epochs, data.root or data.num_val changed (the "
    "learning rates then follow the new number of epochs from the current one); "
    "config.json records the change. Other changes are always refused.")
_FORCE_EVALUATE = flags.DEFINE_bool(
    "force_evaluate", False,
    "Evaluate the final checkpoint of a finished run again (re-running a "
    "finished workdir otherwise changes nothing).")
_TRACEBACK = flags.DEFINE_bool(
    "traceback", False, "Show the full traceback of expected errors too.")

_loaded = {}  # The config of this command line, set by parse_flags.


def parse_flags(argv: Sequence[str]) -> list[str]:
    """Parses ``argv``: the flags, then the config with its overrides.

    Exits with one ``error:`` line and status 2 on a bad flag or config.
    """
    if any(arg in ("-h", "--help", "-help") for arg in argv[1:]):
        # absl lists the flags of the ``__main__`` module, which a console script
        # is not: list this module's.
        print("\n\n".join(__doc__.split("\n\n")[:2]) + "\n\n"
              + flags.FLAGS.module_help(sys.modules[__name__]))
        sys.exit(0)
    argv, overrides = config_lib.split_overrides(argv)
    try:
        rest = flags.FLAGS(argv)
        if len(rest) > 1:
            raise cli.UsageError(f"unexpected arguments {rest[1:]}")
        _check_distributed_flags()
        _loaded["config"] = config_lib.load(_CONFIG.value, overrides)
    except (flags.Error, cli.UsageError, config_lib.ConfigError) as e:
        cli.print_error(e)
        sys.exit(cli.EXIT_USAGE)
    return rest


def _check_distributed_flags() -> None:
    given = [f"--{flag.name}" for flag in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)
             if flag.value is not None]
    if given and not _DISTRIBUTED.value:
        raise cli.UsageError(f"{', '.join(given)} without --distributed")
    if (_NUM_PROCESSES.value is not None and _PROCESS_ID.value is not None
            and _PROCESS_ID.value >= _NUM_PROCESSES.value):
        raise cli.UsageError(f"--process_id={_PROCESS_ID.value} is not below "
                             f"--num_processes={_NUM_PROCESSES.value}")


def _quiet_libraries(record: logging.LogRecord) -> bool:
    # Orbax and JAX log every save and backend probe at INFO: keep their
    # warnings and errors, and this package's INFO lines (evaluations, resume).
    package = os.path.dirname(os.path.abspath(__file__))
    return (record.levelno >= logging.WARNING
            or os.path.abspath(record.pathname).startswith(package))


def main(argv: Sequence[str]) -> None:
    """Trains as the parsed flags say (``app.run`` calls it after :func:`parse_flags`)."""
    del argv
    absl_logging.get_absl_handler().addFilter(_quiet_libraries)
    # Imported after flag parsing, so that flag errors are reported at once.
    from ofg_jax.training import distributed  # pylint: disable=g-import-not-at-top
    from ofg_jax.training import loop  # pylint: disable=g-import-not-at-top

    config_file = _CONFIG.value or str(config_lib.DEMO_CONFIG)
    workdir = _WORKDIR.value or os.path.join(
        "workdir", pathlib.Path(config_file.split(":", 1)[0]).stem)
    try:
        if _DISTRIBUTED.value:
            distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                                   _PROCESS_ID.value, timeout_s=_DISTRIBUTED_TIMEOUT.value)
        loop.train_and_evaluate(_loaded["config"], workdir,
                                 allow_config_change=_ALLOW_CONFIG_CHANGE.value,
                                 force_evaluate=_FORCE_EVALUATE.value)
    except cli.EXPECTED_ERRORS + (loop.NonFiniteLossError,) as e:
        if _TRACEBACK.value:
            raise
        cli.print_error(e)
        sys.exit(cli.exit_status(e))
    except (loop.Interrupted, KeyboardInterrupt) as e:
        if _TRACEBACK.value:
            raise
        cli.print_error(e if str(e) else "aborted; the last checkpoint is kept")
        sys.exit(cli.EXIT_INTERRUPTED)


def run() -> None:
    """Runs the command line program on ``sys.argv``."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
