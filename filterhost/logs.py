"""Logging set-up: one line per event, queue id first, so ``grep QUEUEID`` tells the story."""

from __future__ import annotations

import logging
import sys

__all__ = ["setup_logging"]


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr as ``time filterhost[pid] LEVEL logger: message``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s filterhost[%(process)d] %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiosmtpd logs every peer and command at INFO; ours says what matters once.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
