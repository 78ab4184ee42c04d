"""Stopping a training run cleanly on Ctrl-C or SIGTERM.

The first SIGINT or SIGTERM only asks the loop to stop: it finishes the current
step, writes a checkpoint and raises :class:`Interrupted`, whose message says how
to resume. A second Ctrl-C aborts at once (``KeyboardInterrupt``).

On several processes a signal may reach one process, or each at another step;
:meth:`StopRequest.agreed` lets them all stop at the same step.
"""

import signal
import sys
import threading
from typing import Optional

import numpy as np

from ofg_jax.training import distributed

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

    def agreed(self) -> Optional[str]:
        """The stop signal of any process (this one's first), or None; after it,
        ``signal`` names it on every process.

        A collective on several processes: each must call it at the same step.
        """
        mine = signal.Signals[self.signal].value if self.signal else 0
        received = [int(n) for n in distributed.gather(np.int32(mine)) if n]
        # From the gathered values only: a signal arriving meanwhile waits for
        # the next call, on every process alike.
        agreed = signal.Signals(received[0]).name if received else None
        if agreed and self.signal is None:
            self.signal = agreed
        return agreed

    def _handle(self, signum, frame) -> None:
        del frame
        if self.signal is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal}: stopping after this step and writing a checkpoint "
              "(Ctrl-C again aborts at once)", file=sys.stderr, flush=True)
