"""Progress events, logs and cancellation.

With ``--progress json`` every event is one JSON object on one line of stdout (what the Slicer module
reads); otherwise progress is a readable line on stderr. Logs always go to stderr. Under torchrun only
rank 0 emits events and progress; the other ranks' logs carry their rank.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, TextIO

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 75  # EX_TEMPFAIL: nothing is wrong, run the same command with --resume

# Share of the whole run taken by each stage, for the overall "fraction" of progress events.
STAGE_WEIGHTS = {"stage1": 0.35, "stage2": 0.03, "stage3": 0.42, "inference": 0.15, "outputs": 0.05}


class Cancelled(Exception):
    """Raised at the next step after a cancel request; the run can be resumed."""


class CancelToken:
    """A cancel request: a file named ``cancel`` in the run directory, or SIGTERM/SIGINT.

    ``agree`` turns this process's request into the decision of all processes of a run (under torchrun:
    ``ddm2.distributed.any_rank``); then ``check`` is a collective that every rank calls equally often.
    """

    def __init__(self, run_dir: str | Path, agree: Callable[[bool], bool] = bool) -> None:
        self.file = Path(run_dir) / "cancel"
        self.agree = agree
        self._signalled = False

    @contextlib.contextmanager
    def signals_handled(self) -> Iterator[None]:
        """For the duration, SIGTERM (a scheduler's stop) and SIGINT (Ctrl-C) request a cancel; then the
        previous handlers come back, so that a Python session that ran the engine keeps its Ctrl-C.
        Python takes signals in the main thread only: elsewhere the cancel file alone works."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request(signum, frame):  # noqa: ARG001 - signal handler signature
            self._signalled = True

        previous = {number: signal.signal(number, request) for number in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for number, handler in previous.items():  # None: a handler not set from Python
                signal.signal(number, signal.SIG_DFL if handler is None else handler)

    def clear(self) -> None:
        """Forget an old request (a resumed run must not stop at once)."""
        self.file.unlink(missing_ok=True)
        self._signalled = False

    def requested(self) -> bool:
        return self._signalled or self.file.exists()

    def check(self) -> None:
        if self.agree(self.requested()):
            raise Cancelled()


class Reporter:
    """Emits progress events and logs; computes the ETA of the running stage."""

    def __init__(self, json_events: bool = False, stdout: TextIO | None = None, stderr: TextIO | None = None,
                 min_interval_s: float = 0.5, rank: int = 0) -> None:
        self.json_events = json_events
        self.rank = rank  # under torchrun: only rank 0 reports events and progress
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        # a terminal redraws one line in place; a log file (or CI) gets a full line every 10 s instead
        self.in_place = not json_events and self.stderr.isatty()
        self.min_interval_s = min_interval_s if json_events or self.in_place else max(min_interval_s, 10.0)
        self._stage_key: tuple | None = None
        self._stage_start = 0.0
        self._first_step = 0
        self._last_emit = 0.0
        self.fraction_base = 0.0  # overall fraction done before the running stage
        self.fraction_span = 0.0  # overall fraction the running stage covers

    def event(self, name: str, **fields) -> None:
        if self.json_events and self.rank == 0:
            self.stdout.write(json.dumps({"event": name, **fields}) + "\n")
            self.stdout.flush()

    def log(self, message: str) -> None:
        prefix = f"[ddm2 rank {self.rank}]" if self.rank else "[ddm2]"
        self.stderr.write(f"{prefix} {message}\n")
        self.stderr.flush()

    def warn(self, message: str) -> None:
        """Something the user should check in the results: logged, and a ``warning`` event."""
        self.log(f"warning: {message}")
        self.event("warning", message=message)

    def begin(self, stage: str, shell: str, base: float, span: float) -> None:
        """Start a stage that covers [base, base + span] of the whole run."""
        self.fraction_base, self.fraction_span = base, span
        self._stage_key = None

    def progress(self, stage: str, shell: str, step: int, total: int, loss: float | None = None) -> None:
        if self.rank:
            return
        now = time.monotonic()
        if self._stage_key != (stage, shell):
            self._stage_key = (stage, shell)
            self._stage_start, self._first_step, self._last_emit = now, step, 0.0
        finished = step >= total
        if not finished and now - self._last_emit < self.min_interval_s:
            return
        self._last_emit = now
        done_here = step - self._first_step
        eta = (now - self._stage_start) / done_here * (total - step) if done_here > 0 else None
        fraction = self.fraction_base + self.fraction_span * (step / total if total else 1.0)
        fields = {"stage": stage, "shell": shell, "step": step, "total": total, "fraction": round(fraction, 4)}
        if loss is not None:
            fields["loss"] = round(float(loss), 6)
        if eta is not None:
            fields["eta_s"] = round(eta, 1)
        if self.json_events:
            self.event("progress", **fields)
        else:
            text = f"{stage} [{shell}] {step}/{total}"
            if loss is not None:
                text += f" loss {loss:.5f}"
            if eta is not None:
                text += f" eta {eta:.0f}s"
            if self.in_place:
                self.stderr.write(f"\r[ddm2] {text}    " + ("\n" if finished else ""))
            else:
                self.stderr.write(f"[ddm2] {text}\n")
            self.stderr.flush()
