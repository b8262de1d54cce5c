"""Errors ember reports to its users as one clear line (the CLI prints them without a traceback).

The ground floor: every floor may import it, and it imports nothing of ember. The IR's errors
live here too, each naming where it happened (file:line:col, node or tensor).
"""


class IRError(Exception):
    """Base of every error about a graph or its text."""


class ShapeError(IRError):
    """An op's inputs or attributes break its shape/dtype rule."""


class VerifyError(IRError):
    """The verifier found a node breaking a rule; the message names the node and the rule."""


class ParseError(IRError):
    """IR text that does not parse; carries the position and what was expected."""

    def __init__(self, message: str, line: int, column: int, source: str = "<ir>"):
        self.line, self.column, self.source = line, column, source
        self.bare_message = message
        super().__init__(f"{source}:{line}:{column}: {message}")



class EmberError(Exception):
    """A failure the user can act on; the message names the file, node or tensor at fault."""


class BackendUnavailable(EmberError):
    """A backend's device, driver or compiler is missing; the message says what and how to get it."""


class CompileError(EmberError):
    """Generated source failed to compile; carries the compiler's log."""

    def __init__(self, message: str, log: str = ""):
        self.log = log
        super().__init__(message + (f"\n{log.strip()}" if log.strip() else ""))
