"""A background engine process that never blocks Slicer's GUI.

Two reader threads turn the worker's stdout (JSON events) and stderr (human log) into items of one
queue; the GUI thread drains that queue from a Qt timer (or from ``waitForFinished`` when a script
wants to block), so every callback runs on the thread that owns the scene.

Cancelling is gentle first: a ``cancel`` file in the run folder makes the engine stop at its next
step with a checkpoint (exit code 75, resumable). If it has not stopped after a grace period the
whole process tree gets SIGTERM and then SIGKILL: PythonSlicer is a launcher whose child is the real
worker, so killing only the launcher would leave training running.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from DDM2SlicerLib import engine

IDLE = "idle"
RUNNING = "running"
CANCELLING = "cancelling"
DONE = "done"
FAILED = "failed"
CANCELLED = "cancelled"


@dataclass
class JobResult:
    """How a job ended. ``state`` is DONE, FAILED or CANCELLED (a cancelled run is resumable)."""

    state: str
    exitCode: int | None
    outputs: dict[str, str] = field(default_factory=dict)
    errorMessage: str = ""
    runDirectory: Path | None = None


class EngineJob:
    """One run of ``python -m ddm2 ...`` with live events, log lines and cancellation."""

    pollIntervalMs = 100
    cancelGraceSeconds = 10.0

    def __init__(self, command: list[str], runDirectory: str | os.PathLike, environment: dict[str, str],
                 onEvent: Callable[[dict], None] | None = None,
                 onLog: Callable[[str], None] | None = None,
                 onFinished: Callable[[JobResult], None] | None = None) -> None:
        self.command = command
        self.runDirectory = Path(runDirectory)
        self.environment = environment
        self.onEvent = onEvent
        self.onLog = onLog
        self.onFinished = onFinished
        self.state = IDLE
        self.result: JobResult | None = None
        self._process: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._openStreams = 0
        self._outputs: dict[str, str] = {}
        self._errorMessage = ""
        self._lastLogLine = ""
        self._cancelRequestedAt: float | None = None
        self._terminated = False

    # ------------------------------------------------------------------ starting and polling

    def start(self, useTimer: bool = True) -> None:
        """Start the worker. With ``useTimer`` a Qt timer drains its output; otherwise call ``poll``."""
        if self.state != IDLE:
            raise RuntimeError("a job can be started only once")
        self.runDirectory.mkdir(parents=True, exist_ok=True)
        (self.runDirectory / engine.CANCEL_FILE_NAME).unlink(missing_ok=True)
        self._process = subprocess.Popen(
            self.command, env=self.environment, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace",
            # A session of its own lets Cancel signal the launcher and the real worker together.
            start_new_session=(os.name == "posix"),
        )
        self.state = RUNNING
        for stream, name in ((self._process.stdout, "stdout"), (self._process.stderr, "stderr")):
            self._openStreams += 1
            threading.Thread(target=self._readLines, args=(stream, name), daemon=True).start()
        if useTimer:
            self._schedulePoll()

    def _readLines(self, stream, name: str) -> None:
        for line in stream:
            self._queue.put((name, line.rstrip("\r\n")))
        self._queue.put((name, None))

    def _schedulePoll(self) -> None:
        import qt  # only the GUI path needs Qt; scripts use waitForFinished

        qt.QTimer.singleShot(self.pollIntervalMs, self._onTimer)

    def _onTimer(self) -> None:
        if self.poll():
            self._schedulePoll()

    @property
    def running(self) -> bool:
        return self.state in (RUNNING, CANCELLING)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def poll(self) -> bool:
        """Hand queued lines to the callbacks; finish when the worker is gone. True while running."""
        if not self.running:
            return False
        while True:
            try:
                name, line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._openStreams -= 1
            elif name == "stdout":
                self._handleStdout(line)
            else:
                self._log(line)
        self._escalateCancel()
        if self._openStreams == 0 and self._process.poll() is not None:
            self._finish(self._process.returncode)
            return False
        return True

    def waitForFinished(self, timeout: float | None = None) -> JobResult:
        """Block (polling) until the worker ends; raise TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the DDM2 engine did not finish within {timeout} s")
            time.sleep(self.pollIntervalMs / 1000.0)
        return self.result

    def _handleStdout(self, line: str) -> None:
        event = engine.parseEvent(line)
        if event is None:
            self._log(line)  # a stray print of a library: still worth showing
            return
        if event["event"] == "done":
            self._outputs = dict(event.get("outputs", {}))
        elif event["event"] == "error":
            self._errorMessage = str(event.get("message", ""))
        if self.onEvent:
            self.onEvent(event)

    def _log(self, line: str) -> None:
        if line.strip():
            self._lastLogLine = line.strip()
        if self.onLog:
            self.onLog(line)

    # ------------------------------------------------------------------ cancelling

    def cancel(self) -> None:
        """Ask the worker to stop at its next step; kill its process tree if it does not."""
        if not self.running or self._cancelRequestedAt is not None:
            return
        self.state = CANCELLING
        self._cancelRequestedAt = time.monotonic()
        try:
            (self.runDirectory / engine.CANCEL_FILE_NAME).touch()
        except OSError:
            self._signalTree(signal.SIGTERM)  # no cancel file possible: go straight to the signal

    def _escalateCancel(self) -> None:
        if self._cancelRequestedAt is None or self._process.poll() is not None:
            return
        waited = time.monotonic() - self._cancelRequestedAt
        if waited > 2 * self.cancelGraceSeconds:
            self._signalTree(signal.SIGKILL if hasattr(signal, "SIGKILL") else signal.SIGTERM)
        elif waited > self.cancelGraceSeconds and not self._terminated:
            self._terminated = True
            self._signalTree(signal.SIGTERM)  # the engine checkpoints on SIGTERM too

    def _signalTree(self, signalNumber: int) -> None:
        """Signal the launcher and all its descendants (psutil when present, else the process group)."""
        try:
            import psutil
        except ImportError:
            psutil = None
        if psutil is not None:
            try:
                parent = psutil.Process(self._process.pid)
                processes = parent.children(recursive=True) + [parent]
            except psutil.NoSuchProcess:
                return
            for process in processes:
                try:
                    process.send_signal(signalNumber)
                except psutil.NoSuchProcess:
                    pass
        elif os.name == "posix":
            try:
                os.killpg(self._process.pid, signalNumber)
            except ProcessLookupError:
                pass
        else:
            self._process.kill()

    # ------------------------------------------------------------------ finishing

    def _finish(self, exitCode: int) -> None:
        cancelled = self._cancelRequestedAt is not None or exitCode == engine.EXIT_CANCELLED
        if exitCode == engine.EXIT_DONE and (self._outputs or not cancelled):
            # A run that printed its outputs finished before the cancel request took effect.
            state = DONE
        elif cancelled:
            state = CANCELLED
        else:
            state = FAILED
        message = ""
        if state == FAILED:
            message = self._errorMessage or self._lastLogLine or f"the DDM2 engine exited with code {exitCode}"
        self.state = state
        self.result = JobResult(state, exitCode, self._outputs, message, self.runDirectory)
        if self.onFinished:
            self.onFinished(self.result)
