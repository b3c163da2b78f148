"""The one base class of every error dms-llm raises for an input it cannot use, and how messages name settings.

Messages name the Python parameter at fault in backticks (`` `keep` ``, `` `overwrite=True` ``); on the command line
:func:`as_flags` shows the matching flag instead (``--keep``, ``--overwrite``), so one message serves both."""

from __future__ import annotations

import logging
import re

# settings whose dms-llm flag is not simply --name-with-dashes
FLAGS = {"target": "--target-params", "out_dir": "--out", "gguf_type": "--type"}
_PARAMETER = re.compile(r"`(\w+)(?:=([^`]*))?`")


class DMSError(Exception):
    """Bad input or a failed step, with a message that says what was wrong and what to do."""


def flag(name: str) -> str:
    """The command-line flag of a setting."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def as_flags(message: str) -> str:
    """``message`` with its parameter names (`keep`, `overwrite=True`, `mixed_precision='no'`) written as flags."""

    def replace(m: re.Match) -> str:
        name, value = m.group(1), m.group(2)
        return flag(name) if value in (None, "True") else f"{flag(name)} {value.strip(chr(39))}"

    return _PARAMETER.sub(replace, message)


class FlagFormatter(logging.Formatter):
    """A logging formatter for the command line: parameter names in messages appear as flags."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return as_flags(super().formatMessage(record))


__all__ = ["DMSError", "FlagFormatter", "as_flags", "flag"]
