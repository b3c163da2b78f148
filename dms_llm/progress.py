"""Progress lines for long work: a line in the log at least every ``HEARTBEAT_SECONDS``, whether the output is a
terminal (beside tqdm's live bar) or a file (where the bar is off and nothing else would be written for minutes)."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("dms_llm")

HEARTBEAT_SECONDS = 30.0


class Heartbeat:
    """Logs ``what: done/total (elapsed)`` when :meth:`tick` is called ``HEARTBEAT_SECONDS`` or more after the start or
    the last line. ``clock`` is for tests."""

    def __init__(self, what: str, total: int | None = None, clock=time.monotonic):
        self.what, self.total, self.clock = what, total, clock
        self.start = self.last = clock()

    def due(self) -> bool:
        """Whether a line is due now; if so, the next one is due ``HEARTBEAT_SECONDS`` from now."""
        now = self.clock()
        if now - self.last < HEARTBEAT_SECONDS:
            return False
        self.last = now
        return True

    def tick(self, done: int) -> None:
        if self.due():
            of = f"/{self.total}" if self.total is not None else ""
            logger.info("%s: %d%s done (%.0f s)", self.what, done, of, self.last - self.start)


__all__ = ["HEARTBEAT_SECONDS", "Heartbeat"]
