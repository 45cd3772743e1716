"""Signal handling of the long-running commands: Ctrl-C in training, SIGTERM in evaluation."""
import logging
import signal
import threading

__all__ = ["StopOnSigint", "TermAsInterrupt"]

log = logging.getLogger("drp_train")


class StopOnSigint:
    """While active (main thread only), the first Ctrl-C only sets ``requested``: the loop
    saves its state at the next step boundary and stops. A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt: saving a checkpoint after this step (Ctrl-C again to stop at once)")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


class TermAsInterrupt:
    """SIGTERM raises KeyboardInterrupt in the main thread while active (torchrun stops its workers
    with SIGTERM), so it too saves the partial results."""

    def __enter__(self):
        self.old = None
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGTERM"):
            self.old = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)
        return False
