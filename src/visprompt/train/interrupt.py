"""Stopping a training run cleanly: SIGINT (Ctrl-C) or SIGTERM asks the run to stop after the
current optimizer step, which it does by saving a checkpoint and then ending as the signal would
have (the handler that was installed before runs: KeyboardInterrupt for Ctrl-C, the console
command's exit 143 for SIGTERM). A second signal acts at once. SIGKILL cannot be caught: the last
checkpoint stands."""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """A context manager that turns SIGINT/SIGTERM into a request, read at step boundaries."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread only
            for signum in SIGNALS:
                previous = signal.getsignal(signum)
                if previous not in (signal.SIG_IGN, None):  # an ignored signal stays ignored
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum
        self._restore()  # the next signal goes to the previous handler: it acts at once

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def stop(self) -> None:
        """End the run as the received signal would have."""
        signum, self.signum = self.signum, None
        self._restore()
        if signum is not None:
            signal.raise_signal(signum)
        raise KeyboardInterrupt  # the previous handler returned (or ignored it): stop all the same
