"""The base classes of ifjax's own errors.

Every exception class ifjax defines derives from :class:`IfjaxError`, and also from the builtin it has always
derived from (``ValueError``, ``RuntimeError``, ...), so ``except ifjax.IfjaxError`` catches the library's own
errors and ``except ValueError`` still catches what it caught before.

>>> import ifjax
>>> issubclass(ifjax.SaveFormatError, ifjax.IfjaxError), issubclass(ifjax.SaveFormatError, ValueError)
(True, True)
"""

from __future__ import annotations

__all__ = ["ArgumentTypeError", "IfjaxError"]


class IfjaxError(Exception):
  """Base class of every exception ifjax defines (each also derives from a builtin exception)."""


class ArgumentTypeError(IfjaxError, TypeError, ValueError):
  """An argument of the wrong type (a str where a number belongs, a list where a dict does, ...).

  A ``TypeError``; also a ``ValueError``, which is what these checks raised before, so callers catching
  ``ValueError`` keep working.
  """


def type_name(x) -> str:
  return type(x).__name__
