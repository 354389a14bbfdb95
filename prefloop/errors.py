"""The one base class of every failure a user can cause and fix.

The CLI catches `PrefloopError` once and prints its message as one line, `prefloop <command>: error: <message>`,
with exit code 2; anything else is a bug and keeps its traceback. Messages read "where: what. Fix: how".

Each subclass also derives from the built-in type it replaces (`ValueError`, `RuntimeError`), so code that caught
those before still does.
"""

from __future__ import annotations


class PrefloopError(Exception):
    """A failure with a cause the user can fix; its message is the whole story, in one line."""


class StageFailed(PrefloopError, RuntimeError):
    """A stage ran but what it made is not usable: everything (or more than the allowed share) failed, or nothing
    came out. Records written so far are kept; the message states the counts, the first error and the fix."""


class BudgetExceeded(PrefloopError, RuntimeError):
    """An API stage reached its `max_budget_usd` (prefloop/budget.py). Like an exhausted quota it stops the stage
    cleanly: what finished is on disk, the spend is in the summary, and re-running with a higher budget resumes."""
