"""Errors raised on bad user input.

Every error names the file (or key) and the problem, what was expected and, where one exists,
the fix. Both classes subclass the builtin the conventions ask for (ValueError /
FileNotFoundError) so callers can catch either; the CLI turns them into a one-line message and
a non-zero exit code.
"""

from __future__ import annotations

from pathlib import Path


def _where(path: str | Path | None) -> str:
    return f"{path}: " if path is not None else ""


class InputError(ValueError):
    """Input exists but is unusable (corrupt file, wrong modality, wrong shape, bad config).

    Args:
        message: what is wrong and, where possible, what was expected and how to fix it.
        path: the offending file, folder or config key; it prefixes the message.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(_where(path) + message)


class MissingInputError(FileNotFoundError):
    """A file or folder that the user named does not exist or holds nothing usable."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(_where(path) + message)
