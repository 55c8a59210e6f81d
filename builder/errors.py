"""Error types that carry an exit code, and `die()` for one-line user-facing failures."""

from __future__ import annotations

from typing import NoReturn

EXIT_OK = 0
EXIT_BUILD_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class SdkError(Exception):
    """An error shown to the user as one line (plus an optional hint), never as a traceback."""

    exit_code = EXIT_BUILD_FAILED

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def render(self) -> str:
        """Return the text shown to the user."""
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class BadInput(SdkError):
    """The user gave us something we cannot use: a profile, a flag, a path. Exit code 2."""

    exit_code = EXIT_BAD_INPUT


class BadInputs(BadInput):
    """Several input problems found at once; each is reported on its own line."""

    def __init__(self, errors: list[BadInput]) -> None:
        super().__init__(errors[0].message if errors else "invalid input", errors[0].hint if errors else None)
        self.errors = errors

    def render(self) -> str:
        return "\n".join(e.render() for e in self.errors)


class BuildFailed(SdkError):
    """A build step (docker build, export, tool run) failed. Exit code 1."""

    exit_code = EXIT_BUILD_FAILED


def die(message: str, hint: str | None = None) -> NoReturn:
    """Stop with a bad-input error (exit 2)."""
    raise BadInput(message, hint)
