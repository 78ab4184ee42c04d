"""What the command lines share: one-line errors, exit codes and ``--traceback``.

Expected failures print one line ``error: <message>`` on stderr and exit with
:data:`EXIT_USAGE` (a bad command line or config), :data:`EXIT_FAILURE` (bad
inputs, data, workdir, disk, a diverging run) or :data:`EXIT_INTERRUPTED`;
``--traceback`` shows the Python traceback instead. Anything else is a bug and
keeps its traceback.
"""

import sys
from typing import Any, Callable, Optional, Sequence, Union

from absl import flags

from ofg_jax.settings.config import ConfigError

EXIT_FAILURE = 1  # Bad inputs, data, workdir, checkpoint or disk; a diverging run.
EXIT_USAGE = 2  # Bad command line or config.
EXIT_INTERRUPTED = 130  # SIGINT or SIGTERM (128 + SIGINT, the shell's convention).

# The library's errors for bad inputs and for the file system (missing, not a
# directory, read-only, full), each with a message that names the input.
EXPECTED_ERRORS = (ValueError, OSError)


class UsageError(Exception):
    """A bad command line; the message says what is wrong."""


def print_error(error: Any) -> None:
    """Prints ``error: <message>`` on stderr, as one line."""
    print("error: " + " ".join(str(error).split()), file=sys.stderr)


def exit_status(error: BaseException) -> int:
    """:data:`EXIT_USAGE` for command-line and config errors, else :data:`EXIT_FAILURE`."""
    if isinstance(error, (UsageError, ConfigError, flags.Error)):
        return EXIT_USAGE
    return EXIT_FAILURE


def define_traceback_flag(fv: flags.FlagValues) -> None:
    """Defines ``--traceback`` (show the traceback of expected errors) in ``fv``."""
    flags.DEFINE_bool("traceback", False, "Show the traceback of expected errors.",
                      flag_values=fv)


def run(command: Callable[[flags.FlagValues], None], fv: flags.FlagValues,
        argv: Optional[Sequence[str]], doc: str,
        expected: tuple[type[BaseException], ...] = ()) -> int:
    """Parses ``argv`` (program name first; None: ``sys.argv``) into ``fv``, runs
    ``command(fv)``.

    ``--help`` prints the first two paragraphs of ``doc`` and the flags. ``fv``
    must have a ``traceback`` flag (:func:`define_traceback_flag`).

    Returns:
      The exit status: 0, or that of the expected error (one line on stderr).
    """
    argv = sys.argv if argv is None else argv
    if any(arg in ("-h", "--help", "-help") for arg in argv[1:]):
        print("\n\n".join(doc.split("\n\n")[:2]) + "\n\n" + fv.get_help())
        return 0
    try:
        rest = fv(list(argv))
        if len(rest) > 1:
            raise UsageError(f"unexpected arguments {rest[1:]}")
        command(fv)
    except (flags.Error, UsageError) as e:
        print_error(e)
        return EXIT_USAGE
    except EXPECTED_ERRORS + tuple(expected) as e:
        if fv.is_parsed() and fv.traceback:
            raise
        print_error(e)
        return exit_status(e)
    return 0


def define_checkpoint_flag(fv: flags.FlagValues) -> None:
    """Defines ``--checkpoint`` (best, latest or a step; see :func:`checkpoint_of`)."""
    flags.DEFINE_string("checkpoint", "best", "best (by validation Dice), latest, or "
                        "a step.", flag_values=fv)


def checkpoint_of(fv: flags.FlagValues) -> Union[int, str]:
    """``--checkpoint`` as ``inference.load_trained`` takes it: "best", "latest" or
    a step."""
    value = fv.checkpoint
    if value in ("best", "latest"):
        return value
    if not value.isdigit():
        raise UsageError(f"--checkpoint must be best, latest or a step, got {value!r}")
    return int(value)
