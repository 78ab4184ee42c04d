"""What every peer adapter shares: its command line, its outputs, its errors.

Standard library only: it runs in each tool's own virtualenv.
"""

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

FIELD_FILE = "field.nii.gz"
WARPED_FILE = "warped.nii.gz"  # the moving image as the tool resamples it
RESULT_FILE = "peer.json"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "XLA_FLAGS")


def parser(description: str) -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(description=description)
    result.add_argument("--fixed", required=True, help="fixed image (NIfTI)")
    result.add_argument("--moving", required=True, help="moving image (NIfTI)")
    result.add_argument("--out", required=True, help="output folder")
    result.add_argument("--threads", type=int, required=True,
                        help="threads the tool may use")
    return result


def parse(description: str, argv: Optional[Sequence[str]] = None,
          arguments: Optional[argparse.ArgumentParser] = None) -> argparse.Namespace:
    """The checked arguments (``arguments``: :func:`parser` with the tool's own)."""
    args = (arguments or parser(description)).parse_args(argv)
    for path in (args.fixed, args.moving):
        if not os.path.isfile(path):
            fail(f"{path} not found")
    if args.threads < 1:
        fail(f"--threads must be >= 1, not {args.threads}")
    os.makedirs(args.out, exist_ok=True)
    return args


def fail(message: str) -> None:
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    sys.exit(1)


def thread_settings() -> dict[str, Any]:
    """The thread settings this process runs under (for the record)."""
    settings = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    settings["cpus"] = len(os.sched_getaffinity(0))
    return settings


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    """``(call(), seconds)``."""
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def write_result(out: str, *, tool: str, version: str, seconds: float,
                 recipe: dict[str, Any], **extra: Any) -> None:
    """Writes ``peer.json`` (after ``field.nii.gz``, which must exist)."""
    if not os.path.isfile(os.path.join(out, FIELD_FILE)):
        fail(f"{tool} adapter wrote no {FIELD_FILE} in {out}")
    record = {"tool": tool, "version": version, "registration_seconds": seconds,
              "recipe": recipe, "threads": thread_settings(), **extra}
    with open(os.path.join(out, RESULT_FILE), "w") as f:
        json.dump(record, f, indent=1, default=str)


def run(main: Callable[[], None]) -> None:
    """Runs an adapter; a missing tool is one ``error:`` line."""
    try:
        main()
    except ImportError as e:
        fail(f"{e} (run the adapter with the python of the tool's virtualenv; see "
             "experiments/registration_peers.py)")
