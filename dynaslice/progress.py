"""Progress of long work, on a terminal and in a log file alike.

Why one helper: training, evaluation, latency measurement and ``dynaslice profile`` each run for
minutes, and a user who redirects the output to a file (``make demo > log 2>&1``, a CI job) saw
nothing between ``[stage1] running`` and the end -- tqdm draws only on a terminal, and a bar
redrawn with carriage returns is unreadable in a file anyway. So:

- stderr is a terminal: a tqdm bar (removed when done; the caller prints its own summary line);
- otherwise: one plain line every ``interval`` seconds (default 10, or the environment variable
  ``DYNASLICE_PROGRESS_SECONDS``; 0 prints a line on every update), e.g.
  ``stage1 epoch 1/3: 120/469 steps (26%), 3.1 steps/s, ETA 1m53s, loss 0.713``.

Nothing is printed for work that ends within the first interval, so short steps (and the test
suite) stay quiet. The clock and the stream are arguments, so the behaviour is testable without
waiting (``Progress(..., clock=fake, stream=io.StringIO())``).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TextIO

from tqdm import tqdm

ENV = "DYNASLICE_PROGRESS_SECONDS"
INTERVAL = 10.0  # seconds between two log lines when stderr is not a terminal


def default_interval() -> float:
    """``DYNASLICE_PROGRESS_SECONDS`` when set (a number >= 0), else :data:`INTERVAL`.

    A value that is not a number is refused (ValueError, one line through the CLI) rather than
    silently replaced: the user asked for something specific.
    """
    text = os.environ.get(ENV)
    if text is None or not text.strip():
        return INTERVAL
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{ENV}={text!r}: expected seconds between progress lines, e.g. 10") from None
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"{ENV}={text!r}: expected a finite number of seconds >= 0")
    return value


def format_seconds(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``: short enough for a progress line."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Progress of ``total`` units of work (steps, batches, timed calls); see the module docstring.

    Use as a context manager, calling :meth:`update` after each unit::

        with Progress(len(batches), "eval x0.5", unit="batch") as bar:
            for x, y in batches:
                ...
                bar.update()

    ``loss``: an optional number shown with the line (training). ``tty``: force the terminal
    (True) or the log-line (False) form; by default it is ``stream.isatty()``. ``enabled=False``
    prints nothing (a non-main rank of a distributed job).
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        unit: str = "step",
        initial: int = 0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        interval: float | None = None,
        tty: bool | None = None,
        enabled: bool = True,
    ):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.done = self.start_done = int(initial)
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        if not enabled:
            interval = math.inf
        self.interval = default_interval() if interval is None else float(interval)
        self.enabled = enabled
        self.loss: float | None = None
        self.lines = 0  # log lines printed (the terminal form draws a bar instead)
        self.start = self.last = clock()
        is_tty = self.stream.isatty() if tty is None else tty
        self._bar = None
        if enabled and is_tty:
            self._bar = tqdm(total=self.total, initial=self.done, desc=desc, unit=unit, file=self.stream,
                             leave=False, dynamic_ncols=True)  # fmt: skip

    def update(self, n: int = 1, loss: float | None = None) -> None:
        """``n`` more units done; ``loss`` (optional) is shown with the next line."""
        self.done += n
        if loss is not None:
            self.loss = float(loss)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if loss is not None:
                self._bar.set_postfix(loss=f"{self.loss:.3f}", refresh=False)
            return
        now = self.clock()
        if now - self.last >= self.interval and self.done < self.total:
            self.last = now
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()
            self.lines += 1

    def line(self, now: float | None = None) -> str:
        """The log line for the current state: done/total, percentage, rate, ETA and the loss."""
        now = self.clock() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        new = self.done - self.start_done
        rate = new / elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        units = self.unit + ("es" if self.unit.endswith(("ch", "sh", "s", "x")) else "s")
        text = f"{self.desc}: {self.done}/{self.total} {units} ({pct:.0f}%)"
        if new > 0:
            rate_text = f"{rate:.3g} {units}/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit}"
            text += f", {rate_text}, ETA {format_seconds((self.total - self.done) / rate)}"
        else:
            text += f", {format_seconds(elapsed)} so far"
        if self.loss is not None:
            text += f", loss {self.loss:.4g}"
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@contextlib.contextmanager
def heartbeat(desc: str, *, stream: TextIO | None = None, interval: float | None = None) -> Iterator[None]:
    """A line ``DESC still running, 1m20s`` every ``interval`` seconds while the block runs, when
    ``stream`` (stderr) is not a terminal.

    Why beside :class:`Progress`: a step made of several parts, each shorter than the interval
    (the pipeline's latency step: preparing the models, then timing them), would otherwise be
    silent for longer than the interval in a log file, since every bar counts from its own start.
    On a terminal the parts' bars show already, so nothing is added there.
    """
    stream = stream if stream is not None else sys.stderr
    interval = default_interval() if interval is None else float(interval)
    if stream.isatty() or not math.isfinite(interval):
        yield
        return
    interval = interval or 1.0  # 0 asks for every update; a heartbeat has none: once a second
    stop = threading.Event()
    start = time.monotonic()

    def beat() -> None:
        while not stop.wait(interval):
            print(f"{desc} still running, {format_seconds(time.monotonic() - start)}", file=stream, flush=True)

    thread = threading.Thread(target=beat, name=f"heartbeat {desc}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
