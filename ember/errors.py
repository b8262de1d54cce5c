"""Errors ember reports to its users as one clear line (the CLI prints them without a traceback)."""
from ember.ir.errors import IRError, ParseError, ShapeError, VerifyError  # noqa: F401


class EmberError(Exception):
    """A failure the user can act on; the message names the file, node or tensor at fault."""


class BackendUnavailable(EmberError):
    """A backend's device, driver or compiler is missing; the message says what and how to get it."""


class CompileError(EmberError):
    """Generated source failed to compile; carries the compiler's log."""

    def __init__(self, message: str, log: str = ""):
        self.log = log
        super().__init__(message + (f"\n{log.strip()}" if log.strip() else ""))
