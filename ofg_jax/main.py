"""Command line entry point: parses flags and runs ``train.train_and_evaluate``.

    python -m ofg_jax.main --config=configs/ixi.py --config.data.root=/data/IXI_data
    python -m ofg_jax.main --config=configs/demo.py --workdir=/tmp/demo
    python -m ofg_jax.main                      # the synthetic demo

Any config field can be overridden with ``--config.<path>=<value>``. The outputs
go to ``--workdir`` (default ``./workdir/<config file name>``); re-running with
the same workdir resumes the run. Expected errors (bad flags, bad config values,
missing or malformed data, a diverging loss) print one message and exit with a
non-zero status; ``--traceback`` shows the full Python traceback instead.
"""

import logging
import os
import pathlib
import re
import sys
from typing import NoReturn, Optional, Sequence

from absl import app
from absl import flags
from absl import logging as absl_logging
import ml_collections
from ml_collections import config_flags

DEMO_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py"

_CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    "Training config file (a Python file with get_config()); default: the demo, "
    f"{DEMO_CONFIG}. Override fields with --config.<path>=<value>.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    "Directory for metrics, checkpoints and summary; default "
    "./workdir/<config file name>. An existing run there is resumed.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Multi-host training: call jax.distributed.initialize() first. Under SLURM or "
    "Open MPI the processes are found from the cluster's environment; elsewhere "
    "pass --coordinator_address, --num_processes and --process_id.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (with --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes (with --distributed).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, 0 .. num_processes - 1.")
_TRACEBACK = flags.DEFINE_bool(
    "traceback", False, "Show the full traceback of expected errors too.")

EXIT_USAGE = 2  # Bad command line or config.
EXIT_FAILURE = 1  # The run failed (data, divergence).


def _fail(message: str, status: int) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def _config_arg(argv: Sequence[str]) -> Optional[str]:
    """The value of ``--config`` in ``argv`` (``--config=X`` or ``--config X``)."""
    for i, arg in enumerate(argv):
        if arg.startswith(("--config=", "-config=")):
            return arg.split("=", 1)[1]
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    return None


def with_default_config(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--config=<demo>`` inserted when no config is given."""
    argv = list(argv)
    if _config_arg(argv) is None:
        argv.insert(1, f"--config={DEMO_CONFIG}")
    return argv


def _make_config_folder_importable(config_file: str) -> None:
    # Config files import their shared defaults as ``configs.default``: put the
    # folder holding the ``configs`` package on the path.
    folder = pathlib.Path(config_file.split(":", 1)[0]).resolve().parent
    if (folder / "__init__.py").exists() and str(folder.parent) not in sys.path:
        sys.path.insert(0, str(folder.parent))


def _unknown_key_message(argv: Sequence[str], error: Exception) -> str:
    # ml_collections names only the missing field ("'trian'"), sometimes with a
    # suggestion; point at the override flag that holds it.
    text = str(error).replace("\\n", " ").replace("\\'", "'")
    field = re.search(r"'(\w+)'", text)
    overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
    culprits = [o for o in overrides
                if field and field.group(1) in o.split(".")[1:]] or overrides
    hint = re.search(r'Did you mean "(\w+)"', text)
    return (f"unknown config key in {', '.join(culprits)}"
            + (f' (did you mean "{hint.group(1)}"?)' if hint else
               "; see the config file for the available keys"))


def parse_flags(argv: Sequence[str]) -> list[str]:
    """Parses ``argv`` into the flags; exits with a message on bad flags."""
    config_file = _config_arg(argv)
    if config_file is not None:
        path = config_file.split(":", 1)[0]
        if not os.path.isfile(path):
            _fail(f"config file {path!r} not found", EXIT_USAGE)
        _make_config_folder_importable(config_file)
    try:
        rest = flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # ml_collections: no such field.
        _fail(_unknown_key_message(argv, e), EXIT_USAGE)
    except flags.Error as e:
        _fail(str(e), EXIT_USAGE)
    if len(rest) > 1:
        _fail(f"unexpected arguments {rest[1:]}", EXIT_USAGE)
    config = _CONFIG.value
    if not isinstance(config, ml_collections.ConfigDict):
        try:
            config.lock()  # A config that failed to load raises its error here.
        except Exception as e:  # pylint: disable=broad-except
            _fail(f"cannot load config {config_file!r}: {e}", EXIT_USAGE)
    return rest


def _quiet_libraries(record: logging.LogRecord) -> bool:
    # Orbax and JAX log every save and backend probe at INFO: keep their
    # warnings and errors, and this package's INFO lines (evaluations, resume).
    package = os.path.dirname(os.path.abspath(__file__))
    return (record.levelno >= logging.WARNING
            or os.path.abspath(record.pathname).startswith(package))


def main(argv: Sequence[str]) -> None:
    del argv
    absl_logging.get_absl_handler().addFilter(_quiet_libraries)
    # Imported after flag parsing, so that flag errors are reported at once.
    import jax  # pylint: disable=g-import-not-at-top
    from ofg_jax import train  # pylint: disable=g-import-not-at-top

    if _DISTRIBUTED.value:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                                   _PROCESS_ID.value)

    config = _CONFIG.value
    config_file = _config_arg(sys.argv) or str(DEMO_CONFIG)
    workdir = _WORKDIR.value or os.path.join(
        "workdir", pathlib.Path(config_file.split(":", 1)[0]).stem)
    try:
        train.train_and_evaluate(config, workdir)
    except (ValueError, FileNotFoundError, NotADirectoryError,
            train.NonFiniteLossError) as e:
        if _TRACEBACK.value:
            raise
        _fail(str(e), EXIT_FAILURE)


def run() -> None:
    """Runs the command line program on ``sys.argv``."""
    sys.argv = with_default_config(sys.argv)
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
