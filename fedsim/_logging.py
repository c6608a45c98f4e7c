"""The package logger and the console. Library code logs; only the CLI prints.

The console is for people: by default the server logs one line per round and the clients (Ray
actors, or SuperNodes) only their warnings; Flower's and Ray's chatter (strategy summaries, sampling
lines, the deprecation notice of ``run_simulation``, Ray's start-up lines and tips) stays off.
``fedsim run -v`` sets :data:`VERBOSE_ENV` to ``1`` (which the Ray workers inherit): then the
server also logs every client's metrics, the clients their local epochs, and Flower and Ray speak.

Escape codes go only to a terminal: fedsim's own lines have none, Flower's colours and Ray's
coloured ``(ClientAppActor pid=...)`` prefixes are switched off when stderr is not a TTY, and the
progress bar (tqdm, driven by log records that carry ``extra={"progress": (done, total)}``) is
drawn only on a TTY.
"""

from __future__ import annotations

import logging
import os
from typing import IO, Any

logger = logging.getLogger("fedsim")
logger.addHandler(logging.NullHandler())

#: Environment variable with the console verbosity: ``1`` (``-v``), ``0`` (``fedsim run``'s default);
#: unset (e.g. a deployment's SuperNodes), clients keep logging their local epochs.
VERBOSE_ENV = "FEDSIM_VERBOSE"


def verbose() -> bool | None:
    """The console verbosity from :data:`VERBOSE_ENV`: True, False, or None when unset."""
    value = os.environ.get(VERBOSE_ENV)
    return None if value is None else value not in ("", "0", "false", "no")


def set_verbose(on: bool) -> None:
    """Set the verbosity for this process and the processes it starts (Ray workers inherit it)."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"


def _isatty(stream: IO[str] | Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _ConsoleHandler(logging.StreamHandler):
    """The stderr handler :func:`enable_console_logging` attaches (its class marks it as ours).

    On a TTY, records with ``progress=(done, total)`` move a tqdm bar at the bottom of the screen,
    and every line is written above it; elsewhere it is a plain stream handler."""

    def __init__(self) -> None:
        super().__init__()
        self._bar: Any = None

    def emit(self, record: logging.LogRecord) -> None:
        progress = getattr(record, "progress", None)
        if not _isatty(self.stream):
            super().emit(record)
            return
        try:
            if progress is not None and self._bar is None:
                from tqdm import tqdm  # type: ignore[import-untyped]

                done, total = progress
                self._bar = tqdm(total=total, initial=done, unit="round", file=self.stream, leave=False, dynamic_ncols=True)
            if self._bar is None:
                super().emit(record)
                return
            self._bar.write(self.format(record), file=self.stream)
            if progress is not None:
                self._bar.n = progress[0]
                self._bar.refresh()
                if progress[0] >= progress[1]:
                    self._bar.close()
                    self._bar = None
        except (OSError, ValueError):  # a closed or broken terminal must not stop a run
            self.handleError(record)


def enable_console_logging(level: int | None = None, *, client: bool = False) -> None:
    """Attach one stderr handler to the ``fedsim`` logger (idempotent) and quiet Flower and Ray.

    Called by entry points (CLI, ServerApp, ClientApp), never on import, so that embedding
    applications keep control of logging. ``level`` defaults to the verbosity (:func:`verbose`):
    the server logs INFO (DEBUG with ``-v``: every client's metrics); a client (``client=True``)
    logs WARNING under ``fedsim run`` and INFO with ``-v`` or when the variable is unset.
    """
    loud = verbose()
    if level is None:
        if client:
            level = logging.WARNING if loud is False else logging.INFO
        else:
            level = logging.DEBUG if loud else logging.INFO
    quiet_third_party(client=client)
    if any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        return
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s fedsim %(levelname)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


class _DropDeprecation(logging.Filter):
    """Drops Flower's "DEPRECATED FEATURE" notices (fedsim tests the API it uses instead)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in str(record.msg)


def quiet_third_party(*, client: bool = False) -> None:
    """Unless ``-v``: Flower logs only warnings (only errors in a client process, where its
    "terminating actor" notices are noise) without its deprecation notices, and Ray only warnings.
    Flower's colours and Ray's coloured log prefixes are off when stderr is not a terminal.
    Does nothing when the verbosity is unset (a deployment keeps Flower's defaults)."""
    loud = verbose()
    if loud is None:
        return
    import sys

    tty = _isatty(sys.stderr)
    if not tty:
        os.environ["RAY_COLOR_PREFIX"] = "0"
    flwr = logging.getLogger("flwr")
    for h in flwr.handlers:
        if hasattr(h, "colored"):
            h.colored = tty
        h.setLevel(logging.INFO if loud else logging.ERROR if client else logging.WARNING)
    for f in [f for f in flwr.filters if isinstance(f, _DropDeprecation)]:
        flwr.removeFilter(f)
    if not loud:
        flwr.addFilter(_DropDeprecation())
    logging.getLogger("ray").setLevel(logging.INFO if loud else logging.WARNING)
