"""A DataLoader that hangs or loses a worker ends the run with a message, not a hang.

torch reports a dead worker late (or never, when the main thread is blocked reading a
batch a stopped worker half wrote); the watchdog here kills the workers of an overdue
batch, and ``loader_failure_message`` turns torch's error into one that says what to do.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any


def is_loader_failure(exc: BaseException) -> bool:
    """torch reports a dead or timed-out DataLoader worker as a plain RuntimeError (a worker's
    own exception is re-raised as itself, starting "Caught ...", and left alone)."""
    msg = str(exc)
    return type(exc) is RuntimeError and msg.startswith(
        ("DataLoader worker (pid", "DataLoader timed out")
    )


def kill_workers(batches: Any) -> None:
    """A hung worker ignores SIGTERM (see ``make_loader``), and Python's exit would join it
    forever: kill what is left of the loader's workers.

    torch's SIGCHLD handler would then raise "worker killed" into the main thread at some
    later moment (a traceback and exit 1 after our message), so the loader's workers are
    first taken off its watch list, as torch's own shutdown does.
    """
    from torch.utils.data._utils import signal_handling

    if getattr(batches, "_worker_pids_set", False):
        signal_handling._remove_worker_pids(id(batches))
        batches._worker_pids_set = False
    for w in getattr(batches, "_workers", ()):
        if w.is_alive():
            w.kill()


class LoaderWatchdog:
    """Kills the loader's workers when the trainer has waited for a batch far past the timeout.

    torch's own ``timeout`` cannot fire while the main thread is blocked reading a batch
    that a worker stopped half-way through writing (a SIGSTOP'd or wedged worker): the
    read never returns. Killing the workers ends that read, and the run stops with the
    timed-out message instead of hanging.
    """

    def __init__(self, batches: Any, timeout: float) -> None:
        # A weak reference: the iterator must be collected when training ends, which is
        # what shuts its workers down (they ignore SIGTERM, so nothing else would).
        self._batches = weakref.ref(batches)
        self.limit = 2 * timeout + 5
        self.waiting_since: float | None = None
        self.fired = False
        self._stop = threading.Event()
        if timeout > 0 and getattr(batches, "_workers", None):
            threading.Thread(target=self._watch, daemon=True, name="loader-watchdog").start()

    def next(self) -> Any:
        self.waiting_since = time.monotonic()
        try:
            return next(self._batches())
        except (OSError, EOFError) as exc:
            # A worker killed half-way through handing over a batch (by this watchdog or
            # by the OOM killer) breaks the shared-memory hand-over itself: report that as
            # the loader failure it is, not as a socket error. A worker's own OSError (a
            # missing chunk, say) comes here too, with every worker alive: left alone.
            why = self._describe(exc)
            if why is None:
                raise
            raise RuntimeError(why) from exc
        finally:
            self.waiting_since = None

    def _describe(self, exc: BaseException) -> str | None:
        err = f"{type(exc).__name__}: {exc}"
        if self.fired:
            return f"DataLoader timed out after {self.limit:g} s ({err})"
        batches = self._batches()
        dead = [w.pid for w in getattr(batches, "_workers", ()) if not w.is_alive()]
        if not dead:
            return None
        pids = ", ".join(map(str, dead))
        return f"DataLoader worker (pid(s) {pids}) exited unexpectedly ({err})"

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            since = self.waiting_since
            batches = self._batches()
            if batches is None:
                return
            if since is not None and time.monotonic() - since > self.limit:
                self.fired = True
                kill_workers(batches)
                return
            del batches


def loader_failure_message(exc: RuntimeError, step: int, timeout: float, timed_out: bool) -> str:
    """What went wrong with a dead or hung DataLoader worker, and what to do."""
    if timed_out or "timed out" in str(exc):
        what = (
            f"a DataLoader worker timed out: no batch for data.worker_timeout={timeout:g} s "
            "(hung, e.g. on the bank's storage); check the storage, or raise "
            "data.worker_timeout (0 waits forever)"
        )
    else:
        what = (
            "a DataLoader worker died (often the out-of-memory killer: lower "
            "data.num_workers or data.prefetch_factor; data.num_workers=0 shows a "
            "worker's own error in the main process)"
        )
    return (
        f"data loading failed at step {step}: {str(exc).splitlines()[0]}: {what}; "
        "resume with --resume"
    )
