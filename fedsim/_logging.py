"""The package logger. Library code logs; only the CLI prints."""

from __future__ import annotations

import logging

logger = logging.getLogger("fedsim")
logger.addHandler(logging.NullHandler())


def enable_console_logging(level: int = logging.INFO) -> None:
    """Attach one stderr handler to the ``fedsim`` logger (idempotent).

    Called by entry points (CLI, ServerApp, ClientApp), never on import, so that
    embedding applications keep control of logging.
    """
    if any(getattr(h, "_fedsim", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s fedsim %(levelname)s: %(message)s", "%H:%M:%S"))
    handler._fedsim = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
