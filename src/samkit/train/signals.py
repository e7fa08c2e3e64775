"""Stopping a training run cleanly: Ctrl-C and SIGTERM finish the step, save, and say what was kept."""

from __future__ import annotations

import signal
import threading
from typing import Any


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by SIGINT (Ctrl-C) or SIGTERM (`kill`, docker stop, a scheduler's preemption); the
    message says what was kept. `exit_code` is what `samkit train` exits with: 128 + the signal's number,
    as a shell reports a process ended by it (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum or signal.SIGINT)


def stopped_by(signum: int) -> str:
    """How a stop by `signum` is named in messages."""
    return "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"


class StopOnSignals:
    """While active, the first SIGINT (Ctrl-C) or SIGTERM only records its number in `signum` and sets
    `requested`, so the loop can finish its step and save; a second one raises TrainingInterrupted at once.
    With `at_once`, the first one raises already (for work that keeps nothing half done).

    Outside the main thread it installs nothing. A signal sent to the whole process group (a terminal's
    Ctrl-C, SLURM's SIGTERM) also reaches the DataLoader workers: they must ignore it (train/data.py's
    worker set-up), or torch ends them and the step in progress fails."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, at_once: bool = False) -> None:
        self.at_once = at_once
        self.signum = 0
        self.previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def __enter__(self) -> StopOnSignals:
        self.signum = 0
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise TrainingInterrupted(
                f"{stopped_by(signum)} again: stopped at once, without saving the step in progress", signum
            )
        self.signum = signum
        if self.at_once:
            raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            if handler is not None:
                signal.signal(s, handler)
        self.previous = {}
