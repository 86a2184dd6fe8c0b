"""interrupt_after holds Ctrl-C / SIGTERM until its block ends, with one handler that reads a flag: no handler is ever
swapped, so no signal can land between two swaps and leave one behind."""

from __future__ import annotations

import os
import signal

import pytest

from gridrun import interrupt


@pytest.fixture
def restored_handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    interrupt._signals.update(received=0, held=0)
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    interrupt._signals.update(received=0, held=0)
    interrupt._deferring["depth"] = 0
    interrupt._deferred.clear()


def _handlers():
    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


def test_the_block_swaps_no_handler(restored_handlers):
    interrupt.stop_on_signals()
    before = _handlers()
    with interrupt.interrupt_after():
        inside = _handlers()
    assert before == inside == _handlers() == (interrupt._on_signal, interrupt._on_signal)


def test_signals_inside_the_block_are_raised_once_after_it(restored_handlers):
    interrupt.stop_on_signals()
    finished = []
    with pytest.raises(KeyboardInterrupt), interrupt.interrupt_after():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        finished.append(True)  # the block ran to its end despite both signals
    assert finished == [True]
    assert interrupt._signals["received"] == 2  # both counted: the next ones are noted, not raised
    assert _handlers() == (interrupt._on_signal, interrupt._on_signal)
    os.kill(os.getpid(), signal.SIGINT)  # a third while stopping: noted, not raised
    assert interrupt._signals["received"] == 3


def test_nested_blocks_raise_when_the_outer_one_ends(restored_handlers):
    interrupt.stop_on_signals()
    order = []
    with pytest.raises(KeyboardInterrupt), interrupt.interrupt_after():
        with interrupt.interrupt_after():
            os.kill(os.getpid(), signal.SIGINT)
        order.append("inner ended, nothing raised")
    assert order == ["inner ended, nothing raised"]


def test_installs_the_handlers_when_the_caller_had_not(restored_handlers):
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with pytest.raises(KeyboardInterrupt), interrupt.interrupt_after():
        os.kill(os.getpid(), signal.SIGTERM)  # with SIG_DFL still in place this would kill the test process
    assert _handlers() == (interrupt._on_signal, interrupt._on_signal)


def test_a_block_without_signals_raises_nothing(restored_handlers):
    interrupt.stop_on_signals()
    with interrupt.interrupt_after():
        pass
    assert interrupt._signals["received"] == 0


def test_two_signals_held_during_the_imports_still_stop_the_command(restored_handlers):
    interrupt.hold_signals()
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):  # the old count (held - 1, then one more) reached 2 and raised nothing
        interrupt.stop_on_signals()
    assert interrupt._signals["received"] == 2
