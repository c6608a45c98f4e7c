"""The package logger. Library code logs; only the CLI prints."""

from __future__ import annotations

import logging

logger = logging.getLogger("fedsim")
logger.addHandler(logging.NullHandler())


class _ConsoleHandler(logging.StreamHandler):
    """The stderr handler :func:`enable_console_logging` attaches (its class marks it as ours)."""


def enable_console_logging(level: int = logging.INFO) -> None:
    """Attach one stderr handler to the ``fedsim`` logger (idempotent).

    Called by entry points (CLI, ServerApp, ClientApp), never on import, so that
    embedding applications keep control of logging.
    """
    if any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        return
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s fedsim %(levelname)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
