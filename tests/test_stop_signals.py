"""StopSignals in this process: what it records, and when a repeated signal gets its default action back."""

from __future__ import annotations

import os
import signal

from adacov.training.stop_signals import StopSignals


def _raise_signal(signum: int) -> None:
    os.kill(os.getpid(), signum)  # delivered to the main thread before os.kill returns


def test_first_signal_is_recorded_and_the_previous_handler_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals(repeat_kills=True) as signals:
        _raise_signal(signal.SIGTERM)
        assert signals.received == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is before  # a second SIGTERM would now act as before
    assert signal.getsignal(signal.SIGTERM) is before


def test_under_torchrun_repeats_are_ignored_until_the_loop_ends(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as signals:
        assert not signals.repeat_kills
        _raise_signal(signal.SIGTERM)
        _raise_signal(signal.SIGTERM)  # the agent's forwarded copy: would kill the process if not ignored
        _raise_signal(signal.SIGINT)
        assert signals.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGINT) is before


def test_outside_torchrun_a_repeat_kills(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert StopSignals().repeat_kills
