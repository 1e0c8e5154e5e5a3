"""The studio's one error base class. Every error a user can cause or meet derives from ``StudioError``; its message
says what was wrong and what to do, and ``exit_code`` is what ``python -m studio`` exits with:

- ``2`` (``UsageError``): what was asked cannot be done as asked - a flag, a run-config field, a model, a run folder
  or a path named wrongly. Fix the command and run it again.
- ``1`` (``StudioError``): it was tried and failed - the data file cannot be used, the run failed, an export was
  refused or failed its check, nothing fits the card.

The CLI prints ``error: <message>`` on one line (no traceback) and exits with the code; the UI shows the message.
"""
from __future__ import annotations


class StudioError(Exception):
    """Something that was tried and failed; the message says why and what to do."""

    exit_code = 1


class UsageError(StudioError):
    """A request that cannot be carried out as given (a flag, field, model or folder named wrongly)."""

    exit_code = 2
