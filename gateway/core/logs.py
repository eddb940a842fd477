"""Logging set-up shared by every credgate process: one line format on stderr, level from CREDGATE_LOG_LEVEL."""

from __future__ import annotations

import logging
import os
import sys


def configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("CREDGATE_LOG_LEVEL", "INFO"),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
