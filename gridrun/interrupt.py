"""Ctrl-C (SIGINT) and `kill` (SIGTERM) for the gridrun command line: the first stops the command cleanly (a
KeyboardInterrupt in the main thread), the ones after it are noted while it stops.

Light on purpose (no imports past the standard library): `python -m gridrun` installs it before its heavy imports, so
that no moment of a driver's life, its imports included, ends in a traceback or a death by the signal.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager

EXIT_INTERRUPTED = 130  # for SIGTERM too: the README promises one exit code for an interrupted grid

# Signals after the first, while the driver stops (Ray's shutdown, the resume message), are noted, not raised: an
# interrupted shutdown would leave Ray's processes running and print a traceback from its atexit callback. After this
# many more, the driver exits at once (Ray's processes, tied to it, go down with it).
FORCE_EXIT_AFTER = 5
_signals = {"received": 0, "held": 0}
# interrupt_after's blocks open (nested blocks count) and the signals that came inside them: one handler, _on_signal,
# checks this flag, so a block never swaps handlers (a signal between two swaps would leave one swapped).
_deferring = {"depth": 0}
_deferred: list[int] = []


def hold_signals() -> None:
    """Until stop_on_signals: note SIGINT and SIGTERM, raise nothing (while the command line imports its modules)."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _note_signal)


def _note_signal(signum, frame) -> None:
    _signals["held"] += 1


def stop_on_signals(reset: bool = True) -> None:
    """Ctrl-C (SIGINT) and `kill` (SIGTERM) stop the driver cleanly: the first raises KeyboardInterrupt (main thread),
    the next ones are noted while it stops. Installed whatever the process inherited: a background job starts with
    SIGINT ignored, and a driver that ignores Ctrl-C until a run is being recorded is one no one can stop."""
    if threading.current_thread() is not threading.main_thread():
        return
    if reset:
        _signals["received"] = 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    held, _signals["held"] = _signals["held"], 0
    if held:  # signals that came while hold_signals held them: the command stops now
        _count(signal.SIGINT, held)


def _on_signal(signum, frame) -> None:
    if _deferring["depth"]:
        _deferred.append(signum)
        return
    _count(signum, 1)


def _count(signum: int, signals: int) -> None:
    """`signals` more signals came: the first of the command's life raises KeyboardInterrupt, the later are noted."""
    first = _signals["received"] == 0
    _signals["received"] += signals
    if first:
        raise KeyboardInterrupt
    if _signals["received"] > FORCE_EXIT_AFTER:
        sys.stderr.write(f"\n{signal.Signals(signum).name} {_signals['received']} times: exiting now, without "
                         "waiting for Ray to shut down\n")
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)


def stopping() -> None:
    """The driver is stopping (a KeyboardInterrupt is on its way out): later signals are noted, not raised."""
    _signals["received"] = max(_signals["received"], 1)


@contextmanager
def interrupt_after():
    """Hold Ctrl-C / SIGTERM until the block ends, then raise KeyboardInterrupt (main thread only). The handlers are
    stop_on_signals' (installed here if they are not yet): the block only sets the flag they read."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if any(signal.getsignal(sig) is not _on_signal for sig in (signal.SIGINT, signal.SIGTERM)):
        stop_on_signals(reset=False)
    _deferring["depth"] += 1
    try:
        yield
    finally:
        _deferring["depth"] -= 1
    if _deferring["depth"] == 0 and _deferred:
        received = _deferred[:]
        del _deferred[:len(received)]
        _count(received[0], len(received))
