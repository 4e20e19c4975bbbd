"""Progress of download + load: a `(message, fraction)` callback for the app, tqdm in a terminal.

The app passes `progress(message: str, fraction: float)` (fraction in [0, 1], never
decreasing) and shows it; run from a terminal, a tqdm bar on stderr shows the same. Phases
get a slice of [0, 1] with `Progress.span`, so the loader code reports 0..1 within its phase.

Usage:
    with Progress(callback) as progress:
        download = progress.span(0.0, 0.5)
        download("Downloading gemma3-4b-it: 1.2 GB", 0.3)   # -> callback(..., 0.15)
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, float], None]


class Progress:
    """Forwards `(message, fraction)` to a callback and to tqdm when stderr is a terminal.

    Args:
      callback: the app's `progress(message, fraction)`, or None.
      terminal: show a tqdm bar; default: when stderr is a TTY.
    """

    def __init__(self, callback: ProgressFn | None = None, *, terminal: bool | None = None):
        self._callback = callback
        self._lock = threading.Lock()  # the download watcher reports from its own thread
        self._fraction = 0.0
        self._message = ""
        self._bar = None
        if terminal if terminal is not None else sys.stderr.isatty():
            from tqdm import tqdm

            fmt = "{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]"
            self._bar = tqdm(total=1000, bar_format=fmt, leave=False, file=sys.stderr)

    def __call__(self, message: str, fraction: float) -> None:
        with self._lock:
            # Clamp and keep monotonic: a late report of the watcher never moves the bar back.
            self._fraction = min(1.0, max(self._fraction, fraction))
            if message != self._message:
                logger.info("%s", message)
                self._message = message
            if self._callback is not None:
                self._callback(message, self._fraction)
            if self._bar is not None:
                self._bar.set_description_str(message[:60])
                self._bar.update(round(1000 * self._fraction) - self._bar.n)

    def span(self, start: float, end: float) -> ProgressFn:
        """A `(message, fraction)` function whose 0..1 maps onto `start..end` of this one."""

        def report(message: str, fraction: float) -> None:
            self(message, start + (end - start) * min(1.0, max(0.0, fraction)))

        return report

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as download tools show them)."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} GB"
