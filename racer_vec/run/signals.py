"""The stop signals (design §8, §10): Ctrl-C and a scheduler's SIGTERM stop a run, an evaluation or
a sweep cleanly. No JAX here."""

from __future__ import annotations

import contextlib
import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""Both stop a run or an evaluation cleanly: Ctrl-C, and a scheduler's preemption (design §10)."""


@contextlib.contextmanager
def stop_signals(handler, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
    """`handler` for `signals` (default: both stop signals) inside the block; after it, the handlers
    every stop signal had before it, whatever the block set meanwhile."""
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in signals:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, before in previous.items():
            signal.signal(s, before)


def ignore_stop_signals() -> None:
    """From here on (up to the end of the enclosing `stop_signals` block), Ctrl-C and SIGTERM are
    ignored: a second one must not cut short the clean-up the first asked for."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
