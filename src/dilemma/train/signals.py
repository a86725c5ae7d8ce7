"""Stop on SIGTERM / SIGINT at the next step boundary, so the loop can save a checkpoint first.

Pre-empting schedulers send SIGTERM; a user presses Ctrl-C (SIGINT). The first signal only sets
a flag that the training loop checks after every step; a second SIGINT interrupts at once.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from dilemma.errors import DilemmaError


class Interrupted(DilemmaError):
    """Training stopped by a signal after saving; the exit status is 128 + the signal number."""

    def __init__(self, message: str, signum: int, hint: str = ""):
        super().__init__(f"{message} {hint}".strip())
        self.message, self.signum, self.exit_code = message, signum, 128 + signum


class StopRequest:
    def __init__(self):
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


@contextmanager
def stop_on_signals():
    """Yields a ``StopRequest`` that turns true on SIGTERM / SIGINT (main thread only)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if request and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        request.signum = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
