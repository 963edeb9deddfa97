"""Error type of the data layer.

Every ``DataError`` carries a single-line, user-facing message that says what is
wrong (naming the file, directory or argument) and what to do about it.
"""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """One-line, user-facing message saying what is wrong and what to do."""
