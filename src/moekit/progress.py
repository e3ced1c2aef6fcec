"""Progress of long work on stderr: a tqdm bar on a terminal, otherwise one line every
EVERY_S seconds (logs and CI keep them), so no command sits silent for minutes.

`Progress` counts steps of a loop the caller owns; `heartbeat` covers work whose loop lives
elsewhere (loading, calibration, training inside a library call) with elapsed-time lines.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import IO, Iterable, Iterator, TypeVar

T = TypeVar("T")

EVERY_S = 10.0  # seconds between two log lines when stderr is not a terminal


def _stream(stream: IO[str] | None) -> IO[str]:
    return stream if stream is not None else sys.stderr


def _is_tty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """A count of done steps out of `total` (None: unknown), shown as a tqdm bar on a terminal,
    else as `moekit: DESC: N/TOTAL UNIT (P%), S s elapsed, ~R s left` every `every_s` seconds
    and once at the end (when at least one line was printed). `enabled=False` shows nothing."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", enabled: bool = True,
                 every_s: float | None = None, stream: IO[str] | None = None):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.every_s = EVERY_S if every_s is None else every_s
        self.stream = _stream(stream)
        self.done = 0
        self.note = ""
        self.start = self.last = time.monotonic()
        self.lines = 0
        self.bar = None
        if enabled and _is_tty(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=False)

    def update(self, n: int = 1, note: str = "") -> None:
        """Counts n more steps done; `note` (e.g. "loss 2.31") is shown with the count."""
        self.done += n
        self.note = note or self.note
        if not self.enabled:
            return
        if self.bar is not None:
            if note:
                self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self._line(now)

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        count = f"{self.done}/{self.total}" if self.total else str(self.done)
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        left = ""
        if self.total and 0 < self.done < self.total:
            left = f", ~{elapsed * (self.total - self.done) / self.done:.0f} s left"
        note = f", {self.note}" if self.note else ""
        print(f"moekit: {self.desc}: {count} {self.unit}{pct}{note}, {elapsed:.0f} s elapsed{left}",
              file=self.stream, flush=True)
        self.last = now
        self.lines += 1

    def close(self) -> None:
        """Removes the bar, or prints the final line when lines were printed before."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.lines:
            self._line(time.monotonic())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it",
             enabled: bool = True) -> Iterator[T]:
    """Yields the items of `items`, showing a Progress of them (total: len(items) when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, desc, unit, enabled) as bar:
        for item in items:
            yield item
            bar.update()


@contextmanager
def heartbeat(desc: str, enabled: bool = True, on_tty: bool = False, every_s: float | None = None,
              stream: IO[str] | None = None) -> Iterator[None]:
    """Within the block, prints `moekit: DESC (S s)` every `every_s` seconds from a background
    thread. On a terminal it stays quiet unless `on_tty` (the work inside shows its own bar)."""
    out = _stream(stream)
    if not enabled or (_is_tty(out) and not on_tty):
        yield
        return
    every = EVERY_S if every_s is None else every_s
    stop = threading.Event()
    start = time.monotonic()

    def beat() -> None:
        while not stop.wait(every):
            print(f"moekit: {desc} ({time.monotonic() - start:.0f} s)", file=out, flush=True)

    thread = threading.Thread(target=beat, name="moekit-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
