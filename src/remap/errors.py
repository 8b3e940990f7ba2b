"""The one exception family of remap, and the exit code each member maps to.

Every error a user can cause is a :class:`RemapError`; the CLI turns it into a message
and an exit code, the Python API lets it propagate. Nothing else escapes on purpose.

>>> try:
...     raise RulesError("unknown field 'expcet'", where="rules.yaml:3:1")
... except RemapError as e:
...     print(e, e.exit_code)
rules.yaml:3:1: unknown field 'expcet' 2
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .report.records import Report

__all__ = [
    "RemapError",
    "RulesError",
    "UsageError",
    "SourceError",
    "TargetError",
    "CheckError",
    "VerifyError",
    "InternalError",
    "describe_value",
]


class RemapError(Exception):
    """Base of every error remap raises on purpose.

    ``where`` is a breadcrumb placed before the message: a ``file:line:col`` and/or a
    context such as ``step 3 (rename)``.
    """

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None) -> None:
        self.message = message
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class RulesError(RemapError):
    """The rules file (or dict) is malformed: exit code 2."""

    exit_code = 2


class UsageError(RemapError):
    """The command line or the API was called wrongly: exit code 2."""

    exit_code = 2


class SourceError(RemapError):
    """The source checkpoint cannot be read or holds no recognisable weights: exit code 3."""

    exit_code = 3


class TargetError(RemapError):
    """The target module cannot be built or described: exit code 3."""

    exit_code = 3


class CheckError(RemapError):
    """A check of the plan failed, so the module was not touched: exit code 1.

    ``report`` holds the full account (``report.failures`` lists what failed).
    """

    exit_code = 1

    def __init__(self, message: str, *, report: Report, where: str | None = None) -> None:
        super().__init__(message, where=where)
        self.report = report


class VerifyError(CheckError):
    """The loaded target's outputs differ from the source model's: exit code 1.

    Unlike other check failures this one comes after loading: the module holds the weights.
    """


class InternalError(RemapError):
    """remap disagrees with itself or with torch: a bug to report, exit code 4."""

    exit_code = 4

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message + "\nThis is a bug in remap; please report it with the rules file.")
        self.details = details


def describe_value(value: Any) -> str:
    """How an unexpected value reads in a message.

    >>> describe_value([1, 2]), describe_value(None)
    ('a list [1, 2]', 'nothing (null)')
    """
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping"}
    if value is None:
        return "nothing (null)"
    text = f"'{value}'" if isinstance(value, str) else repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{names.get(type(value), type(value).__name__)} {text}"
