"""SIGTERM and SIGINT: what a scheduler's preemption (or Ctrl-C) may cost a run — the current step, no more.

Before training starts (planning, probing, loading), a signal ends the command at once: `Interrupted`
propagates through the probe's `finally` blocks, which remove its temp dirs. During training, the first
signal asks the Trainer (through the `callback()` it is given) to save a complete checkpoint at the end of
the current optimizer step and stop; a second signal ends the command at once. Exit code 128 + the
signal's number (143 for SIGTERM, 130 for SIGINT), as a shell reports a process the signal killed.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

from autobatch.errors import Interrupted

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalStop:
    """The signal handler's state: `signum` of the first signal, and whether training can defer it."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.training = False  # set by the callback between on_train_begin and on_train_end

    def handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.training and self.signum is None:
            self.signum = signum
            logger.warning("%s: saving a checkpoint at the end of this optimizer step, then stopping "
                           "(send it again to stop at once)", name)
            return
        first = self.signum is None
        self.signum = signum
        raise Interrupted(
            f"stopped by {name} before training started: nothing was trained" if first and not self.training
            else f"stopped at once by a second {name}: a checkpoint being written is incomplete "
                 "(`resume` skips it and takes the newest complete one)",
            signum, keys=("resume",),
        )

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def callback(self):
        """A TrainerCallback: after a signal, save at the end of the current optimizer step and stop."""
        from transformers import TrainerCallback

        stop = self

        class StopOnSignal(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                stop.training = True

            def on_step_end(self, args, state, control, **kwargs):
                if stop.signum is not None:
                    control.should_save = True  # after DefaultFlowCallback: it wins over save_strategy
                    control.should_training_stop = True

            def on_train_end(self, args, state, control, **kwargs):
                stop.training = False

        return StopOnSignal()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[SignalStop]:
    """Handle SIGTERM and SIGINT inside the block (main thread only); the previous handlers return after."""
    stop = SignalStop()
    if threading.current_thread() is not threading.main_thread():  # signal.signal works only there
        yield stop
        return
    previous = {signum: signal.signal(signum, stop.handle) for signum in SIGNALS}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
