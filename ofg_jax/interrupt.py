"""Stopping a training run cleanly on Ctrl-C or SIGTERM.

The first SIGINT or SIGTERM only asks the loop to stop: it finishes the current
step, writes a checkpoint and raises :class:`Interrupted`, whose message says how
to resume. A second Ctrl-C aborts at once (``KeyboardInterrupt``).
"""

import signal
import sys
import threading
from typing import Optional

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Training stopped on a signal after writing a checkpoint."""


class StopRequest:
    """Catches SIGINT and SIGTERM while active (``with StopRequest() as stop:``).

    ``stop.signal`` is the name of the first signal received, or None. Outside
    the main thread (where Python cannot set signal handlers) it never fires.
    """

    def __init__(self):
        self.signal: Optional[str] = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        del frame
        if self.signal is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal}: stopping after this step and writing a checkpoint "
              "(Ctrl-C again aborts at once)", file=sys.stderr, flush=True)
